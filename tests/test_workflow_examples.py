"""The cookbook's examples run, and each one the cookbook names exists (and the reverse)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, cas_env

EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
COOKBOOK = ROOT / "docs" / "workflow.md"


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(script: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "store")],
        cwd=tmp_path,
        env=cas_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip(), f"{script.name} printed nothing"


def test_cookbook_and_examples_agree() -> None:
    named = set(re.findall(r"examples/([a-z_]+\.py)", COOKBOOK.read_text()))
    assert named == {p.name for p in EXAMPLES}
