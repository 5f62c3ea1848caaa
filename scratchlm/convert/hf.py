"""HF transformers model folders <-> scratchlm checkpoints (`scratchlm convert`).

Import (`--from hf --to scratchlm`) reads a local HF folder: `config.json`, the weights
(`model.safetensors`, a sharded `model.safetensors.index.json`, or `pytorch_model.bin[.index.json]`
read with `torch.load(weights_only=True)`, which cannot run code), and the tokenizer
(`hf_tokenizer.py`, or `--tokenizer FILE`). The config is mapped field by field onto our
`ModelConfig` by the family module (`hf_gpt2.py`, `hf_llama.py`, `hf_moe.py` for Mixtral and
Qwen2/3-MoE); whatever our models cannot compute is refused by name rather than approximated.
The vocabulary is kept at HF's size (`pad_vocab_to=1`) so the logits are the same tensor. Our
model is then built on the meta device (no memory) only to list the tensors and shapes it
expects; each is looked up under its HF name, checked (a "transposed" tensor has its last two
dims swapped: a matrix, or a stack of expert matrices), cast to fp32 (what our training writes)
and saved, with any persistent buffers the family supplies (`extra_tensors`: the MoE selection
biases). The output is a checkpoint folder that `load_model_for_inference` and
`scratchlm sample --ckpt DST` load: the model, config and tokenizer, plus a step-0 training state
with an empty optimizer (there was no training here).

Export (`--from scratchlm --to hf`) goes the other way and writes a folder that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load without custom
code (a family's `finish_hf` rewrites the tensors into HF's file layout: the MoE experts one
matrix each). The exported vocab_size is our padded embedding size (e.g. 50,304 for GPT-2's
50,257 tokens); the extra rows are never produced by the tokenizer. Non-BPE tokenizers are not
exported. A chat model's `tokenizer_config.json` carries its chat template as Jinja, with <|end|>
as EOS (`chat_template.py`), so `apply_chat_template` and HF pipelines talk to it as it was trained.

Either way the destination is built under a temporary name and renamed into place, and only an
empty folder or an earlier output of this converter is replaced.
Left out: weights kept in bf16/fp16 (all is fp32), models with custom code, encoder-decoders.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import ModuleType

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scratchlm.checkpoint import find_checkpoint, load_model_for_inference, save_weights_checkpoint
from scratchlm.config import Config, TokenizerConfig
from scratchlm.convert import hf_deepseek, hf_diffllama, hf_gpt2, hf_jamba, hf_llama, hf_moe
from scratchlm.convert.chat_template import hf_tokenizer_config
from scratchlm.convert.gguf_export import export_gguf
from scratchlm.convert.hf_common import HFConfig
from scratchlm.convert.hf_tokenizer import from_tokenizer_json, load_hf_tokenizer
from scratchlm.errors import UserError
from scratchlm.io import atomic_dir, write_json
from scratchlm.model import build_model
from scratchlm.model.lora import merge_lora
from scratchlm.model.quant import dequantize_model
from scratchlm.tokenizer import BPETokenizer, Tokenizer, load_tokenizer

FORMATS = ("hf", "scratchlm", "gguf")  # gguf: written only (gguf_export.py)
FAMILIES: dict[str, ModuleType] = {
    **{arch: hf_gpt2 for arch in hf_gpt2.ARCHITECTURES},
    **{arch: hf_llama for arch in hf_llama.ARCHITECTURES},
    **{arch: hf_diffllama for arch in hf_diffllama.ARCHITECTURES},
    **{arch: hf_moe for arch in hf_moe.ARCHITECTURES},
    **{arch: hf_deepseek for arch in hf_deepseek.ARCHITECTURES},
    **{arch: hf_jamba for arch in hf_jamba.ARCHITECTURES},
}
MODEL_TYPE_ARCH = {"gpt2": "GPT2LMHeadModel", **{t: a for a, t in hf_llama.MODEL_TYPES.items()},
                   **{t: a for a, t in hf_moe.MODEL_TYPES.items()},
                   **{t: a for a, t in hf_diffllama.MODEL_TYPES.items()},
                   **{t: a for a, t in hf_deepseek.MODEL_TYPES.items()},
                   **{t: a for a, t in hf_jamba.MODEL_TYPES.items()}}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
MARK = "scratchlm_converted_from"  # in our outputs' trainer.json / config.json: safe to replace


def convert(src: str | Path, dst: str | Path, *, src_format: str, dst_format: str,
            tokenizer: str | Path | None = None, adapters: str | Path | None = None,
            dtype: str | None = None) -> Path:
    """Import (`src_format="hf"`) or export (`dst_format="hf"` or `"gguf"`, a file in `dtype`);
    returns the folder or file written. The errors name the `scratchlm convert` flags (--from, --to,
    --tokenizer, --adapters, --dtype)."""
    for flag, fmt in (("--from", src_format), ("--to", dst_format)):
        if fmt not in FORMATS:
            raise UserError(f"{flag} {fmt}: unknown format", fix=f"use one of {', '.join(FORMATS)}")
    if src_format == dst_format:
        raise UserError(f"--from {src_format} --to {dst_format}: nothing to convert",
                        fix="convert hf -> scratchlm or scratchlm -> hf")
    if "gguf" in (src_format, dst_format) and (src_format, dst_format) != ("scratchlm", "gguf"):
        raise UserError(f"--from {src_format} --to {dst_format}: GGUF is written from scratchlm checkpoints only",
                        fix="import an HF folder with --to scratchlm first, then export that with --to gguf")
    if dtype is not None and dst_format != "gguf":
        raise UserError(f"--dtype {dtype} applies to --to gguf only", fix="drop --dtype")
    if tokenizer is not None and src_format != "hf":
        raise UserError("--tokenizer applies to --from hf only", fix="an export uses the checkpoint's tokenizer")
    if adapters is not None and src_format != "scratchlm":
        raise UserError("--adapters applies to --from scratchlm only", fix="merge them into the export's source")
    if src_format == "hf":
        return import_hf(src, dst, tokenizer=tokenizer)
    if dst_format == "gguf":
        return export_gguf(src, dst, dtype=dtype or "f32", adapters=adapters)
    return export_hf(src, dst, adapters=adapters)


# -- reading an HF folder ----------------------------------------------------------------------
def read_hf_config(folder: Path) -> tuple[HFConfig, str, ModuleType]:
    """(config, architecture, family module) of an HF model folder."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder", fix="pass an HF model folder (config.json + model.safetensors)")
    path = folder / "config.json"
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder}: no config.json", fix="pass an HF model folder (config.json + weights)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(fields, dict):
        raise UserError(f"{path}: not an HF model config (a JSON object)")
    archs = fields.get("architectures") or [MODEL_TYPE_ARCH.get(fields.get("model_type"), fields.get("model_type"))]
    arch = archs[0]
    if arch not in FAMILIES:
        raise UserError(f"{path}: architecture {arch!r} is not supported",
                        fix=f"supported: {', '.join(FAMILIES)}")
    family = FAMILIES[arch]
    return HFConfig(fields, family.defaults(arch), str(path)), arch, family


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: no such weight file (named by the index)", fix="download the missing shard")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"{path}: unreadable weights ({type(e).__name__}: {first})", fix="download it again") \
            from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{path}: not a state dict of tensors", fix="save it with save_pretrained")
    return sd


