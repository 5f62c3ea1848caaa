"""The reward model (scratchlm/model/reward.py): one score per text, read at the last real token,
whatever the padding side, and an end-of-text token inside the text is never taken for padding.

Scores of the same rows padded left and right are bit-identical (the rows are right-aligned before
the forward, so both run the same operations on the same tensor). A row scored alone runs at another
width; in float64 that changes only the order of sums (atol 1e-10).
"""

from __future__ import annotations

import pytest
import torch

from scratchlm.data.labelled import PAD
from scratchlm.model.reward import RewardModel, pad_rows, right_aligned
from tests.helpers import prompts_of, tiny_model

EOT = 63  # the text's own end-of-text token: a real id, here also the last id of the vocabulary


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_score_ignores_the_padding_side_and_an_eot_at_the_end(arch):
    extra = dict(bias=False, n_kv_head=1) if arch == "llama" else {}
    rm = RewardModel(tiny_model(arch=arch, **extra)).double().eval()
    rows = [r + [EOT] for r in prompts_of([3, 9, 6], vocab=60, seed=2)]
    with torch.no_grad():
        right, _ = rm(pad_rows(rows, "right"))
        left, _ = rm(pad_rows(rows, "left"))
        alone = torch.cat([rm(torch.tensor([r]))[0] for r in rows])
        without_eot, _ = rm(pad_rows([r[:-1] for r in rows]))
    assert right.shape == (3,) and right.dtype == torch.float32
    assert torch.equal(left, right)
    torch.testing.assert_close(right, alone, atol=1e-6, rtol=0)  # fp32 output of float64 scores
    assert (right - without_eot).abs().min() > 1e-4  # the EOT is read as text: the score moves


def test_right_aligned_moves_text_to_the_front_and_refuses_inner_padding():
    idx = torch.tensor([[PAD, PAD, 5, 6], [7, 8, 9, PAD], [PAD, 1, PAD, PAD]])
    assert right_aligned(idx).tolist() == [[5, 6, PAD, PAD], [7, 8, 9, PAD], [1, PAD, PAD, PAD]]
    with pytest.raises(ValueError, match="padding inside a row"):
        right_aligned(torch.tensor([[1, PAD, 2]]))
    assert pad_rows([[1], [2, 3]], "left").tolist() == [[PAD, 1], [2, 3]]


def test_reward_model_drops_the_lm_head_and_has_one_output():
    body = tiny_model()
    rm = RewardModel(body)
    assert rm.head.out_features == 1 and rm.unembedding is None
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features == 64 for m in rm.body.modules())
    with pytest.raises(ValueError, match="no targets"):
        rm(torch.tensor([[1, 2]]), torch.tensor([0]))


# -- the likelihood term: the response's mean token log-probability under the policy's own LM head --

ASSISTANT = 62  # stands for <|assistant|> in these rows


def chat_rows() -> list[list[int]]:
    """prompt, ASSISTANT, response (its last token stands for <|end|>), of several lengths; the second
    row has an ASSISTANT inside its prompt too (only the last one starts the response)."""
    prompts, responses = prompts_of([4, 7, 2], vocab=60, seed=5), prompts_of([3, 1, 6], vocab=60, seed=6)
    prompts[1][2] = ASSISTANT
    return [p + [ASSISTANT] + r for p, r in zip(prompts, responses)]


def hand_mean_logprob(policy, row: list[int]) -> float:
    """The policy's own forward on the row alone: mean over the tokens after the last ASSISTANT of
    log softmax(logits at the position before)[token]."""
    with torch.no_grad():
        logits, _ = policy(torch.tensor([row]))
    logp = torch.log_softmax(logits[0].double(), -1)
    start = max(i for i, t in enumerate(row) if t == ASSISTANT)
    return sum(float(logp[t - 1, row[t]]) for t in range(start + 1, len(row))) / (len(row) - start - 1)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_likelihood_term_is_the_policys_mean_response_logprob_whatever_the_padding(arch):
    extra = dict(bias=False, n_kv_head=1) if arch == "llama" else {}
    policy = tiny_model(arch=arch, **extra).double()
    rm = RewardModel(tiny_model(arch=arch, **extra), response_start=ASSISTANT).double().eval()
    with torch.no_grad():
        rm.head.weight.zero_()
        rm.head.bias.fill_(0.25)
        rm.likelihood_scale.fill_(2.0)
    rows = chat_rows()
    with torch.no_grad():
        right, _ = rm(pad_rows(rows, "right"))
        left, _ = rm(pad_rows(rows, "left"))
    expected = torch.tensor([0.25 + 2.0 * hand_mean_logprob(policy, r) for r in rows], dtype=torch.float64)
    assert torch.equal(left, right)
    torch.testing.assert_close(right.double(), expected, atol=1e-6, rtol=2.4e-7)  # fp32 output (2 ulp) of fp64
    # the term counts: the same model without it scores 0.25 everywhere
    assert (right - 0.25).abs().min() > 0.1


def test_likelihood_term_keeps_the_lm_head_tied_and_trains_it():
    rm = RewardModel(tiny_model(), response_start=ASSISTANT)
    assert rm.lm_head.weight is rm.body.embedding.weight  # tied as in the policy: one tensor, saved once
    rewards, _ = rm(pad_rows(chat_rows()))
    rewards.sum().backward()
    assert rm.likelihood_scale.grad is not None and rm.body.embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="without <|assistant|>"):
        rm(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="not a token id"):
        RewardModel(tiny_model(), response_start=64)


def test_starts_fix_the_response_whatever_specials_it_writes_and_an_empty_one_is_refused():
    """RL passes each row's prompt length: an answer that writes ASSISTANT itself (the policy samples
    specials too) then cannot move where its scored tokens begin, which would let it pick which of
    its own tokens count. Without starts, the last ASSISTANT is where the response begins."""
    policy = tiny_model().double()
    rm = RewardModel(tiny_model(), response_start=ASSISTANT).double().eval()
    with torch.no_grad():
        rm.head.weight.zero_()
        rm.head.bias.zero_()
    prompt, answer = [5, 9, 11, ASSISTANT], [7, ASSISTANT, 3, 4]
    row = prompt + answer
    with torch.no_grad():
        logp = torch.log_softmax(policy(torch.tensor([row]))[0][0].double(), -1)
        fixed, _ = rm(pad_rows([row, row], "left"), starts=torch.tensor([4, 4]))
        moved, _ = rm(torch.tensor([row]))
    from_prompt = sum(float(logp[t - 1, row[t]]) for t in range(4, 8)) / 4
    from_last = sum(float(logp[t - 1, row[t]]) for t in range(6, 8)) / 2
    torch.testing.assert_close(fixed, torch.tensor([from_prompt] * 2, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(moved, torch.tensor([from_last], dtype=torch.float64), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="no response token"):
        rm(torch.tensor([prompt]))  # the prompt alone: its mean would be 0, the best possible score
    with pytest.raises(ValueError, match="no response token"):
        rm(torch.tensor([row]), starts=torch.tensor([8]))
