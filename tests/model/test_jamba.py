"""The Jamba hybrid: Jamba's layer layout, the two scans giving one model, cached ≡ uncached through the
engine (alone and left-padded in a batch, float64 logits and exact tokens), packed documents computed as
if alone, the Mamba state's bytes flat over 10x the context (and the whole cache against a same-width
Llama's), a training step, bad settings, and `scratchlm pretrain --preset jamba-tiny` then `sample`."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.cli import main
from scratchlm.config.model import JambaConfig
from scratchlm.errors import UserError
from scratchlm.infer.engine import Engine
from scratchlm.infer.kv_cache import KVCache
from scratchlm.infer.speculative import ModelDraft, SpeculativeDecoder
from scratchlm.model import build_model
from scratchlm.model.jamba import Jamba, MambaBlock
from scratchlm.model.layers import DocumentMask
from scratchlm.model.llama import TransformerBlock
from scratchlm.model.moe import MoELayer
from tests.helpers import assert_logits_close, engine_greedy, prompts_of, tiny_model, uncached_greedy

JAMBA = dict(arch="jamba", bias=False, n_layer=4, n_head=4, n_kv_head=2, n_experts=4, mamba_d_state=4,
             mamba_expand=2, block_size=32)


def test_layers_interleave_as_jamba():
    cfg = JambaConfig(vocab_size=64, n_layer=8, n_head=2, n_embd=32, attn_layer_period=4, attn_layer_offset=1,
                      moe_every=2, moe_first_dense=1)
    model = build_model(cfg)
    assert [type(b) for b in model.layers] == [MambaBlock, TransformerBlock, MambaBlock, MambaBlock] * 2
    assert [isinstance(b.feed_forward, MoELayer) for b in model.layers] == [False, True] * 4
    assert model.attention_slot == {1: 0, 5: 1} and model.attention_shape().n_layer == 2
    assert model.rotary is None and not model.can_stretch


def test_sequential_and_chunked_scans_give_one_model():
    idx = torch.randint(0, 64, (2, 29))
    logits = {}
    for scan in ("sequential", "chunked"):
        model = tiny_model(n_embd=16, mamba_scan=scan, mamba_chunk=8, **JAMBA).double()
        with torch.no_grad():
            logits[scan] = model(idx)[0]
    torch.testing.assert_close(logits["chunked"], logits["sequential"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scan", ["chunked", "sequential"])
def test_cached_equals_uncached_alone_and_left_padded_in_a_batch(scan):
    model = tiny_model(n_embd=16, mamba_scan=scan, **JAMBA).double()
    prompts = prompts_of((1, 7, 13, 4))
    n = 12
    batched, batched_logits = engine_greedy(model, prompts, n)
    for r, prompt in enumerate(prompts):
        ref_tokens, ref_logits = uncached_greedy(model, prompt, n)
        ref_logits = ref_logits.float()  # the engine hands out fp32 logits
        alone, alone_logits = engine_greedy(model, [prompt], n)
        assert alone[0] == ref_tokens and batched[r] == ref_tokens
        assert_logits_close(alone_logits[0], ref_logits)
        assert_logits_close(batched_logits[r], ref_logits)
        # computed in float64, the cached paths differ from the full forward only by the final rounding
        scale = ref_logits.abs().max()
        assert (alone_logits[0] - ref_logits).abs().max() <= 1e-6 * scale
        assert (batched_logits[r] - ref_logits).abs().max() <= 1e-6 * scale


def test_packed_documents_are_computed_as_if_alone():
    model = tiny_model(n_embd=16, **JAMBA).double()
    docs = prompts_of((5, 9, 3))
    packed = torch.tensor([sum(docs, [])])
    doc_ids = torch.tensor([[i for i, d in enumerate(docs) for _ in d]])
    with torch.no_grad():
        out, _ = model(packed, doc_mask=DocumentMask(doc_ids))
        alone = torch.cat([model(torch.tensor([d]))[0] for d in docs], 1)
        unmasked, _ = model(packed)
    torch.testing.assert_close(out, alone, rtol=1e-10, atol=1e-10)
    assert (unmasked[:, 5:] - alone[:, 5:]).abs().max() > 1e-3  # without the mask the documents do mix


def mamba_state_bytes(cache: KVCache, model: Jamba) -> int:
    return sum(cache.state(i).nelement() * cache.state(i).element_size()
               for i in range(model.config.n_layer) if i not in model.attention_slot)


def test_mamba_state_is_flat_over_ten_times_the_context():
    model = tiny_model(n_embd=32, **JAMBA)
    llama = tiny_model(arch="llama", bias=False, n_layer=4, n_head=4, n_kv_head=2, n_embd=32, block_size=32)
    ctx = 16
    held = {}
    for scale in (1, 10):
        n = ctx * scale
        cache = KVCache.for_model(model, 1, n)
        llama_cache = KVCache.for_model(llama, 1, n)
        with torch.no_grad():
            model(torch.randint(0, 64, (1, n // 2)), cache=cache)  # a prefill, then decode steps to n tokens
            for _ in range(n - n // 2):
                model(torch.randint(0, 64, (1, 1)), cache=cache)
        assert int(cache.lengths()[0]) == n
        held[scale] = (mamba_state_bytes(cache, model), cache.nbytes, llama_cache.nbytes)
        print(f"{n} tokens: Mamba states {held[scale][0]} B, hybrid cache {held[scale][1]} B, "
              f"same-width Llama cache {held[scale][2]} B")
    assert held[1][0] == held[10][0] > 0  # the Mamba layers hold as much at 10x the context as at 1x
    # only the one attention layer in four grows: the hybrid's growth is a quarter of the Llama's
    assert held[10][1] - held[1][1] == (held[10][2] - held[1][2]) // 4


def test_a_training_step_moves_every_parameter_and_adds_the_router_losses():
    model = tiny_model(n_embd=16, std=0.02, **JAMBA).train()
    x = torch.randint(0, 64, (2, 16))
    _, loss = model(x, x)
    aux = model.aux_loss()
    assert aux.item() > 0 and len(model.moe_layers()) == 2
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead
    assert model.routing_metrics() and model.flops_per_token() > 6 * model.active_params() > 0


def test_bad_settings_are_one_line_user_errors():
    with pytest.raises(UserError, match="attn_layer_offset=4 must be < model.attn_layer_period=4"):
        JambaConfig(attn_layer_offset=4).validate()
    with pytest.raises(UserError, match="n_active_experts"):
        JambaConfig(n_experts=2, n_active_experts=3).validate()


SMALL = ["--quiet", "--tokenizer.vocab_size=300", "--train.batch_size=4", "--train.eval_interval=20",
         "--train.eval_iters=1", "--train.log_interval=5", "--train.tensorboard=false", "--train.precision=fp32",
         "--data.workers=1"]


def test_pretrain_jamba_tiny_then_sample(capsys, tmp_path):
    corpus = tmp_path / "corpus.txt"
    words = ["the", "cat", "sat", "on", "mat", "dog", "log", "zebra", "quickly", "jumped", "over", "lazy", "fox"]
    corpus.write_text("\n".join(" ".join(words[(i * k) % len(words)] for k in range(1, 9)) + f" {i}."
                                for i in range(300)))
    run = tmp_path / "run"
    assert main(["pretrain", str(corpus), "--out", str(run), "--preset", "jamba-tiny", "--train.max_steps=20",
                 *SMALL]) == 0
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses and losses[-1] < losses[0]
    model, _, _ = load_model_for_inference(run, "cpu")
    assert isinstance(model, Jamba)
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(run), "--prompt", "the", "--sample.max_new_tokens=8",
                 "--sample.temperature=0"]) == 0
    assert capsys.readouterr().out.strip()


def test_speculative_decoding_refuses_a_recurrent_model_in_one_line():
    jamba, llama = tiny_model(n_embd=16, **JAMBA), tiny_model(arch="llama", n_embd=16, n_layer=2, n_head=2)
    with pytest.raises(UserError, match="target model.arch=jamba keeps a recurrent state"):
        SpeculativeDecoder(Engine(jamba), ModelDraft(llama), 2)
    with pytest.raises(UserError, match="draft model.arch=jamba keeps a recurrent state"):
        SpeculativeDecoder(Engine(llama), ModelDraft(jamba), 2)
    assert jamba.recurrent and not llama.recurrent
