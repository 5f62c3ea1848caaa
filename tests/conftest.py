"""Shared test settings: the torch thread count, a private cache folder, a fixed start for every
test, and what may skip (helpers that tests import live in tests/helpers.py, never in a conftest).

- Threads: `SCRATCHLM_TEST_THREADS` (default 1). The test models' matmuls are far too small to split,
  and when another process holds the second core, two spinning threads make a forward many times
  slower; the suite must also pass at 2 threads, so no test may depend on the count.
- Order: every test starts from the same state (threads, denormals, seeded global RNGs), so the
  suite passes shuffled: `-p random_order --random-order-bucket=global` (the seed is printed in the
  summary line). Property tests are derandomized and keep no example database.
- Cache: `SCRATCHLM_CACHE` points at a folder made for this session, so nothing a test reads comes
  from ~/.cache (a matmul peak measured on another day, a stale corpus index) and nothing is left there.
- CI (`CI=true`): a green run must mean every test ran. Missing public data (../shared/data), or any
  other skip, fails the test there; only tests marked `gpu` may skip, each with its reason, and the
  summary prints the number of skipped tests.
"""

from __future__ import annotations

import os
import random

import hypothesis
import numpy as np
import pytest
import torch

from tests.helpers import in_ci, shared_file

THREADS_VAR = "SCRATCHLM_TEST_THREADS"
pytest_plugins = ["pytester"]  # tests/test_conftest.py runs an inner suite under these rules


@pytest.fixture
def shakespeare() -> str:
    return shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")


def configured_threads() -> int:
    raw = os.environ.get(THREADS_VAR, "1")
    if not raw.isdigit() or int(raw) < 1:
        raise pytest.UsageError(f"{THREADS_VAR}={raw!r} must be a whole number >= 1")
    return int(raw)


def pytest_configure(config: pytest.Config) -> None:
    """The thread count for the whole run (module fixtures included), and the `gpu` marker."""
    torch.set_num_threads(configured_threads())
    # Property tests draw the same examples every run and keep no example database (.hypothesis/)
    # between runs; `--hypothesis-profile=default` explores afresh.
    hypothesis.settings.register_profile("scratchlm", derandomize=True, database=None)
    hypothesis.settings.load_profile("scratchlm")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; the only tests allowed to skip in CI")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Each test starts from the same state, whatever ran before it, before any of its fixtures (a
    module fixture is built for whichever test of its module runs first): the configured thread
    count, denormals kept (a training run turns on flushing them, for speed), and the global random
    generators seeded, so code that draws without its own seed still draws the same numbers."""
    if torch.get_num_threads() != configured_threads():
        torch.set_num_threads(configured_threads())
    torch.set_flush_denormal(False)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Every test (and every CLI subprocess, which inherits the environment) uses a fresh cache folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCRATCHLM_CACHE", str(tmp_path_factory.mktemp("scratchlm-cache")))
        yield


def _ci_skip_failure(reason: str) -> str:
    return f"CI=true: skipped tests are not allowed (only tests marked gpu may skip): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("gpu") is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome, report.longrepr = "failed", _ci_skip_failure(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A module that skips as a whole (`pytest.importorskip` of a dev dependency) fails in CI too."""
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome, report.longrepr = "failed", _ci_skip_failure(reason)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    # The reasons are in the short summary above (addopts -ra).
    terminalreporter.write_line(f"skipped: {len(skipped)} ({THREADS_VAR}={configured_threads()}, "
                                f"CI={'true' if in_ci() else 'false'}{_order(config)})")


def _order(config: pytest.Config) -> str:
    """pytest-random-order's bucket and seed when it shuffled (its own header line hides under -q)."""
    if not config.pluginmanager.hasplugin("random_order"):
        return ""
    from random_order.config import Config as RandomOrder

    order = RandomOrder(config)
    if not order.is_enabled:
        return ""
    return f", random order: --random-order-bucket={order.bucket_type} --random-order-seed={order.seed}"
