"""The EAGLE draft head at inference (scratchlm/infer/eagle.py): greedy output token-identical to the
target's own (float64); each proposal equal to an uncached recomputation of the head over the target's
true features (so its cache keeps exactly the accepted items); `load_draft` refusing a draft with
another tokenizer or a head trained on another target."""

from __future__ import annotations

import pytest
import torch

from scratchlm.errors import UserError
from scratchlm.infer.eagle import EagleDraft, EagleHead, head_config, load_draft, save_head
from scratchlm.infer.engine import Engine
from scratchlm.infer.speculative import LastHidden, SpeculativeDecoder
from scratchlm.tokenizer import CharTokenizer
from tests.helpers import char_tokenizer, greedy, make_checkpoint, prompts_of, tiny_model

LLAMA = dict(arch="llama", bias=False, n_head=4, n_kv_head=2, std=0.2)


def random_head(target, seed: int = 0) -> EagleHead:
    torch.manual_seed(seed)
    return EagleHead(head_config(target)).double().eval()


@pytest.mark.parametrize("arch", ["llama", "gpt"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_with_a_head_equals_the_targets_greedy_decoding(arch, k):
    target = tiny_model(block_size=32, **(LLAMA if arch == "llama" else dict(std=0.2))).double()
    prompts = prompts_of([1 + i % 29 for i in range(100)], seed=3)
    expected = Engine(target).generate(prompts, greedy(12))
    spec = SpeculativeDecoder(Engine(target), EagleDraft(random_head(target), target), k)
    assert spec.generate(prompts, greedy(12)) == expected
    assert spec.stats.drafted > 0


def test_each_proposal_equals_the_head_recomputed_over_the_true_features():
    target = tiny_model(block_size=32, **LLAMA).double()
    head = random_head(target)
    draft = EagleDraft(head, target)
    calls = []
    propose = draft.propose

    def recording(view, feats, k, pick):
        tokens, dists = propose(view, feats, k, pick)
        calls.append((list(view), feats.clone() if feats is not None else None, tokens))
        return tokens, dists

    draft.propose = recording
    spec = SpeculativeDecoder(Engine(target), draft, 3)
    spec.generate(prompts_of([5, 9], seed=2), greedy(16))
    drafted = [c for c in calls if c[2]]
    assert len(drafted) > 10
    hidden = LastHidden(target)
    try:
        with torch.no_grad():
            for view, feats, tokens in drafted:
                target(torch.tensor([view[:-1]]))
                torch.testing.assert_close(feats, hidden.value[0], atol=1e-9, rtol=0)  # the target's true features
                f, toks = feats, list(view[1:])
                for t in tokens:  # the head over all items, uncached, each drafted token fed back
                    h = head(f[None], target.embedding(torch.tensor([toks])))[0, -1]
                    assert int(target.unembedding(h).argmax()) == t
                    f, toks = torch.cat([f, h[None]]), toks + [t]
    finally:
        hidden.hook.remove()


def test_load_draft_refuses_another_tokenizer_and_another_target(tmp_path):
    target_dir = make_checkpoint(tmp_path / "target", block_size=32)
    target, tok = tiny_model(block_size=32), char_tokenizer()
    other = make_checkpoint(tmp_path / "other", block_size=32)
    assert load_draft(other, target, tok).needs_features is False  # same tokenizer: accepted
    with pytest.raises(UserError, match="tokenizer .* differs from the target's"):
        load_draft(other, target, CharTokenizer(list("xyz"), {"<|endoftext|>": 3}))
    save_head(tmp_path / "head", EagleHead(head_config(target)), {
        "target": str(target_dir), "tokenizer_fingerprint": tok.fingerprint(), "target_fingerprint": "0" * 64})
    with pytest.raises(UserError, match="trained on another target"):
        load_draft(tmp_path / "head", target, tok)
    with pytest.raises(UserError, match="no such file"):
        load_draft(tmp_path / "missing", target, tok)
