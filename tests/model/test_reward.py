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
