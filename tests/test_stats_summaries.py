"""``Store.stats`` keeps a summary of each manifest it has read: never a wrong figure.

The figures are checked against a walk that reads every manifest whole (the
way stats were counted before summaries), on a store with dedup, deltas and
deleted versions, as versions are put, deleted and collected; and against a
fresh store object, which has no summary yet. ``Store.stats`` takes the live
versions from the catalog of versions where it can: the figures must be
those of the refs alone, whatever state the catalog is in.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from test_repack import series
from test_tensors import PARAMS

from cas.backends import LocalBackend
from cas.digest import Digest
from cas.errors import CorruptObjectError, MissingObjectError
from cas.repository import _changes
from cas.repository import _layout as layout
from cas.repository._live import LiveVersions
from cas.store import CatalogUnavailable, Store, _index
from cas.store import _catalog_table as table
from cas.store._config import load_config
from cas.store._stats import Summaries, live_from_refs, measure
from cas.store._values import Stats
from cas.testing.faults import FaultyBackend


def read_whole(store: Store) -> Stats:
    """The store's figures from every live manifest read and decoded, none summarised."""
    keys: set[str] = set()
    versions = logical = 0
    named: dict[bytes, int] = {}
    needed: set[bytes] = set()
    bases: set[bytes] = set()
    deltas: set[bytes] = set()
    live: set[str] = set()
    for ref, manifest in LiveVersions(store.refs, lambda r: store.load_manifest(r.manifest_id)):
        live.add(layout.manifest_key(ref.manifest_id))
        keys.add(ref.key)
        versions += 1
        logical += manifest.size
        for _, digest, _ in manifest.live_chunks():
            needed.add(digest.raw)
        for entry in manifest.entries:
            for chunk in entry.chunks:
                named[chunk.digest.raw] = chunk.length
                bases.update(b.raw for b in chunk.bases)
                if chunk.bases:
                    deltas.update(d.raw for d in (chunk.digest, *chunk.bases[:-1]))
    sizes = {d.raw: info.size for d, info in store.chunks.list_chunks()}
    manifests = {i.key: i.size for i in store.backend.list_objects(layout.MANIFESTS)}
    return Stats(
        keys=len(keys),
        versions=versions,
        logical_bytes=logical,
        unique_bytes=sum(named.values()),
        stored_bytes=sum(sizes.values()) + sum(manifests.values()),
        chunks=len(sizes),
        referenced_chunks=len(needed),
        live_bytes=sum(sizes.get(r, 0) for r in needed) + sum(manifests[k] for k in live),
        delta_base_bytes=sum(sizes.get(r, 0) for r in needed - named.keys()),
        delta_chunks=len(deltas),
        delta_bytes=sum(sizes.get(r, 0) for r in deltas),
        base_chunks=len(bases),
    )


