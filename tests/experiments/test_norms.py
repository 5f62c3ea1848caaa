"""The LayerNorm-vs-RMSNorm experiment runs both variants from the same start and draws them."""

from __future__ import annotations

import json

from scratchlm.config import get_preset
from scratchlm.experiments.norms import norms_experiment
from tests.helpers import make_docs, write_corpus


def test_norms_experiment_end_to_end(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", make_docs(40, seed=3))
    cfg = get_preset("tiny")
    cfg.tokenizer.kind, cfg.tokenizer.special_tokens = "byte", ["<|endoftext|>"]
    cfg.data.workers = 1
    m, t = cfg.model, cfg.train
    m.n_layer, m.n_head, m.n_embd, m.block_size = 2, 2, 32, 16
    t.max_steps, t.log_interval, t.eval_interval, t.eval_iters, t.warmup_steps, t.tensorboard = 6, 2, 6, 2, 2, False
    t.precision = "fp32"  # the tests compare numbers: "auto" may choose bf16 on some CPUs
    png = norms_experiment(cfg, tmp_path / "out", inputs=[str(corpus)], progress=False)
    assert png.stat().st_size > 10_000
    runs = {}
    for label in ("rmsnorm", "layernorm"):
        rows = [json.loads(x) for x in (tmp_path / "out" / label / "metrics.jsonl").read_text().splitlines()]
        runs[label] = [r for r in rows if "loss" in r]
        assert {"grad_norm/layer_0", "grad_norm/layer_1"} <= set(runs[label][0])
    # Same seed and data: the first logged losses are close, but the norms differ, so not identical.
    first = runs["rmsnorm"][0]["loss"], runs["layernorm"][0]["loss"]
    assert abs(first[0] - first[1]) < 0.05 and first[0] != first[1]
