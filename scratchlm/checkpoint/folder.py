"""A checkpoint folder: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a folder `RUN/ckpt/step_000500/` holding
- `model.safetensors`: the weights (tied tensors stored once);
- `optimizer.safetensors` + the `optimizer` entry of `trainer.json`: AdamW's moment tensors, and
  its param groups and step counts;
- `trainer.json`: step, best validation loss, the data loader's position, the RNG states
  (torch's as a byte tensor in `rng.safetensors`), the gradient scaler;
- `config.json` (the resolved run config) and `tokenizer.json`.
The folder is built under a temporary name and renamed into place, and `RUN/ckpt/latest` names the
newest complete one, so an interrupted save never leaves a checkpoint that loads half-written (the
temporary folders of a killed save are removed when the next run claims the folder, see
`scratchlm.rundir`). Pruning to `keep_last` only removes checkpoints older than the one just
written. Loading refuses weights holding NaN or inf, naming the tensor.
`RUN/ckpt/best/` is a copy of the checkpoint with the lowest validation loss. Nothing here uses
pickle: loading cannot run code.

Loading for inference builds the model, applies a LoRA checkpoint's adapter structure, and puts
adapter files (scratchlm/checkpoint/adapters.py) on top when asked; `merge_adapters` writes base +
adapters as a plain checkpoint.

A quantized checkpoint (`scratchlm quantize`) holds one more file, `quant.json`: how it was
quantized (method, format, group size, skipped layers) and each quantized layer's format
(`scratchlm.model.quant.quant_record`). Loading for inference rebuilds those QuantLinear layers
before the packed codes and scales are loaded; loading it to train further is refused (its
quantized weights are frozen buffers: train from the checkpoint it was quantized from).
"""

from __future__ import annotations

import contextlib
import errno
import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from scratchlm.checkpoint.adapters import adapter_files, adapter_tokenizer, load_adapters
from scratchlm.config import Config, SFTConfig, load_config
from scratchlm.errors import UserError
from scratchlm.io import atomic_dir, write_json, write_text
from scratchlm.model import build_model
from scratchlm.model.lora import adapt_model, merge_lora
from scratchlm.model.quant import QuantLinear, apply_quant_record, dequantize_model
from scratchlm.model.reward import RewardModel
from scratchlm.tokenizer import Tokenizer, load_tokenizer
from scratchlm.tokenizer.chat import CHAT_SPECIALS

FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json", "config.json",
         "tokenizer.json")
