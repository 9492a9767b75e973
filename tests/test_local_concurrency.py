"""A folder's default worker count follows the cores the process may use."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cas.backends import local


@pytest.mark.parametrize(("cores", "workers"), [(1, 2), (2, 2), (3, 3), (12, 12), (64, 16)])
def test_one_worker_per_core_between_2_and_16(
    monkeypatch: pytest.MonkeyPatch, cores: int, workers: int
) -> None:
    monkeypatch.setattr(local, "_cores", lambda: cores)
    assert local.default_concurrency() == workers


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs CPU affinity")
def test_a_process_pinned_to_one_core_counts_one() -> None:
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
    code += "from cas.backends import local; print(local._cores())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
