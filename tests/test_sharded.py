"""Versions written in parts by several writers, committed by one (the store's side of DCP).

These run in one process: each ShardWriter stands for a rank. The parts
cross a pickle, as they cross processes in a distributed job.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gc_helpers import World, live_objects, make_world, stored_keys
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from cas.chunks._chunking import ChunkerParams
from cas.errors import (
    ConcurrentCollectionError,
    InvalidInputError,
    InvalidKeyError,
    InvalidRefError,
    NotFoundError,
    RefNotFoundError,
)
from cas.gc._collect import Collector
from cas.ml.diff import diff
from cas.repository import _layout as layout
from cas.store import INDEX_PATH, Record, ShardPart, Store, TensorPart
from cas.tensors._index import TensorIndex
from cas.transfer._sharded import PartsCutter

KiB = 1024
PARAMS = ChunkerParams.from_average(16 * KiB)
rng = np.random.default_rng(7)
WEIGHT = rng.standard_normal((128, 96)).astype(np.float32)  # 48 KiB: own chunks
BIAS = rng.standard_normal(96).astype(np.float32)  # small: grouped with framing


def shard_parts(
    weight: NDArray[np.float32], rows: slice, *, bias: bool
) -> list[bytes | TensorPart]:
    block = np.ascontiguousarray(weight[rows])
    parts: list[bytes | TensorPart] = [
        b"frame-before",
        TensorPart("w", "F32", block.shape, block.data, (rows.start, 0), weight.shape),
        b"frame-after",
    ]
    if bias:
        parts += [b"small", TensorPart("b", "F32", BIAS.shape, BIAS.tobytes()), b"end"]
    return parts


def expected_bytes(parts: list[bytes | TensorPart]) -> bytes:
    return b"".join(bytes(p.view) if isinstance(p, TensorPart) else p for p in parts)


def record(key: str, **fields: Any) -> Record:
    """A version's record as a put of these fields would make it."""
    arguments: dict[str, Any] = {
        "parents": (),
        "tags": (),
        "metrics": None,
        "metadata": None,
        "message": "",
        "info": None,
    }
    return Record.of(key, **{**arguments, **fields})


def commit_two_ranks(
    store: Store,
    spec: Record,
    weight: NDArray[np.float32],
    parents: Sequence[str] = (),
    **options: Any,
) -> str:
    """Rank 1 writes its half and seals; rank 0 writes its half, .metadata, and commits."""
    rank1 = store.shard_writer(spec, parents=parents, **options)
    with rank1:
        rank1.write("__1_0.distcp", shard_parts(weight, slice(64, 128), bias=False))
        part = pickle.loads(pickle.dumps(rank1.seal()))
    with store.shard_writer(spec, parents=parents, **options) as rank0:
        rank0.write("__0_0.distcp", shard_parts(weight, slice(0, 64), bias=True))
        own = rank0.seal()
        rank0.write(".metadata", [b"pickled metadata"])
        return rank0.commit([own, part]).ref


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.init(tmp_path / "store", chunker=PARAMS)


def test_parts_commit_one_version_that_restores_and_reads_by_tensor(
    store: Store, tmp_path: Path
) -> None:
    ref = commit_two_ranks(store, record("runs/a", metrics={"loss": 2.0}), WEIGHT)
    assert ref == "runs/a@1"
    assert [v.ref for v in store.log("runs/a")] == ["runs/a@1"]
    store.get(ref, tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".metadata", "__0_0.distcp", "__1_0.distcp", INDEX_PATH]
    )
    assert (out / "__0_0.distcp").read_bytes() == expected_bytes(
        shard_parts(WEIGHT, slice(0, 64), bias=True)
    )
    np.testing.assert_array_equal(store.read_tensor(ref, None, "w"), WEIGHT)
    np.testing.assert_array_equal(store.read_tensor(ref, None, "b"), BIAS)
    with pytest.raises(NotFoundError, match="no tensor named 'nope'"):
        store.read_tensor(ref, None, "nope")
    index = TensorIndex.from_bytes((out / INDEX_PATH).read_bytes())
    assert [s.offsets for s in index.tensor("w").shards] == [(0, 0), (64, 0)]
    assert store.verify(deep=True).ok


