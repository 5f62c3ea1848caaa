"""The EAGLE draft head at inference (scratchlm/infer/eagle.py): greedy output token-identical to the
target's own (float64); each proposal equal to an uncached recomputation of the head over the target's
true features (so its cache keeps exactly the accepted items); a head drafting from part of the
vocabulary changes neither the greedy output nor the sampled distribution (chi-square); `load_draft`
refusing a draft with another tokenizer or a head trained on another target."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2

from scratchlm.config import SampleConfig
from scratchlm.errors import UserError
from scratchlm.infer.eagle import EagleDraft, EagleHead, head_config, load_draft, save_head
from scratchlm.infer.engine import Engine
from scratchlm.infer.speculative import LastHidden, SpeculativeDecoder, filtered_logits
from scratchlm.tokenizer import CharTokenizer
from tests.helpers import char_tokenizer, greedy, make_checkpoint, prompts_of, tiny_model

LLAMA = dict(arch="llama", bias=False, n_head=4, n_kv_head=2, std=0.2)


def random_head(target, seed: int = 0, draft_vocab: int = 0) -> EagleHead:
    torch.manual_seed(seed)
    head = EagleHead(head_config(target)).double().eval()
    if draft_vocab:  # the draft_vocab ids with the highest made-up counts
        counts = torch.randint(0, 100, (target.config.vocab_size,), generator=torch.Generator().manual_seed(seed))
        head.set_vocab(counts, draft_vocab)
    return head


def test_set_vocab_keeps_the_most_frequent_ids_ties_to_the_lower_id():
    head = EagleHead(head_config(tiny_model(block_size=32, **LLAMA)))
    counts = torch.tensor([5, 0, 9, 5, 1, 9, 5, 2])
    assert head.set_vocab(counts, 4) == pytest.approx((9 + 9 + 5 + 5) / 36)
    assert head.vocab.tolist() == [0, 2, 3, 5]  # 9, 9, then the first two of the three 5s
    assert head.set_vocab(counts, 0) == 1.0 and head.vocab is None
    assert head.set_vocab(counts, 8) == 1.0 and head.vocab is None  # all of them: no subset


@pytest.mark.parametrize("lm_head", ["linear", "other"])
def test_a_vocabulary_subset_gives_the_lm_heads_logits_there_and_minus_inf_elsewhere(lm_head):
    target = tiny_model(block_size=32, **LLAMA).double()
    draft = EagleDraft(random_head(target, draft_vocab=9), target)
    h = torch.randn(1, target.config.n_embd, dtype=torch.float64)
    full = target.unembedding(h)
    if lm_head == "other":  # not a plain Linear (a LoRA or quantized head): the whole head, then its columns
        draft.sub = None
    z = draft.logits(h)
    vocab = draft.head.vocab
    assert vocab.numel() == 9 and z.shape == full.shape
    torch.testing.assert_close(z[:, vocab], full[:, vocab], atol=1e-12, rtol=0)
    outside = torch.ones(full.size(1), dtype=torch.bool)
    outside[vocab] = False
    assert torch.isneginf(z[:, outside]).all()


@pytest.mark.parametrize("arch, k, draft_vocab", [("llama", 1, 0), ("llama", 4, 0), ("gpt", 1, 0), ("gpt", 4, 0),
                                                  ("llama", 4, 12)])
def test_greedy_with_a_head_equals_the_targets_greedy_decoding(arch, k, draft_vocab):
    target = tiny_model(block_size=32, **(LLAMA if arch == "llama" else dict(std=0.2))).double()
    prompts = prompts_of([1 + i % 29 for i in range(100)], seed=3)
    expected = Engine(target).generate(prompts, greedy(12))
    draft = EagleDraft(random_head(target, draft_vocab=draft_vocab), target)
    drafted = []
    propose = draft.propose

    def recording(*args):
        tokens, dists = propose(*args)
        drafted.extend(tokens)
        return tokens, dists

    draft.propose = recording
    spec = SpeculativeDecoder(Engine(target), draft, k)
    assert spec.generate(prompts, greedy(12)) == expected
    assert spec.stats.drafted > 0
    if draft_vocab:  # only ids of the subset drafted, while the target's output has others
        assert set(drafted) <= set(draft.head.vocab.tolist())
        assert set(t for row in expected for t in row) - set(draft.head.vocab.tolist())


def exact_last_pair_distribution(model, prompt: list[int], cfg: SampleConfig) -> torch.Tensor:
    """P(2nd and 3rd generated tokens = (b, c)) under the target's filtered distribution, (V, V), by
    enumerating every first token a."""
    V = model.config.vocab_size

    def next_dist(rows: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            logits, _ = model(torch.tensor(rows))
        return F.softmax(filtered_logits(logits[:, -1], rows, cfg, None).double(), -1)

    p1 = next_dist([prompt])[0]  # (V,)
    p2 = next_dist([prompt + [a] for a in range(V)])  # (V, V): [a, b]
    p3 = next_dist([prompt + [a, b] for a in range(V) for b in range(V)]).view(V, V, V)  # [a, b, c]
    return (p1[:, None, None] * p2[:, :, None] * p3).sum(0)


def test_sampling_with_a_vocabulary_subset_follows_the_targets_distribution():
    """A head drafting from 4 of 8 ids puts q = 0 on the others, where the target's p is not: the
    residual max(0, p - q) must supply them. N rows of three sampled tokens (the head drafts from the
    second on: it needs the target's features of the text before); the chi-square statistic of the
    (2nd, 3rd) pairs against their exact distribution stays under its 0.999 quantile."""
    target = tiny_model(vocab_size=8, std=0.5, block_size=16, **{k: v for k, v in LLAMA.items() if k != "std"})
    target = target.double()
    draft = EagleDraft(random_head(target, seed=1, draft_vocab=4), target)
    prompt, N = [1, 2, 3], 1500
    cfg = SampleConfig(max_new_tokens=3, temperature=1.0)
    spec = SpeculativeDecoder(Engine(target), draft, 2)
    outs = spec.generate([prompt] * N, cfg, generator=torch.Generator().manual_seed(0))
    assert 0 < spec.stats.accepted < spec.stats.drafted
    counts = torch.zeros(8, 8, dtype=torch.float64)
    for _, b, c in outs:
        counts[b, c] += 1
    p = exact_last_pair_distribution(target, prompt, cfg)
    outside = torch.ones(8, dtype=torch.bool)
    outside[draft.head.vocab] = False
    assert counts[outside].sum() > 0.1 * N  # tokens the head can never draft do come out
    cells = p * N >= 5
    obs = torch.cat([counts[cells], counts[~cells].sum()[None]])
    exp = N * torch.cat([p[cells], p[~cells].sum()[None]])
    stat = float(((obs - exp) ** 2 / exp).sum())
    threshold = chi2.ppf(0.999, len(obs) - 1)
    assert stat < threshold, f"chi-square {stat:.1f} >= {threshold:.1f}"


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
