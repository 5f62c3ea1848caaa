"""LoRA adapter files: the trained part of a LoRA fine-tune, saved apart from the base it was trained on.

`save_adapters` writes one file plus its record: `RUN/adapters.safetensors` holds A and B of each
wrapped layer and the token rows that differ from the base (the trained ones, and any the fine-tune
appended when the base tokenizer lacked the chat specials); `RUN/adapters.json` holds r, alpha,
dropout, the wrapped layer names, the base's quantization, the base's path and fingerprint
(`base_fingerprint`: a SHA-256 of its state dict), the tokens added to its tokenizer, and the
tensors file's own SHA-256. `load_adapters` turns a fresh base into exactly the fine-tuned model
(same structure, same numbers) and refuses another base; `adapter_tokenizer` gives its tokenizer;
`scratchlm.checkpoint.merge_adapters` writes the merged weights as a plain checkpoint
(`scratchlm merge`).

The LoRA layers themselves (wrapping, merging, the token rows that train) are model parts, in
scratchlm/model/lora.py; this module only writes and reads them.

Left out: several adapters in one file, and loading adapters onto a base that is already wrapped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from scratchlm.errors import UserError
from scratchlm.io import atomic_open, write_json
from scratchlm.model import resize_embeddings
from scratchlm.model.lora import adapt_model, lora_layers, lora_state_dict, token_tables, wrap_layers
from scratchlm.model.quant import QuantLinear
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.base import with_specials

ADAPTER_TENSORS = "adapters.safetensors"  # in an sft run folder, beside its record adapters.json
FORMAT = "scratchlm-lora"
VERSION = 2  # 1 was a folder of adapters.safetensors + adapters.json, without the base's fingerprint


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a base model's state dict (names, dtypes, shapes, bytes). Take it right after
    loading the base, before resizing, quantizing or applying LoRA; `save_adapters` records it and
    `load_adapters` refuses a base whose fingerprint differs."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _quantized_layers(model: nn.Module) -> dict[str, list[int]]:
    """Name (as in the unwrapped base) -> [bits, group_size] of every QuantLinear."""
    wrapped = {f"{n}.base": n for n, _ in lora_layers(model)}
    return {wrapped.get(n, n): [m.bits, m.group_size] for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def adapter_files(path: str | Path) -> tuple[Path, Path]:
    """(tensors, record) for adapters named by `RUN`, `RUN/adapters.safetensors` or `RUN/adapters.json`."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_TENSORS
    if path.suffix not in (".safetensors", ".json"):
        raise UserError(f"{path}: adapters are a .safetensors file with a .json record beside it",
                        fix=f"pass e.g. RUN/{ADAPTER_TENSORS}")
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def save_adapters(
    model: nn.Module, path: str | Path, *, base: str = "", base_fingerprint: str | None = None,
    base_vocab_size: int | None = None, added_tokens: dict[str, int] | None = None, meta: dict[str, Any] | None = None,
) -> Path:
    """Write the adapters as `path` (a `.safetensors` file) and their record beside it (`.json`).

    Tensors: every `<layer>.lora_A` / `.lora_B`, and `tokens.<table>` (k, C): the rows `token_ids`
    of each token table that differ from the base's, i.e. those trained (`train_token_rows`) and
    those the fine-tune appended (ids >= `base_vocab_size`, when the tokenizer gained specials).
    Record: format, r, alpha, dropout, targets (the wrapped layer names), quant_bits and the
    quantized layers, token_ids, vocab_size, base_vocab_size, added_tokens ({name: id} the base
    tokenizer lacked), base (where it was), base_fingerprint, the tensors file's SHA-256 (so a
    record never pairs with another run's tensors), and `meta`. Each file is written atomically,
    the tensors first. Returns the tensors path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: the adapters file must end in .safetensors")
    layers = lora_layers(model)
    if not layers:
        raise UserError("the model has no LoRA layers to save", fix="apply_lora or prepare_qlora first")
    settings = {(m.r, m.alpha, m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0) for _, m in layers}
    if len(settings) > 1:
        raise UserError(f"LoRA layers with different settings {sorted(settings)} cannot be saved as one adapter")
    if any(m.merged for _, m in layers):
        raise UserError("cannot save adapters while merged", fix="unmerge() the LoRA layers first")
    tables = token_tables(model)
    vocab = tables[0][1].size(0)
    base_vocab = vocab if base_vocab_size is None else base_vocab_size
    trained = {int(i) for _, p in tables for i in getattr(p, "trainable_rows", [])}
    token_ids = sorted(trained | set(range(base_vocab, vocab)))
    tensors = {k: v.cpu().contiguous() for k, v in lora_state_dict(model).items()}
    if token_ids:
        tensors.update({f"tokens.{n}": p.detach()[token_ids].cpu().contiguous() for n, p in tables})
    blob = safetensors_save(tensors)
    quantized = _quantized_layers(model)
    r, alpha, dropout = next(iter(settings))
    record = {"format": FORMAT, "version": VERSION, "r": r, "alpha": alpha, "dropout": dropout,
              "targets": [n for n, _ in layers], "quant_bits": max((b for b, _ in quantized.values()), default=0),
              "quantized": quantized, "token_ids": token_ids, "vocab_size": vocab, "base_vocab_size": base_vocab,
              "added_tokens": dict(added_tokens or {}), "base": base, "base_fingerprint": base_fingerprint,
              "tensors_sha256": hashlib.sha256(blob).hexdigest(), "meta": dict(meta or {})}
    tensors_path, record_path = adapter_files(path)
    with atomic_open(tensors_path, "wb") as f:
        f.write(blob)
    write_json(record_path, record)
    return tensors_path


def read_adapters(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(record, tensors, tensors path) of saved adapters, checked to belong together."""
    tensors_path, record_path = adapter_files(path)
    missing = [f.name for f in (tensors_path, record_path) if not f.is_file()]
    if missing:
        raise UserError(f"{tensors_path}: no LoRA adapters here (missing {', '.join(missing)})",
                        fix="pass the adapters.safetensors an `sft` run with --sft.lora_r wrote")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        blob = tensors_path.read_bytes()
        tensors = safetensors_load(blob)
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as e:
        raise UserError(f"{tensors_path}: corrupt adapter files ({type(e).__name__}: {e})",
                        fix="save the adapters again") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != VERSION:
        raise UserError(f"{record_path}: not a {FORMAT} v{VERSION} adapter record",
                        fix="save the adapters again with this version")
    fields = ("r", "alpha", "dropout", "targets", "quantized", "token_ids", "vocab_size", "base_vocab_size",
              "added_tokens", "base_fingerprint", "tensors_sha256", "meta")
    absent = [k for k in fields if k not in record]
    if absent:
        raise UserError(f"{record_path}: adapter record lacks {', '.join(absent)}", fix="save the adapters again")
    if hashlib.sha256(blob).hexdigest() != record["tensors_sha256"]:
        raise UserError(f"{tensors_path}: these tensors are not the ones {record_path.name} describes (SHA-256 "
                        "mismatch)", fix="keep the two files of one save together")
    return record, tensors, tensors_path