def test_large_tensors_start_chunks_of_their_own_and_get_the_tensor_codec(store: Store) -> None:
    ref = commit_two_ranks(store, record("runs/a"), WEIGHT)
    files = store.open_version(ref)
    assert files.tensors is not None
    (shard, _) = files.tensors.tensor("w").shards
    entry = files.files[shard.file]
    starts = entry.chunk_offsets()
    assert shard.start in starts
    assert shard.end in [*starts, entry.size]
    first = starts.index(shard.start)
    blob = store.backend.get(layout.chunk_key(entry.chunks[first].digest))
    assert blob[3] == 2  # codec 2: byte-grouped elements


def test_a_second_version_stores_only_the_changed_shard_as_a_delta(store: Store) -> None:
    first = commit_two_ranks(store, record("runs/a"), WEIGHT)
    before = stored_keys(store.backend, layout.CHUNKS)
    moved = WEIGHT.copy()
    moved[:64] += np.float32(1e-4) * rng.standard_normal((64, 96)).astype(np.float32)
    second = commit_two_ranks(store, record("runs/a", parents=("runs/a",)), moved, [first])
    new = stored_keys(store.backend, layout.CHUNKS) - before
    report = diff(store, first, second)
    changed = {c.path: c.tensors for c in report.changes}
    assert changed["__0_0.distcp"] is not None
    assert changed["__0_0.distcp"].changed == ("w",)
    assert changed["__0_0.distcp"].unchanged == 1  # the bias
    assert "__1_0.distcp" not in changed  # the other half did not move
    shard0 = {e.path: e for e in store.show(second).entries}["__0_0.distcp"]
    assert any(c.bases for c in shard0.chunks)  # stored as deltas of the parent's shard
    assert {layout.chunk_key(c.digest) for c in shard0.chunks if c.bases} <= new
    assert report.new_bytes < WEIGHT.nbytes // 2 + 4 * KiB
    np.testing.assert_array_equal(store.read_tensor(second, None, "w"), moved)
    assert store.show(second).version.parents == ("runs/a@1",)


def test_without_parents_the_pinned_latest_version_is_the_delta_base(store: Store) -> None:
    commit_two_ranks(store, record("runs/a"), WEIGHT)
    commit_two_ranks(store, record("runs/a"), WEIGHT + 1)  # the latest, unrelated
    moved = WEIGHT + np.float32(1e-4) * rng.standard_normal(WEIGHT.shape).astype(np.float32)
    # Pinned to version 1, as the committing process pins it for every rank.
    third = commit_two_ranks(store, record("runs/a"), moved, latest=1)
    shown = store.show(third)
    assert shown.storage.delta_base == "runs/a@1"
    assert shown.version.parents == ()
    first_chunks = {c.digest for e in store.show("runs/a@1").entries for c in e.chunks}
    deltas = [c for e in shown.entries for c in e.chunks if c.bases]
    assert len(deltas) >= 2  # each rank's shard of the weight
    assert all(c.bases[0] in first_chunks for c in deltas)
    np.testing.assert_array_equal(store.read_tensor(third, None, "w"), moved)
    # delta=False stores whole; a pinned version deleted since gives no base.
    again = moved + np.float32(1e-4)
    whole = commit_two_ranks(store, record("runs/a"), again, latest=3, delta=False)
    assert store.show(whole).storage.delta_chunks == 0
    store.delete("runs/a@1")
    orphan = commit_two_ranks(store, record("runs/a"), again * 2, latest=1)
    assert store.show(orphan).storage.delta_chunks == 0
    assert store.verify(deep=True).ok


def test_a_writer_that_never_commits_leaves_no_version(store: Store) -> None:
    spec = record("runs/a")
    with store.shard_writer(spec) as rank1:
        rank1.write("__1_0.distcp", shard_parts(WEIGHT, slice(64, 128), bias=False))
        rank1.seal()
    with pytest.raises(RefNotFoundError):
        store.log("runs/a")
    assert store.verify(deep=True).ok
    assert store.gc(grace=0).deleted_chunks > 0
    assert not stored_keys(store.backend, "gc/puts/")


def test_commit_refuses_two_writers_of_one_file(store: Store) -> None:
    spec = record("runs/a")
    with store.shard_writer(spec) as one, store.shard_writer(spec) as two:
        one.write("__0_0.distcp", [b"a"])
        two.write("__0_0.distcp", [b"b"])
        with pytest.raises(InvalidInputError, match=r"two processes wrote file '__0_0\.distcp'"):
            one.commit([one.seal(), two.seal()])
    with pytest.raises(RefNotFoundError):
        store.log("runs/a")


