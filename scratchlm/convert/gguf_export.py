"""scratchlm checkpoints -> one GGUF file, the format llama.cpp (and Ollama, LM Studio, ...) runs.

`scratchlm convert RUN out.gguf --from scratchlm --to gguf --dtype f32|f16|q8_0` writes, with
the `gguf` package's `GGUFWriter` (llama.cpp's own Python writer):

- the architecture, as llama.cpp's "llama" (our Llama) or "gpt2" (our GPT): `context_length` (our
  block_size), `embedding_length`, `block_count`, `feed_forward_length`, `attention.head_count`;
  for llama also `attention.head_count_kv`, `attention.layer_norm_rms_epsilon`, `rope.freq_base`,
  `rope.dimension_count` (the head dim: our RoPE rotates all of it) and linear RoPE scaling (our
  static "ntk" scaling is plain RoPE with a larger base, written as that base, as in the HF
  export); for gpt2 `attention.layer_norm_epsilon`;
- the tensors under llama.cpp's names (`token_embd`, `blk.N.attn_q` or `attn_qkv`, ...,
  `output_norm`, `output`), each (out, in) as in torch; GGUF lists dims innermost first, the
  writer reverses them. A tied head writes no `output`: llama.cpp (and transformers' GGUF
  loader) then reuse `token_embd`;
- the tokenizer as `tokenizer.ggml.model = "gpt2"` (byte-level BPE): every id's token in GPT-2's
  byte alphabet, its type (normal, control for our specials, unused for the padded rows named
  `[PAD{id}]`), the merges in priority order, BOS/EOS/EOT/padding ids, and `tokenizer.ggml.pre`,
  the name llama.cpp knows our split regex by;
- a chat model's template (`tokenizer.chat_template`, see chat_template.py), EOS = <|end|>.

The one layout change is RoPE's. Our RoPE (like HF's Llama) pairs dim i of a head with dim
i + D/2 ("rotate half"); llama.cpp's "llama" pairs dims 2i and 2i+1. So the rows of wq and wk
are permuted within each head, (2, D/2) -> (D/2, 2): row i goes to 2i, row i + D/2 to 2i + 1.
q·k is unchanged (both permuted alike), v and the output projection are untouched. A wrong
permutation still gives a loadable, plausible-looking model, which is why the test compares
logits with an independent loader (transformers' GGUF reader, which undoes the permutation).
GPT-2 has no RoPE and needs no change.

Dtypes: norms, biases and learned positions stay F32 (as llama.cpp's converter keeps them);
matrices are F32, F16, or Q8_0: blocks of 32 weights along a row, each an fp16 scale
d = max|w| / 127 and 32 int8 round(w / d) (half away from zero), 34 bytes: the reference ggml
quantizer's arithmetic, so the bytes equal `gguf.quants.quantize`'s. A matrix whose rows are not a
multiple of 32 long falls back to F16. The file is written under a temporary name and renamed.

Left out: MoE models (refused with a message), YaRN scaling and sliding windows (llama.cpp's
"llama" has neither), q/k/v biases and QK-norm (llama.cpp's qwen2/qwen3 architectures would hold
them), GPT without biases or with sinusoidal positions, the K-quants, and byte and character
tokenizers (a byte tokenizer is a BPE without merges, but llama.cpp requires the merges key and
GGUF cannot store an empty array).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, RopeScalingType, TokenType

from scratchlm.checkpoint import find_checkpoint, load_model_for_inference
from scratchlm.config import GPTConfig, LlamaConfig, ModelConfig
from scratchlm.convert.chat_template import CHAT_TEMPLATE, end_token, is_chat_tokenizer
from scratchlm.convert.hf_llama import rope_to_hf
from scratchlm.errors import UserError
from scratchlm.model.llama import ffn_hidden
from scratchlm.model.lora import merge_lora
from scratchlm.model.quant import dequantize_model
from scratchlm.tokenizer import BPETokenizer, Tokenizer
from scratchlm.tokenizer.bpe import PATTERNS, token_to_str

DTYPES = ("f32", "f16", "q8_0")
FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}
# Our split regexes by llama.cpp's pre-tokenizer names. "gpt4" (cl100k's) and Llama 3's differ only
# in spelling (possessive quantifiers, `\s*[\r\n]` vs `\s*[\r\n]+`), which match the same pieces.
PRE_TOKENIZERS = {PATTERNS["gpt4"]: "llama-bpe", PATTERNS["gpt2"]: "gpt-2"}
QK8_0 = 32  # weights per Q8_0 block

# Our names -> llama.cpp's, per architecture: `layers.N.<module>.<leaf>` (Llama) or `h.N.<module>.<leaf>`
# (GPT) -> `blk.N.<theirs>.<leaf>`; whole names for the rest.
LAYER_NAMES = {
    "llama": {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
              "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
              "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down"},
    "gpt2": {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
}
TOP_NAMES = {
    "llama": {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "output.weight": "output.weight"},
    "gpt2": {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
             "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias", "lm_head.weight": "output.weight"},
}
ARCHS = {"llama": "llama", "gpt": "gpt2"}  # our model.arch -> llama.cpp's architecture
GPT_NORM_EPS = 1e-5  # our GPT's LayerNorm: PyTorch's default eps

# -- the pieces --------------------------------------------------------------------------------
def permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """wq or wk (n_head * D, C) from rotate-half pairs (i, i + D/2) to adjacent pairs (2i, 2i + 1)."""
    D = w.shape[0] // n_head
    return w.reshape(n_head, 2, D // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def quantize_q8_0(w: torch.Tensor) -> np.ndarray:
    """Q8_0 blocks of w (rows, cols), cols a multiple of 32, as bytes (rows, cols / 32 * 34): per
    block an fp16 scale d = max|x| / 127, then 32 int8 round(x / d), computed as x * (1 / d)."""
    rows, cols = w.shape
    blocks = w.detach().to(torch.float32).reshape(-1, QK8_0)  # (n_blocks, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    x = blocks * inv
    # round half away from zero without the error of floor(|x| + 0.5): frac >= 0.5 adds one
    a = x.abs()
    whole = a.floor()
    q = torch.sign(x) * (whole + torch.floor(2 * (a - whole)))
    scale = d.to(torch.float16).view(torch.uint8)  # (n_blocks, 2), little-endian fp16
    out = torch.cat([scale, q.to(torch.int8).view(torch.uint8)], dim=1)  # (n_blocks, 34)
    return out.reshape(rows, cols // QK8_0 * (QK8_0 + 2)).numpy()


def encode_tensor(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, GGMLQuantizationType]:
    """A tensor's data in the file and its GGML type: 1-D tensors F32, matrices by dtype."""
    t = t.detach().to(torch.float32).contiguous()
    if t.dim() == 1 or dtype == "f32":
        return t.numpy(), GGMLQuantizationType.F32
    if dtype == "q8_0" and t.shape[-1] % QK8_0 == 0:
        return quantize_q8_0(t), GGMLQuantizationType.Q8_0
    return t.to(torch.float16).numpy(), GGMLQuantizationType.F16


