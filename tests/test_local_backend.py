"""What the local backend does beyond the contract: workers, directories, its own folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cas.backends import Backend, MemoryBackend, local
from cas.errors import InvalidInputError
from cas.store import Store
from cas.store._config import load_config
from cas.testing.faults import FaultyBackend


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


def test_a_key_directory_is_made_on_first_need_and_again_if_removed(tmp_path: Path) -> None:
    backend = local.LocalBackend(tmp_path / "store")
    backend.put("chunks/ab/one", b"1", if_absent=True)
    backend.put("chunks/ab/two", b"2", if_absent=True)
    shutil.rmtree(tmp_path / "store" / "chunks")  # as a sweep of empty directories might
    backend.put("chunks/ab/three", b"3", if_absent=True)
    backend.put("refs/k/1", b"r")
    backend.flush()
    assert backend.get("chunks/ab/three") == b"3"
    assert backend.get("refs/k/1") == b"r"
    assert sorted(p.name for p in (tmp_path / "store" / "chunks" / "ab").iterdir()) == ["three"]


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
def test_the_store_keeps_its_own_folder_out_of_puts_and_restores(
    tmp_path: Path, wrapped: bool
) -> None:
    """The store asks the backend for its folder, so a wrapper around a folder counts too."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "a.txt").write_bytes(b"kept")
    Store.init(work / "store")
    backend: Backend = local.LocalBackend(work / "store")
    if wrapped:
        backend = FaultyBackend(backend)
    assert backend.local_root == work / "store"
    store = Store(backend, load_config(backend, create=False))
    store.put(work, "tree")  # the store's own files are not part of the version
    assert [e.path for e in store.show("tree").entries] == ["data", "data/a.txt"]
    with pytest.raises(InvalidInputError, match="holds this store"):
        store.get("tree", work, force=True)
    assert (work / "store" / "config").exists()


def test_object_stores_have_no_local_root() -> None:
    assert MemoryBackend().local_root is None
    assert FaultyBackend(MemoryBackend()).local_root is None
