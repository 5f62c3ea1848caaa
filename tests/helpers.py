"""Helpers shared by the test packages (not a test module; fixtures stay in the conftest.py files,
which import from here, and no test imports a conftest):

- public test data: `shared_file` and the CI rule that it may not be missing (`in_ci`);
- data: small generated corpora, tokenizers and configs for the data, training and SFT tests;
- models and training: a tiny MoE config, counted matmul FLOPs, a tiny pretraining run's config;
- inference: tiny models, checkpoints, the fp32 logits tolerance and greedy generation with and
  without the engine, for the inference, visualisation and convert tests;
- convert: tiny random HF models, tokenizers and scratchlm checkpoints.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from scratchlm.checkpoint import save_checkpoint
from scratchlm.config import (
    Config,
    GPTConfig,
    LlamaConfig,
    ModelConfig,
    SampleConfig,
    TokenizerConfig,
    get_preset,
    model_config,
    switch_arch,
)
from scratchlm.data.prepare import prepare
from scratchlm.infer.engine import Engine
from scratchlm.model import build_model, padded_vocab
from scratchlm.sft.train import sft
from scratchlm.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer, train_bpe
from scratchlm.train.pretrain import pretrain

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def shared_file(name: str) -> Path:
    """A file from ../shared/data; without it the test skips, or fails in CI (the parity tests must run there)."""
    path = SHARED_DATA / name
    if not path.exists():
        reason = f"{path} is absent (public test data lives in ../shared/data beside the repository)"
        if in_ci():
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    return path


# Data: small generated corpora, tokenizers and configs.

WORDS = (
    "the", "lord", "said", "unto", "moses", "and", "aaron", "go", "forth", "into", "land", "which", "I", "give",
    "you", "behold", "a", "sower", "went", "out", "to", "sow", "seed", "upon", "stony", "places", "where", "they",
    "had", "not", "much", "earth",
)


def make_docs(n: int, seed: int = 0, lines: int = 4) -> list[str]:
    """n distinct documents of a few lines each (the doc number keeps them distinct)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        body = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(lines)]
        docs.append(f"Document {i}.\n" + "\n".join(body))
    return docs