def vocab_fields(tok: Tokenizer, n_vocab: int, where: Path) -> tuple[list[str], list[int], list[str], str]:
    """(tokens, token types, merges "a b", pre-tokenizer name) for every one of the model's n_vocab rows."""
    if isinstance(tok, BPETokenizer):
        pieces = tok.vocab
        merges = [f"{a} {b}" for a, b in tok.to_hf_json()["model"]["merges"]]  # in HF's (priority) order
        pre = PRE_TOKENIZERS.get(tok.pattern)
        if pre is None:
            raise UserError(f"{where}: the tokenizer's split regex {tok.pattern!r} has no llama.cpp pre-tokenizer",
                            fix="GGUF export needs a BPE trained with the gpt2 or gpt4 pattern")
    else:  # a byte tokenizer would be a BPE without merges, but GGUF cannot hold an empty merge list
        raise UserError(f"{where}: a {tok.kind} tokenizer has no GGUF form (llama.cpp's BPE needs merges)",
                        fix="GGUF export takes models with a BPE tokenizer")
    specials = {i: s for s, i in tok.special_tokens.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i < len(pieces):
            tokens.append(token_to_str(pieces[i]))
            types.append(TokenType.NORMAL)
        elif i in specials:
            tokens.append(specials[i])
            types.append(TokenType.CONTROL)
        else:  # the embedding's padding rows: never produced, but llama.cpp wants a token per row
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    return tokens, [int(t) for t in types], merges, pre


def gguf_name(ours: str, arch: str) -> str:
    if ours in TOP_NAMES[arch]:
        return TOP_NAMES[arch][ours]
    _, i, rest = ours.split(".", 2)  # layers.N.<module>.<leaf> or h.N.<module>.<leaf>
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{i}.{LAYER_NAMES[arch][module]}.{leaf}"


def check_exportable(m: ModelConfig, where: Path) -> str:
    """llama.cpp's architecture for the model, or a refusal naming the setting it cannot compute."""
    if m.arch not in ARCHS:
        raise UserError(f"{where}: model.arch={m.arch!r} has no GGUF export (llama and gpt only)",
                        fix="export it with --to hf instead")
    arch = ARCHS[m.arch]
    if arch == "gpt2":
        refusals = [(not m.bias, "model.bias=false"), (m.pos_emb != "learned", f"model.pos_emb={m.pos_emb!r}"),
                    (m.sliding_window > 0, f"model.sliding_window={m.sliding_window}")]
    else:
        refusals = [(m.bias, "model.bias=true (q/k/v biases)"), (m.qk_norm, "model.qk_norm=true"),
                    (m.sliding_window > 0, f"model.sliding_window={m.sliding_window}"),
                    (m.rope.scaling == "yarn" and m.rope.factor != 1.0, "model.rope.scaling=yarn")]
    for bad, what in refusals:
        if bad:
            raise UserError(f"{where}: {what} has no GGUF export (llama.cpp's {arch} architecture lacks it)",
                            fix="export it with --to hf instead")
    return arch


def add_llama_fields(writer: GGUFWriter, m: LlamaConfig) -> None:
    theta, scaling = rope_to_hf(m)  # theta with "ntk" folded in; scaling only for "linear" here
    writer.add_feed_forward_length(ffn_hidden(m))
    writer.add_head_count_kv(m.n_kv_head or m.n_head)
    writer.add_layer_norm_rms_eps(m.norm_eps)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(m.n_embd // m.n_head)
    if scaling is not None:
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])