EXTRA = "extra.safetensors"  # optional: a stage's own resume tensors (`save_checkpoint(extra=...)`)
QUANT = "quant.json"  # optional: a quantized checkpoint's format record (`scratchlm quantize`)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    np_state = np.random.get_state()
    meta = {"python": _jsonable(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tupled(meta["python"]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, tuple | list) else x


def _tupled(x: Any) -> Any:
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def optimizer_state(opt: torch.optim.Optimizer | dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `opt.state_dict()` (or such a dict, gathered from FSDP's shards) into tensors (for
    safetensors) and JSON."""
    sd = opt if isinstance(opt, dict) else opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Load a saved state into `opt`. The moments are whole; a parameter that FSDP shards (a
    DTensor) gets its moments sharded the same way, so any world size resumes any checkpoint."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    params = [p for group in opt.param_groups for p in group["params"]]
    for pid, st in state.items():
        p = params[pid] if pid < len(params) else None
        if isinstance(p, DTensor):
            for name, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    st[name] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _save_weights(model: nn.Module | dict[str, torch.Tensor], path: Path) -> None:
    """A module's weights (shared ones once, as safetensors' save_model does), or a dict of whole
    tensors gathered from FSDP's shards, where a tied weight is one tensor under two names."""
    if isinstance(model, nn.Module):
        save_model(model, str(path))
        return
    first: dict[int, str] = {}  # each tensor under its alphabetically first name, as save_model keeps it
    for name in sorted(model):
        first.setdefault(id(model[name]), name)
    save_file({name: model[name].contiguous() for name in first.values()}, str(path))


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """safetensors reports a failed write (a full disk) as its own error type: make it the OSError
    it is, naming the checkpoint, so the CLI prints one line instead of a traceback."""
    try:
        yield
    except SafetensorError as e:
        raise OSError(errno.EIO, f"cannot write the checkpoint ({e})", str(path)) from None


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module | dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict[str, Any],
    cfg: Config,
    tokenizer: Tokenizer,
    trainer: dict[str, Any],
    *,
    keep_last: int = 2,
    scaler: torch.amp.GradScaler | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `RUN/ckpt/step_N/` atomically, point `latest` at it, drop older ones beyond keep_last.
    `scaler`: an fp16 run's gradient scaler, whose loss scale and growth count go in trainer.json.
    `extra`: tensors a stage needs to resume besides the network (an RL run's value head and the rest
    of its rollout), in `extra.safetensors` (`load_extra`)."""
    root = Path(run_dir) / "ckpt"
    final = root / f"step_{step:07d}"
    with _write_errors(final), atomic_dir(final) as tmp:
        _save_weights(model, tmp / "model.safetensors")
        opt_tensors, opt_meta = optimizer_state(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        if extra:
            save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(tmp / EXTRA))
        write_json(tmp / "trainer.json", {**trainer, "step": step, "optimizer": opt_meta, "rng": rng_meta,
                                          "scaler": scaler_state(scaler)})
        cfg.save(tmp / "config.json")
        tokenizer.save(tmp / "tokenizer.json")
    write_text(root / "latest", final.name + "\n")
    # Only this run's earlier checkpoints go: never the one just written, nor any of a later step.
    older = sorted((int(p.name[len("step_"):]), p) for p in root.glob("step_*")
                   if p.is_dir() and p.name[len("step_"):].isdigit() and int(p.name[len("step_"):]) < step)
    for _, old in older[: max(0, len(older) - (max(keep_last, 1) - 1))]:
        shutil.rmtree(old)
    return final


def mark_best(ckpt: Path) -> None:
    """Copy a checkpoint to `RUN/ckpt/best` (atomically)."""
    with atomic_dir(ckpt.parent / "best") as tmp:
        for name in FILES + ((EXTRA,) if (ckpt / EXTRA).exists() else ()):
            shutil.copy2(ckpt / name, tmp / name)


def find_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, a run folder (its latest checkpoint) or `RUN/ckpt`."""
    path = Path(path)
    for root in (path / "ckpt", path):
        latest = root / "latest"
        if latest.is_file():
            path = root / latest.read_text().strip()
            break
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint", fix="pass a run folder or a ckpt/step_* folder")
    missing = [n for n in FILES if not (path / n).is_file()]
    if missing:
        raise UserError(f"{path}: not a complete checkpoint (missing {', '.join(missing)})",
                        fix="pass another checkpoint, e.g. the run folder for its latest")
    return path


def load_config_and_tokenizer(ckpt: Path) -> tuple[Config, Tokenizer]:
    return load_config(ckpt / "config.json"), load_tokenizer(ckpt / "tokenizer.json")


def load_weights(model: nn.Module, ckpt: Path) -> None:
    """Load `model.safetensors` into `model`; a shape or name mismatch, or a tensor holding NaN or
    inf, says which tensor."""
    file = ckpt / "model.safetensors"
    rebuilt = any(isinstance(m, QuantLinear) for m in model.modules()) or \
        next(model.parameters()).dtype == torch.bfloat16  # a bf16 checkpoint's model is cast before loading
    if (ckpt / QUANT).exists() and not rebuilt:
        raise UserError(f"{ckpt}: a quantized checkpoint ({QUANT}): it loads for inference (sample, chat, eval) only",
                        fix="train from the full-precision checkpoint it was quantized from")
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except SafetensorError as e:
        raise UserError(f"{file}: unreadable or truncated ({e})", fix="use another checkpoint") from None
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"{file}: does not fit this model ({first})",
                        fix="the checkpoint's config.json must match the model settings") from None
    if missing or unexpected:
        names = ", ".join(sorted(missing or unexpected)[:3])
        raise UserError(f"{file}: {'missing' if missing else 'unexpected'} tensors {names}",
                        fix="the checkpoint was made by a different model configuration")
    for name, t in model.state_dict().items():  # NaN/inf weights would sample blank text without a word
        t = t.float() if t.is_floating_point() and t.element_size() == 1 else t  # fp8 codes: no isfinite of their own
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"{file}: tensor {name} holds {bad} NaN/inf value(s) of {t.numel()}",
                            fix="the run diverged before this save; use an earlier checkpoint (RUN/ckpt/step_*)")


def scaler_state(scaler: torch.amp.GradScaler | None) -> dict[str, Any] | None:
    """A gradient scaler's state as JSON (loss scale, growth/backoff factors, growth interval and
    the count of good steps toward the next growth); None without an enabled scaler."""
    return scaler.state_dict() if scaler is not None and scaler.is_enabled() else None


