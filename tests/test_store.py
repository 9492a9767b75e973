"""The Python API: cas.open and the Store facade, with typed, frozen results."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import KiB, build_sample_tree, chunk_files, random_bytes, small_store, snapshot

import cas
from cas.errors import (
    DestinationExistsError,
    InvalidInputError,
    InvalidKeyError,
    InvalidRefError,
    NotAStoreError,
    RefNotFoundError,
    SourceError,
    StoreError,
)
from cas.gc._verify import VerifyReport
from cas.repository._manifest import Entry
from cas.repository._metadata import Summary
from cas.store import Details, KeySummary, Stats, Store, Version

HEX64 = re.compile(r"[0-9a-f]{64}")
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return small_store(tmp_path / "store")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return build_sample_tree(tmp_path / "tree")


# -- opening -------------------------------------------------------------------------


def test_open_creates_a_store_on_first_use(tmp_path: Path) -> None:
    location = tmp_path / "new"
    store = cas.open(location)
    assert isinstance(store, Store)
    assert (location / "config").is_file()
    # A second open reads the same config.
    assert cas.open(location).config == store.config
    assert repr(store) == f"Store({location.as_uri()!r})"
    assert repr(cas.open("memory://repr")) == "Store('memory://repr')"


def test_open_default_locations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tree: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CAS_STORE", raising=False)
    cas.open().put(tree, "k")
    assert (tmp_path / ".cas" / "config").is_file()
    monkeypatch.setenv("CAS_STORE", str(tmp_path / "from-env"))
    cas.open().put(tree, "k")
    assert (tmp_path / "from-env" / "config").is_file()
    assert [v.number for v in cas.open(tmp_path / ".cas").log("k")] == [1]


def test_open_without_create_and_non_stores(tmp_path: Path) -> None:
    with pytest.raises(NotAStoreError, match="cas init"):
        cas.open(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a store")
    with pytest.raises(NotAStoreError, match="not a cas store"):
        cas.open(other)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotAStoreError):
        cas.open(tmp_path / "afile")


def test_init_twice_fails_and_keeps_params(tmp_path: Path) -> None:
    store = small_store(tmp_path / "s")
    with pytest.raises(StoreError, match="already"):
        Store.init(tmp_path / "s")
    assert cas.open(tmp_path / "s").config.chunker == store.config.chunker


def test_memory_store_shared_by_name(tree: Path) -> None:
    a = cas.open("memory://test-store-shared")
    a.put(tree, "k")
    b = cas.open("memory://test-store-shared")
    assert [v.ref for v in b.log("k")] == ["k@1"]


# -- put / get -------------------------------------------------------------------------


def test_put_returns_a_typed_frozen_version(store: Store, tree: Path) -> None:
    v = store.put(
        tree,
        "runs/bert/ckpt",
        tags=["best"],
        metrics={"loss": 0.31, "step": 100},
        metadata={"lr": 0.001, "opt": {"name": "adam"}},
        message="first",
    )
    assert isinstance(v, Version)
    assert (v.key, v.number, v.ref) == ("runs/bert/ckpt", 1, "runs/bert/ckpt@1")
    assert HEX64.fullmatch(v.manifest_id)
    assert ISO.fullmatch(v.created)
    assert v.kind == "directory"
    assert v.files == 5
    assert v.size == sum(f.stat().st_size for f in tree.rglob("*") if f.is_file() and
                         not f.is_symlink())  # fmt: skip
    assert v.tags == ("best",)
    assert v.parents == ()
    assert dict(v.metrics) == {"loss": 0.31, "step": 100}
    assert dict(v.metadata) == {"lr": 0.001, "opt": {"name": "adam"}}
    assert v.message == "first"
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.number = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.tags = ()  # type: ignore[misc]
    d = v.to_dict()
    assert d["ref"] == "runs/bert/ckpt@1"
    assert d["version"] == 1
    assert d["manifest"] == v.manifest_id


def test_results_do_not_share_state_with_the_store(store: Store, tree: Path) -> None:
    v = store.put(tree, "k", metrics={"loss": 1.0}, metadata={"a": [1]})
    try:
        v.metrics["loss"] = 99.0  # type: ignore[index]
        v.metadata["a"].append(2)
    except TypeError:
        pass  # read-only mappings are fine too
    again = store.log("k")[0]
    assert dict(again.metrics) == {"loss": 1.0}
    assert dict(again.metadata) == {"a": [1]}


def test_get_restores_an_identical_tree(store: Store, tree: Path, tmp_path: Path) -> None:
    v = store.put(tree, "k")
    out = tmp_path / "out"
    got = store.get("k", out)
    assert got == v
    assert snapshot(out) == snapshot(tree)


def test_single_file_round_trip(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "w.bin"
    src.write_bytes(random_bytes(100 * KiB, 1))
    src.chmod(0o640)
    v = store.put(src, "model")
    assert (v.kind, v.files, v.size) == ("file", 1, 100 * KiB)
    dest = tmp_path / "nested" / "dirs" / "w.restored"
    store.get("model@1", dest)
    assert snapshot(dest) == snapshot(src)


def test_get_refuses_existing_destination_unless_forced(
    store: Store, tree: Path, tmp_path: Path
) -> None:
    store.put(tree, "k")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old").write_text("old")
    with pytest.raises(DestinationExistsError):
        store.get("k", dest)
    assert (dest / "old").read_text() == "old"
    store.get("k", dest, force=True)
    assert snapshot(dest) == snapshot(tree)
    # A file destination is replaced by a directory, and back.
    f = tmp_path / "f"
    f.write_text("x")
    store.get("k", f, force=True)
    assert snapshot(f) == snapshot(tree)


def test_versions_tags_and_refs(store: Store, tree: Path, tmp_path: Path) -> None:
    v1 = store.put(tree, "k", tags=["first"])
    (tree / "weights.bin").write_bytes(random_bytes(10 * KiB, 99))
    v2 = store.put(tree, "k", parents=["k@1"], metrics={"loss": 0.1})
    assert (v1.number, v2.number) == (1, 2)
    assert v2.parents == ("k@1",)
    assert store.resolve("k").number == 2
    assert store.resolve("k@1").number == 1
    assert store.resolve("k:first").number == 1
    store.get("k:first", tmp_path / "first")
    store.get("k", tmp_path / "latest")
    assert (tmp_path / "first" / "weights.bin").read_bytes() != (
        tmp_path / "latest" / "weights.bin"
    ).read_bytes()
    assert (tmp_path / "latest" / "weights.bin").read_bytes() == random_bytes(10 * KiB, 99)

    log = store.log("k")
    assert [v.number for v in log] == [2, 1]
    assert all(isinstance(v, Version) for v in log)
    assert log[1].tags == ("first",)

    moved = store.tag("k@2", "first")
    assert moved.tags == ("first",)
    assert store.resolve("k:first").number == 2
    store.tag("k", "best")
    assert set(store.show("k@2").version.tags) == {"first", "best"}
    store.untag("k", "best")
    assert store.show("k@2").version.tags == ("first",)
    with pytest.raises(RefNotFoundError):
        store.untag("k", "best")


def test_show_returns_details_with_entries(store: Store, tree: Path) -> None:
    store.put(tree, "k")
    details = store.show("k@1")
    assert isinstance(details, Details)
    assert isinstance(details.version, Version)
    assert all(isinstance(e, Entry) for e in details.entries)
    by_path = {e.path: e for e in details.entries}
    assert by_path["latest"].type == "symlink"
    assert by_path["latest"].target == "weights.bin"
    assert by_path["empty-dir"].type == "dir"
    assert by_path["sub/empty"].size == 0
    assert by_path["run.sh"].mode == 0o755
    assert by_path["weights.bin"].size == 150 * KiB
    assert len(by_path["weights.bin"].chunks) > 1  # small params: several chunks


def test_delete_tagged_needs_force(store: Store, tree: Path) -> None:
    store.put(tree, "k", tags=["keep"])
    store.put(tree, "k")
    with pytest.raises(InvalidInputError, match="tagged") as err:
        store.delete("k@1")
    # In API terms for the library; the command line names its flag instead.
    assert str(err.value) == "k@1 is tagged (keep); pass force=True to delete it and its tags"
    assert err.value.worded({"force": "pass --force"}).endswith(
        "pass --force to delete it and its tags"
    )
    with pytest.raises(InvalidInputError, match=r"^workers must be a whole number >= 1, not 0$"):
        store.get("k@1", tree.parent / "out", workers=0)
    assert [v.number for v in store.log("k")] == [2, 1]
    deleted = store.delete("k@2")
    assert deleted.number == 2
    assert [v.number for v in store.log("k")] == [1]
    store.delete("k:keep", force=True)
    with pytest.raises(RefNotFoundError):
        store.log("k")
    with pytest.raises(RefNotFoundError):
        store.resolve("k:keep")
    # Numbers are never reused after a delete.
    assert store.put(tree, "k").number == 3


def test_delete_all(store: Store, tree: Path) -> None:
    for _ in range(3):
        store.put(tree, "k")
    store.tag("k@2", "t")
    with pytest.raises(InvalidInputError, match="tagged"):
        store.delete_all("k")
    assert len(store.log("k")) == 3
    removed = store.delete_all("k", force=True)
    assert sorted(v.number for v in removed) == [1, 2, 3]
    assert store.list_keys() == []


def test_reads_the_ml_layer_builds_on(store: Store, tree: Path, tmp_path: Path) -> None:
    first = store.put(tree, "k", tags=["first"])
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "one").write_bytes(random_bytes(90 * KiB, 7))
    second = store.put(tmp_path / "two", "k")
    other = store.put(tmp_path / "two", "other")
    assert store.uri == store.backend.uri
    assert store.uri.startswith("file://")
    # The catalog: every live version with its current tags, by key then newest first.
    assert store.catalog() == [second, first, other]
    assert store.catalog("o") == [other]
    assert store.catalog()[1].tags == ("first",)
    # A manifest by reference or by resolved ref.
    manifest = store.manifest("k:first")
    assert manifest == store.manifest(store.resolve("k@1"))
    assert manifest.entries == store.show("k@1").entries
    # Random access to one stored file, chunk by chunk.
    (entry,) = [e for e in manifest.entries if e.path == "weights.bin"]
    data = (tree / "weights.bin").read_bytes()
    reader = store.open_file(entry, label="k@1")
    assert reader.read(1000, 70 * KiB) == data[1000 : 1000 + 70 * KiB]
    assert reader.chunk(1) == data[reader.starts[1] : reader.starts[1] + entry.chunks[1].length]
    # What deleting versions frees: k@2 shares all its chunks with other@1.
    assert store.reclaimable([second]).chunks == 0
    assert store.reclaimable([second, other]).raw_bytes == 90 * KiB
    freed = store.reclaimable([first])
    assert freed.raw_bytes == manifest.size
    assert freed.chunks == len({c.digest for e in manifest.entries for c in e.chunks})
    store.delete("k@1", force=True)
    assert store.gc(grace=0).bytes_reclaimed == freed.stored_bytes
    # A version is its summary, with a name and current tags.
    assert isinstance(first, Summary)
    assert first.to_dict() == {
        "ref": "k@1",
        "key": "k",
        "version": 1,
        "manifest": first.manifest_id,
        "created": first.created,
        **Summary.of_manifest(manifest).to_dict(),
    }


def test_list_and_prefix(store: Store, tree: Path) -> None:
    for key in ["runs/b", "runs/a", "runs/a/x", "other", "runs-c"]:
        store.put(tree, key)
    store.put(tree, "runs/a")
    summaries = store.list_keys()
    assert all(isinstance(s, KeySummary) for s in summaries)
    assert {s.key: s.versions for s in summaries} == {
        "runs/b": 1,
        "runs/a": 2,
        "runs/a/x": 1,
        "other": 1,
        "runs-c": 1,
    }
    latest = {s.key: s.latest for s in summaries}
    assert latest["runs/a"].number == 2
    assert {s.key for s in store.list_keys("runs/")} == {"runs/a", "runs/a/x", "runs/b"}
    assert {s.key for s in store.list_keys("runs/a/")} == {"runs/a/x"}


def test_list_is_sorted_by_key(store: Store, tree: Path) -> None:
    keys = ["a", "a/0", "a/z", "a-b", "a.b", "b"]
    for key in keys:
        store.put(tree, key)
    assert [s.key for s in store.list_keys()] == sorted(keys)


def test_stats(store: Store, tree: Path, tmp_path: Path) -> None:
    v1 = store.put(tree, "k")
    store.put(tree, "k2")  # same content under another key: dedup
    s = store.stats()
    assert isinstance(s, Stats)
    assert (s.keys, s.versions) == (2, 2)
    assert s.logical_bytes == 2 * v1.size
    assert s.unique_bytes == v1.size
    assert s.chunks == len(chunk_files(tmp_path / "store"))
    assert s.referenced_chunks == s.chunks
    assert s.dedup_ratio == pytest.approx(2.0)
    assert s.stored_bytes > 0
    d = s.to_dict()
    assert d["dedup_ratio"] == pytest.approx(2.0)
    assert d["chunks"] == s.chunks


def test_verify_report(store: Store, tree: Path) -> None:
    store.put(tree, "k")
    report = store.verify()
    assert isinstance(report, VerifyReport)
    assert report.ok
    assert (report.versions, report.deep, report.chunks_read) == (1, False, 0)
    deep = store.verify(deep=True)
    assert deep.ok
    assert deep.deep
    assert deep.chunks_read == deep.chunks_referenced > 1


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda s, p: s.put(p, "bad key"), InvalidKeyError),
        (lambda s, p: s.put(p, "a//b"), InvalidKeyError),
        (lambda s, p: s.put(p, "k", tags=["12"]), InvalidRefError),
        (lambda s, p: s.put(p, "k", metadata={"x": object()}), InvalidInputError),
        (lambda s, p: s.put(p, "k", parents=["nothing@1"]), RefNotFoundError),
        (lambda s, p: s.put(p / "absent", "k"), SourceError),
        (lambda s, p: s.get("nothing", p / "x"), RefNotFoundError),
        (lambda s, p: s.get("k@", p / "x"), InvalidRefError),
        (lambda s, p: s.show("k@7"), RefNotFoundError),
        (lambda s, p: s.show("k:nope"), RefNotFoundError),
        (lambda s, p: s.log("nothing"), RefNotFoundError),
    ],
)
def test_api_errors(
    store: Store, tree: Path, call: Callable[[Store, Path], object], error: type[Exception]
) -> None:
    store.put(tree, "k")
    with pytest.raises(error):
        call(store, tree)
    assert [v.number for v in store.log("k")] == [1], "a failed call committed nothing"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "high", True])
def test_put_refuses_bad_metrics(store: Store, tree: Path, bad: object) -> None:
    with pytest.raises(InvalidInputError, match="finite number"):
        store.put(tree, "k", metrics={"loss": bad})  # type: ignore[dict-item]
    with pytest.raises(RefNotFoundError):
        store.log("k")


def test_put_refuses_links_out_of_the_tree_to_nothing(store: Store, tree: Path) -> None:
    (tree / "escape").symlink_to("../../etc/passwd-that-is-not-there")
    with pytest.raises(SourceError, match="outside"):
        store.put(tree, "k")
    (tree / "escape").unlink()
    (tree / "abs").symlink_to("/nowhere/at/all")
    with pytest.raises(SourceError, match="outside"):
        store.put(tree, "k")


def test_links_out_of_the_tree_are_stored_as_what_they_point_to(
    store: Store, tree: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"kept by value")
    (tree / "abs").symlink_to(outside)
    (tree / "rel").symlink_to(os.path.relpath(outside, tree))
    store.put(tree, "k")
    types = {e.path: e.type for e in store.show("k").entries}
    assert types["abs"] == types["rel"] == "file"
    store.get("k", tmp_path / "out")
    for name in ("abs", "rel"):
        assert not (tmp_path / "out" / name).is_symlink()
        assert (tmp_path / "out" / name).read_bytes() == b"kept by value"


def test_context_manager(tmp_path: Path, tree: Path) -> None:
    with cas.open(tmp_path / "s") as store:
        assert store.put(tree, "k").number == 1


@pytest.mark.timeout(60)
def test_file_that_grew_after_the_scan_is_refused_promptly(tmp_path: Path) -> None:
    # The scan's size is only a hint for reading; a file that grew (a checkpoint
    # still being written) must be reported, not read a byte per block.
    from cas.chunks._chunking import ChunkerParams
    from cas.chunks._store import ChunkStore
    from cas.transfer._ingest import Ingestor, SourceItem

    src = tmp_path / "growing.bin"
    src.write_bytes(random_bytes(3 * 1024 * KiB, 4))
    backend = cas.open(tmp_path / "s").backend
    ingestor = Ingestor(ChunkStore(backend), ChunkerParams(), workers=2)
    item = SourceItem("growing.bin", src, "file", 0o644, size=1000)
    with pytest.raises(SourceError, match="changed while it was read"):
        ingestor.run([item])


def test_empty_directory_and_empty_file_artifacts(store: Store, tmp_path: Path) -> None:
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    v = store.put(empty_dir, "empty/dir")
    assert (v.kind, v.files, v.size) == ("directory", 0, 0)
    store.get("empty/dir", tmp_path / "d")
    assert (tmp_path / "d").is_dir()
    assert list((tmp_path / "d").iterdir()) == []
    empty_file = tmp_path / "zero.bin"
    empty_file.write_bytes(b"")
    v = store.put(empty_file, "empty/file")
    assert (v.kind, v.files, v.size) == ("file", 1, 0)
    store.get("empty/file", tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == b""


def test_verify_report_names_damaged_versions(store: Store, tree: Path, tmp_path: Path) -> None:
    from cas.repository import _layout as layout

    store.put(tree, "a")
    store.put(tree / "sub" / "notes.txt", "b")
    entry = next(e for e in store.show("a").entries if e.path == "weights.bin")
    (tmp_path / "store" / layout.chunk_key(entry.chunks[0].digest)).unlink()
    report = store.verify()
    assert not report.ok
    assert report.missing_chunks == (entry.chunks[0].digest.hex,)
    assert [(d.ref, d.files) for d in report.damaged] == [("a@1", ("weights.bin",))]
    assert report.to_dict()["damaged"][0]["ref"] == "a@1"
