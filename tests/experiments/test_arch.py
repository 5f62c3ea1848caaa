"""`scratchlm experiment arch`: the sizes matched within tolerance for every architecture, active parameters
equal to a hand count, the quick comparison end to end (PNG, JSON, markdown; the caches' bytes per token
from their layouts), a resumed comparison retrains nothing, bad input is one line and exit 2."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scratchlm.cli import main
from scratchlm.config.model import MoEConfig
from scratchlm.experiments import arch
from scratchlm.model import build_model

PNG = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *names: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scratchlm: error: "), err
    for name in names:
        assert name in lines[0]


def test_every_architecture_is_matched_within_tolerance_on_total_and_moe_on_active_parameters():
    variants = arch.plan(arch.DEFAULT_SETTINGS, 512)
    base = [v for v in variants if v.matched == "baseline"]
    assert len(base) == 3 and len({v.init_seed for v in base}) == 3
    target = base[0].params.total
    assert target == base[0].params.active  # dense: every weight is used by every token
    names = {v.name for v in variants}
    assert names == {"llama_s0", "llama_s1", "llama_s2", "diff", "diff-nonorm", "nsa", "mla_total", "mla_active",
                     "mtp_total", "mtp_active", "jamba_total", "jamba_active"}
    for v in variants:
        if v.matched == "baseline":
            continue
        got = getattr(v.params, v.matched)
        assert abs(got - target) <= arch.TOLERANCE * target, (v.name, got, target)
        m = arch.sized_config(v, arch.DEFAULT_SETTINGS, 512)
        assert arch.param_counts(m) == v.params  # the plan's sizes are the config's
        if v.arch in arch.MOE:  # the experts are wider than on total, narrower than the preset's on total
            other = next(w for w in variants if w.arch == v.arch and w.matched != v.matched)
            assert (v.params.active < v.params.total) and (other.expert_hidden != v.expert_hidden)
    # mtp's prediction modules are counted apart, and its main model is mla's
    mtp, mla = (next(v for v in variants if v.name == n) for n in ("mtp_total", "mla_total"))
    assert mtp.params.train_only > 0 and mla.params.train_only == 0 and mtp.params.total == mla.params.total


def test_the_meta_count_is_the_built_models():
    v = next(v for v in arch.plan(arch.QUICK_SETTINGS, 512) if v.name == "jamba_total")
    model = build_model(arch.sized_config(v, arch.QUICK_SETTINGS, 512))
    table = model.tok_embeddings.weight.numel()
    assert sum(p.numel() for p in model.parameters()) - table == v.params.total
    assert v.params.with_embedding == v.params.total + table


def test_active_parameters_of_a_moe_equal_a_hand_count():
    C, F, E, k, H, V = 8, 12, 4, 2, 6, 64  # width, dense FFN, experts, top-k, expert width, vocabulary
    cfg = MoEConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=C, block_size=16, vocab_size=V, bias=False,
                    ffn_hidden=F, n_experts=E, n_active_experts=k, expert_hidden=H, n_shared_experts=1,
                    moe_first_dense=1)
    attention = C * C + 2 * (C * C // 2) + C * C  # wq, wk and wv (one kv head of two: half width), wo
    norms = 2 * C  # per layer
    dense = 3 * C * F  # layer 0: gate, up, down
    router, expert = C * E, 3 * C * H  # layer 1: the router, each expert, and one shared expert as wide
    total = 2 * (attention + norms) + C + dense + router + E * expert + expert
    active = total - (E - k) * expert
    counts = arch.param_counts(cfg)
    assert (counts.total, counts.active, counts.train_only, counts.with_embedding) == (1464, 1176, 0, 1464 + V * C)
    assert (total, active) == (1464, 1176)
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.active_params() - V * C == active  # the model's own count agrees


def test_a_difference_inside_the_seed_spread_is_no_difference():
    assert arch.verdict(3.01, 3.0, 0.01).startswith("no difference measured")
    assert arch.verdict(2.95, 3.0, 0.01).startswith("wins")
    assert arch.verdict(3.05, 3.0, 0.01).startswith("loses")
    assert arch.verdict(2.0, 3.0, math.nan).startswith("not judged")


def test_quick_comparison_end_to_end_and_a_resumed_one_retrains_nothing(tmp_path, capsys):
    out = tmp_path / "arch"
    code, stdout, _ = run(capsys, "experiment", "arch", "--quick", "--out", str(out), "--quiet")
    assert code == 0
    assert (out / "arch.png").read_bytes()[:8] == PNG
    results = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    assert len(runs) == 12 and results["tokens"] == 12 * 4 * 32
    s = arch.QUICK_SETTINGS
    for r in runs.values():
        assert 0 < r["val_loss"] < 10 and r["decode_tokens_per_s"] > 0 and r["seconds"] > 0
        assert [p["tokens"] for p in r["curve"]] == [4 * 128, 8 * 128, 12 * 128]  # same tokens for every run
        assert r["curve"][-1]["val_loss"] == r["val_loss"]
    # the caches' bytes per token, from their layouts (fp32): llama's K and V for 4 layers of 2 heads of 32;
    # mla's 32-wide latent and 16-wide RoPE key per layer; jamba's one attention layer's K and V plus the
    # constant Mamba states, spread over the tokens
    assert runs["llama_s0"]["cache_bytes_per_token"] == 2 * 4 * 2 * 32 * 4
    assert runs["mla_total"]["cache_bytes_per_token"] == 4 * (32 + 16) * 4
    assert runs["mtp_active"]["cache_bytes_per_token"] == 4 * (32 + 16) * 4
    jamba = runs["jamba_total"]
    kv = 2 * 1 * 2 * 32 * 4
    state = (jamba["cache_bytes_per_token"] - kv) * s.block_size
    assert state > 0 and jamba["cache_bytes_per_token_10x"] == pytest.approx(kv + state / (10 * s.block_size))
    losses = [runs[f"llama_s{i}"]["val_loss"] for i in range(3)]
    assert len(set(losses)) == 3  # three initial draws
    assert results["baseline"]["mean"] == pytest.approx(sum(losses) / 3)
    summary = (out / "summary.md").read_text()
    assert "| run | params (non-emb.) |" in summary and summary.count("matched on") >= 9
    assert len(results["verdicts"]) == 9
    assert all(("no difference measured" in v) or ("wins" in v) or ("loses" in v) for v in results["verdicts"])
    before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    assert len(before) == 12

    code, stdout, _ = run(capsys, "experiment", "arch", "--quick", "--out", str(out), "--quiet", "--resume")
    assert code == 0
    assert stdout.count("kept (finished before)") == 12 and "trained" not in stdout
    assert {p.parent.name: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")} == before

    code, _, err = run(capsys, "experiment", "arch", "--quick", "--out", str(out), "--quiet")
    one_line_error(code, err, str(out), "--resume", "--overwrite")
    code, _, err = run(capsys, "experiment", "arch", "--quick", "--out", str(out), "--quiet", "--resume",
                       "--budget", "2048")
    one_line_error(code, err, "plan.json", "budget=1536", "budget=2048")


@pytest.mark.parametrize("argv, names", [
    (["--archs", "llama,mamba"], ["--archs", "mamba", "jamba"]),
    (["--budget", "lots"], ["--budget lots"]),
    (["--budget", "100"], ["--budget 100", "fewer than 10"]),
    (["--budget", "-5"], ["--budget -5"]),
    (["--seeds", "0"], ["--seeds 0"]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, names):
    out = tmp_path / "arch"
    code, _, err = run(capsys, "experiment", "arch", "--quick", "--out", str(out), "--quiet", *argv)
    one_line_error(code, err, *names)
    assert not (out / "data").exists()  # refused before any work
