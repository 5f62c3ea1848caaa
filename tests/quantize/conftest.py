"""A tiny byte-level Llama trained in-test (60 steps) on generated documents, with its prepared data folder."""

from __future__ import annotations

import pytest

from scratchlm.config import Config, LlamaConfig
from scratchlm.data.prepare import prepare
from scratchlm.train.pretrain import pretrain
from tests.helpers import byte_tok, make_docs, write_corpus


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(root, base run folder, data folder): widths 64 (attention) and 192 (feed-forward)."""
    root = tmp_path_factory.mktemp("quantize")
    cfg = Config()
    cfg.data.workers, cfg.data.val_fraction = 1, 0.1
    prepare([str(write_corpus(root / "c", make_docs(120, seed=3)))], byte_tok(), cfg, root / "data", progress=False)
    cfg.out_dir = str(root / "base")
    cfg.model = LlamaConfig(block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, bias=False)
    t = cfg.train
    t.max_steps, t.batch_size, t.lr, t.warmup_steps = 60, 8, 3e-3, 5
    t.eval_interval, t.eval_iters, t.tensorboard, t.log_interval = 60, 1, False, 60
    t.precision = "fp32"  # the tests compare numbers: "auto" may choose bf16 on some CPUs
    pretrain(cfg, root / "data", progress=False)
    return root, root / "base", root / "data"
