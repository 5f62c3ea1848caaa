"""Typed configuration: one dataclass per pipeline stage and per model family, named presets, CLI
overrides, validation.

- `fields.py`: what a field accepts (`Literal` choices, `Range`, `Rule`), setting a field by its
  dotted name from a CLI string or a JSON value, and checking fields.
- `model.py`: the model section, one class per model family (`GPTConfig`, `LlamaConfig` with its
  `RopeConfig`, `MoEConfig`, `BigramConfig`, `MLPConfig`), built by name with `model_config`,
  switched with `switch_arch`; the migration of the flat model section of old.
- `sections.py`: the other sections, the whole `Config` (JSON round trip), `apply_overrides` and
  `load_config`.
- `align.py`: the preference-alignment sections (pairs, reward model, DPO, Constitutional AI).
- `rl.py`: the online-RL section (PPO, GRPO).
- `presets.py`: named presets.

A leaf of the package: it imports only the standard library, `errors` and `io`.
"""

from scratchlm.config.align import CAIConfig, DPOConfig, PrefConfig, RMConfig
from scratchlm.config.fields import Range, Rule, check_fields, flatten, set_field
from scratchlm.config.model import (
    MODEL_FAMILIES,
    BigramConfig,
    GPTConfig,
    LlamaConfig,
    MLPConfig,
    ModelConfig,
    MoEConfig,
    RopeConfig,
    TransformerConfig,
    family_keys,
    migrate_flat_model,
    model_config,
    switch_arch,
)
from scratchlm.config.presets import PRESETS, get_preset
from scratchlm.config.rl import RLConfig
from scratchlm.config.sections import (
    DEFAULT_SPECIALS,
    SECTIONS,
    Config,
    DataConfig,
    SampleConfig,
    SFTConfig,
    TokenizerConfig,
    TrainConfig,
    apply_overrides,
    load_config,
    set_setting,
)

__all__ = [
    "CAIConfig", "DPOConfig", "PrefConfig", "RLConfig", "RMConfig",
    "DEFAULT_SPECIALS", "MODEL_FAMILIES", "PRESETS", "SECTIONS", "BigramConfig", "Config", "DataConfig", "GPTConfig",
    "LlamaConfig", "MLPConfig", "ModelConfig", "MoEConfig", "Range", "RopeConfig", "Rule", "SFTConfig",
    "SampleConfig", "TokenizerConfig", "TrainConfig", "TransformerConfig", "apply_overrides", "check_fields",
    "family_keys", "flatten", "get_preset", "load_config", "migrate_flat_model", "model_config", "set_field",
    "set_setting", "switch_arch",
]