def read_hf_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Every tensor of the folder (all shards), and the file named in messages."""
    found = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if found is None:
        raise UserError(f"{folder}: no weights ({', '.join(WEIGHT_FILES)})", fix="download the model's weights too")
    if not found.name.endswith(".index.json"):
        return _load_weight_file(found), found
    try:
        shards = sorted(set(json.loads(found.read_text(encoding="utf-8"))["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError, TypeError) as e:
        raise UserError(f"{found}: not a weight index ({type(e).__name__}: {e})") from None
    if not all(isinstance(s, str) for s in shards):
        raise UserError(f"{found}: not a weight index (weight_map must map tensor names to file names)")
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        sd.update(_load_weight_file(folder / shard))
    return sd, found


def _tokenizer_for_import(folder: Path, tokenizer: str | Path | None) -> Tokenizer:
    """--tokenizer (a scratchlm tokenizer file, or an HF tokenizer.json or folder), else the folder's own."""
    if tokenizer is None:
        return load_hf_tokenizer(folder)
    path = Path(tokenizer)
    if path.is_dir():
        return load_hf_tokenizer(path)
    try:
        is_hf = path.is_file() and "model" in json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        is_hf = False
    return from_tokenizer_json(path) if is_hf else load_tokenizer(path)


# -- safe destinations -------------------------------------------------------------------------
def _check_destination(src: Path, dst: Path) -> None:
    """Refuse to replace anything but an empty folder or an earlier output of this converter."""
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise UserError(f"{dst}: the destination is the source or inside it", fix="write to a new folder")
    if not dst.exists():
        return
    if not dst.is_dir():
        raise UserError(f"{dst}: exists and is not a folder", fix="choose another destination")
    if not any(dst.iterdir()):
        return
    for name in ("trainer.json", "config.json"):
        try:
            if MARK in json.loads((dst / name).read_text(encoding="utf-8")):
                return
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError):
            pass
    raise UserError(f"{dst}: exists and was not written by `scratchlm convert`; not replacing it",
                    fix="choose a new folder or delete this one")


