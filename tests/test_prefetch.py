"""A restore asks for its chunks ahead of the workers; a folder turns that into read-ahead."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pytest
from helpers import digests, random_bytes, small_store

import cas.transfer._restore
from cas.backends.local import LocalBackend
from cas.digest import Digest


def test_a_folder_prefetches_present_files_and_skips_the_rest(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "store")
    backend.put("chunks/aa/one", b"x" * 10_000)
    # Missing, invalid and escaping keys are left to the reads that follow.
    backend.prefetch(["chunks/aa/one", "chunks/aa/missing", "../outside", ""])
    assert backend.get("chunks/aa/one") == b"x" * 10_000


def test_a_restore_hints_every_chunk_once_in_order_and_a_bounded_way_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = small_store(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.bin").write_bytes(random_bytes(600_000, seed=i))
    store.put(src, "k")
    ahead = 200_000
    monkeypatch.setattr(cas.transfer._restore._ReadAhead, "AHEAD", ahead)

    hinted: list[Digest] = []
    gaps: list[int] = []
    real_submitted = cas.transfer._restore._ReadAhead.submitted

    def submitted(self: cas.transfer._restore._ReadAhead, length: int) -> None:
        real_submitted(self, length)
        gaps.append(self.hinted - self.handed)

    def prefetch(digests_: Iterable[Digest]) -> None:
        hinted.extend(digests_)

    monkeypatch.setattr(cas.transfer._restore._ReadAhead, "submitted", submitted)
    monkeypatch.setattr(store.chunks, "prefetch", prefetch)
    store.get("k", tmp_path / "out")

    order = [c.digest for e in store.show("k").entries if e.type == "file" for c in e.chunks]
    assert hinted == order
    largest = max(c.length for e in store.show("k").entries for c in e.chunks)
    assert all(0 <= gap < ahead + largest for gap in gaps)
    assert max(gaps) >= ahead  # ahead of the workers, not just in step with them
    assert digests(tmp_path / "out") == digests(src)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_a_restore_from_a_store_out_of_the_page_cache_is_whole(tmp_path: Path) -> None:
    store = small_store(tmp_path / "store")
    src = tmp_path / "w.bin"
    src.write_bytes(random_bytes(3_000_000, seed=7))
    store.put(src, "k")
    store.backend.flush()
    for root, _, files in os.walk(tmp_path / "store" / "chunks"):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    store.get("k", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == src.read_bytes()
