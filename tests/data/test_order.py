"""EpochOrder: the resumable visiting order of the whole-example loaders."""

from __future__ import annotations

from scratchlm.data.order import EpochOrder, python_permutation


def test_one_pass_without_fill_reads_each_example_once_and_resume_continues_exactly():
    once = EpochOrder(10, fill=False, seed=3)
    batches = [once.take(4) for _ in range(3)]
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(sum(batches, [])) == list(range(10))
    full = EpochOrder(10, seed=3, permutation=python_permutation)
    first = [full.take(4) for _ in range(3)]
    # the third batch wrapped into epoch 1
    assert all(len(b) == 4 for b in first) and full.state_dict("n")["epoch"] == 1
    resumed = EpochOrder(10, seed=3, permutation=python_permutation)
    resumed.load_state_dict(full.state_dict("n"), "n", "examples", "")
    assert [resumed.take(4) for _ in range(5)] == [full.take(4) for _ in range(5)]
    assert EpochOrder(5, shuffle=False).take(3) == [0, 1, 2]
