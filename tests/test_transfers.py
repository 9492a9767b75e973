"""Parallel transfers: --jobs and workers=, the whole-file hash beside the reader, failing fast."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from helpers import KiB, MiB, ok, random_bytes, run_cas

from cas.backends import MemoryBackend
from cas.chunks._chunking import ChunkerParams
from cas.cli._common import CLI_WORDS
from cas.digest import BackgroundHasher, Digest, StreamingHasher
from cas.errors import BackendError, InvalidInputError, MissingObjectError
from cas.repository import _layout as layout
from cas.store import Store
from cas.store._config import StoreConfig, write_config
from cas.testing.faults import FaultyBackend
from cas.transfer import _budget as inflight
from cas.transfer._budget import InFlight

PARAMS = ChunkerParams.from_average(16 * KiB)
T = TypeVar("T")


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
    # The library names its argument; the command line words it as its flag.
    with pytest.raises(InvalidInputError, match=r"^workers must be") as err:
        store.put(tmp_path / "a", "k", workers=bad)  # type: ignore[arg-type]
    assert "--jobs" in err.value.worded(CLI_WORDS)
    store.put(tmp_path / "a", "k")
    with pytest.raises(InvalidInputError, match=r"^workers must be") as err:
        store.get("k", tmp_path / "out", workers=bad)  # type: ignore[arg-type]
    assert "--jobs" in err.value.worded(CLI_WORDS)


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


def test_in_flight_waits_on_whichever_limit_comes_first() -> None:
    room = InFlight(3, 100)
    room.acquire(40)
    room.acquire(40)
    assert room.full(40)
    assert not room.full(20)
    room.acquire(20)
    assert room.full(1)
    assert room.held == (3, 100)
    for size in (40, 40, 20):
        room.release(size)
    assert room.held == (0, 0)
    room.acquire(500)  # larger than the byte limit: admitted, but alone
    assert room.full(1)
    released: list[int] = []

    def acquire_then_record() -> None:
        room.acquire(1)
        released.append(1)

    waiter = threading.Thread(target=acquire_then_record)
    waiter.start()
    time.sleep(0.05)
    assert not released  # still waiting for the big one
    room.release(500)
    waiter.join(5)
    assert released == [1]
    with pytest.raises(ValueError, match="positive"):
        InFlight(0, 1)


class SlowChunks(MemoryBackend):
    """Chunk reads and writes that take a while, counting how many run at once."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.active = 0
        self.most = 0

    def _slowly(self, key: str, call: Callable[[], T]) -> T:
        if not key.startswith(layout.CHUNKS):
            return call()
        with self._lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            time.sleep(0.01)
            return call()
        finally:
            with self._lock:
                self.active -= 1

    def put(self, key: str, data: bytes | bytearray | memoryview, **conditions: Any) -> None:
        self._slowly(key, lambda: super(SlowChunks, self).put(key, data, **conditions))

    def get(self, key: str) -> bytes:
        return self._slowly(key, lambda: super(SlowChunks, self).get(key))


def test_puts_and_gets_keep_a_bounded_number_of_bytes_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many workers, chunk bytes in flight stay under the byte limit."""
    fixed = ChunkerParams(64 * KiB, 64 * KiB, 64 * KiB)
    monkeypatch.setattr(inflight, "IN_FLIGHT_BYTES", 3 * 64 * KiB)
    backend = SlowChunks()
    store = Store(backend, write_config(backend, StoreConfig(chunker=fixed), exist_ok=True))
    data = random_bytes(4 * MiB, 5)  # 64 chunks
    (tmp_path / "w.bin").write_bytes(data)
    store.put(tmp_path / "w.bin", "k", workers=8)
    assert 2 <= backend.most <= 3, backend.most
    backend.most = 0
    store.get("k", tmp_path / "out.bin", workers=8)
    assert 2 <= backend.most <= 3, backend.most
    assert (tmp_path / "out.bin").read_bytes() == data
    # Without the byte limit, the same put runs all eight workers at once.
    monkeypatch.setattr(inflight, "IN_FLIGHT_BYTES", 1 << 30)
    backend.most = 0
    store.put(tmp_path / "w.bin", "k2", workers=8)  # dedups: no chunk writes,
    store.get("k2", tmp_path / "out2.bin", workers=8)  # but every chunk is read
    assert backend.most > 3, backend.most


def test_a_failed_restore_of_a_large_file_leaves_no_hashing_thread(tmp_path: Path) -> None:
    """Large files hash on a thread of their own on a get too; a failure must end it."""
    store = Store.init(tmp_path / "store", chunker=PARAMS)
    (tmp_path / "big.bin").write_bytes(random_bytes(40 * MiB, 6))
    version = store.put(tmp_path / "big.bin", "k")
    chunks = store.show(version.ref).entries[0].chunks
    assert len(chunks) > 100
    store.backend.delete([layout.chunk_key(chunks[len(chunks) // 2].digest)])
    with pytest.raises(MissingObjectError, match=r"big\.bin"):
        store.get("k", tmp_path / "out.bin", workers=2)
    assert not (tmp_path / "out.bin").exists()
    assert not [t for t in threading.enumerate() if t.name == "cas-hash"]
