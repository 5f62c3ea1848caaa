"""LayerNorm vs RMSNorm: the same model trained twice, one variable changed.

Both runs use the Llama-family model of the config (RMSNorm is its native norm); the LayerNorm run
swaps every RMSNorm for a bias-free `nn.LayerNorm` of the same width before training. Same seed,
same initial weights for everything else, same data order, same schedule. The picture shows the
training loss of both and the gradient norm of each transformer block over training: the
curriculum's "compare gradients and convergence". RMSNorm skips the mean subtraction; on models
this size the curves usually overlap, which is the point: it is cheaper for the same result.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from torch import nn

from scratchlm.config import Config, switch_arch
from scratchlm.model import build_model
from scratchlm.model.layers import RMSNorm
from scratchlm.train.loop import RunResult
from scratchlm.train.pretrain import prepare_run_data, pretrain


def with_layernorm(model: nn.Module) -> nn.Module:
    """Replace every RMSNorm in `model` by a bias-free LayerNorm of the same width and epsilon."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RMSNorm):
                setattr(parent, name, nn.LayerNorm(child.weight.numel(), eps=child.eps, bias=False))
    return model


def norms_experiment(cfg: Config, out: Path, inputs: list[str] | None = None, progress: bool = True) -> Path:
    """Train RMSNorm and LayerNorm variants of `cfg`'s model; write `out/norms.png`. Returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    base = replace(cfg, model=replace(switch_arch(cfg.model, "llama"), bias=False))
    data_dir = prepare_run_data(replace(base, out_dir=str(out)), out, inputs, progress)
    results: dict[str, RunResult] = {}
    for label, build in (("RMSNorm", build_model), ("LayerNorm", lambda m: with_layernorm(build_model(m)))):
        run = replace(base, out_dir=str(out / label.lower()), train=replace(base.train, ckpt_interval=0))
        results[label] = pretrain(run, data_dir, progress=progress, build=build, layer_grad_norms=True)
    png = out / "norms.png"
    plot(out, list(results), png)
    summary = {k: {"val_loss": r.val_loss, "train_loss": r.train_loss, "seconds": r.seconds}
               for k, r in results.items()}
    print(json.dumps(summary, indent=2))
    print(f"wrote {png}")
    return png


def plot(out: Path, labels: list[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"RMSNorm": "-", "LayerNorm": "--"}
    for label in labels:
        rows = [json.loads(x) for x in (out / label.lower() / "metrics.jsonl").read_text().splitlines()]
        train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), float)]
        a.plot(*zip(*train), styles[label], label=label)
        layers = sorted({k for r in rows for k in r if k.startswith("grad_norm/layer_")},
                        key=lambda k: int(k.rsplit("_", 1)[1]))
        for i, key in enumerate(layers):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            b.plot(*zip(*pts), styles[label], color=f"C{i}", label=f"{label} layer {i}", linewidth=1)
    a.set(xlabel="step", ylabel="training loss", title="loss")
    a.legend()
    b.set(xlabel="step", ylabel="gradient norm", title="gradient norm per layer (solid: RMS, dashed: Layer)",
          yscale="log")
    b.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)


