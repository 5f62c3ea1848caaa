"""Multi-token prediction modules as a speculative draft (scratchlm/infer/mtp.py): greedy output
token-identical to plain decoding (float64, past the context too); every proposal equal to the uncached
MTP forward on the row plus the tokens drafted before it (so the modules' caches keep exactly the items
that read only the row, whatever was accepted); `--draft mtp` names it, and a model without MTP is refused."""

from __future__ import annotations

import random

import pytest
import torch

from scratchlm.errors import UserError
from scratchlm.infer.eagle import load_draft
from scratchlm.infer.engine import Engine
from scratchlm.infer.mtp import MTPDraft
from scratchlm.infer.speculative import SpeculativeDecoder
from tests.helpers import greedy, prompts_of, tiny_model

MTP = dict(arch="mla", bias=False, n_head=4, n_embd=32, n_experts=4, n_active_experts=2, expert_hidden=16,
           kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, moe_first_dense=1, mtp_depth=2,
           std=0.2)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_with_the_mtp_draft_equals_plain_greedy(k):
    target = tiny_model(block_size=32, **MTP).double()
    prompts = prompts_of([1 + (7 * i) % 31 for i in range(24)], seed=3)  # up to 31 tokens + 12: slides
    expected = Engine(target).generate(prompts, greedy(12))
    spec = SpeculativeDecoder(Engine(target), MTPDraft(target), k)
    assert spec.generate(prompts, greedy(12)) == expected
    assert spec.stats.drafted > 0 and spec.stats.forwards < sum(len(e) for e in expected)


def test_each_proposal_equals_the_uncached_mtp_forward():
    target = tiny_model(block_size=32, **MTP).double()
    draft = MTPDraft(target)
    rng = random.Random(0)
    view = prompts_of([4], seed=5)[0]
    checked = 0
    with torch.no_grad():
        while len(view) < 30:
            features = target.norm(target.hidden(torch.tensor([view[:-1]])))[0]  # the target's true features
            seen = []

            def pick(logits, context, seen=seen):
                seen.append(logits[0].clone())
                return int(logits[0].argmax()), None

            tokens, _ = draft.propose(list(view), features, 2, pick)
            assert len(tokens) == 2
            for j in range(2):  # depth j+1 at the row's last fed position, on the row + the drafts before it
                ref = target.mtp_logits(torch.tensor([view + tokens[:j]]))[j][0, -1]
                torch.testing.assert_close(seen[j], ref, atol=1e-10, rtol=0)
                checked += 1
            # the verifier keeps some drafts or none, then adds its own token (here: random ones)
            keep = rng.randint(0, 2)
            view += tokens[:keep] + [rng.randrange(64)]
    assert checked >= 20


def test_load_draft_mtp_and_a_model_without_modules():
    target = tiny_model(block_size=32, **MTP).double()
    assert isinstance(load_draft("mtp", target, None), MTPDraft)
    plain = tiny_model(block_size=32, **{**MTP, "mtp_depth": 0})
    with pytest.raises(UserError, match="no multi-token prediction modules"):
        MTPDraft(plain)
