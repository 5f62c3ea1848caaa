"""Sampling: each filter on hand-made distributions, the order `sample_next` applies them in,
padded ids, the empirical distribution, and generation through the engine (seeds, EOS, stop strings, long
prompts, batches of different lengths ≡ one at a time), then `scratchlm sample` end to end."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from scratchlm.cli import main
from scratchlm.config import SampleConfig
from scratchlm.errors import UserError
from scratchlm.infer.engine import Engine
from scratchlm.infer.sample import (
    apply_temperature,
    check_sample_config,
    min_p_filter,
    repetition_penalty,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from scratchlm.infer.text import TextStream
from tests.helpers import make_checkpoint, tiny_model

PROBS = [0.5, 0.3, 0.15, 0.05]
# The same distribution with the vocabulary order shuffled, so filters must map sorted order back.
SHUFFLED = [0.15, 0.5, 0.05, 0.3]


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()  # (1, V): softmax gives back probs


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


# ----------------------------------------------------------------------------------------------
# filters


def test_temperature_scales_and_zero_is_greedy():
    x = torch.tensor([[1.0, -2.0, 4.0]])
    torch.testing.assert_close(apply_temperature(x, 2.0), x / 2, atol=0, rtol=0)  # halving is exact in fp32
    with pytest.raises(ValueError):
        apply_temperature(x, 0.0)
    cfg = SampleConfig(temperature=0.0)
    logits = torch.randn(5, 10)
    assert torch.equal(sample_next(logits, [[]] * 5, cfg), logits.argmax(-1))


def test_top_k():
    assert kept(top_k_filter(logits_of(PROBS), 2)) == [0, 1]
    assert kept(top_k_filter(logits_of(SHUFFLED), 2)) == [1, 3]
    assert kept(top_k_filter(logits_of(PROBS), 1)) == [0]
    for k in (0, 4, 10):  # off, or no fewer than V
        assert kept(top_k_filter(logits_of(PROBS), k)) == [0, 1, 2, 3]


@pytest.mark.parametrize("p,n", [(0.8, 2), (0.81, 3), (0.5, 1), (0.3, 1), (0.51, 2), (0.95, 3), (0.96, 4),
                                 (1.0, 4)])
def test_top_p_keeps_smallest_set_reaching_p(p, n):
    assert kept(top_p_filter(logits_of(PROBS), p)) == list(range(n))
    order = sorted(range(4), key=lambda i: -SHUFFLED[i])  # most likely first: [1, 3, 0, 2]
    assert kept(top_p_filter(logits_of(SHUFFLED), p)) == sorted(order[:n])


def test_top_p_always_keeps_the_top_token():
    logits = torch.tensor([[0.0, 10.0, 0.0]])
    assert kept(top_p_filter(logits, 1e-9)) == [1]


def test_min_p():
    # min_p 0.2 of the top 0.5: keep p >= 0.1.
    assert kept(min_p_filter(logits_of(PROBS), 0.2)) == [0, 1, 2]
    assert kept(min_p_filter(logits_of(SHUFFLED), 0.2)) == [0, 1, 3]
    assert kept(min_p_filter(logits_of(PROBS), 0.5)) == [0, 1]  # >= 0.25
    assert kept(min_p_filter(logits_of(PROBS), 0.9)) == [0]
    assert kept(min_p_filter(logits_of(PROBS), 0.0)) == [0, 1, 2, 3]


def test_repetition_penalty_signs():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    # Row 0 saw tokens 0 and 1 (1 twice: penalised once); row 1 saw only token 3.
    out = repetition_penalty(logits, [[0, 1, 1], [3]], 2.0)
    exact = dict(atol=0, rtol=0)  # multiplying or dividing by 2 is exact in fp32
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 0.5, 3.0], [2.0, -1.0, 0.5, 1.5]]), **exact)
    out_t = repetition_penalty(logits, torch.tensor([[0, 1, 1], [3, 3, 3]]), 2.0)
    torch.testing.assert_close(out_t, out, **exact)
    assert torch.equal(repetition_penalty(logits, [[0], [3]], 1.0), logits)
    # Both signs move down: a penalised token never becomes more likely.
    assert (out <= logits).all()


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, -1.0]])
    cfg = SampleConfig(temperature=0.0, repetition_penalty=2.0)
    assert sample_next(logits, [[1]], cfg).item() == 0
    assert sample_next(logits, [[0]], cfg).item() == 1  # 3/2 = 1.5 < 2


def test_padded_ids_are_never_sampled():
    logits = torch.zeros(2000, 8)
    logits[:, 4:] = 20.0  # padding rows the model happens to like
    gen = torch.Generator().manual_seed(0)
    ids = sample_next(logits, [[]] * 2000, SampleConfig(temperature=1.0), gen, valid_vocab=4)
    assert ids.max().item() < 4 and set(ids.tolist()) == {0, 1, 2, 3}
    greedy = sample_next(logits, [[]] * 2000, SampleConfig(temperature=0.0), gen, valid_vocab=4)
    assert greedy.max().item() < 4
    out = Engine(tiny_model()).generate([[1, 2, 3]] * 4, SampleConfig(temperature=2.0, max_new_tokens=30),
                                        valid_vocab=40)
    assert max(max(row) for row in out) < 40 and all(len(row) == 30 for row in out)


@pytest.mark.parametrize("top_k", [0, 3])
def test_empirical_distribution_matches_softmax(top_k):
    torch.manual_seed(0)
    base = torch.randn(8)  # (V,)
    n = 20_000
    gen = torch.Generator().manual_seed(1)
    ids = sample_next(base.expand(n, 8), [[]] * n, SampleConfig(temperature=1.0, top_k=top_k), gen)
    freq = torch.bincount(ids, minlength=8).float() / n
    expected = torch.softmax(top_k_filter(base[None], top_k), -1)[0]
    # Binomial std at p <= 0.5 is <= sqrt(0.25 / 20000) = 0.0035; allow about 4 sigma.
    assert (freq - expected).abs().max().item() < 0.015
    assert (freq[expected == 0] == 0).all()


def test_bad_settings_are_user_errors():
    for kw in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"min_p": -0.1}, {"top_k": -1},
               {"repetition_penalty": 0.0}, {"num_samples": 0}, {"stop": [""]}, {"temperature": math.inf}):
        with pytest.raises(UserError, match="sample."):
            check_sample_config(SampleConfig(**kw))


# ----------------------------------------------------------------------------------------------
# generation through the engine


def greedy(n: int = 12, **kw) -> SampleConfig:
    return SampleConfig(temperature=0.0, max_new_tokens=n, **kw)


def test_same_seed_same_text_other_seed_other_text():
    model = tiny_model()
    prompt = [[5, 6, 7]]
    a = Engine(model).generate(prompt, SampleConfig(temperature=1.0, max_new_tokens=20, seed=1))
    b = Engine(model).generate(prompt, SampleConfig(temperature=1.0, max_new_tokens=20, seed=1))
    c = Engine(model).generate(prompt, SampleConfig(temperature=1.0, max_new_tokens=20, seed=2))
    assert a == b and a != c


def test_batch_of_different_lengths_equals_one_at_a_time():
    model = tiny_model()
    torch.manual_seed(1)
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (1, 5, 16, 20, 5)]  # 20 > block_size
    for cfg in (greedy(), greedy(repetition_penalty=1.3)):
        with pytest.warns(UserWarning):
            batched = Engine(model).generate(prompts, cfg)
        for prompt, out in zip(prompts, batched):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the 20-token prompt warns again
                assert Engine(model).generate([prompt], cfg) == [out]


def test_eos_stops_a_row():
    model = tiny_model()
    full = Engine(model).generate([[3, 4]], greedy(n=15))[0]
    eos = full[4]
    out = Engine(model).generate([[3, 4], [3, 4]], greedy(n=15), eos_id=eos)
    assert out[0] == out[1] == full[: full.index(eos)]


def test_stop_string_stops_and_is_trimmed():
    alphabet = [chr(0x41 + i) for i in range(64)]  # one distinct character per id

    def decode(ids):
        return "".join(alphabet[i] for i in ids)

    model = tiny_model()
    full = Engine(model).generate([[3, 4]], greedy(n=15))[0]
    stop = decode(full[5:7])
    out = Engine(model).generate([[3, 4]], greedy(n=15, stop=[stop, "not there"]), decode=decode)[0]
    assert out == full[: decode(full).index(stop)]
    assert stop not in decode(out)
    with pytest.raises(ValueError):
        Engine(model).generate([[3, 4]], greedy(stop=["x"]))  # stop strings need a decode function


def test_long_prompt_is_cropped_with_a_warning_and_still_generates():
    model = tiny_model()
    prompt = list(range(40))  # block_size is 16
    with pytest.warns(UserWarning, match="block_size=16"):
        out = Engine(model).generate([prompt], greedy(n=8))[0]
    assert len(out) == 8
    assert out == Engine(model).generate([prompt[-16:]], greedy(n=8))[0]  # the model only ever saw the last 16


def test_text_stream_never_shows_what_it_takes_back():
    pieces = {0: "ab", 1: "c", 2: "dX", 3: "Y", 4: "e"}

    def decode(ids):
        return "".join(pieces[i] for i in ids)

    shown: list[str] = []
    stream = TextStream(decode, shown.append, stop=["XY"])
    for t in (0, 1, 2):
        stream.push(t)
    assert "".join(shown) == "abc"  # "dX" may start "XY": held back
    stream.push(3)  # "XY" complete: generate would trim the continuation to [0, 1]
    stream.close([0, 1])
    assert "".join(shown) == "abc"
    shown.clear()
    stream = TextStream(decode, shown.append, stop=["XY"])
    for t in (0, 2, 4):
        stream.push(t)
    stream.close([0, 2, 4])
    assert "".join(shown) == "abdXe"


# ----------------------------------------------------------------------------------------------
# the CLI verb


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("run") / "run")


def sample(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["sample", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_cli(capsys, run_dir):
    code, out, err = sample(capsys, "--ckpt", str(run_dir), "--prompt", "ab", "--sample.max_new_tokens=5",
                            "--sample.stream=false", "--device", "cpu")
    assert code == 0, err
    assert out.startswith("ab") and len(out.rstrip("\n")) <= 2 + 5
    # Streaming prints the same text for the same seed.
    code, streamed, err = sample(capsys, "--ckpt", str(run_dir), "--prompt", "ab", "--sample.max_new_tokens=5")
    assert code == 0 and streamed == out


def test_sample_cli_several_samples_and_empty_prompt(capsys, run_dir):
    code, out, err = sample(capsys, "--ckpt", str(run_dir), "--sample.max_new_tokens=4",
                            "--sample.num_samples=3", "--sample.temperature=1.5")
    assert code == 0, err
    assert out.count("-" * 40 + "\n") == 2


def test_sample_cli_long_prompt_warns(capsys, run_dir):
    code, out, err = sample(capsys, "--ckpt", str(run_dir), "--prompt", "abcdefgh" * 4, "--sample.max_new_tokens=3")
    assert code == 0 and "warning" in err and "last 16" in err


@pytest.mark.parametrize("argv,needle", [
    (["--prompt", "abz"], "'z'"),
    (["--sample.temperature=-1"], "sample.temperature"),
    (["--model.n_layer=3"], "--model.n_layer"),
    (["--sample.nope=1"], "unknown key"),
    (["--device", "cuda:0" if not torch.cuda.is_available() else "nonsense"], "--device"),
])
def test_sample_cli_user_errors(capsys, run_dir, argv, needle):
    code, out, err = sample(capsys, "--ckpt", str(run_dir), *argv)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_sample_cli_bad_checkpoint(capsys, tmp_path):
    code, out, err = sample(capsys, "--ckpt", str(tmp_path / "missing"))
    assert code == 2 and "no such checkpoint" in err and len(err.strip().splitlines()) == 1
