"""The checkpoint layer: the one owner of the on-disk format of weights, config, tokenizer, optimizer and
adapters.

- `folder.py`: a checkpoint folder (`RUN/ckpt/step_N/`): saving a training run's state atomically,
  finding and resuming it, loading a model for inference, writing weights-only checkpoints and merging
  adapters into one;
- `adapters.py`: LoRA adapter files (`RUN/adapters.safetensors` + `adapters.json`), checked against
  the base they were trained on.

Layering: above the model layer (it builds models, applies a LoRA checkpoint's adapter structure,
merges adapters) and below training, inference and every stage, which all save and load through it.
The names below are the layer's surface: `from scratchlm.checkpoint import ...`.
"""

from scratchlm.checkpoint.adapters import (
    ADAPTER_TENSORS,
    adapter_files,
    adapter_tokenizer,
    base_fingerprint,
    load_adapters,
    read_adapters,
    save_adapters,
)
from scratchlm.checkpoint.folder import (
    FILES,
    HEADS,
    checkpoint_head,
    find_checkpoint,
    load_chat_policy,
    load_config_and_tokenizer,
    load_extra,
    load_model_for_inference,
    load_policy,
    load_reward_model,
    load_trainer_state,
    load_weights,
    mark_best,
    merge_adapters,
    require_head,
    save_checkpoint,
    save_weights_checkpoint,
)

__all__ = [
    "ADAPTER_TENSORS", "FILES", "HEADS", "adapter_files", "adapter_tokenizer", "base_fingerprint", "checkpoint_head",
    "find_checkpoint", "load_adapters", "load_chat_policy", "load_config_and_tokenizer", "load_extra",
    "load_model_for_inference", "load_policy", "load_reward_model",
    "load_trainer_state", "load_weights", "mark_best", "merge_adapters", "read_adapters", "require_head",
    "save_adapters", "save_checkpoint", "save_weights_checkpoint",
]
