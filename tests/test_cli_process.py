"""The settings the ``cas`` command makes for its own process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Allocates a 24 MiB block and says whether it lies in the heap or in a mapping
# of its own: glibc maps blocks that large by default (its threshold starts at
# 128 KiB and moves up only as mapped blocks are freed).
PROBE = """
import ctypes
{setup}
block = bytearray(24 << 20)
address = ctypes.addressof(ctypes.c_char.from_buffer(block))
with open("/proc/self/maps") as f:
    heap = [line.split()[0] for line in f if line.rstrip().endswith("[heap]")]
start, end = (int(x, 16) for x in heap[0].split("-")) if heap else (0, 0)
print("heap" if start <= address < end else "mapped")
"""


def probe(setup: str, **env: str) -> str:
    code = PROBE.format(setup=setup)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_large_blocks_come_from_the_heap_once_tuned() -> None:
    assert probe("") == "mapped"
    assert probe("from cas.cli import process; process.tune()") == "heap"
    # A threshold the user set is theirs: glibc applied it at start-up and it stays.
    chosen = probe("from cas.cli import process; process.tune()", MALLOC_MMAP_THRESHOLD_="65536")
    assert chosen == "mapped"


def test_openblas_threads_default_to_one_and_a_user_choice_stays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cas.cli import process

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    process.tune()
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    process.tune()
    assert os.environ["OPENBLAS_NUM_THREADS"] == "4"


ENTRY = """
import gc, sys
{before}
from cas.__main__ import main
sys.argv = ["cas", "--store", sys.argv[1], "init"]
code = main()
print(code, gc.isenabled(), gc.get_freeze_count())
"""


@pytest.mark.parametrize(("before", "enabled"), [("", "True"), ("gc.disable()", "False")])
def test_the_entry_point_loads_with_the_collector_paused_then_restores_it(
    tmp_path: Path, before: str, enabled: str
) -> None:
    code = ENTRY.format(before=before)
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "store")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    rc, state, frozen = out.stdout.split()[-3:]
    assert (rc, state) == ("0", enabled)
    # What loading made is frozen out of later collections: thousands of objects.
    assert int(frozen) > 10_000
