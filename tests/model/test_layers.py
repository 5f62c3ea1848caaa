"""DocumentMask (packed training): its mask against a hand-written rule, with and without a sliding
window, and GPT's attention dropout applied through it in training only.
Packed ≡ one by one on whole models is in tests/sft/test_data.py."""

from __future__ import annotations

import pytest
import torch

from scratchlm.config import ModelConfig
from scratchlm.model import build_model
from scratchlm.model.layers import DocumentMask


@pytest.mark.parametrize("window", [0, 3])
def test_document_mask_against_a_reference(window):
    docs = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, -2, -2]])
    dm = DocumentMask(docs)
    T = docs.size(1)
    mask = dm.mask(window)
    assert mask.shape == (1, 1, T, T)
    for i in range(T):
        for j in range(T):
            allowed = docs[0, i] == docs[0, j] and j <= i and (window == 0 or i - j < window)
            assert bool(mask[0, 0, i, j]) == allowed, (i, j)
    assert dm.positions(T).tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1]]


def gpt_with_attention_dropout(p: float) -> torch.nn.Module:
    """A tiny GPT whose only dropout is the attention's (embedding, residual and MLP dropout off), so
    train and eval mode differ only if attention dropout is applied."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=p))
    model.drop.p = 0.0
    for block in model.h:
        block.attn.resid_drop.p = block.mlp.drop.p = 0.0
    return model


def test_gpt_attention_dropout_applies_through_document_mask_in_training_only():
    idx = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    model = gpt_with_attention_dropout(0.5)
    torch.manual_seed(2)
    train = model.train()(idx, doc_mask=DocumentMask(docs))[0]
    evaluated = model.eval()(idx, doc_mask=DocumentMask(docs))[0]
    # Half the attention weights dropped (the rest doubled) moves the logits far beyond rounding.
    assert (train - evaluated).abs().max() > 1e-3
    # Eval mode is deterministic: the same call twice gives the same bits.
    assert torch.equal(evaluated, model(idx, doc_mask=DocumentMask(docs))[0])

    # With dropout 0, train and eval run the same operations in the same order: equal bits.
    model = gpt_with_attention_dropout(0.0)
    assert torch.equal(model.train()(idx, doc_mask=DocumentMask(docs))[0],
                       model.eval()(idx, doc_mask=DocumentMask(docs))[0])
