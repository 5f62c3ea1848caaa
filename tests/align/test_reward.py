"""The reward-model stage on tiny random models: the objective against a hand computation, the pair
loader's resumability, gradient accumulation 1x8 == 8x1, embedded pairs disjoint from the SFT run's
prompts, the surface-cue baselines near chance on corrupted pairs, a whole run writing its checks,
and bad input (identical pairs, empty responses, a checkpoint of the wrong kind)."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from scratchlm import checkpoint as ckpt_io
from scratchlm.align import rm_checks
from scratchlm.align.data import corrupted_pairs, split_pairs_by_prompt, tokenize_pairs
from scratchlm.align.reward import (
    PairLoader,
    RewardObjective,
    build_pairs,
    score,
    train_reward_model,
    trained_prompts,
)
from scratchlm.checkpoint import load_reward_model, save_checkpoint
from scratchlm.config import Config, LlamaConfig, get_preset
from scratchlm.errors import UserError
from scratchlm.model import build_model
from scratchlm.model.reward import RewardModel, pad_rows
from scratchlm.tasks.families import generate_tasks
from scratchlm.tokenizer import ByteTokenizer
from scratchlm.tokenizer.chat import ensure_chat_specials
from scratchlm.train.loop import forward_backward
from scratchlm.train.objective import count_examples


def chat_tok():
    return ensure_chat_specials(ByteTokenizer({"<|endoftext|>": 256}))[0]


def tiny_rm(seed: int = 0, block: int = 128, likelihood: bool = False) -> RewardModel:
    tok = chat_tok()
    torch.manual_seed(seed)
    body = build_model(LlamaConfig(vocab_size=tok.vocab_size, block_size=block, n_layer=2, n_head=2, n_kv_head=1,
                                   n_embd=32, bias=False, pad_vocab_to=1))
    rm = RewardModel(body, tok.special_tokens["<|assistant|>"] if likelihood else None)
    with torch.no_grad():
        rm.head.weight.normal_(0.0, 0.5)  # rewards spread out, so pairs differ
    return rm


def save_sft_like(root, n_tasks: int = 50, seed: int = 3, tie: bool = True, **sft):
    """A checkpoint shaped like an SFT run's: a chat tokenizer, sft.base set, sft.n_tasks embedded tasks."""
    tok = chat_tok()
    cfg = Config(name="sft", out_dir=str(root), seed=seed)
    cfg.tokenizer.kind = "byte"
    cfg.sft.base, cfg.sft.n_tasks = "some/pretrain", n_tasks
    for k, v in sft.items():
        setattr(cfg.sft, k, v)
    cfg.model = LlamaConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                            bias=False, pad_vocab_to=1, tie_embeddings=tie)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    save_checkpoint(root, 1, model, torch.optim.AdamW(model.parameters()), cfg, tok, trainer={}, keep_last=1)
    return root


def rm_cfg(base, out, **pref) -> Config:
    cfg = get_preset("rm-tiny")
    cfg.out_dir, cfg.pref.base, cfg.pref.kind, cfg.pref.n_prompts = str(out), str(base), "corrupted", 60
    t = cfg.train
    t.max_steps, t.batch_size, t.eval_interval, t.warmup_steps, t.tensorboard = 4, 4, 4, 1, False
    t.precision = "fp32"  # the tests compare numbers: "auto" may choose bf16 on some CPUs
    for k, v in pref.items():
        setattr(cfg.pref, k, v)
    return cfg


def encoded_pairs(n: int = 12, seed: int = 0):
    return tokenize_pairs(corrupted_pairs(n, seed), chat_tok(), 128)[0]


