"""The RL verb from the command line: settings and bad input answer in one line, exit 2."""

from __future__ import annotations

import pytest

from scratchlm.cli import main
from scratchlm.cli.rl import parse_reward
from scratchlm.errors import UserError
from tests.align.test_cli_align import one_line, run
from tests.helpers import make_checkpoint


def test_reward_spec():
    assert parse_reward("checker") == ("checker", "")
    assert parse_reward("rm:runs/rm") == ("rm", "runs/rm")
    assert parse_reward("both:C:/x") == ("both", "C:/x")
    for bad in ("rm", "checker:x", "judge:x", ""):
        with pytest.raises(UserError, match="--reward"):
            parse_reward(bad)


def test_rl_refuses_bad_settings_and_inputs_in_one_line(capsys, tmp_path):
    out = ["--out", str(tmp_path / "rl")]
    one_line(*run(capsys, "rl", *out), "no base model", "--base")
    one_line(*run(capsys, "rl", "--base", "x", "--reward", "rm", *out), "--reward 'rm' is not understood")
    one_line(*run(capsys, "rl", "--base", "x", "--rl.group=1", *out), "rl.group=1", "at least 2")
    one_line(*run(capsys, "rl", "--algo", "ppo", "--base", "x", "--rl.kl_target=0", *out), "rl.kl_target=0.0",
             "needs a target above 0")
    one_line(*run(capsys, "rl", "--base", "x", "--model.n_layer=2", *out), "not a setting this verb reads")
    one_line(*run(capsys, "rl", "--base", str(tmp_path / "missing"), *out), "missing")
    # a policy without the chat tokens (a pretraining run) is not an SFT policy
    policy = make_checkpoint(tmp_path / "policy")
    one_line(*run(capsys, "rl", "--base", str(policy), *out), "lacks the chat tokens")


def test_ppo_default_preset_follows_algo(capsys, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("scratchlm.rl.stage.rl", lambda cfg, **kw: seen.update(cfg=cfg))
    assert main(["rl", "--algo", "ppo", "--base", "b", "--out", str(tmp_path / "r")]) == 0
    assert seen["cfg"].name == "ppo-tiny" and seen["cfg"].rl.algo == "ppo"
    assert main(["rl", "--base", "b", "--reward", "both:rm", "--out", str(tmp_path / "g")]) == 0
    assert seen["cfg"].name == "grpo-tiny" and (seen["cfg"].rl.reward, seen["cfg"].rl.reward_model) == ("both", "rm")