def load_adapters(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Turn a freshly loaded base `model` into the fine-tuned one, in place: check the base's
    fingerprint, grow its token tables to the fine-tune's vocabulary, put back the saved token
    rows, quantize the layers the adapters were trained on quantized (QLoRA), wrap the targets and
    load A and B. Returns the record; `adapter_tokenizer` gives the matching tokenizer."""
    record, tensors, file = read_adapters(path)
    if lora_layers(model):
        raise UserError("the model already has LoRA layers", fix="load adapters onto a fresh base model")
    expected_fp = record["base_fingerprint"]
    if expected_fp and base_fingerprint(model) != expected_fp:
        raise UserError(f"{file}: these adapters were trained on another base model (fingerprint mismatch)",
                        fix=f"pass the base they were trained from ({record.get('base') or 'see adapters.json'})")

    def module(name: str) -> nn.Module:
        try:
            return model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{file}: this model has no layer {name!r}",
                            fix="the adapters were trained on a different architecture") from None

    tables = token_tables(model)
    if tables[0][1].size(0) != record["base_vocab_size"]:
        raise UserError(f"{file}: the base has {tables[0][1].size(0)} token rows, the adapters were trained on "
                        f"{record['base_vocab_size']}", fix="pass the base they were trained from")
    if record["vocab_size"] > record["base_vocab_size"]:
        resize_embeddings(model, record["vocab_size"])
        tables = token_tables(model)
    for name, (bits, group_size) in record["quantized"].items():  # reproduce the QLoRA base first
        m = module(name)
        if isinstance(m, QuantLinear):
            if (m.bits, m.group_size) != (bits, group_size):
                raise UserError(f"{file}: layer {name} is quantized as {m.bits}-bit/{m.group_size}, the adapters "
                                f"were trained on {bits}-bit/{group_size}", fix="load onto the unquantized base")
        elif isinstance(m, nn.Linear):
            model.set_submodule(name, QuantLinear.from_linear(m, bits, group_size))
        else:
            raise UserError(f"{file}: layer {name} is a {type(m).__name__}, not a linear layer")
    for name in record["targets"]:
        if not isinstance(module(name), nn.Linear | QuantLinear):
            raise UserError(f"{file}: layer {name} is a {type(module(name)).__name__}, not a linear layer")
    wrap_layers(model, record["targets"], record["r"], record["alpha"], record["dropout"])

    params = dict(model.named_parameters())
    wanted = {k: v.shape for k, v in lora_state_dict(model).items()}
    if record["token_ids"]:
        wanted.update({f"tokens.{n}": (len(record["token_ids"]), p.size(1)) for n, p in tables})
    for key in sorted(wanted.keys() | tensors.keys()):
        if key not in tensors:
            raise UserError(f"{file}: missing tensor {key}", fix="the adapter file is incomplete; save it again")
        if key not in wanted:
            raise UserError(f"{file}: unexpected tensor {key}", fix="the adapters were trained on another model")
        if tensors[key].shape != wanted[key]:
            raise UserError(f"{file}: tensor {key} has shape {tuple(tensors[key].shape)}, this model needs "
                            f"{tuple(wanted[key])}", fix="the adapters were trained on a different model size")
    with torch.no_grad():
        for key in wanted:
            if key.startswith("tokens."):
                params[key[len("tokens."):]][record["token_ids"]] = tensors[key].to(params[key[len("tokens."):]])
            else:
                params[key].copy_(tensors[key])
    return record


def adapter_tokenizer(tok: Tokenizer, record: dict[str, Any], where: str | Path = "adapters") -> Tokenizer:
    """The base tokenizer with the special tokens the fine-tune added (`record["added_tokens"]`)."""
    added = record["added_tokens"]
    if added:
        tok = with_specials(tok, list(added))
    wrong = {n: i for n, i in added.items() if tok.special_tokens.get(n) != i}
    if wrong or tok.vocab_size > record["vocab_size"]:
        raise UserError(f"{where}: the base tokenizer does not give the fine-tune's token ids {wrong or ''}",
                        fix="pass the base checkpoint the adapters were trained from")
    return tok


def adapt_beside_reference(policy: nn.Module, cfg: Any, tok: Tokenizer, stage: str
                           ) -> Callable[[Path, str | Path], None] | None:
    """LoRA (`sft.lora_r > 0`) on a policy whose reference is the policy itself with its adapters
    disabled (DPO, RL): only the adapters train (`sft.lora_embedding` is set to none, since trained
    token rows would change the reference too). Returns a function that saves the adapters into a run
    folder against `base`, or None without LoRA."""
    if cfg.sft.lora_r <= 0:
        return None
    if cfg.sft.lora_embedding != "none":
        print(f"{stage} with LoRA trains the adapters only (sft.lora_embedding=none): the reference is the policy "
              "with its adapters disabled, which trained token rows would change")
        cfg.sft.lora_embedding = "none"
    fingerprint, vocab = base_fingerprint(policy), policy.config.vocab_size
    wrapped = adapt_model(policy, cfg, tok)
    print(f"LoRA r={cfg.sft.lora_r} on {len(wrapped)} layers; the reference is the policy with them disabled")

    def save(run_dir: Path, base: str | Path) -> None:
        save_adapters(policy, run_dir / ADAPTER_TENSORS, base=str(base), base_fingerprint=fingerprint,
                      base_vocab_size=vocab)

    return save