def write_corpus(folder: Path, docs: list[str]) -> Path:
    """One file per document, named so the folder's sorted order is the list's order."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(docs):
        (folder / f"{i:05d}.txt").write_text(text, encoding="utf-8")
    return folder


def make_cfg(**data) -> Config:
    cfg = Config()
    cfg.data.workers = 1
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def byte_tok() -> ByteTokenizer:
    return ByteTokenizer({"<|endoftext|>": 256})


def read_split(out: Path, manifest: dict, split: str) -> np.ndarray:
    """A split's whole token stream, read straight from its shard files."""
    dtype = np.dtype(manifest["dtype"])
    parts = [np.fromfile(out / s["file"], dtype=dtype) for s in manifest["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


# Models and training.

def moe_cfg(**kw) -> ModelConfig:
    """A tiny MoE config (4 experts, 2 active, GQA)."""
    base = dict(arch="moe", vocab_size=64, block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, bias=False,
                n_experts=4, n_active_experts=2)
    base.update(kw)
    return model_config(**base)


def counted_training_flops(model: torch.nn.Module, T: int) -> tuple[int, int]:
    """(forward, forward + backward) matmul FLOPs of one length-T sequence, counted by torch's
    FlopCounterMode (every mm / addmm / bmm the dispatcher runs, nothing taken from the model)."""
    idx, targets = torch.randint(0, model.config.vocab_size, (2, 1, T))
    with FlopCounterMode(display=False) as forward:
        model(idx)
    with FlopCounterMode(display=False) as both:
        logits, _ = model(idx)  # an unfused loss outside the model: the count sees the plain head
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return forward.get_total_flops(), both.get_total_flops()


def tiny_run_cfg(run_dir: Path, **train) -> Config:
    """A tiny GPT pretraining run of 12 steps into run_dir, fp32; `train` overrides train settings."""
    cfg = Config(name="test", out_dir=str(run_dir))
    cfg.model = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
    t = cfg.train
    t.batch_size, t.max_steps, t.warmup_steps, t.lr = 4, 12, 2, 3e-3
    t.eval_interval, t.eval_iters, t.log_interval, t.ckpt_interval = 4, 2, 1, 0
    t.tensorboard = False
    t.precision = "fp32"  # the tests compare numbers: "auto" may choose bf16 on some CPUs
    for k, v in train.items():
        setattr(t, k, v)
    cfg.data.workers = 1
    return cfg


# Inference: tiny models and checkpoints, greedy generation.

CHARS = sorted(set("abcdefgh ijklmnop.\n"))

# Two computations of the same fp32 logits (cached vs uncached, batched vs alone, by hand vs the
# cache, ours vs transformers') sum in different orders: different shapes take different GEMM paths,
# and those differ per CPU. The test models' logits reach about +-6 after 2-3 layers of ~100-term
# sums, each rounding at ~6e-8 relative; measured differences are up to 1.4e-5 (an AMD EPYC, the MoE
# model). A wrong mask, position or cache slot moves logits by 1e-2 or more, so this bound still
# catches every real bug.
LOGITS_ATOL, LOGITS_RTOL = 1e-4, 1e-5


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    torch.testing.assert_close(actual, expected, atol=LOGITS_ATOL, rtol=LOGITS_RTOL, msg=msg)


def tiny_config(arch: str = "gpt", **kw) -> ModelConfig:
    base = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    return replace(switch_arch(base, arch), **kw)  # a baseline keeps the sizes it has (vocab, block, ...)


def tiny_model(seed: int = 0, std: float = 0.3, **kw) -> nn.Module:
    """A random tiny GPT in eval mode. Weights wider than GPT-2's init (std 0.3, not 0.02) spread
    the logits, so greedy choices are far from ties and sampled text varies with the seed."""
    torch.manual_seed(seed)
    model = build_model(tiny_config(**kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model.eval()


def char_tokenizer() -> CharTokenizer:
    return CharTokenizer(CHARS, {"<|endoftext|>": len(CHARS)})


def make_checkpoint(run_dir: Path, **model_kw) -> Path:
    """A run folder with one checkpoint of a tiny random model and a char tokenizer."""
    tok = char_tokenizer()
    cfg = Config()
    cfg.tokenizer.kind = "char"
    cfg.model = tiny_config(**model_kw)
    model = tiny_model(**model_kw)
    save_checkpoint(run_dir, 1, model, torch.optim.AdamW(model.parameters()), cfg, tok, trainer={}, keep_last=1)
    return run_dir


# Convert: tiny random HF models, tokenizers and scratchlm checkpoints.

TEXT = "The quick brown fox jumps over the lazy dog. It can't be 32.5 feet, naïvely!\n" * 8
VOCAB = 320  # HF models' vocab_size: the tiny tokenizer's 287 tokens fit
T = 12  # test sequence length; the sliding windows below are smaller


def tiny_bpe() -> BPETokenizer:
    return train_bpe([TEXT], 280, "gpt4", ["<|endoftext|>", "<|pad|>"], progress=False)


def randomize(model: nn.Module, seed: int, std: float = 0.2) -> nn.Module:
    """Weights far from HF's N(0, 0.02) init, norm gains far from 1 and non-zero biases, so the
    logits are O(1) and every tensor (and any transposition or mix-up of them) shows in them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_gain = p.dim() == 1 and name.endswith("weight")
            p.copy_(1 + 0.3 * noise if is_gain else std * noise)
    return model.eval()


def hf_folder(tmp: Path, hf_model: nn.Module, tok: BPETokenizer | None = None, **save_kw) -> Path:
    """save_pretrained a random HF model (and our tokenizer in HF's format) into tmp/hf."""
    out = tmp / "hf"
    hf_model.save_pretrained(out, **save_kw)
    (tok or tiny_bpe()).save_hf(out)
    return out


def our_checkpoint(tmp: Path, seed: int = 0, tok: Tokenizer | None = None, std: float = 0.2,
                   **model_kw) -> tuple[Path, nn.Module, Tokenizer]:
    """A random scratchlm model saved as a run folder (vocab padded to a multiple of 64), with `tok`
    (default: the tiny BPE) and weights of scale `std`."""
    tok = tok or tiny_bpe()
    cfg = Config(name="t", out_dir=str(tmp / "run"))
    cfg.tokenizer = TokenizerConfig(kind=tok.kind, vocab_size=tok.vocab_size, special_tokens=list(tok.special_tokens))
    arch = model_kw.pop("arch", "gpt")
    cfg.model = replace(switch_arch(GPTConfig(block_size=16, n_layer=2, n_head=4, n_embd=32), arch), **model_kw)
    cfg.model.vocab_size = padded_vocab(cfg.model, tok.vocab_size)
    torch.manual_seed(seed)
    model = randomize(build_model(cfg.model), seed, std)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(Path(cfg.out_dir), 0, model, opt, cfg, tok, {"best_val_loss": None})
    return Path(cfg.out_dir), model, tok


def ids(seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


def greedy(n: int, **kw) -> SampleConfig:
    return SampleConfig(temperature=0.0, max_new_tokens=n, **kw)


def uncached_greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """The reference: every step recomputes the logits of the whole sequence with a plain forward
    (the model's own causal / sliding-window mask). Returns the n tokens and their logits (n, V).
    Every choice is clear (top two logits 10x the logit tolerance apart), so the tokens of two
    computations compare exactly on any CPU."""
    seq, steps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([seq]))  # (1, T, V)
            top = logits[0, -1].topk(2).values
            assert top[0] - top[1] > 10 * LOGITS_ATOL, f"a near tie at step {len(steps)}: pick another seed"
            steps.append(logits[0, -1])
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):], torch.stack(steps)


def engine_greedy(model, prompts: list[list[int]], n: int, **kw) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy generation through the engine, with each row's logits at every step (n_steps, V)."""
    seen: dict[int, list[torch.Tensor]] = {r: [] for r in range(len(prompts))}

    def record(rows: list[int], logits: torch.Tensor) -> None:
        for pos, r in enumerate(rows):
            seen[r].append(logits[pos].clone())

    outs = Engine(model).generate(prompts, greedy(n), on_logits=record, **kw)
    return outs, [torch.stack(seen[r]) for r in range(len(prompts))]


def prompts_of(lengths, vocab: int = 64, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# A tiny pretrained base and SFT run on bytes, for the stages built on them (SFT, classify, DPO, CAI).

def tiny_llama_base(root: Path, block_size: int, **model_kw) -> Path:
    """A 2-layer byte-level Llama pretrained 4 steps on 30 generated documents; returns its run folder.
    fp32: the tests compare numbers, and "auto" may choose bf16 on some CPUs."""
    cfg = Config()
    cfg.data.workers = 1
    prepare([str(write_corpus(root / "c", make_docs(30, seed=2)))], ByteTokenizer({"<|endoftext|>": 256}), cfg,
            root / "data", progress=False)
    cfg.out_dir = str(root / "base")
    cfg.model = LlamaConfig(block_size=block_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, bias=False,
                            **model_kw)
    t = cfg.train
    t.max_steps, t.batch_size, t.eval_interval, t.eval_iters, t.tensorboard, t.log_interval = 4, 4, 4, 1, False, 2
    t.precision = "fp32"
    pretrain(cfg, root / "data", progress=False)
    return root / "base"


def tiny_sft_run(root: Path, base: Path, eval_max_new_tokens: int) -> Path:
    """`base` fine-tuned 4 steps on 40 embedded tasks (fp32); returns the SFT run folder."""
    s = get_preset("sft-tiny")
    s.out_dir, s.sft.base, s.sft.n_tasks, s.sft.eval_max_new_tokens = str(root / "sft"), str(base), 40, \
        eval_max_new_tokens
    t = s.train
    t.max_steps, t.batch_size, t.eval_interval, t.eval_iters, t.tensorboard, t.precision = 4, 4, 4, 1, False, "fp32"
    sft(s, progress=False)
    return root / "sft"