def test_writer_refuses_bad_paths_and_the_index_name(store: Store) -> None:
    with store.shard_writer(record("runs/a")) as writer:
        with pytest.raises(InvalidInputError, match="tensor index"):
            writer.write(INDEX_PATH, [b"{}"])
        with pytest.raises(InvalidInputError):
            writer.write("../escape", [b"x"])
        writer.write("a", [b"x"])
        with pytest.raises(InvalidInputError, match="already written"):
            writer.write("a", [b"y"])


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"key": "runs/bad key"}, InvalidKeyError, "invalid key"),
        ({"tags": ("1",)}, InvalidRefError, "invalid tag"),
        ({"metrics": {"loss": float("nan")}}, InvalidInputError, "finite number"),
        ({"metadata": {"x": object()}}, InvalidInputError, "JSON"),
    ],
)
def test_a_record_checks_everything_before_any_write(
    fields: dict[str, Any], error: type[Exception], message: str
) -> None:
    key = fields.pop("key", "runs/a")
    with pytest.raises(error, match=message):
        record(key, **fields)


def test_tensor_part_checks_its_shape_and_bytes() -> None:
    with pytest.raises(InvalidInputError, match="bytes for"):
        TensorPart("w", "F32", (4,), b"\0" * 15)
    with pytest.raises(InvalidInputError, match="does not fit"):
        TensorPart("w", "F32", (4,), b"\0" * 16, offsets=(2,), whole_shape=(5,))
    with pytest.raises(InvalidInputError, match="number of dimensions"):
        TensorPart("w", "F32", (4,), b"\0" * 16, offsets=(0, 0))
    strided = memoryview(bytes(32))[::2]
    with pytest.raises(InvalidInputError, match="contiguous"):
        TensorPart("w", "F32", (4,), strided).view  # noqa: B018


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=3000),
            st.integers(min_value=0, max_value=40_000).map(lambda n: ("F32", n)),
            st.integers(min_value=0, max_value=9_000).map(lambda n: ("BF16", n)),
        ),
        max_size=8,
    )
)
def test_cut_parts_cover_the_file_and_cut_large_tensors_on_their_elements(
    parts_spec: list[bytes | tuple[str, int]],
) -> None:
    params = ChunkerParams(min_size=4 * KiB, avg_size=8 * KiB, max_size=16 * KiB)
    parts: list[bytes | TensorPart] = []
    for number, item in enumerate(parts_spec):
        if isinstance(item, bytes):
            parts.append(item)
        else:
            dtype, count = item
            size = 4 if dtype == "F32" else 2
            data = bytes([number]) * (count * size)
            parts.append(TensorPart(f"t{number}", dtype, (count,), data))
    cutter = PartsCutter("f", params)
    spans = list(cutter.spans(parts))
    assert b"".join(bytes(v) for v, _ in spans) == expected_bytes(parts)
    position = 0
    for view, span in spans:
        assert span.offset == position
        assert span.length == len(view) <= params.max_size
        position += len(view)
    assert cutter.size == position
    starts = {span.offset for _, span in spans}
    for name, dtype, _shape, shard in cutter.rows:
        if shard.end - shard.start >= params.min_size:
            assert shard.start in starts
            assert shard.end in starts or shard.end == position
            inside = [s for _, s in spans if shard.start <= s.offset < shard.end]
            assert all(s.pieces[0].name == name and s.pieces[0].dtype == dtype for s in inside)
            assert all(s.length % (4 if dtype == "F32" else 2) == 0 for s in inside)


def test_ranges_of_a_version_read_back_exactly(store: Store) -> None:
    ref = commit_two_ranks(store, record("runs/a"), WEIGHT)
    files = store.open_version(ref)
    whole = {p: files.read(p) for p in files.files}
    requests = [
        (path, start, min(start + length, len(whole[path])))
        for path in sorted(whole)
        for start, length in [(0, 5), (3, 40_000), (len(whole[path]) // 2, 1), (7, 0)]
        if start <= len(whole[path])
    ]
    got = [b"".join(p) for p in files.read_ranges(requests, workers=3)]
    assert got == [whole[p][s:e] for p, s, e in requests]
    with pytest.raises(InvalidInputError, match="not within"):
        list(files.read_ranges([("__0_0.distcp", 0, 10**9)]))
    with pytest.raises(NotFoundError, match="no file"):
        files.size("nope")


def test_many_processes_creating_one_store_at_once_all_succeed(tmp_path: Path) -> None:
    location = tmp_path / "fresh"
    opened: list[str] = []
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            opened.append(Store.open(location).config.store_id)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=open_it) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(opened)) == 1


