"""Speculative decoding (scratchlm/infer/speculative.py): greedy output token-identical to the target's
own greedy decoding (float64 models, so the wider verify forward cannot flip a near-tie), whatever the
draft; sampled output distributed as the target's filtered distribution (a chi-square test on a
vocabulary of 8); both caches rolled back to exactly the accepted text."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2

from scratchlm.config import SampleConfig
from scratchlm.infer.engine import Engine
from scratchlm.infer.speculative import ModelDraft, SpeculativeDecoder, filtered_logits
from tests.helpers import greedy, prompts_of, tiny_model

LLAMA = dict(arch="llama", bias=False, n_head=4, n_kv_head=2, std=0.2)


def noisy_copy(model: torch.nn.Module, scale: float, seed: int = 7) -> torch.nn.Module:
    """A draft that agrees with the target often but not always: its weights plus noise."""
    draft = tiny_model(**LLAMA, block_size=model.config.block_size, vocab_size=model.config.vocab_size).double()
    draft.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return draft


@pytest.fixture(scope="module")
def target() -> torch.nn.Module:
    return tiny_model(block_size=32, **LLAMA).double()


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("kind", ["random", "noisy", "self"])
def test_greedy_equals_the_targets_greedy_decoding(target, kind, k):
    draft = {"random": lambda: tiny_model(seed=5, block_size=32, **LLAMA).double(),
             "noisy": lambda: noisy_copy(target, 0.02), "self": lambda: target}[kind]()
    prompts = prompts_of([1 + i % 29 for i in range(100)], seed=3)  # up to 29 + 12 > 32: some rows slide
    n = 12
    expected = Engine(target).generate(prompts, greedy(n))
    spec = SpeculativeDecoder(Engine(target), ModelDraft(draft), k)
    assert spec.generate(prompts, greedy(n)) == expected
    s = spec.stats
    assert s.produced == sum(map(len, expected)) and s.drafted > 0
    if kind == "self":  # the target as its own draft: every token accepted, up to k + 1 per forward
        assert s.accepted == s.drafted and s.mean_accepted > 0.75 * (k + 1)
    elif kind == "noisy":  # some drafts accepted, some rejected: the rollbacks ran
        assert 0 < s.accepted < s.drafted
    else:
        assert s.accepted < s.drafted / 4


def test_eos_and_stop_strings_end_a_row_as_in_the_engine(target):
    prompts = prompts_of([3, 8, 15], seed=4)
    full = Engine(target).generate(prompts, greedy(12))
    eos = full[0][5]  # a token row 0 produces: it must stop just before it
    spec = SpeculativeDecoder(Engine(target), ModelDraft(noisy_copy(target, 0.02)), 4)
    assert spec.generate(prompts, greedy(12), eos_id=eos) == Engine(target).generate(prompts, greedy(12),
                                                                                      eos_id=eos)
    decode = lambda ids: "".join(chr(97 + t % 26) for t in ids)  # noqa: E731
    stop = decode(full[1][4:6])
    cfg = greedy(12, stop=[stop])
    assert spec.generate(prompts, cfg, decode=decode) == Engine(target).generate(prompts, cfg, decode=decode)


def test_rollback_leaves_each_cache_holding_exactly_the_accepted_text(target):
    """Every forward of the target and of the draft gives the logits an uncached forward of the text
    its cache should hold (the accepted prefix) plus the tokens fed gives, in float64 to 1e-9."""
    draft_model = noisy_copy(target, 0.02)
    draft = ModelDraft(draft_model)
    prompt = prompts_of([6], seed=9)[0]
    seen = {"target": [], "draft": []}

    def recorder(name, prefix_of):
        def hook(module, args, kwargs, out):
            cache, idx = kwargs["cache"], args[0]
            L = int(cache.lengths()[0]) - idx.size(1)  # tokens held before this forward
            seen[name].append((prefix_of(L), idx[0].tolist(), out[0][0], list(text)))
        return hook

    text = []  # the row's accepted text so far (prompt + tokens), kept by on_token
    h1 = target.register_forward_hook(recorder("target", lambda L: text[:L]), with_kwargs=True)
    h2 = draft_model.register_forward_hook(recorder("draft", lambda L: draft.fed[:L]), with_kwargs=True)
    try:
        text.extend(prompt)
        spec = SpeculativeDecoder(Engine(target), draft, 4)
        out = spec.generate([prompt], greedy(20), on_token=lambda r, t: text.append(t))[0]
    finally:
        h1.remove()
        h2.remove()
    assert 0 < spec.stats.accepted < spec.stats.drafted  # rejections happened, so rollbacks did
    assert text == prompt + out
    for name, model in (("target", target), ("draft", draft_model)):
        for prefix, fed, logits, accepted in seen[name]:
            if name == "draft":
                assert prefix[: len(accepted)] == accepted[: len(prefix)]  # the accepted text (+ its drafts)
            with torch.no_grad():
                full, _ = model(torch.tensor([prefix + fed]))
            expected = full[0, -logits.size(0):]
            torch.testing.assert_close(logits, expected, atol=1e-9, rtol=0)


def exact_pair_distribution(model, prompt: list[int], cfg: SampleConfig) -> torch.Tensor:
    """P(first two generated tokens = (a, b)) under the target's filtered distribution, (V, V), by enumeration."""
    V = model.config.vocab_size
    with torch.no_grad():
        first, _ = model(torch.tensor([prompt]))
        p1 = F.softmax(filtered_logits(first[0, -1:], [prompt], cfg, None)[0].double(), -1)
        rows = [prompt + [a] for a in range(V)]
        second, _ = model(torch.tensor(rows))
        p2 = F.softmax(filtered_logits(second[:, -1], rows, cfg, None).double(), -1)  # (V, V)
    return p1[:, None] * p2


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_sampled_tokens_follow_the_targets_filtered_distribution(settings):
    """N rows of two sampled tokens each, the generator seeded once (the test is deterministic). Under
    the right distribution the chi-square statistic over the (a, b) cells follows chi2(cells - 1): a
    threshold at its 0.999 quantile fails a correct sampler for 0.1% of seeds. The same N would reject
    the draft's own distribution (the bug of keeping drafts unchecked) by a wide margin (asserted)."""
    target = tiny_model(vocab_size=8, std=0.5, block_size=16).double()
    draft = tiny_model(seed=3, vocab_size=8, std=0.5, block_size=16).double()
    prompt, N = [1, 2, 3], 3000
    cfg = SampleConfig(max_new_tokens=2, **settings)
    spec = SpeculativeDecoder(Engine(target), ModelDraft(draft), 2)
    outs = spec.generate([prompt] * N, cfg, generator=torch.Generator().manual_seed(0))
    assert 0 < spec.stats.accepted < spec.stats.drafted
    counts = torch.zeros(8, 8, dtype=torch.float64)
    for a, b in outs:
        counts[a, b] += 1
    p = exact_pair_distribution(target, prompt, cfg)
    q = exact_pair_distribution(draft, prompt, cfg)
    assert counts[p == 0].sum() == 0  # nothing outside the filtered support
    cells = p > 0
    small = cells & (p * N < 5)  # pooled into one cell, as the chi-square approximation asks
    big = cells & ~small
    pooled = [small] if bool(small.any()) else []
    obs = torch.stack([*counts[big], *(counts[m].sum() for m in pooled)])
    exp = N * torch.stack([*p[big], *(p[m].sum() for m in pooled)])
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    threshold = chi2.ppf(0.999, df)
    assert stat < threshold, f"chi-square {stat:.1f} >= {threshold:.1f} (df {df})"
    draft_stat = N * float(((q[cells] - p[cells]) ** 2 / p[cells]).sum()) + df  # expected under the draft
    assert draft_stat > 3 * threshold
