"""``Store.stats`` keeps a summary of each manifest it has read: never a wrong figure.

The figures are checked against a walk that reads every manifest whole (the
way stats were counted before summaries), on a store with dedup, deltas and
deleted versions, as versions are put, deleted and collected; and against a
fresh store object, which has no summary yet.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_repack import series
from test_tensors import PARAMS

from cas.digest import Digest
from cas.errors import CorruptObjectError, MissingObjectError
from cas.repository import _layout as layout
from cas.repository._live import LiveVersions
from cas.store import Store
from cas.store._stats import Summaries, measure
from cas.store._values import Stats


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
        store.refs, store.load_manifest, store.chunks, store.backend, summaries=summaries
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