def summarised(store: Store, summaries: Summaries) -> Stats:
    return measure(
        live_from_refs(store.refs),
        store.load_manifest,
        store.chunks,
        store.backend,
        summaries=summaries,
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.init(tmp_path / "store", chunker=PARAMS)


def assert_all_agree(store: Store, *kept: Summaries) -> Stats:
    whole = read_whole(store)
    for summaries in kept:  # summaries kept from earlier calls
        assert summarised(store, summaries) == whole
    assert summarised(store, Summaries()) == whole  # none kept
    fresh = Store.open(store.uri, create=False)
    assert store.stats() == fresh.stats()
    assert dataclasses.replace(store.stats(), repack_frees_bytes=0) == whole
    return whole


def test_summaries_give_the_figures_of_whole_manifests_as_the_store_changes(
    store: Store, tmp_path: Path
) -> None:
    # All kept, and only the first few (the rest read on every call).
    summaries = (Summaries(), Summaries(budget=150))
    paths = series(store, tmp_path, versions=4)  # each version a delta of the one before
    store.put(paths[1], "copy")  # the same content under another key: dedup
    store.put(paths[1], "copy")  # and a second version sharing its manifest
    first = assert_all_agree(store, *summaries)
    assert first.delta_chunks
    assert first.base_chunks
    assert first.logical_bytes > first.unique_bytes

    store.delete("run@1")  # a base of run@2's deltas: kept only as a base now
    store.delete("copy@2")
    deleted = assert_all_agree(store, *summaries)
    assert deleted.versions == first.versions - 2
    assert deleted.delta_base_bytes > 0

    store.gc(grace=0, repack=False)
    collected = assert_all_agree(store, *summaries)
    assert collected.stored_bytes < deleted.stored_bytes

    store.delete_all("copy", force=True)
    store.gc(grace=0)  # with the repack, which may store run@2's deltas again
    repacked = assert_all_agree(store, *summaries)
    assert (repacked.keys, repacked.versions) == (1, 3)


def test_a_summarised_manifest_gone_from_the_store_fails_as_an_unread_one(
    store: Store, tmp_path: Path
) -> None:
    version = store.put(series(store, tmp_path, versions=1)[0], "other")
    store.stats()
    store.backend.delete([layout.manifest_key(Digest.parse(version.manifest_id))])
    with pytest.raises(MissingObjectError):
        Store.open(store.uri, create=False).stats()
    with pytest.raises(MissingObjectError):
        store.stats()


def test_a_summarised_manifest_of_other_bytes_fails_as_an_unread_one(
    store: Store, tmp_path: Path
) -> None:
    version = store.put(series(store, tmp_path, versions=1)[0], "other")
    store.stats()
    path = tmp_path / "store" / layout.manifest_key(Digest.parse(version.manifest_id))
    path.write_bytes(path.read_bytes() + b" ")
    with pytest.raises(CorruptObjectError):
        store.stats()


def test_live_chunks_are_what_stats_counts_and_read_once_for_both(tmp_path: Path) -> None:
    Store.init(tmp_path / "store", chunker=PARAMS)
    backend = FaultyBackend(LocalBackend(tmp_path / "store"))
    store = Store(backend, load_config(backend, create=False))
    series(store, tmp_path, versions=3)  # deltas: their bases are kept alive too
    versions = store.log("run")
    expected = {
        v.manifest_id: frozenset(
            d.raw for _, d, _ in store.load_manifest(Digest.parse(v.manifest_id)).live_chunks()
        )
        for v in versions
    }
    backend.reset_counts()
    assert {v.manifest_id: store.live_chunks(v.manifest_id) for v in versions} == expected
    assert any(len(chunks) > 1 for chunks in expected.values())
    store.stats()
    store.live_chunks(versions[0].manifest_id)
    manifest_reads = [k for k in backend.keys["get"] if k.startswith(layout.MANIFESTS)]
    assert sorted(manifest_reads) == sorted(
        layout.manifest_key(Digest.parse(v.manifest_id)) for v in versions
    )


def test_live_chunks_of_a_damaged_manifest_raise(store: Store, tmp_path: Path) -> None:
    version = store.put(series(store, tmp_path, versions=1)[0], "other")
    path = tmp_path / "store" / layout.manifest_key(Digest.parse(version.manifest_id))
    path.write_bytes(b"{}")
    with pytest.raises(CorruptObjectError):
        store.live_chunks(version.manifest_id)


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A process of its own for the catalog; its notes fold at the next compaction."""
    monkeypatch.setattr(_index, "_DECODED", {})
    monkeypatch.setenv("CAS_CATALOG_CACHE", str(tmp_path / "catalog-cache"))
    monkeypatch.setattr(_changes, "SETTLE", 0.0)
    monkeypatch.setattr(_changes, "TIME_GRAIN", 0.0)


def assert_catalog_gives_the_refs_figures(store: Store, monkeypatch: pytest.MonkeyPatch) -> Stats:
    """``stats`` through the catalog equals ``stats`` from every ref, and the whole manifests."""
    via_catalog = store.stats()
    assert store._live_from_catalog() is not None  # the catalog answered

    def missing() -> None:
        raise CatalogUnavailable("the catalog needs pyarrow")

    with monkeypatch.context() as without:
        without.setattr(table, "_pyarrow", missing)
        assert store._live_from_catalog() is None
        via_refs = Store.open(store.uri, create=False).stats()
    assert via_catalog == via_refs
    assert store.stats(versions=store.catalog()) == via_catalog  # as the ui's store page asks
    assert dataclasses.replace(via_catalog, repack_frees_bytes=0) == read_whole(store)
    return via_catalog


@pytest.mark.usefixtures("settled")
def test_stats_through_the_catalog_are_those_of_the_refs(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = series(store, tmp_path, versions=4)  # deltas
    store.put(paths[1], "copy", tags=["best"])  # dedup
    store.put(paths[2], "copy")
    assert_catalog_gives_the_refs_figures(store, monkeypatch)

    time.sleep(0.05)  # file times are coarse: the last note must be older than "now"
    assert store.compact_catalog().pending == 0
    store.tag("copy@2", "best")  # moved: committed after the compaction, read from the notes
    store.delete("run@1")
    store.delete("copy@1")
    store.put(paths[3], "late")
    assert store.catalog_status().pending >= 4
    after = assert_catalog_gives_the_refs_figures(store, monkeypatch)
    assert (after.keys, after.versions) == (3, 5)
    assert after.delta_base_bytes > 0
    assert after.repack_frees_bytes >= 0

    status = store.compact_catalog()
    damaged = tmp_path / "store" / "catalog" / "checkpoints" / f"{status.checkpoint}.parquet"
    damaged.write_bytes(b"PAR1 not a parquet file")
    for cached in (tmp_path / "catalog-cache").rglob("*"):
        if cached.is_file():
            cached.unlink()
    _index._DECODED.clear()
    assert assert_catalog_gives_the_refs_figures(store, monkeypatch) == after  # rebuilt

    for entry in sorted((tmp_path / "store" / "catalog").rglob("*"), reverse=True):
        entry.unlink() if entry.is_file() else entry.rmdir()
    _index._DECODED.clear()
    assert assert_catalog_gives_the_refs_figures(store, monkeypatch) == after  # built anew


@pytest.mark.usefixtures("settled")
def test_stats_read_no_version_ref_when_the_catalog_answers(store: Store, tmp_path: Path) -> None:
    faulty = FaultyBackend(store.backend)
    counted = Store(faulty, load_config(faulty, create=False))
    for n in range(12):
        source = tmp_path / "src.bin"
        source.write_bytes(f"version {n}".encode() * 50)
        counted.put(source, f"k{n % 3}")
    time.sleep(0.05)
    counted.compact_catalog()
    warm = counted.stats()  # reads and summarises every manifest once
    faulty.reset_counts()
    assert counted.stats() == warm
    gets = faulty.keys["get"]
    assert not [key for key in gets if key.startswith(layout.REFS)], gets
    assert faulty.calls["get"] <= 3, gets  # the catalog's head, twice
    # the catalog's notes, chunks/, manifests/, and one key's refs and tags (the spot check)
    assert faulty.calls["list"] == 5


@pytest.mark.usefixtures("settled")
def test_stats_of_a_store_that_cannot_be_written_and_has_no_catalog(
    store: Store, tmp_path: Path
) -> None:
    series(store, tmp_path, versions=3)
    store.delete("run@1")
    readonly = FaultyBackend(store.backend, fail_on={"put"}, transient=False)
    reader = Store(readonly, store.config)
    assert reader._live_from_catalog() is None
    assert dataclasses.replace(reader.stats(), repack_frees_bytes=0) == read_whole(store)