# -- import ------------------------------------------------------------------------------------
def hf_buffers(family: ModuleType, m) -> dict[str, str]:
    """Our persistent buffers the HF model keeps too (ours -> HF name): a family's `hf_buffers`, or none."""
    return family.hf_buffers(m) if hasattr(family, "hf_buffers") else {}


def map_weights(hf: dict[str, torch.Tensor], model: torch.nn.Module, family: ModuleType, where: Path) \
        -> dict[str, torch.Tensor]:
    """HF tensors -> ours, for every parameter `model` (on the meta device) expects. Tied
    parameters appear once in named_parameters, as in our safetensors files."""
    cfg = model.config
    family.prepare_hf(hf, cfg, str(where))
    ours, missing = {}, []
    for name, p in model.named_parameters():
        hf_name, transposed = family.hf_name(name, cfg)
        t = hf.pop(hf_name, None)
        if t is None:
            missing.append(hf_name)
            continue
        want = (*p.shape[:-2], p.shape[-1], p.shape[-2]) if transposed else tuple(p.shape)  # in HF's layout
        if tuple(t.shape) != want:
            raise UserError(f"{where}: tensor {hf_name} has shape {tuple(t.shape)}, config.json implies {want}",
                            fix="the weights do not belong to this config.json")
        ours[name] = (t.transpose(-2, -1) if transposed else t).to(torch.float32).contiguous()
    for name, hf_name in hf_buffers(family, cfg).items():  # persistent buffers both sides keep
        t = hf.pop(hf_name, None)
        if t is None:
            missing.append(hf_name)
        else:
            ours[name] = t.to(torch.float32).contiguous()
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{where}: missing tensors {', '.join(missing[:3])}{more}",
                        fix="the weights are incomplete or for another architecture")
    if hf:
        extra = sorted(hf)
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise UserError(f"{where}: unexpected tensors {', '.join(extra[:3])}{more} (our model has no place for them)",
                        fix="the weights are for a different configuration than config.json")
    return ours


