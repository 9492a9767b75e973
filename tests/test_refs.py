"""Version and tag refs: create-if-absent numbering under races, tombstones, tags."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cas.backends import LocalBackend, MemoryBackend, ObjectInfo
from cas.backends.base import Backend
from cas.digest import Digest
from cas.errors import CorruptObjectError, RefNotFoundError
from cas.repository import _layout as layout
from cas.repository._live import LiveVersions
from cas.repository._refs import DeletedRef, Refs, VersionRef

M1 = Digest.of(b"manifest one")
M2 = Digest.of(b"manifest two")


def race(refs: Refs, key: str, threads: int, each: int) -> list[int]:
    """``threads`` threads each commit ``each`` versions of ``key`` at once."""
    barrier = threading.Barrier(threads)
    results: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        try:
            barrier.wait()
            for _ in range(each):
                ref = refs.create_next(key, Digest.of(f"{index}".encode()))
                with lock:
                    results.append(ref.number)
        except BaseException as err:  # reported below, not lost in the thread
            errors.append(err)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    assert not errors, errors
    return results


def live(refs: Refs, key: str, number: int) -> VersionRef:
    """A version ref that must be live: a tombstone has no manifest to compare."""
    ref = refs.read_version(key, number)
    assert isinstance(ref, VersionRef)
    return ref


def test_create_next_numbers_from_one() -> None:
    refs = Refs(MemoryBackend())
    assert [refs.create_next("k", M1).number for _ in range(3)] == [1, 2, 3]
    assert refs.create_next("other", M2).number == 1
    assert refs.version_numbers("k") == [1, 2, 3]
    ref = live(refs, "k", 2)
    assert (ref.key, ref.number, ref.manifest_id, ref.deleted) == ("k", 2, M1, False)


def test_create_next_races_on_memory_backend() -> None:
    backend = MemoryBackend()
    refs = Refs(backend)
    numbers = race(refs, "runs/a", threads=8, each=25)
    assert sorted(numbers) == list(range(1, 201)), "every writer got a distinct number, no gap"
    assert refs.version_numbers("runs/a") == list(range(1, 201))
    # Each ref names the manifest of the writer that won it.
    owners = {live(refs, "runs/a", n).manifest_id for n in range(1, 201)}
    assert owners == {Digest.of(f"{i}".encode()) for i in range(8)}


def test_create_next_races_on_local_backend(tmp_path: Path) -> None:
    refs = Refs(LocalBackend(tmp_path / "store", fsync=False))
    numbers = race(refs, "k", threads=4, each=15)
    assert sorted(numbers) == list(range(1, 61))


class LaggingListBackend(MemoryBackend):
    """A backend whose listing is stale: every writer computes the same next number.

    Only the create-only write can then keep writers apart.
    """

    def __init__(self) -> None:
        super().__init__()
        self.frozen: list[ObjectInfo] = []

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return iter(self.frozen)


def test_create_next_relies_on_create_only_writes_not_listing() -> None:
    backend = LaggingListBackend()
    refs = Refs(backend)
    numbers = race(refs, "k", threads=6, each=5)
    assert sorted(numbers) == list(range(1, 31))


def test_tombstoned_numbers_are_never_reused() -> None:
    refs = Refs(MemoryBackend())
    first = refs.create_next("k", M1)
    second = refs.create_next("k", M2)
    refs.mark_deleted(second)
    assert refs.read_version("k", 2).deleted
    assert isinstance(refs.read_version("k", 2), DeletedRef)
    assert refs.read_live("k", 2) is None
    assert refs.read_live("k", 1) == first
    assert refs.latest("k").number == 1
    assert refs.create_next("k", M2).number == 3
    assert [r.number for r in refs.live_versions("k")] == [1, 3]
    assert [r.number for r in refs.live_versions("k", newest_first=True)] == [3, 1]
    refs.mark_deleted(first)
    refs.mark_deleted(refs.read_version("k", 3))
    with pytest.raises(RefNotFoundError):
        refs.latest("k")


def test_missing_and_malformed_refs() -> None:
    backend = MemoryBackend()
    refs = Refs(backend)
    with pytest.raises(RefNotFoundError, match="k@4"):
        refs.read_version("k", 4)
    with pytest.raises(RefNotFoundError):
        refs.latest("nothing")
    backend.put(layout.version_key("k", 1), b"{not json")
    with pytest.raises(CorruptObjectError, match="malformed"):
        refs.read_version("k", 1)
    backend.put(layout.tag_key("k", "best"), b'{"nope": 1}')
    with pytest.raises(CorruptObjectError, match="malformed"):
        refs.read_tag("k", "best")
    with pytest.raises(RefNotFoundError, match="k:gone"):
        refs.read_tag("k", "gone")


def test_tags_set_move_and_remove() -> None:
    refs = Refs(MemoryBackend())
    refs.create_next("k", M1)
    refs.create_next("k", M2)
    refs.set_tag("k", "best", 1)
    refs.set_tag("k", "latest-good", 2)
    assert refs.tags("k") == {"best": 1, "latest-good": 2}
    refs.set_tag("k", "best", 2)  # a tag moves
    assert refs.read_tag("k", "best") == 2
    refs.remove_tag("k", "best")
    assert refs.tags("k") == {"latest-good": 2}
    assert refs.tags("other") == {}


def test_iter_keys_groups_versions_and_ignores_tags() -> None:
    backend: Backend = MemoryBackend()
    refs = Refs(backend)
    for key in ["b", "a", "a/x", "a-b"]:
        refs.create_next(key, M1)
    refs.create_next("a", M2)
    refs.set_tag("a", "t", 2)
    found = dict(refs.iter_keys())
    assert found == {"a": [1, 2], "a/x": [1], "a-b": [1], "b": [1]}
    assert dict(refs.iter_keys("a/")) == {"a/x": [1]}


@pytest.mark.parametrize("workers", [1, 4])
def test_live_versions_walk_every_key_in_order(workers: int) -> None:
    backend = MemoryBackend()
    refs = Refs(backend)
    for key in ("b", "a/x", "a"):
        for manifest in (M1, M2, M1):
            refs.create_next(key, manifest)
    refs.mark_deleted(refs.latest("a"))
    refs.set_tag("b", "best", 1)
    refs.set_tag("a", "first", 1)
    seen: list[str] = []
    walk = LiveVersions(refs, lambda ref: ref.manifest_id, workers=workers, tick=lambda: None)
    walked = [(ref.label, manifest) for ref, manifest in walk]
    assert walked == [
        ("a@1", M1),
        ("a@2", M2),
        ("a/x@1", M1),
        ("a/x@2", M2),
        ("a/x@3", M1),
        ("b@1", M1),
        ("b@2", M2),
        ("b@3", M1),
    ]
    assert walk.tags == 2
    # A ref that cannot be read stops the walk, unless the caller takes it.
    backend.put(layout.version_key("a/x", 2), b"{not json")
    with pytest.raises(CorruptObjectError, match="malformed"):
        list(LiveVersions(refs, lambda ref: None, workers=workers))
    taken = LiveVersions(
        refs, lambda ref: None, workers=workers, on_unreadable=lambda label, _: seen.append(label)
    )
    assert [ref.label for ref, _ in taken] == ["a@1", "a@2", "a/x@1", "a/x@3", "b@1", "b@2", "b@3"]
    assert seen == ["a/x@2"]
