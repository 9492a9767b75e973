"""The settings the ``cas`` command makes for its own process."""

from __future__ import annotations

import json
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
    from cas.cli import _process as process

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


# -- the entry point's quick exit ---------------------------------------------------------


@pytest.fixture
def store_with_long_log(tmp_path: Path) -> Path:
    """A store whose ``--json log`` is far beyond a pipe's and stdout's buffers."""
    import cas

    store = cas.open(tmp_path / "store")
    source = tmp_path / "f.txt"
    for i in range(40):
        source.write_text(f"version {i}\n")
        store.put(source, "k", metadata={"note": "x" * 2000})
    return tmp_path / "store"


def test_output_is_flushed_whole_before_the_quick_exit(store_with_long_log: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cas", "--store", str(store_with_long_log), "--json", "log", "k"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout) > 80_000
    assert len(json.loads(out.stdout)) == 40


def test_a_reader_that_leaves_early_is_no_error(store_with_long_log: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cas", "--store", str(store_with_long_log), "--json", "log", "k"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()  # before the command has written anything
    err = proc.stderr.read().decode()
    assert proc.wait() == 0
    assert "Traceback" not in err


FULL_STDOUT = """
import errno, io, sys
from cas.__main__ import run

class Full(io.StringIO):
    def flush(self):
        raise OSError(errno.ENOSPC, "No space left on device")

sys.stdout = Full()
sys.argv = ["cas", "--store", sys.argv[1], "ls"]
run()
"""


def test_output_that_cannot_be_flushed_fails_as_python_would(store_with_long_log: Path) -> None:
    from cas.__main__ import FLUSH_FAILED

    out = subprocess.run(
        [sys.executable, "-c", FULL_STDOUT, str(store_with_long_log)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == FLUSH_FAILED, out.stderr
