"""Routing heatmaps: the load matrix read back from a real MoE run, the PNG, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scratchlm.cli import main
from scratchlm.config import get_preset
from scratchlm.errors import UserError
from scratchlm.train.pretrain import pretrain
from scratchlm.viz.routing import balance, draw_routing, load_history, shares
from tests.helpers import make_docs, write_corpus

BATCH, BLOCK, K, EXPERTS = 8, 16, 2, 4


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """A 6-step, 2-layer MoE run on a generated corpus, routing logged every 2 steps."""
    root = tmp_path_factory.mktemp("moe")
    corpus = write_corpus(root / "corpus", make_docs(40, seed=3))
    cfg = get_preset("moe-tiny")
    cfg.out_dir = str(root / "run")
    cfg.tokenizer.kind, cfg.tokenizer.special_tokens = "byte", ["<|endoftext|>"]
    cfg.data.workers = 1
    m, t = cfg.model, cfg.train
    m.n_layer, m.n_head, m.n_kv_head, m.n_embd, m.block_size, m.n_experts = 2, 2, 1, 32, BLOCK, EXPERTS
    t.batch_size, t.max_steps, t.log_interval, t.eval_interval, t.eval_iters = BATCH, 6, 2, 6, 2
    t.warmup_steps, t.tensorboard, t.precision = 2, False, "fp32"
    pretrain(cfg, inputs=[str(corpus)], progress=False)
    return root / "run"


def test_load_history_rows_sum_to_assignments(moe_run):
    history = load_history(moe_run)
    assert sorted(history) == [0, 1]
    for steps, loads in history.values():
        assert steps.tolist() == [2, 4, 6]
        assert loads.shape == (3, EXPERTS)
        np.testing.assert_allclose(loads.sum(axis=1), BATCH * BLOCK * K)  # every token, k times
        np.testing.assert_allclose(shares(loads).sum(axis=1), 1.0)
        assert np.all(balance(loads) >= 1.0) and np.all(balance(loads) <= EXPERTS)
    # The balance recomputed from the loads is the one the run logged.
    logged = [json.loads(x) for x in (moe_run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["moe/layer_1/balance"] for r in logged if "moe/layer_1/balance" in r]
    np.testing.assert_allclose(balance(history[1][1]), logged, rtol=1e-6)


def test_cli_writes_png(moe_run, tmp_path, capsys):
    png = tmp_path / "out" / "routing.png"
    assert main(["viz", "routing", "--run", str(moe_run), "--out", str(png)]) == 0
    assert capsys.readouterr().out.strip() == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not list(png.parent.glob(".*tmp*"))  # written atomically: no temporary left behind


def test_resumed_steps_keep_the_later_record(tmp_path):
    rows = [{"step": 2, "moe/layer_3/load_0": 1, "moe/layer_3/load_1": 3},
            {"step": 4, "moe/layer_3/load_0": 2, "moe/layer_3/load_1": 2},
            {"step": 2, "moe/layer_3/load_0": 4, "moe/layer_3/load_1": 0},  # after a resume
            {"step": 4, "val_loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    steps, loads = load_history(tmp_path)[3]  # the torn last line is skipped
    assert steps.tolist() == [2, 4] and loads.tolist() == [[4, 0], [2, 2]]
    draw_routing(tmp_path, tmp_path / "r.png")  # a single layer, uneven step spacing: still draws
    assert (tmp_path / "r.png").stat().st_size > 0


def test_bad_inputs(tmp_path, capsys):
    with pytest.raises(UserError, match=r"metrics\.jsonl: no such file"):
        draw_routing(tmp_path / "nowhere", tmp_path / "r.png")
    assert main(["viz", "routing", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.png")]) == 2
    assert "nowhere/metrics.jsonl: no such file" in capsys.readouterr().err  # one line, no traceback
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 3.0}) + "\n")
    with pytest.raises(UserError, match=r"not an MoE run \(no routing metrics in .*metrics\.jsonl\)"):
        draw_routing(tmp_path, tmp_path / "r.png")
    (tmp_path / "metrics.jsonl").write_text("{oops\n" + json.dumps({"step": 2, "loss": 3.0}) + "\n")
    with pytest.raises(UserError, match=r"metrics\.jsonl:1: not a JSON record"):
        load_history(tmp_path)
    assert not (tmp_path / "r.png").exists()