def test_objective_matches_hand_computation():
    rm = tiny_rm().eval()
    pairs = encoded_pairs(3)
    x = pad_rows([r for p in pairs for r in (p.chosen_ids, p.rejected_ids)], side="left")
    margins = torch.tensor([0.0, 0.5, -1.0])
    rewards = [rm(pad_rows([r]))[0].item() for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
    rc, rr = rewards[0::2], rewards[1::2]
    c = 0.1
    hand = sum(math.log1p(math.exp(-(a - b - m))) for a, b, m in zip(rc, rr, margins.tolist())) / 3 \
        + c * sum((a + b) ** 2 for a, b in zip(rc, rr)) / 3
    obj = RewardObjective(rm, center_coef=c, use_margin=True).eval()
    out, loss = obj(x, margins)
    assert loss.item() == pytest.approx(hand, rel=1e-5)
    assert out.tolist() == pytest.approx(rewards, abs=1e-5)
    m = obj.metrics(training=False)
    assert m["accuracy"] == pytest.approx(sum(a > b for a, b in zip(rc, rr)) / 3)
    assert m["margin"] == pytest.approx(sum(a - b for a, b in zip(rc, rr)) / 3, abs=1e-5)
    assert m["reward_chosen"] == pytest.approx(sum(rc) / 3, abs=1e-5)
    assert m["reward_rejected"] == pytest.approx(sum(rr) / 3, abs=1e-5)
    no_margin = RewardObjective(rm, center_coef=0.0, use_margin=False).eval()(x, margins)[1]
    assert no_margin.item() == pytest.approx(
        sum(math.log1p(math.exp(-(a - b))) for a, b in zip(rc, rr)) / 3, rel=1e-5)
    assert obj.count(margins) == 3


def test_pair_loader_resumes_and_validation_reads_each_pair_once():
    pairs = encoded_pairs(10)
    a = PairLoader(pairs, 4, seed=7)
    for _ in range(4):  # past the first epoch (10 pairs)
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    want = [a.next_batch() for _ in range(5)]
    b = PairLoader(pairs, 4, seed=7)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(want, [b.next_batch() for _ in range(5)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(UserError, match="pairs changed"):
        PairLoader(pairs[:9], 4).load_state_dict(state)
    val = PairLoader(pairs, 4, shuffle=False, fill=False)
    sizes = [val.next_batch()[1].numel() for _ in range(3)]
    assert sizes == [4, 4, 2]
    x, _ = PairLoader(pairs[:1], 1, shuffle=False).next_batch()
    assert x[0, : len(pairs[0].chosen_ids)].tolist() == pairs[0].chosen_ids  # row 0 chosen, row 1 rejected
    assert x[1, : len(pairs[0].rejected_ids)].tolist() == pairs[0].rejected_ids


@pytest.mark.parametrize("likelihood", [False, True])
def test_grad_accumulation_1x8_equals_8x1(likelihood):
    """One micro-batch of 8 pairs and 8 of 1 pair give the same gradient: the objective's loss is a
    mean over pairs and the loop weighs each micro-batch by its pairs (float64 trunk), with the
    likelihood term too (its per-row mean must not depend on the batch's padding)."""
    pairs = encoded_pairs(8)
    margins = torch.linspace(-1, 1, 8, dtype=torch.float64)
    grads = []
    for split in (8, 1):
        rm = tiny_rm(seed=1, likelihood=likelihood).double()
        obj = RewardObjective(rm, center_coef=0.05).train()
        micro = []
        for i in range(0, 8, split):
            chunk = pairs[i : i + split]
            micro.append((pad_rows([r for p in chunk for r in (p.chosen_ids, p.rejected_ids)]), margins[i : i + split]))
        counts = [count_examples(obj, y) for _, y in micro]
        forward_backward(obj, micro, contextlib.nullcontext(), None, counts)
        grads.append({n: p.grad.clone() for n, p in obj.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    assert ("network.likelihood_scale" in grads[0]) == likelihood
    for name in grads[0]:  # the rewards leave the RM in fp32: agreement to fp32 rounding
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-8, rtol=1e-5, msg=name)


def test_embedded_pairs_avoid_the_sft_prompts(tmp_path):
    base = save_sft_like(tmp_path / "sft", n_tasks=50, seed=3)
    sft_prompts = {t.instruction for t in generate_tasks(50, 3)}
    assert trained_prompts(base) == sft_prompts
    rm = tiny_rm()
    for seed in (3, 11):  # the SFT run's seed (the tasks after its own), and another (collisions filtered)
        cfg = rm_cfg(base, tmp_path / "rm", n_prompts=40)
        cfg.seed = seed
        train, held, counts = build_pairs(cfg, rm, chat_tok())
        asked = {p.prompt[-1][1] for p in train + held}
        assert len(asked) == 40 and not asked & sft_prompts
        assert not {p.prompt[-1][1] for p in train} & {p.prompt[-1][1] for p in held}
        assert counts["pairs"] == 40 == counts["train"] + counts["held_out"]
    # a preference run on top (DPO) adds its own embedded prompts to its base's
    dpo = Config(name="dpo", out_dir=str(tmp_path / "dpo"), seed=3)
    dpo.pref.base, dpo.pref.n_prompts = str(base), 20
    dpo.model = LlamaConfig(vocab_size=chat_tok().vocab_size, block_size=128, n_layer=2, n_head=2, n_kv_head=1,
                            n_embd=32, bias=False, pad_vocab_to=1)
    save_checkpoint(tmp_path / "dpo", 1, build_model(dpo.model), torch.optim.AdamW(rm.parameters()), dpo, chat_tok(),
                    trainer={}, keep_last=1)
    assert trained_prompts(tmp_path / "dpo") == sft_prompts | {t.instruction for t in generate_tasks(70, 3)[50:]}


def test_surface_cues_stay_near_chance_on_corrupted_pairs():
    """A scorer that sees only the length, or only the format, of a response gets <= 60% of the
    embedded held-out pairs right: the corruptions keep the form of the right answer."""
    train, held = split_pairs_by_prompt(corrupted_pairs(2000, 5), 0.1, 5)
    tr, ho = [(p.chosen, p.rejected) for p in train], [(p.chosen, p.rejected) for p in held]
    for name, cue in rm_checks.CUES.items():
        acc = sum(rm_checks.cue_credits(cue, tr, ho)) / len(ho)
        assert 0.4 <= acc <= 0.6, (name, acc)
    # and a length cue does win where the chosen side is always the longer one
    long = [(c + " indeed", r) for c, r in tr]
    assert sum(rm_checks.cue_credits(rm_checks.length_cue, long, [(c + " indeed", r) for c, r in ho])) / len(ho) > 0.8
    assert rm_checks.format_cue("The lord, 81.5!") == "a a, 9.9!"


def test_train_reward_model_end_to_end(tmp_path):
    base = save_sft_like(tmp_path / "sft")
    out = tmp_path / "rm"
    result = train_reward_model(rm_cfg(base, out), progress=False)
    assert (out / "rm_checks.png").stat().st_size > 10_000
    summary = json.loads((out / "eval" / "rm_summary.json").read_text())
    assert summary["n_held_out"] == len(result.scored) == 6
    assert {"all", "kind corrupted", "family add"} <= set(summary["accuracy"])
    assert {"rm", "length_only", "format_only", "n"} == set(summary["accuracy"]["all"])
    assert "reward model" in (out / "eval" / "rm_summary.md").read_text()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("accuracy" in m for m in metrics) and any("val_accuracy" in m for m in metrics)
    rm, tok, _ = load_reward_model(out)
    assert rm.response_start == tok.special_tokens["<|assistant|>"]  # the preset's likelihood term, reloaded
    s = result.scored[0]
    assert score(rm, tok, s.prompt, s.chosen) == pytest.approx(s.r_chosen, abs=1e-5)
    with pytest.raises(UserError, match="nothing to score"):
        score(rm, tok, s.prompt, "  ")
    with pytest.raises(UserError, match="not a language model|reward model"):  # an RM is no policy
        train_reward_model(rm_cfg(out, tmp_path / "rm2"), progress=False)
    with pytest.raises(UserError, match="not a reward model"):  # a policy is no RM
        load_reward_model(base)


@pytest.mark.parametrize("tie", [True, False])
def test_lora_reward_model_reloads_with_its_adapters(tmp_path, tie):
    """With LoRA the body is frozen, and so is an untied LM head of the likelihood term (it sits outside
    the body); the head and the term's scale train."""
    base = save_sft_like(tmp_path / "sft", tie=tie)
    cfg = rm_cfg(base, tmp_path / "rm")
    cfg.sft.lora_r, cfg.train.max_steps = 2, 2
    result = train_reward_model(cfg, progress=False)
    policy, _, _ = ckpt_io.load_policy(base)
    rm, tok, _ = load_reward_model(tmp_path / "rm")
    assert (rm.lm_head.weight is rm.body.embedding.weight) == tie
    if not tie:
        torch.testing.assert_close(rm.lm_head.weight, policy.unembedding.weight, rtol=0, atol=0)
    assert rm.likelihood_scale.item() != 1.0  # trained
    s = result.scored[1]
    assert score(rm, tok, s.prompt, s.rejected) == pytest.approx(s.r_rejected, abs=1e-5)


def test_bad_pairs_and_bases(tmp_path):
    base = save_sft_like(tmp_path / "sft")
    rows = [{"prompt": f"Say {i}", "chosen": f"{i}", "rejected": f"not {i}"} for i in range(10)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows + [{"prompt": "Hi", "chosen": "yo", "rejected": "yo "}]))
    with pytest.raises(UserError, match="same text"):
        build_pairs(rm_cfg(base, tmp_path / "a", data=[str(data)]), tiny_rm(), chat_tok())
    train, held, counts = build_pairs(rm_cfg(base, tmp_path / "a", data=[str(data)], identical="drop"), tiny_rm(),
                                      chat_tok())
    assert counts["identical"] == 1 and len(train) + len(held) == 10
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "Hi", "chosen": "", "rejected": "no"}) + "\n")
    with pytest.raises(UserError, match="response is empty"):
        build_pairs(rm_cfg(base, tmp_path / "a", data=[str(empty)]), tiny_rm(), chat_tok())
    with pytest.raises(UserError, match="pref.base is not set"):
        train_reward_model(rm_cfg("", tmp_path / "b"), progress=False)
    plain = tmp_path / "plain"  # a base without the chat tokens: not an SFT run
    cfg = Config(out_dir=str(plain))
    cfg.model = LlamaConfig(vocab_size=257, block_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, pad_vocab_to=1)
    model = build_model(cfg.model)
    save_checkpoint(plain, 1, model, torch.optim.AdamW(model.parameters()), cfg, ByteTokenizer({"<|endoftext|>": 256}),
                    trainer={}, keep_last=1)
    with pytest.raises(UserError, match="lacks the chat tokens"):
        train_reward_model(rm_cfg(plain, tmp_path / "c"), progress=False)
