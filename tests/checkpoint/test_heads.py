"""Which head a checkpoint's weights end in, read from the file: a reward model is refused where a
policy is expected and the reverse, in one line naming both kinds."""

from __future__ import annotations

import pytest
import torch

from scratchlm.checkpoint import (
    checkpoint_head,
    find_checkpoint,
    load_config_and_tokenizer,
    load_model_for_inference,
    load_reward_model,
    save_weights_checkpoint,
)
from scratchlm.errors import UserError
from scratchlm.model.classifier import ClassifierLM
from scratchlm.model.reward import RewardModel
from scratchlm.tokenizer.chat import ensure_chat_specials
from tests.helpers import make_checkpoint, tiny_model


def test_heads_are_told_apart_and_the_wrong_kind_is_refused(tmp_path):
    policy = find_checkpoint(make_checkpoint(tmp_path / "policy"))
    cfg, tok = load_config_and_tokenizer(policy)
    rm = RewardModel(tiny_model())
    with torch.no_grad():
        rm.head.weight.normal_()
    save_weights_checkpoint(tmp_path / "rm", rm, cfg, tok, {"note": "test"})
    save_weights_checkpoint(tmp_path / "clf", ClassifierLM(tiny_model(), 3), cfg, tok, {"note": "test"})
    assert [checkpoint_head(p) for p in (policy, tmp_path / "rm", tmp_path / "clf")] == ["lm", "reward", "classifier"]

    with pytest.raises(UserError, match="holds a reward model .*, not a language model"):
        load_model_for_inference(tmp_path / "rm")
    with pytest.raises(UserError, match="holds a language model .*, not a reward model"):
        load_reward_model(policy)
    loaded, _, _ = load_reward_model(tmp_path / "rm")
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], rm.eval()(x)[0])


def test_a_reward_model_with_the_likelihood_term_loads_with_it(tmp_path):
    """The file says whether the reward model has the likelihood term (its scale tensor), so a run made
    before the term existed loads as before, and one with it scores the same once loaded."""
    policy = find_checkpoint(make_checkpoint(tmp_path / "policy"))
    cfg, tok = load_config_and_tokenizer(policy)
    tok = ensure_chat_specials(tok)[0]
    start = tok.special_tokens["<|assistant|>"]
    assert start < cfg.model.vocab_size
    rm = RewardModel(tiny_model(), response_start=start)
    save_weights_checkpoint(tmp_path / "rm", rm, cfg, tok, {"note": "test"})
    loaded, _, _ = load_reward_model(tmp_path / "rm")
    assert loaded.response_start == start and loaded.lm_head.weight is loaded.body.embedding.weight
    x = torch.tensor([[1, 2, start, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], rm.eval()(x)[0])
