"""Batched existence checks: a put lists chunks/ instead of a stat per chunk when cheaper.

These run on the in-memory backend told to page its listings like a cloud
service (``list_page_size``), so every shape of the plan is reached with
small stores; tests/test_store_backends.py runs puts through it on the real
servers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import pytest
from gc_helpers import FakeClock, random_bytes, write

from cas.backends import Backend, MemoryBackend, ObjectInfo
from cas.chunks._chunking import ChunkerParams
from cas.chunks._listing import ChunkIndex, expected_chunks, plan, plan_in_background
from cas.digest import Digest
from cas.errors import BackendError
from cas.repository import _layout as layout
from cas.store import Store
from cas.store._config import StoreConfig, write_config
from cas.testing.faults import FaultyBackend

KiB = 1024
PARAMS = ChunkerParams.from_average(16 * KiB)


def fill(backend: MemoryBackend, count: int, seed: int = 0) -> list[Digest]:
    """``count`` chunk objects (their bytes do not matter to a listing)."""
    digests = [Digest.of(f"{seed}-{i}".encode()) for i in range(count)]
    for digest in digests:
        backend.put(layout.chunk_key(digest), b"x")
    return digests


def paged(page: int, clock: FakeClock | None = None) -> MemoryBackend:
    backend = MemoryBackend(clock=clock.time) if clock else MemoryBackend()
    backend.list_page_size = page
    return backend


def test_expected_chunks_counts_every_started_chunk() -> None:
    avg = PARAMS.avg_size
    assert expected_chunks([0, 1, avg, avg + 1, 10 * avg], PARAMS) == 0 + 1 + 1 + 2 + 10


def test_no_listing_where_it_saves_nothing() -> None:
    assert plan(MemoryBackend(), 10_000, workers=4) is None  # page size 0: a folder, memory
    assert plan(paged(1000), 1, workers=4) is None


@pytest.mark.parametrize(
    ("stored", "page", "shards"),
    [(0, 1000, 1), (999, 1000, 1), (300, 100, 1), (2_000, 100, 16), (5_000, 10, 256)],
)
def test_listing_answers_exactly_like_stat(stored: int, page: int, shards: int) -> None:
    backend = paged(page)
    present = fill(backend, stored)
    absent = [Digest.of(f"absent-{i}".encode()) for i in range(200)]
    index = plan(backend, 100_000, workers=4)
    assert index is not None
    with index:
        assert index.shards == shards
        for digest in present:
            assert index.mtime(digest) == backend.stat(layout.chunk_key(digest)).mtime
        assert all(index.mtime(d) is None for d in absent)


def test_store_size_estimate_picks_the_cheaper_way() -> None:
    backend = paged(10)
    fill(backend, 3_000)
    # 3,000 chunks in pages of 10: about 300 listing requests plus the shards.
    assert plan(backend, 200, workers=4) is None
    index = plan(backend, 2_000, workers=4)
    assert index is not None
    assert index.shards == 256
    assert 256 + 100 < index.requests < 256 + 1_000
    index.close()
    # Stores larger than the memory cap are never listed.
    assert plan(backend, 10**9, workers=4, max_listed=1_000) is None


def test_the_plan_in_the_background_decides_the_same() -> None:
    backend = paged(10)
    present = fill(backend, 3_000)
    assert plan_in_background(MemoryBackend(), 10_000, workers=2) is None
    assert plan_in_background(backend, 1, workers=2) is None
    small = plan_in_background(backend, 200, workers=2)
    assert small is not None
    assert not small.listed()  # a small put into a large store: a stat per chunk
    small.close()
    large = plan_in_background(backend, 5_000, workers=2)
    assert large is not None
    assert large.listed()
    assert large.mtime(present[7]) == backend.stat(layout.chunk_key(present[7])).mtime
    assert large.mtime(Digest(bytes(32))) is None
    large.close()


def test_a_failed_listing_fails_the_lookups_of_its_shard() -> None:
    inner = paged(10)
    fill(inner, 500)
    flaky = FaultyBackend(inner, fail_on={"list"}, prefix="chunks/0", times=1)
    with ChunkIndex.listing(flaky, 16, workers=4) as index:
        with pytest.raises(BackendError, match="injected fault"):
            index.mtime(Digest(bytes(32)))
        assert index.mtime(Digest(b"\xff" * 32)) is None


def make_store(backend: Backend, clock: FakeClock | None = None) -> Store:
    config = write_config(backend, StoreConfig(chunker=PARAMS), exist_ok=True)
    store = Store(backend, config, workers=4)
    if clock is not None:
        store.clock = clock
    return store


def test_a_put_of_many_chunks_lists_instead_of_a_stat_each(tmp_path: Path) -> None:
    counted = FaultyBackend(paged(1000))
    store = make_store(counted)
    data = random_bytes(1024 * KiB, seed=1)
    store.put(write(tmp_path / "a.bin", data), "k")
    chunks = {k for k in counted.keys["put"] if k.startswith(layout.CHUNKS)}
    assert len(chunks) > 30
    assert not [k for k in counted.keys["stat"] if k.startswith(layout.CHUNKS)]

    # The second put of mostly the same bytes uploads only what changed.
    counted.reset_counts()
    edited = bytearray(data)
    edited[500 * KiB : 500 * KiB + 10] = b"0123456789"
    store.put(write(tmp_path / "b.bin", bytes(edited)), "k")
    uploaded = [k for k in counted.keys["put"] if k.startswith(layout.CHUNKS)]
    assert 1 <= len(uploaded) <= 2
    assert not [k for k in counted.keys["stat"] if k.startswith(layout.CHUNKS)]
    assert counted.calls["list"] <= 4  # refs and gc markers aside: one of chunks/
    # What the key's latest version names needs no read of each chunk's header.
    assert counted.calls["get_range"] == 0
    store.get("k@2", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == bytes(edited)
    assert store.verify(deep=True).ok


def test_listed_old_chunks_are_refreshed_for_gc(tmp_path: Path) -> None:
    """A reused chunk the listing shows older than grace/2 is touched, as after a stat."""
    clock = FakeClock()
    counted = FaultyBackend(paged(1000, clock))
    store = make_store(counted, clock)
    store.set_gc_grace(600)
    data = random_bytes(300 * KiB, seed=2)
    store.put(write(tmp_path / "a.bin", data), "old")
    store.delete("old@1")
    clock.advance(400)  # older than grace/2, younger than the grace
    counted.reset_counts()
    store.put(write(tmp_path / "b.bin", data), "new")
    reused = {layout.chunk_key(c.digest) for e in store.show("new@1").entries for c in e.chunks}
    assert set(counted.keys["touch"]) >= reused
    assert not [k for k in counted.keys["put"] if k.startswith(layout.CHUNKS)]
    # The touch moved them to now: a collection with the grace keeps them all.
    clock.advance(300)
    assert store.gc(grace=600).deleted_chunks == 0
    assert store.verify(deep=True).ok


def test_chunk_listed_but_collected_before_use_is_stored_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing shows an old unreferenced chunk; a collection deletes it before the
    put reaches it. The put touches, finds it gone, and uploads it again."""
    clock = FakeClock()
    backend = paged(1000, clock)
    store = make_store(backend, clock)
    store.set_gc_grace(600)
    data = random_bytes(200 * KiB, seed=3)
    store.put(write(tmp_path / "a.bin", data), "old")
    store.delete("old@1")
    clock.advance(2_000)
    listed = plan(backend, 1_000, workers=2)
    assert listed is not None
    # What a collection between the listing and the put does: remove them all.
    backend.delete([i.key for i in backend.list_objects(layout.CHUNKS)])

    monkeypatch.setattr("cas.store._writing.plan_index", lambda *args, **kwargs: listed)
    store.put(write(tmp_path / "b.bin", data), "new")
    store.get("new@1", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data
    assert store.verify(deep=True).ok


def test_chunk_stored_by_another_writer_after_the_listing_gets_its_real_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Absent from the listing, present at upload: the chunk store reads its time."""
    clock = FakeClock()
    counted = FaultyBackend(paged(1000, clock))
    store = make_store(counted, clock)
    data = random_bytes(100 * KiB, seed=4)
    digests = []
    from cas.chunks._chunking import iter_chunks

    with open(write(tmp_path / "a.bin", data), "rb") as stream:
        digests = [Digest.of(bytes(v)) for v in iter_chunks(stream, PARAMS)]
    ready = threading.Event()

    def other_writer() -> None:
        # Stores the same chunks after the put listed: create-only, same bytes.
        other = make_store(counted.inner, clock)
        other.put(tmp_path / "a.bin", "other")
        ready.set()

    original = ChunkIndex.complete
    raced: list[bool] = []

    def complete_then_race(infos: Iterable[ObjectInfo], requests: int) -> ChunkIndex:
        index = original(infos, requests)
        if not raced:  # the other writer lists too: it must not race again
            raced.append(True)
            thread = threading.Thread(target=other_writer)
            thread.start()
            thread.join()
        return index

    monkeypatch.setattr(ChunkIndex, "complete", complete_then_race)
    counted.reset_counts()
    store.put(tmp_path / "a.bin", "mine")
    assert ready.is_set()
    keys = {layout.chunk_key(d) for d in digests}
    assert keys <= set(counted.keys["stat"]), "each chunk found at upload must be stat'ed"
    assert store.verify(deep=True).ok
