"""Parallel transfers: --jobs and workers=, the whole-file hash beside the reader, failing fast."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import KiB, MiB, ok, random_bytes, run_cas

from cas import layout
from cas.backends import MemoryBackend
from cas.chunking import ChunkerParams
from cas.config import StoreConfig, write_config
from cas.digest import BackgroundHasher, Digest, StreamingHasher
from cas.errors import BackendError, InvalidInputError
from cas.store import Store
from cas.testing.faults import FaultyBackend

PARAMS = ChunkerParams.from_average(16 * KiB)


def test_background_hasher_equals_the_inline_one() -> None:
    data = random_bytes(5 * MiB + 123, 1)
    inline, background = StreamingHasher(), BackgroundHasher(depth=2)
    for start in range(0, len(data), 1 * MiB):
        inline.update(data[start : start + 1 * MiB])
        background.update(memoryview(data)[start : start + 1 * MiB])
    assert background.digest() == inline.digest() == Digest.of(data)
    background.close()  # a second close is harmless
    idle = BackgroundHasher()
    idle.close()  # a hasher closed unused ends its thread
    assert not idle._thread.is_alive()


@pytest.mark.parametrize("workers", [1, 3, 32])
def test_any_number_of_workers_round_trips(workers: int, tmp_path: Path) -> None:
    store = Store.init("memory://" + tmp_path.name + str(workers), chunker=PARAMS)
    data = random_bytes(40 * MiB, 2)  # large enough for the background hash
    (tmp_path / "big.bin").write_bytes(data)
    store.put(tmp_path / "big.bin", "k", workers=workers)
    store.get("k", tmp_path / "out.bin", workers=workers)
    assert (tmp_path / "out.bin").read_bytes() == data


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_bad_worker_counts_are_refused(bad: object, tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store", chunker=PARAMS)
    (tmp_path / "a").write_bytes(b"a")
    with pytest.raises(InvalidInputError, match="--jobs"):
        store.put(tmp_path / "a", "k", workers=bad)  # type: ignore[arg-type]
    store.put(tmp_path / "a", "k")
    with pytest.raises(InvalidInputError, match="--jobs"):
        store.get("k", tmp_path / "out", workers=bad)  # type: ignore[arg-type]


def test_cli_jobs_must_be_a_positive_number(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ok(run_cas("init", store=store))
    (tmp_path / "a").write_bytes(b"a")
    for value in ("0", "-2", "many"):
        proc = run_cas("put", tmp_path / "a", "k", "--jobs", value, store=store)
        assert proc.returncode == 2, proc.stderr
        assert "--jobs" in proc.stderr
        assert "whole number >= 1" in proc.stderr
    ok(run_cas("put", tmp_path / "a", "k", "-j", "2", store=store))


def test_a_put_stops_at_the_first_failed_chunk(tmp_path: Path) -> None:
    """Once a chunk upload fails, the put reads no further than the chunks in flight."""
    backend = FaultyBackend(MemoryBackend(), fail_on={"put"}, prefix=layout.CHUNKS, after=3)
    store = Store(backend, write_config(backend, StoreConfig(chunker=PARAMS), exist_ok=True))
    (tmp_path / "w.bin").write_bytes(random_bytes(8 * MiB, 3))  # about 500 chunks
    with pytest.raises(BackendError, match="injected fault"):
        store.put(tmp_path / "w.bin", "k", workers=2)
    attempted = [k for k in backend.keys["put"] if k.startswith(layout.CHUNKS)]
    assert len(attempted) < 40, f"{len(attempted)} chunk uploads tried after the failure"
