"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a folder `RUN/ckpt/step_000500/` holding
- `model.safetensors`: the weights (tied tensors stored once);
- `optimizer.safetensors` + the `optimizer` entry of `trainer.json`: AdamW's moment tensors, and
  its param groups and step counts;
- `trainer.json`: step, best validation loss, the data loader's position, the RNG states
  (torch's as a byte tensor in `rng.safetensors`), the gradient scaler;
- `config.json` (the resolved run config) and `tokenizer.json`.
The folder is built under a temporary name and renamed into place, and `RUN/ckpt/latest` names the
newest complete one, so an interrupted save never leaves a checkpoint that loads half-written.
`RUN/ckpt/best/` is a copy of the checkpoint with the lowest validation loss. Nothing here uses
pickle: loading cannot run code.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from scratchlm.config import Config, load_config
from scratchlm.errors import UserError
from scratchlm.io import atomic_dir, write_json, write_text
from scratchlm.tokenizer import Tokenizer, load_tokenizer

FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json", "config.json",
         "tokenizer.json")


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


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `opt.state_dict()` into tensors (for safetensors) and JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    tokenizer: Tokenizer,
    trainer: dict[str, Any],
    *,
    keep_last: int = 2,
) -> Path:
    """Write `RUN/ckpt/step_N/` atomically, point `latest` at it, drop older ones beyond keep_last."""
    root = Path(run_dir) / "ckpt"
    final = root / f"step_{step:07d}"
    with atomic_dir(final) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = optimizer_state(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        write_json(tmp / "trainer.json", {**trainer, "step": step, "optimizer": opt_meta, "rng": rng_meta})
        cfg.save(tmp / "config.json")
        tokenizer.save(tmp / "tokenizer.json")
    write_text(root / "latest", final.name + "\n")
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[: max(0, len(steps) - max(keep_last, 1))]:
        shutil.rmtree(old)
    return final


def mark_best(ckpt: Path) -> None:
    """Copy a checkpoint to `RUN/ckpt/best` (atomically)."""
    with atomic_dir(ckpt.parent / "best") as tmp:
        for name in FILES:
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
    """Load `model.safetensors` into `model`; a shape or name mismatch says which tensor."""
    file = ckpt / "model.safetensors"
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


def load_trainer_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore optimizer and RNG states; return trainer.json (step, loader state, ...)."""
    try:
        trainer = json.loads((ckpt / "trainer.json").read_text())
        load_optimizer_state(optimizer, load_file(str(ckpt / "optimizer.safetensors")), trainer["optimizer"])
        set_rng_state(load_file(str(ckpt / "rng.safetensors")), trainer["rng"])
    except (json.JSONDecodeError, SafetensorError, KeyError, ValueError) as e:
        raise UserError(f"{ckpt}: corrupt training state ({type(e).__name__}: {e})",
                        fix="resume from another checkpoint") from None
    return trainer


def load_model_for_inference(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Tokenizer, Config]:
    """A trained model ready to sample from or evaluate: (model in eval mode, tokenizer, config)."""
    from scratchlm.model import build_model

    ckpt = find_checkpoint(path)
    cfg, tok = load_config_and_tokenizer(ckpt)
    if cfg.model.vocab_size < tok.vocab_size:
        raise UserError(f"{ckpt}: model vocab {cfg.model.vocab_size} is smaller than its tokenizer's "
                        f"{tok.vocab_size}", fix="the checkpoint's tokenizer.json was replaced; restore it")
    model = build_model(cfg.model)
    if cfg.sft.lora_r > 0:  # a LoRA fine-tune: rebuild the adapter (and quantized base) structure it was saved with
        from scratchlm.sft.train import adapt_model

        adapt_model(model, cfg)
    load_weights(model, ckpt)
    return model.to(device).eval(), tok, cfg
