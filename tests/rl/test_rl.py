"""The RL stage's invariants on a tiny byte-level SFT run: the first update's probability ratio is
exactly 1 and the first rollout's policy/reference KL exactly 0 (GRPO, PPO, LoRA); prompt tokens
get no gradient; the shared value head reads the policy's own hidden states; resume mid-rollout is
the uninterrupted run; GRPO's dynamic sampling keeps only informative groups; the stage writes its
summary, answers and curves; bad settings get one line each."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm import checkpoint as ckpt_io
from scratchlm.config import Config, RLConfig, get_preset, set_setting
from scratchlm.errors import UserError
from scratchlm.model.reward import RewardModel
from scratchlm.rl.objective import RLObjective
from scratchlm.rl.rollout import build_rollout, gather_logprobs
from scratchlm.rl.stage import rl, split_prompts
from scratchlm.tasks.families import generate_tasks
from tests.helpers import tiny_llama_base, tiny_sft_run


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    return tiny_sft_run(root, tiny_llama_base(root, 96, pad_vocab_to=1), 2)


@pytest.fixture(scope="module")
def random_rm(sft_run, tmp_path_factory):
    """A reward model with the policy's tokenizer, a random head and the likelihood term (as `rm train`
    makes them): rewards that differ between the tiny policy's answers (the checker scores them all 0,
    which teaches nothing)."""
    ckpt = ckpt_io.find_checkpoint(sft_run)
    cfg, tok = ckpt_io.load_config_and_tokenizer(ckpt)
    policy, _, _ = ckpt_io.load_policy(sft_run)
    torch.manual_seed(0)
    rm = RewardModel(policy, tok.special_tokens["<|assistant|>"])
    torch.nn.init.normal_(rm.head.weight, 0.0, 1.0)
    out = tmp_path_factory.mktemp("rm") / "rm"
    ckpt_io.save_weights_checkpoint(out, rm, cfg, tok, {})
    return out


def rl_cfg(sft_run, out, **settings) -> Config:
    cfg = get_preset("sft-tiny")
    cfg.out_dir, cfg.rl.base = str(out), str(sft_run)
    t = cfg.train
    t.max_steps, t.batch_size, t.lr, t.min_lr, t.warmup_steps, t.log_interval = 2, 4, 1e-3, 1e-4, 0, 1
    t.tensorboard, t.precision, t.ckpt_interval = False, "fp32", 0
    r = cfg.rl
    r.prompts, r.group, r.n_prompts, r.eval_prompts, r.max_new_tokens = 2, 4, 20, 10, 6
    for k, v in settings.items():
        set_setting(cfg, k, v)
    return cfg


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("settings", [
    {"rl.algo": "grpo"}, {"rl.algo": "ppo", "rl.kl_control": "adaptive"}, {"rl.algo": "grpo", "sft.lora_r": "4"},
    {"rl.algo": "ppo", "rl.value_head": "separate", "rl.reward": "both"},
    {"rl.algo": "rft", "rl.rft_threshold": "0"},
], ids=["grpo", "ppo", "grpo-lora", "ppo-critic", "rft"])
def test_first_update_ratio_is_one_and_kl_zero(sft_run, random_rm, tmp_path, settings):
    settings = {"rl.reward": "rm", "rl.reward_model": str(random_rm), "rl.epochs": "2", **settings}
    cfg = rl_cfg(sft_run, tmp_path / "run", **settings)
    result = rl(cfg, progress=False)
    first = metrics(tmp_path / "run")[0]
    assert first["step"] == 1 and first["ratio"] == 1.0 and first["approx_kl"] == 0.0 and first["clip_frac"] == 0.0
    assert first["kl_ref"] == 0.0  # the first rollout: policy == reference, same forward, same batches
    if cfg.rl.algo == "rft":  # only the answers the (random) reward model scores >= 0 are trained on
        assert 0 < first["accepted"] < 1 and "kl_loss" not in first
    later = [m for m in metrics(tmp_path / "run") if m["step"] == 2][0]
    assert later["approx_kl"] > 0  # the second epoch reads the same rollout with the updated policy
    assert (tmp_path / "run" / "rl.png").stat().st_size > 0
    summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    assert set(summary["scores"]) == {"sft", "rl"} and summary["rollouts"] == 1
    assert (tmp_path / "run" / "eval" / "answers_rl.jsonl").exists()
    assert result.summary["kl_to_sft"] == summary["kl_to_sft"]


def test_prompt_tokens_get_no_gradient_and_answers_keep_their_end():
    prompts, answers, ended = [[5, 6, 7], [8, 9]], [[1, 2], [3, 4, 10]], [True, False]
    roll = build_rollout(prompts, answers, ended, end_id=99)
    # row 0: 5 6 7 | 1 2 <end>: targets from the last prompt position; row 1 was cut: no <end>
    assert roll.x.tolist() == [[5, 6, 7, 1, 2], [8, 9, 3, 4, 0]]
    assert roll.targets.tolist() == [[-1, -1, 1, 2, 99], [-1, 3, 4, 10, -1]]
    logits = torch.randn(2, 5, 100, dtype=torch.float64, requires_grad=True)
    gather_logprobs(logits, roll.targets).sum().backward()
    prompt_positions = roll.targets == -1
    assert torch.all(logits.grad[prompt_positions] == 0)
    assert torch.all(logits.grad[~prompt_positions].abs().sum(-1) > 0)


def test_shared_value_head_reads_the_policy_hidden_states(sft_run):
    policy, _, cfg = ckpt_io.load_policy(sft_run)
    obj = RLObjective(policy, RLConfig(algo="ppo"))
    torch.nn.init.normal_(obj.value_head.weight)
    x = torch.randint(0, 200, (3, 7))
    logits = obj.policy_logits(x)
    values = obj.values(x)
    h = policy.norm(_trunk(policy, x))  # the final normed hidden state, by hand
    torch.testing.assert_close(values, obj.value_head(h)[..., 0], rtol=0, atol=0)
    torch.testing.assert_close(logits, policy.output(h), rtol=0, atol=0)
    assert obj.reference is not None and not any(p.requires_grad for p in obj.reference.parameters())


def _trunk(llama, x):
    h = llama.tok_embeddings(x)
    positions = torch.arange(x.shape[1])[None]
    for i, layer in enumerate(llama.layers):
        h = layer(h, llama.rope, positions, i, None, None)
    return h


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_resume_mid_rollout_equals_uninterrupted(sft_run, random_rm, tmp_path, algo):
    # 2 epochs x 2 minibatches = 4 steps per rollout: stopped at step 6, inside the second rollout; the
    # resumed run finishes it from the saved tensors, then samples the third with the saved generator
    settings = {"rl.algo": algo, "rl.epochs": "2", "rl.minibatches": "2", "train.max_steps": "10",
                "rl.reward": "rm", "rl.reward_model": str(random_rm), "rl.kl_control": "adaptive",
                "rl.kl_target": "0.05"}
    full = rl(rl_cfg(sft_run, tmp_path / "full", **settings), progress=False)
    cut = rl_cfg(sft_run, tmp_path / "cut", **settings)
    rl(cut, progress=False, stop_at_step=6)
    resumed = rl(rl_cfg(sft_run, tmp_path / "cut", **settings), progress=False, resume=True)
    a = ckpt_io.find_checkpoint(tmp_path / "full")
    b = ckpt_io.find_checkpoint(tmp_path / "cut")
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ckpt_io.load_extra(a).keys() == ckpt_io.load_extra(b).keys()
    losses = lambda run: [(m["step"], m["loss"]) for m in metrics(run) if "loss" in m]  # noqa: E731
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")
    assert full.summary["scores"] == resumed.summary["scores"]
    if algo == "ppo":  # the adaptive controller moved the coefficient, and the resumed run carried it on
        coefs = [m["kl_coef"] for m in metrics(tmp_path / "cut") if "kl_coef" in m]
        assert coefs[0] == 0.04 and coefs[-1] != coefs[0] and full.summary["kl_coef"] == resumed.summary["kl_coef"]


def _weights(ckpt):
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def test_dynamic_sampling_keeps_informative_groups(sft_run, tmp_path):
    # the format reward (1 for an answer that stopped) splits some groups; max_new_tokens 3 cuts many answers
    settings = {"rl.format_reward": "1", "rl.max_new_tokens": "3", "train.max_steps": "1", "rl.prompts": "4"}
    rl(rl_cfg(sft_run, tmp_path / "plain", **settings), progress=False)
    rl(rl_cfg(sft_run, tmp_path / "run", **settings, **{"rl.skip_zero_spread": "true"}), progress=False)
    plain, dynamic = metrics(tmp_path / "plain")[0]["zero_spread"], metrics(tmp_path / "run")[0]["zero_spread"]
    assert 0 < plain and dynamic < plain


@pytest.mark.parametrize("families", ["all", "add,sort"])
def test_held_out_prompts_are_disjoint_from_sft_and_rl_training(sft_run, tmp_path, families):
    cfg = rl_cfg(sft_run, tmp_path / "run", **{"rl.families": families, "rl.n_prompts": "300"})
    seen = {t.instruction for t in generate_tasks(2000, cfg.seed)}
    train, held = split_prompts(cfg, seen)
    names = lambda ts: {t.instruction for t in ts}  # noqa: E731
    assert not names(train) & names(held) and not (names(train) | names(held)) & seen
    assert len(train) == cfg.rl.n_prompts and len(held) == cfg.rl.eval_prompts
    assert {t.family for t in train + held} == ({"add", "sort"} if families != "all" else
                                                {"add", "count", "repeat", "reverse", "sort"})


@pytest.mark.parametrize("settings, words", [
    ({"rl.group": "1"}, "at least 2"),
    ({"rl.reward": "rm"}, "needs a reward model"),
    ({"rl.prompts": "3", "rl.group": "3"}, "does not split"),
    ({"rl.families": "add,nope"}, "unknown family"),
    ({"rl.kl_control": "adaptive", "rl.kl_target": "0"}, "rl.kl_target=0.0"),
    ({"rl.kl_target": "-1"}, "rl.kl_target"),
    ({"rl.algo": "ppo", "rl.group": "1", "rl.prompts": "8", "rl.skip_zero_spread": "true"}, "dynamic sampling"),
    ({"rl.max_new_tokens": "96"}, "no room for the prompt"),
])
def test_bad_settings_get_one_line(sft_run, tmp_path, settings, words):
    with pytest.raises(UserError, match=words):
        cfg = rl_cfg(sft_run, tmp_path / "run", **settings)
        cfg.validate()
        rl(cfg, progress=False)


def test_reward_model_with_another_tokenizer_is_refused(sft_run, tmp_path):
    from scratchlm.model import build_model
    from scratchlm.tokenizer import ByteTokenizer

    policy_cfg, _ = ckpt_io.load_config_and_tokenizer(ckpt_io.find_checkpoint(sft_run))
    rm = RewardModel(build_model(policy_cfg.model))
    ckpt_io.save_weights_checkpoint(tmp_path / "rm", rm, policy_cfg, ByteTokenizer({"<|endoftext|>": 256}), {})
    cfg = rl_cfg(sft_run, tmp_path / "run", **{"rl.reward": "rm", "rl.reward_model": str(tmp_path / "rm")})
    with pytest.raises(UserError, match="tokenizer differs"):
        rl(cfg, progress=False)


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_one_update_raises_the_answers_with_positive_advantage(algo):
    """The sign of the whole objective: a small gradient step makes answers with a positive advantage
    more likely and those with a negative one less likely (float64, plain SGD)."""
    from scratchlm.config import model_config
    from scratchlm.model import build_model
    from scratchlm.rl.objective import FIELDS

    torch.manual_seed(0)
    policy = build_model(model_config(arch="llama", vocab_size=32, block_size=16, n_layer=2, n_head=2, n_kv_head=1,
                                      n_embd=16, dropout=0.0)).double()
    obj = RLObjective(policy, RLConfig(algo=algo, kl_coef=0.0, value_coef=0.0)).double()
    x = torch.randint(0, 32, (4, 10))
    targets = torch.randint(0, 32, (4, 10))
    targets[:, :4] = -1  # prompt positions
    mask = targets != -1
    with torch.no_grad():
        old = gather_logprobs(obj.policy_logits(x), targets)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)[:, None].expand(4, 10) * mask
    zeros = torch.zeros(4, 10, dtype=torch.float64)
    y = torch.stack([targets.double(), old, old, adv, zeros, zeros], dim=1)
    assert y.shape[1] == len(FIELDS)
    _, loss = obj(x, y)
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            p -= 1e-2 * p.grad
        new = gather_logprobs(obj.policy_logits(x), targets)
    change = (new - old).sum(1)  # per answer
    assert change[0] > 0 and change[2] > 0 and change[1] < 0 and change[3] < 0, change


def test_dropout_is_off_everywhere():
    """A base trained with dropout: every dropout (layers and the attention's own rate) goes, so two
    training-mode forwards agree exactly."""
    from scratchlm.config import model_config
    from scratchlm.model import build_model
    from scratchlm.rl.stage import no_dropout

    torch.manual_seed(0)
    gpt = build_model(model_config(arch="gpt", vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16,
                                   dropout=0.3)).train()
    x = torch.randint(0, 32, (2, 12))
    assert not torch.equal(gpt(x)[0], gpt(x)[0])
    no_dropout(gpt, None)
    assert torch.equal(gpt(x)[0], gpt(x)[0])


def test_rft_micro_batch_without_accepted_answers_is_a_zero_update():
    from scratchlm.config import model_config
    from scratchlm.model import build_model

    torch.manual_seed(0)
    policy = build_model(model_config(arch="llama", vocab_size=32, block_size=16, n_layer=1, n_head=2, n_kv_head=1,
                                      n_embd=16, dropout=0.0))
    obj = RLObjective(policy, RLConfig(algo="rft"))
    x = torch.randint(0, 32, (2, 6))
    y = torch.zeros(2, 6, 6)
    y[:, 0] = -1  # every answer rejected: no target
    assert obj.count(y) == 1
    _, loss = obj(x, y)
    assert float(loss.detach()) == 0.0 and obj.metrics() == {}


def test_reward_hacking_is_named_on_training_or_held_out_accuracy():
    from scratchlm.rl.stage import reward_hacking

    def run(rewards, accuracies, before=0.5, after=0.5):
        history = [{"reward": r, "accuracy": a} for r, a in zip(rewards, accuracies)]
        return reward_hacking(history, {"sft": {"all": {"checked": before}}, "rl": {"all": {"checked": after}}})

    assert "accuracy fell over the run" in run([0, 0, 1, 1], [0.6, 0.6, 0.4, 0.4])
    assert "held-out accuracy fell (55.0% -> 50.0%)" in run([0, 0, 1, 1], [0.5] * 4, before=0.55, after=0.50)
    assert run([0, 0, 1, 1], [0.5, 0.5, 0.6, 0.6], before=0.5, after=0.6) is None  # both rose: no hacking
    assert run([1, 1, 0, 0], [0.6, 0.6, 0.4, 0.4], before=0.6, after=0.4) is None  # the reward fell too
    assert run([0, 1, 2], [1, 0, 0]) is None  # too few rollouts to say
