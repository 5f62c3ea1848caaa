"""The suite's own rules (tests/conftest.py), run on a small inner suite with pytester: in CI a
missing ../shared/data and every skip but a GPU-only one fail (a module skipped whole too); outside
CI they skip with a reason; the summary counts the skips; the thread count comes from
SCRATCHLM_TEST_THREADS, and every test starts from it and from seeded random generators."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py").read_text(encoding="utf-8")
INNER = '''
import pytest
import torch

from tests.helpers import shared_file


def test_parity_data():
    shared_file("no-such-file.txt")


@pytest.mark.gpu
def test_gpu_only():
    pytest.skip("needs a CUDA GPU")


def test_skips_for_another_reason():
    pytest.skip("a dependency is missing")


def test_leaves_a_mess():
    torch.set_num_threads({threads} + 1)
    torch.rand(5)


def test_starts_from_the_configured_state():
    assert torch.get_num_threads() == {threads}
    drawn = torch.rand(1)
    assert torch.equal(drawn, torch.rand(1, generator=torch.Generator().manual_seed(0)))
'''
SKIPPED_MODULE = 'import pytest\n\npytest.importorskip("no_such_module_here")\n'


@pytest.fixture
def inner(pytester: pytest.Pytester):
    def run(ci: str, threads: int = 1) -> pytest.RunResult:
        pytester.makeconftest(CONFTEST)
        pytester.makepyfile(test_inner=INNER.format(threads=threads), test_needs=SKIPPED_MODULE)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CI", ci)
            mp.setenv("SCRATCHLM_TEST_THREADS", str(threads))
            # File order (the mess comes first); a collection error would otherwise stop the run.
            return pytester.runpytest("-ra", "-p", "no:random_order", "--continue-on-collection-errors")
    return run


def test_ci_fails_missing_data_and_non_gpu_skips(inner):
    result = inner("true")
    result.assert_outcomes(passed=2, failed=2, skipped=1, errors=1)  # the error: the module skipped whole
    result.stdout.fnmatch_lines(["*CI=true: skipped tests are not allowed*no_such_module_here*",
                                 "*CI=true*no-such-file.txt is absent*", "*CI=true: skipped tests are not allowed*",
                                 "skipped: 1 *", "SKIPPED*needs a CUDA GPU*"])


def test_outside_ci_missing_data_skips_with_its_reason(inner):
    result = inner("", threads=2)
    result.assert_outcomes(passed=2, skipped=4)
    result.stdout.fnmatch_lines(["skipped: 4 (SCRATCHLM_TEST_THREADS=2*", "SKIPPED*no-such-file.txt is absent*"])