def add_gpt2_fields(writer: GGUFWriter, m: GPTConfig) -> None:
    writer.add_feed_forward_length(4 * m.n_embd)
    writer.add_layer_norm_eps(GPT_NORM_EPS)


# -- the export --------------------------------------------------------------------------------
def export_gguf(src: str | Path, dst: str | Path, *, dtype: str = "f32", adapters: str | Path | None = None) -> Path:
    """A scratchlm run or checkpoint (with LoRA `adapters` merged, if given) -> a GGUF file at dst."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: unknown GGUF dtype", fix=f"use one of {', '.join(DTYPES)}")
    src, dst = Path(src), Path(dst)
    ckpt = find_checkpoint(src)
    model, tok, cfg = load_model_for_inference(ckpt, adapters=adapters)
    m = cfg.model
    arch = check_exportable(m, ckpt)
    merge_lora(model, dequantize=True)
    dequantize_model(model)
    tokens, types, merges, pre = vocab_fields(tok, m.vocab_size, ckpt)

    writer = GGUFWriter(None, arch)
    writer.add_name(cfg.name or ckpt.name)
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_quantization_version(2)  # ggml's GGML_QNT_VERSION
    writer.add_vocab_size(m.vocab_size)
    writer.add_context_length(m.block_size)
    writer.add_embedding_length(m.n_embd)
    writer.add_block_count(m.n_layer)
    writer.add_head_count(m.n_head)
    (add_llama_fields if arch == "llama" else add_gpt2_fields)(writer, m)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    sp = tok.special_tokens
    if tok.eot_id is not None:
        writer.add_bos_token_id(tok.eot_id)
    if (end := end_token(tok)) is not None:
        writer.add_eos_token_id(sp[end])
    if is_chat_tokenizer(tok):
        writer.add_eot_token_id(sp["<|end|>"])
        writer.add_chat_template(CHAT_TEMPLATE)
    if "<|pad|>" in sp:
        writer.add_pad_token_id(sp["<|pad|>"])
    writer.add_add_bos_token(False)  # our prompts start bare (llama-bpe would otherwise prepend BOS)
    writer.add_add_eos_token(False)

    kinds: dict[str, int] = {}
    for name, p in model.named_parameters():  # a tied head appears once, as the embedding
        t = p.detach()
        if name.endswith("attention.wq.weight"):
            t = permute_rope_rows(t, m.n_head)
        elif name.endswith("attention.wk.weight"):
            t = permute_rope_rows(t, m.n_kv_head or m.n_head)
        gname = gguf_name(name, arch)
        # learned positions stay F32, as llama.cpp's own converter keeps them
        data, kind = encode_tensor(t, "f32" if gname == "position_embd.weight" else dtype)
        writer.add_tensor(gname, data, raw_dtype=kind if kind == GGMLQuantizationType.Q8_0 else None)
        kinds[kind.name] = kinds.get(kind.name, 0) + 1

    _write_atomically(writer, dst)
    mix = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    print(f"wrote {dst}: {arch}, {m.n_layer} layers, vocab {m.vocab_size} ({tok.vocab_size} tokens), {mix} tensors "
          f"({os.path.getsize(dst) / 1e6:.1f} MB), pre-tokenizer {pre}"
          f"{', chat template' if is_chat_tokenizer(tok) else ''}; run it with llama.cpp: llama-cli -m {dst}")
    return dst


def _write_atomically(writer: GGUFWriter, dst: Path) -> None:
    """Write the whole file under `.NAME.tmp-PID` (the name `io.remove_stale_temps` cleans up), fsync,
    then rename it over dst."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