def load_trainer_state(ckpt: Path, optimizer: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
    """Restore optimizer, RNG and (fp16) gradient-scaler states; return trainer.json (step, loader
    state, ...)."""
    file = ckpt / "trainer.json"  # the file being read, named in the error
    try:
        trainer = json.loads(file.read_text())
        opt_meta, rng_meta = trainer["optimizer"], trainer["rng"]
        file = ckpt / "optimizer.safetensors"
        load_optimizer_state(optimizer, load_file(str(file)), opt_meta)
        file = ckpt / "rng.safetensors"
        set_rng_state(load_file(str(file)), rng_meta)
        file = ckpt / "trainer.json"
        if scaler is not None and scaler.is_enabled():
            if trainer.get("scaler"):
                scaler.load_state_dict(trainer["scaler"])
            else:  # saved by a run without fp16, or before scalers were saved
                print(f"note: {ckpt} holds no gradient-scaler state; the fp16 loss scale starts afresh", flush=True)
    except (json.JSONDecodeError, SafetensorError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{file}: corrupt training state ({type(e).__name__}: {e})",
                        fix="resume from another checkpoint") from None
    return trainer


def load_extra(ckpt: Path) -> dict[str, torch.Tensor]:
    """The tensors `save_checkpoint(extra=...)` wrote; empty when the checkpoint holds none."""
    file = ckpt / EXTRA
    if not file.exists():
        return {}
    try:
        return load_file(str(file))
    except SafetensorError as e:
        raise UserError(f"{file}: corrupt ({e})", fix="resume from another checkpoint") from None


HEADS = {"lm": "a language model (a policy: sample, chat, sft, dpo)", "reward": "a reward model (scratchlm rm)",
         "classifier": "a classifier (scratchlm classify)"}


def checkpoint_head(ckpt: Path) -> str:
    """What the weights end in, read from the tensor names and the head's shape without loading them:
    lm (a vocabulary head), reward (`RewardModel`: one score, with or without its likelihood term) or
    classifier (K class logits)."""
    file = ckpt / "model.safetensors"
    try:
        with safe_open(str(file), framework="pt") as f:
            if "head.weight" not in f.keys():  # noqa: SIM118 - a safetensors handle has no __contains__
                return "lm"
            return "reward" if f.get_slice("head.weight").get_shape()[0] == 1 else "classifier"
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file}: unreadable or truncated ({e})", fix="use another checkpoint") from None


def require_head(ckpt: Path, head: str) -> None:
    """Refuse a checkpoint of another kind (a reward model passed as a policy, or the reverse), naming both."""
    found = checkpoint_head(ckpt)
    if found != head:
        raise UserError(f"{ckpt}: holds {HEADS[found]}, not {HEADS[head]}",
                        fix="pass a checkpoint of the right kind")


def load_reward_model(path: str | Path, device: str = "cpu") -> tuple[RewardModel, Tokenizer, Config]:
    """A trained reward model from a run or checkpoint folder: (model in eval mode, tokenizer, config)."""
    ckpt = find_checkpoint(path)
    require_head(ckpt, "reward")
    cfg, tok = load_config_and_tokenizer(ckpt)
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:  # readable: require_head opened it
        likelihood = "likelihood_scale" in f.keys()  # noqa: SIM118 - the tensors say whether it has the term
    start = tok.special_tokens.get("<|assistant|>")
    if likelihood and start is None:
        raise UserError(f"{ckpt}: a reward model with the likelihood term, but its tokenizer has no <|assistant|>",
                        fix="use a reward model trained by `scratchlm rm train` with its own tokenizer.json")
    model = RewardModel(build_model(cfg.model), start if likelihood else None)
    if cfg.sft.lora_r > 0:
        adapt_model(model.body, cfg)
    load_weights(model, ckpt)
    return model.to(device).eval(), tok, cfg


def read_quant_record(ckpt: Path) -> dict[str, Any] | None:
    """A quantized checkpoint's `quant.json` (method, format, group_size, skipped, layers), or None."""
    file = Path(ckpt) / QUANT
    if not file.exists():
        return None
    try:
        record = json.loads(file.read_text())
        if not isinstance(record.get("layers"), dict):
            raise ValueError("no 'layers' table")
    except (json.JSONDecodeError, ValueError, AttributeError) as e:
        raise UserError(f"{file}: corrupt quantization record ({e})", fix="quantize the checkpoint again") from None
    return record


