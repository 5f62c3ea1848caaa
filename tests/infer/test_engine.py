"""The inference engine: cached generation ≡ uncached generation (tokens identical, fp32 logits close at
every step: helpers.LOGITS_ATOL/RTOL say why) for the GPT and Llama variants (GQA, multi-query +
QK-norm, sliding window), alone and in batches of different lengths; sliding past the context;
finished rows leaving the batch; and the errors a user can meet. The caches' own operations are
tested in test_kv_cache.py."""

from __future__ import annotations

import warnings

import pytest
import torch

from scratchlm.config import SampleConfig
from scratchlm.errors import UserError
from scratchlm.infer.engine import SLIDE_KEEP, Engine
from scratchlm.infer.kv_cache import KVCache
from tests.helpers import (
    assert_logits_close,
    char_tokenizer,
    engine_greedy,
    greedy,
    prompts_of,
    tiny_model,
    uncached_greedy,
)

VARIANTS = {
    "gpt": dict(std=0.2),
    "llama-gqa": dict(arch="llama", bias=False, n_head=4, n_kv_head=2, std=0.2),
    "llama-mqa-qknorm": dict(arch="llama", bias=False, n_head=4, n_kv_head=1, qk_norm=True, std=0.2),
    "llama-window": dict(arch="llama", bias=False, n_head=4, n_kv_head=2, sliding_window=5, std=0.2),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_equals_uncached_alone_and_batched(variant):
    model = tiny_model(block_size=32, **VARIANTS[variant])
    prompts = prompts_of((1, 7, 13, 4))
    n = 16  # longest prompt + n = 29 <= block_size: within the context, no slide
    batched, batched_logits = engine_greedy(model, prompts, n)
    for r, prompt in enumerate(prompts):
        ref_tokens, ref_logits = uncached_greedy(model, prompt, n)
        alone, alone_logits = engine_greedy(model, [prompt], n)
        assert alone[0] == ref_tokens and batched[r] == ref_tokens
        assert_logits_close(alone_logits[0], ref_logits)
        assert_logits_close(batched_logits[r], ref_logits)


def test_sliding_window_model_past_its_window():
    model = tiny_model(block_size=32, **VARIANTS["llama-window"])
    prompt = prompts_of((9,))[0]
    assert len(prompt) + 20 > 2 * model.config.sliding_window  # many tokens leave the window
    tokens, logits = engine_greedy(model, [prompt], 20)
    ref_tokens, ref_logits = uncached_greedy(model, prompt, 20)
    assert tokens[0] == ref_tokens
    assert_logits_close(logits[0], ref_logits)


def test_prefill_and_decode_match_the_full_forward():
    model = tiny_model(block_size=32, **VARIANTS["llama-gqa"])
    engine = Engine(model)
    prompts = prompts_of((3, 9, 6))
    logits, cache = engine.prefill(prompts)
    assert isinstance(cache, KVCache) and cache.len == 9 and logits.shape == (3, 64)
    nxt = [5, 6, 7]
    logits2 = engine.decode(nxt, cache)
    with torch.no_grad():
        for r, p in enumerate(prompts):
            full, _ = model(torch.tensor([p + [nxt[r]]]))
            assert_logits_close(logits[r], full[0, -2])
            assert_logits_close(logits2[r], full[0, -1])


def test_past_the_context_the_engine_slides_by_half_a_block():
    model = tiny_model(block_size=16, **VARIANTS["llama-gqa"])
    ctx = model.config.block_size
    keep = int(ctx * SLIDE_KEEP)
    prompt = prompts_of((12,))[0]
    n = 40
    tokens, logits = engine_greedy(model, [prompt], n)
    # The documented rule, uncached: when the text would overflow the context, keep its last half block.
    view, ref_tokens, ref_logits = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            out, _ = model(torch.tensor([view]))
            ref_logits.append(out[0, -1])
            ref_tokens.append(int(out[0, -1].argmax()))
            view.append(ref_tokens[-1])
            if len(view) > ctx:
                view = view[-keep:]
    assert tokens[0] == ref_tokens and len(ref_tokens) == n
    assert_logits_close(logits[0], torch.stack(ref_logits))


@pytest.mark.parametrize("variant", ["gpt", "llama-window"])
def test_batch_past_the_context_equals_one_at_a_time(variant):
    model = tiny_model(**VARIANTS[variant])  # block_size 16
    prompts = prompts_of((1, 5, 16, 20, 9))
    with pytest.warns(UserWarning, match="block_size=16"):
        batched = Engine(model).generate(prompts, greedy(30))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 20-token prompt warns again
        for prompt, out in zip(prompts, batched):
            assert Engine(model).generate([prompt], greedy(30)) == [out]


def test_finished_rows_leave_the_batch_and_the_rest_go_on():
    model = tiny_model(block_size=32, **VARIANTS["llama-gqa"])
    prompts = prompts_of((4, 9, 2))
    free = Engine(model).generate(prompts, greedy(12))
    eos = free[1][3]  # row 1 stops after 3 tokens; the others stop wherever they meet it, or not at all
    engine = Engine(model)
    sizes = []
    outs = engine.generate(prompts, greedy(12), eos_id=eos, on_logits=lambda rows, lg: sizes.append(len(rows)))
    for prompt, out in zip(prompts, outs):
        assert [out] == Engine(model).generate([prompt], greedy(12), eos_id=eos)
    assert outs[1] == free[1][:3]
    assert min(sizes) < 3 and engine.cache.k.size(1) == sizes[-1]  # the cache shrank with the batch


def test_tokenizer_supplies_decode_eos_and_vocabulary():
    tok = char_tokenizer()
    model = tiny_model(block_size=32)
    engine = Engine(model, tok)
    out = engine.generate([tok.encode("abc")], SampleConfig(temperature=2.0, max_new_tokens=30, stop=["zz"]))[0]
    assert max(out) < tok.vocab_size  # the padded ids of the embedding are never sampled


def test_generation_stops_at_the_end_token_and_leaves_it_out():
    tok = char_tokenizer()
    model = tiny_model(block_size=32)
    prompt = tok.encode("abc")
    free = Engine(model).generate([prompt], greedy(12), valid_vocab=tok.vocab_size)[0]  # no end token: 12 tokens
    # The trigger: the first generated token (after two) not seen before; once the model has read it,
    # a forward hook makes the end token its clear favourite, so greedy emits it at step j + 1.
    j = next(i for i in range(2, 12) if free[i] not in prompt + free[:i] and tok.eot_id not in free[: i + 1])
    trigger = free[j]

    def end_after_trigger(module, args, output):
        logits, loss = output  # (B, T, V); the engine asks for the last position only
        logits[:, -1, tok.eot_id] += 100.0 * (args[0][:, -1] == trigger)
        return logits, loss

    model.register_forward_hook(end_after_trigger)
    chosen: list[int] = []
    out = Engine(model, tok).generate([prompt], greedy(12),
                                      on_logits=lambda rows, lg: chosen.append(int(lg[0, : tok.vocab_size].argmax())))
    assert chosen == free[: j + 1] + [tok.eot_id]  # the model did emit the end token, at step j + 1...
    assert out == [free[: j + 1]]  # ...and generation stopped there, without it


def test_streaming_callback_gets_row_and_token():
    model = tiny_model(block_size=32)
    seen: list[tuple[int, int]] = []
    outs = Engine(model).generate([[1, 2], [3]], SampleConfig(max_new_tokens=6),
                                  on_token=lambda r, t: seen.append((r, t)))
    for r in (0, 1):
        assert [t for row, t in seen if row == r] == outs[r]


def test_models_without_a_cache_still_generate():
    model = tiny_model(arch="bigram")
    out = Engine(model).generate([[1, 2, 3]], greedy(5))[0]
    seq = [1, 2, 3]
    for _ in range(5):
        seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert out == seq[3:]


def test_uncached_mode_equals_cached():
    model = tiny_model(block_size=32, **VARIANTS["llama-gqa"])
    prompts = prompts_of((3, 8))
    assert Engine(model).generate(prompts, greedy(10), cache="none") == Engine(model).generate(prompts, greedy(10))


def test_user_errors():
    gpt = tiny_model()
    with pytest.raises(UserError, match="max_len"):
        Engine(gpt).generate([[1]], greedy(3), max_len=64)
    with pytest.raises(UserError, match="sample.cache"):
        Engine(gpt).generate([[1]], greedy(3), cache="paged")
    with pytest.raises(UserError, match="RoPE"):
        Engine(gpt).generate([[1]], greedy(3), cache="sink")
    with pytest.raises(ValueError, match="at least one token"):
        Engine(gpt).generate([[1], []], greedy(3))
    assert Engine(gpt).generate([[1], [2]], greedy(0)) == [[], []]
