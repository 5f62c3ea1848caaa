"""The convert stage: HF transformers model folders <-> scratchlm checkpoints.

`import_hf` reads GPT-2, Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE and Qwen3-MoE folders into
our GPT / Llama / MoE;
`export_hf` writes our checkpoints as folders `AutoModelForCausalLM` loads; `convert` picks
one by the formats (`scratchlm convert`). See `hf.py` for the flow and the family modules for the field mappings.
"""

from __future__ import annotations

from scratchlm.convert.hf import convert, export_hf, import_hf

__all__ = ["convert", "export_hf", "import_hf"]