def load_model_for_inference(path: str | Path, device: str = "cpu", adapters: str | Path | None = None
                             ) -> tuple[nn.Module, Tokenizer, Config]:
    """A trained model ready to sample from or evaluate: (model in eval mode, tokenizer, config).

    `adapters` (an sft run's `adapters.safetensors`, or the run folder) are applied on top of the
    checkpoint at `path`, which must be the base they were trained from (checked by fingerprint):
    the result is the fine-tuned model, with the fine-tune's tokenizer."""
    ckpt = find_checkpoint(path)
    require_head(ckpt, "lm")
    cfg, tok = load_config_and_tokenizer(ckpt)
    if cfg.model.vocab_size < tok.vocab_size:
        raise UserError(f"{ckpt}: model vocab {cfg.model.vocab_size} is smaller than its tokenizer's "
                        f"{tok.vocab_size}", fix="the checkpoint's tokenizer.json was replaced; restore it")
    model = build_model(cfg.model)
    if cfg.sft.lora_r > 0:  # a LoRA fine-tune: rebuild the adapter (and quantized base) structure it was saved with
        if adapters is not None:
            raise UserError(f"{ckpt}: a LoRA fine-tune already, not a base model for --adapters",
                            fix="pass the base the adapters were trained from as --ckpt, or drop --adapters")
        adapt_model(model, cfg)
    quant = read_quant_record(ckpt)
    if quant is not None:  # a quantized checkpoint: rebuild its QuantLinear layers, then load their buffers
        if adapters is not None:
            raise UserError(f"{ckpt}: a quantized checkpoint, not a base for --adapters",
                            fix="apply the adapters to the full-precision base, then quantize the merged model")
        if quant.get("dtype") == "bfloat16":
            model.to(torch.bfloat16)
        apply_quant_record(model, quant["layers"], str(ckpt / QUANT))
    load_weights(model, ckpt)
    if adapters is not None:
        record = load_adapters(model, adapters)
        tok = adapter_tokenizer(tok, record, adapters)
        cfg.model.vocab_size = model.config.vocab_size
    return model.to(device).eval(), tok, cfg


def load_policy(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Tokenizer, Config]:
    """A language model to train further (the reward model's trunk, DPO's policy): as
    `load_model_for_inference`, with a LoRA fine-tune's adapters merged into plain (dequantized)
    weights, so the next stage starts from one ordinary model. Returned in train mode."""
    model, tok, cfg = load_model_for_inference(path, device)
    if cfg.sft.lora_r > 0:
        merge_lora(model, dequantize=True)
        cfg.sft = SFTConfig()
    return model.requires_grad_(True).train(), tok, cfg


def load_chat_policy(path: str | Path, device: str | torch.device = "cpu", setting: str = "base"
                     ) -> tuple[nn.Module, Tokenizer, Config]:
    """`load_policy` for the stages after SFT (reward model, DPO, RL): `path` (the value of `setting`)
    must be set and hold a chat model, one whose tokenizer has the chat tokens an SFT run adds."""
    if not path:
        raise UserError(f"{setting} is not set", fix="pass --base RUN (an SFT run or checkpoint folder)")
    policy, tok, cfg = load_policy(path, str(device))
    missing = [s for s in CHAT_SPECIALS if s not in tok.special_tokens]
    if missing:
        raise UserError(f"{path}: its tokenizer lacks the chat tokens {', '.join(missing)}: not an SFT run",
                        fix="pass a run of `scratchlm sft` as --base")
    return policy, tok, cfg


def save_weights_checkpoint(dst: Path, weights: nn.Module | dict[str, torch.Tensor], cfg: Config, tok: Tokenizer,
                            note: dict[str, Any], quant: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder at `dst` (atomically) that holds weights but no training history:
    an empty optimizer, step 0, and `note` in trainer.json (where the weights came from).
    `weights`: a model, or its tensors by name (an import that never built one). `quant`: a quantized
    model's record, written as quant.json (it must hold `layers`, see `read_quant_record`)."""
    rng_tensors, rng_meta = rng_state()
    with atomic_dir(dst) as tmp:
        if isinstance(weights, nn.Module):
            save_model(weights, str(tmp / "model.safetensors"))
        else:
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file({}, str(tmp / "optimizer.safetensors"))  # no training happened here: no moments
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        write_json(tmp / "trainer.json", {"step": 0, "best_val_loss": None, **note,
                                          "optimizer": {"param_groups": [], "scalars": {}}, "rng": rng_meta})
        cfg.save(tmp / "config.json")
        tok.save(tmp / "tokenizer.json")
        if quant is not None:
            write_json(tmp / QUANT, quant)
    return dst


def merge_adapters(base: str | Path, adapters: str | Path, out: str | Path) -> Path:
    """`scratchlm merge`: base + adapters -> a plain checkpoint folder at `out` (no LoRA layers, no
    quantized ones: a QLoRA base is dequantized and the update added in fp32), loadable and
    fine-tunable like any other. Returns `out`."""
    model, tok, cfg = load_model_for_inference(base, adapters=adapters)
    n = merge_lora(model, dequantize=True)
    dequantize_model(model)  # layers QLoRA quantized without wrapping them
    cfg.sft, cfg.out_dir = SFTConfig(), str(out)
    _, record_path = adapter_files(adapters)
    save_weights_checkpoint(Path(out), model, cfg, tok, {"merged_from": {"base": str(base),
                                                                         "adapters": str(record_path)}})
    print(f"merged {n} LoRA layers into {base} -> {out} (a plain checkpoint: sample with --ckpt {out})")
    return Path(out)
