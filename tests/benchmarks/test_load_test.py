"""Small load tests: jobs over 2 worker processes, each completed exactly once; a small soak.

The full runs (figures in ``docs/RELIABILITY.md``) are ``make load`` and ``make soak``; these CI
versions assert correctness and counts (exactly once, dead-letters, threads and descriptors),
never timings.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load_test.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ll_load_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_jobs_complete_exactly_once_across_two_workers(ll_cache: Path, tmp_path: Path) -> None:
    load = _load_script()
    result = load.run_load(4, 2, timeout_s=400, cache_dir=ll_cache, log_dir=tmp_path / "logs")
    summary = result.summary()
    assert result.exactly_once, (summary, result.completions, result.failures)
    assert result.queue_depth == 0 and result.dlq_depth == 0, summary
    assert result.worker_exit_codes == [0, 0], summary
    assert len(result.latencies_s) == 4


@pytest.mark.slow
def test_a_small_soak_settles_every_outcome_and_keeps_the_workers_resources(
    ll_cache: Path, tmp_path: Path
) -> None:
    """``make soak`` in small: failing jobs and refusals among the jobs, over two workers."""
    load = _load_script()
    result = load.run_load(
        3,
        2,
        timeout_s=400,
        cache_dir=ll_cache,
        log_dir=tmp_path / "logs",
        failing=3,
        reported=10,
        silent=10,
    )
    summary = result.summary()
    assert result.exactly_once, (summary, result.completions, result.failures)
    assert result.queue_depth == 0 and result.dlq_depth == 3 + 10 + 10, summary
    assert result.worker_exit_codes == [0, 0], summary
    assert set(result.resources) == {"idle", "warm", "end"}
    assert result.kept_its_resources, result.resources
    assert result.ok, summary
