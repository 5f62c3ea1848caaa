"""Tiny random HF models, tokenizers and scratchlm checkpoints for the convert tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from scratchlm.checkpoint import save_checkpoint
from scratchlm.config import Config, ModelConfig, TokenizerConfig
from scratchlm.model import build_model, padded_vocab
from scratchlm.tokenizer import BPETokenizer, train_bpe

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


def our_checkpoint(tmp: Path, seed: int = 0, **model_kw) -> tuple[Path, nn.Module, BPETokenizer]:
    """A random scratchlm model saved as a run folder (vocab padded to a multiple of 64)."""
    tok = tiny_bpe()
    cfg = Config(name="t", out_dir=str(tmp / "run"))
    cfg.tokenizer = TokenizerConfig(kind=tok.kind, vocab_size=tok.vocab_size, special_tokens=list(tok.special_tokens))
    cfg.model = ModelConfig(**{"block_size": 16, "n_layer": 2, "n_head": 4, "n_embd": 32, **model_kw})
    cfg.model.vocab_size = padded_vocab(cfg.model, tok.vocab_size)
    torch.manual_seed(seed)
    model = randomize(build_model(cfg.model), seed)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(Path(cfg.out_dir), 0, model, opt, cfg, tok, {"best_val_loss": None})
    return Path(cfg.out_dir), model, tok


def ids(seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))