# -- the write-session rules, with a fake clock --------------------------------------------


@pytest.fixture
def world() -> World:
    return make_world("memory", None)


def test_commit_refreshes_a_sealed_part_that_aged_while_the_others_worked(world: World) -> None:
    store = world.store()
    spec = record("runs/a")
    rank1 = store.shard_writer(spec)
    rank1.write("__1_0.distcp", shard_parts(WEIGHT, slice(64, 128), bias=False))
    part = rank1.seal()
    rank1.close()
    mine = {layout.chunk_key(c.digest) for c in rank1.entries["__1_0.distcp"].chunks}
    world.advance(world.grace * 0.8)  # past 3/4 of the grace by the time rank 0 commits
    touched: list[str] = []
    world.backend.on("touch", lambda k: k in mine, touched.append, once=False)
    with store.shard_writer(spec) as rank0:
        rank0.write("__0_0.distcp", shard_parts(WEIGHT, slice(0, 64), bias=True))
        ref = rank0.commit([part]).ref
    assert set(touched) == mine
    world.advance(world.grace * 0.6)
    Collector(store.backend, clock=world.clock, workers=2, grace=world.grace).run()
    np.testing.assert_array_equal(store.read_tensor(ref, None, "w"), WEIGHT)
    assert store.verify(deep=True).ok


def test_commit_stops_when_a_collection_took_a_sealed_part(world: World) -> None:
    store = world.store()
    spec = record("runs/a")
    with store.shard_writer(spec) as rank1:
        rank1.write("__1_0.distcp", shard_parts(WEIGHT, slice(64, 128), bias=False))
        part: ShardPart = rank1.seal()
    world.advance(world.grace * 1.5)  # a stalled coordinator: the part is garbage by now
    report = Collector(store.backend, clock=world.clock, workers=2, grace=world.grace).run()
    assert report.deleted_chunks > 0
    with store.shard_writer(spec) as rank0:
        rank0.write("__0_0.distcp", shard_parts(WEIGHT, slice(0, 64), bias=True))
        with pytest.raises(ConcurrentCollectionError, match="nothing was committed"):
            rank0.commit([part])
    with pytest.raises(RefNotFoundError):
        store.log("runs/a")
    chunks, _ = live_objects(store)
    assert not chunks


def test_a_save_reusing_a_dead_writers_chunks_keeps_them_through_a_collection(
    world: World,
) -> None:
    store = world.store()
    spec = record("runs/a")
    dead = store.shard_writer(spec)  # a rank killed mid-save: never sealed, never closed
    dead.write("__1_0.distcp", shard_parts(WEIGHT, slice(64, 128), bias=False))
    left = {layout.chunk_key(c.digest) for c in dead.entries["__1_0.distcp"].chunks}
    world.advance(world.grace * 1.5)  # its chunks are old garbage by the time of the next save
    rank1 = store.shard_writer(spec)
    with rank1:
        rank1.write("__1_0.distcp", shard_parts(WEIGHT, slice(64, 128), bias=False))
        part = rank1.seal()
    assert {layout.chunk_key(c.digest) for c in rank1.entries["__1_0.distcp"].chunks} == left
    world.advance(world.grace * 0.5)
    # A collection while rank 0 still works: the reused chunks are young again, and kept.
    Collector(store.backend, clock=world.clock, workers=2, grace=world.grace).run()
    assert left <= set(stored_keys(store.backend, layout.CHUNKS))
    with store.shard_writer(spec) as rank0:
        rank0.write("__0_0.distcp", shard_parts(WEIGHT, slice(0, 64), bias=True))
        ref = rank0.commit([part]).ref
    np.testing.assert_array_equal(store.read_tensor(ref, None, "w"), WEIGHT)
    assert store.verify(deep=True).ok
