"""The convert stage: HF transformers model folders <-> scratchlm checkpoints, and GGUF files.

`import_hf` reads GPT-2, Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE and Qwen3-MoE folders into
our GPT / Llama / MoE;
`export_hf` writes our checkpoints as folders `AutoModelForCausalLM` loads, `export_gguf` as the one
file llama.cpp runs; `convert` picks one by the formats (`scratchlm convert`). See `hf.py` for the
flow, the family modules for the field mappings, and `gguf_export.py` for GGUF.
"""

from __future__ import annotations

from scratchlm.convert.gguf_export import export_gguf
from scratchlm.convert.hf import convert, export_hf, import_hf

__all__ = ["convert", "export_gguf", "export_hf", "import_hf"]