def import_hf(src: str | Path, dst: str | Path, *, tokenizer: str | Path | None = None) -> Path:
    """An HF model folder -> a scratchlm checkpoint folder at dst; returns dst."""
    src, dst = Path(src), Path(dst)
    hf_cfg, arch, family = read_hf_config(src)
    m = family.config_from_hf(hf_cfg, arch)
    tok = _tokenizer_for_import(src, tokenizer)
    if tok.vocab_size > m.vocab_size:
        raise UserError(f"{src}: the tokenizer has {tok.vocab_size} tokens but config.json vocab_size="
                        f"{m.vocab_size}", fix="pass the tokenizer that belongs to this model with --tokenizer")
    _check_destination(src, dst)
    hf, where = read_hf_weights(src)
    with torch.device("meta"):  # shapes and names only: no memory, no init cost
        expected = build_model(m)
    tensors = map_weights(hf, expected, family, where)
    buffers = family.extra_tensors(m)

    cfg = Config(name=src.name, out_dir=str(dst))
    cfg.model = m
    specials = list(tok.special_tokens)
    cfg.tokenizer = TokenizerConfig(kind=tok.kind, vocab_size=tok.vocab_size, special_tokens=specials,
                                    pattern=getattr(tok, "pattern_name", TokenizerConfig.pattern))
    save_weights_checkpoint(dst, {**tensors, **buffers}, cfg, tok, {MARK: f"{arch} at {src}"})
    n_params = sum(t.numel() for t in tensors.values())
    print(f"wrote {dst}: {arch} -> arch={m.arch}, {n_params / 1e6:.2f}M params in {len(tensors)} tensors (fp32), "
          f"vocab {m.vocab_size}, {tok.kind} tokenizer with {tok.vocab_size} tokens; "
          f"try `scratchlm sample --ckpt {dst} --prompt ...`")
    return dst


# -- export ------------------------------------------------------------------------------------
def export_hf(src: str | Path, dst: str | Path, adapters: str | Path | None = None) -> Path:
    """A scratchlm run or checkpoint (with LoRA `adapters` on top, if given) -> an HF model folder at
    dst; returns dst. LoRA and QLoRA models are exported merged, in fp32."""
    src, dst = Path(src), Path(dst)
    ckpt = find_checkpoint(src)
    model, tok, cfg = load_model_for_inference(ckpt, adapters=adapters)
    merge_lora(model, dequantize=True)  # HF models have no LoRA or int4 layers of ours
    dequantize_model(model)
    m = cfg.model
    families = {"gpt": hf_gpt2, "llama": hf_llama, "moe": hf_moe, "mla": hf_deepseek, "jamba": hf_jamba,
                "diff": hf_diffllama}
    if m.arch not in families:
        raise UserError(f"{ckpt}: model.arch={m.arch!r} has no HF transformers counterpart",
                        fix="export a gpt, llama, moe, mla or jamba model")
    family = families[m.arch]
    hf_cfg = {**family.config_to_hf(m, tok.eot_id), MARK: str(ckpt)}
    _check_destination(src, dst)
    tensors = {}
    for name, p in model.named_parameters():  # a tied head appears once, as the embedding; HF re-ties it
        hf_name, transposed = family.hf_name(name, m)
        t = p.detach().float()
        tensors[hf_name] = (t.transpose(-2, -1) if transposed else t).contiguous()
    for name, hf_name in hf_buffers(family, m).items():
        tensors[hf_name] = model.get_buffer(name).detach().float().contiguous()
    tensors.update(family.extra_hf_tensors(m))
    family.finish_hf(tensors, m)
    with atomic_dir(dst) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", hf_cfg)
        chat = hf_tokenizer_config(tok)  # a chat model: its template, and it stops at <|end|> too
        stops = [tok.special_tokens["<|end|>"], tok.eot_id] if chat and tok.eot_id is not None else tok.eot_id
        write_json(tmp / "generation_config.json", {"bos_token_id": tok.eot_id, "eos_token_id": stops})
        if isinstance(tok, BPETokenizer):
            tok.save_hf(tmp)
            if chat:
                fields = json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8"))
                write_json(tmp / "tokenizer_config.json", {**fields, **chat})
    arch = hf_cfg["architectures"][0]
    padded = f" (the tokenizer's {tok.vocab_size} padded up)" if m.vocab_size > tok.vocab_size else ""
    tok_note = ("tokenizer.json + tokenizer_config.json" + (" with the chat template" if chat else "")
                if isinstance(tok, BPETokenizer)
                else f"no tokenizer: the {tok.kind} tokenizer has no HF export")
    print(f"wrote {dst}: {arch}, vocab_size {m.vocab_size}{padded}, {len(tensors)} tensors, config.json, "
          f"{tok_note}; load with AutoModelForCausalLM.from_pretrained({str(dst)!r})")
    return dst
