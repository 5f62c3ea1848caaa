"""The pretraining stage: token shards in, a model trained from scratch out.

`pretrain` prepares the run's data when it is not given (`prepare_run_data`: trains the config's
tokenizer on the inputs and shards them into `RUN/data`, or reuses data made with the same
settings from the same inputs), builds the model with its vocabulary padded to the tokenizer's,
and hands model and batches to the shared loop (`scratchlm.train.loop.train_model`), which does
the stepping, validation, checkpoints, resuming and logging. Packed batches (x, y, doc_ids) train
with attention kept inside each document. Validation needs a validation split of at least one
block (`data.val_fraction`); without one it is skipped, said in one line, rather than run on
training data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from scratchlm import checkpoint as ckpt_io
from scratchlm.config import Config, ModelConfig
from scratchlm.data.loader import BatchLoader, TokenShards
from scratchlm.data.prepare import check_prepared, prepare
from scratchlm.data.sources import read_corpus_text
from scratchlm.model import build_model, padded_vocab
from scratchlm.tokenizer import train_tokenizer
from scratchlm.train.distributed import join, main_first
from scratchlm.train.loop import Batches, RunResult, train_model


def prepare_run_data(cfg: Config, run_dir: Path, inputs: list[str] | None, progress: bool, *,
                     resume: bool = False) -> Path:
    """Train the config's tokenizer on the inputs and shard them into RUN/data.

    Data already there is reused only when it was made with the same tokenizer and data settings
    from the same inputs (a resumed run given no inputs keeps its own); otherwise this stops
    with an error naming the difference, never training on something other than what was asked.
    """
    data_dir = run_dir / "data"
    if (data_dir / "manifest.json").exists():
        check_prepared(data_dir, cfg, inputs, check_inputs=bool(inputs) or not resume)
        return data_dir
    texts = read_corpus_text(inputs, cfg.tokenizer.jsonl_field, cfg.tokenizer.max_chars)
    tok = train_tokenizer(texts, cfg.tokenizer, progress=progress)
    prepare(inputs, tok, cfg, data_dir, progress=progress)
    return data_dir


def pretrain(
    cfg: Config,
    data_dir: Path | None = None,
    inputs: list[str] | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_at_step: int | None = None,
    build: Callable[[ModelConfig], nn.Module] = build_model,
    layer_grad_norms: bool = False,
) -> RunResult:
    """Train `cfg.model` from scratch on token shards; everything lands in `cfg.out_dir`.

    `stop_at_step` ends the run early (with a checkpoint) as an interruption would, for tests.
    `build` makes the model from its config (experiments pass variants); `layer_grad_norms` logs
    each block's gradient norm (`grad_norm/layer_i`) at every log step.
    """
    t, run_dir = cfg.train, Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = ckpt_io.find_checkpoint(run_dir) if resume else None
    if latest is not None:
        cfg.model = ckpt_io.load_config_and_tokenizer(latest)[0].model  # the architecture must be the checkpoint's
    here, device = join(t.device)
    with main_first(here):  # under torchrun rank 0 prepares the data; the others then read it
        data_dir = data_dir or prepare_run_data(cfg, run_dir, inputs, progress and here.main, resume=resume)
    shards = TokenShards(data_dir)
    tok = shards.tokenizer()
    if latest is not None:
        shards.check_tokenizer(ckpt_io.load_config_and_tokenizer(latest)[1])
    cfg.model.vocab_size = padded_vocab(cfg.model, tok.vocab_size)
    val_tokens = shards.tokens("val")
    if val_tokens > cfg.model.block_size:
        def make_val() -> BatchLoader:
            return BatchLoader(shards, "val", t.batch_size, cfg.model.block_size, seed=cfg.seed + 1, device=device)
    else:  # evaluating on training tokens instead would report a "val loss" that is not one
        make_val = None
        print(f"validation skipped: {data_dir} holds {val_tokens} validation tokens, fewer than one block of "
              f"{cfg.model.block_size + 1}; no val loss, no ckpt/best (prepare the data with a larger "
              f"--data.val_fraction to validate)", flush=True)
    batches = Batches(
        train=BatchLoader(shards, "train", t.batch_size, cfg.model.block_size, seed=cfg.seed, device=device,
                          rank=here.rank, world_size=here.world_size),  # torchrun: one global stream in turns
        make_val=make_val,
    )
    torch.manual_seed(cfg.seed)
    model = build(cfg.model)
    return train_model(cfg, model, tok, batches, resume_from=latest, progress=progress, stop_at_step=stop_at_step,
                       layer_grad_norms=layer_grad_norms, desc="pretrain")
