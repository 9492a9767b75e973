"""The store suite on every backend: memory, local folder, and S3, GCS and Azure servers.

The same tests, unchanged, on each kind of storage (``any_backend_uri``):
put and get of a tree, dedup, damaged and missing chunks, verify and
verify --deep, rm and gc, the CLI with --jobs, an interrupted put, and the
concurrent-writer GC stress test of ``test_gc_stress.py``. Data is small and
chunks are 64 KiB on average, so each backend takes seconds, not minutes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import test_gc_stress
from backend_fixtures import CLOUD_KINDS
from gc_helpers import REAL_GRACE
from helpers import (
    KiB,
    MiB,
    build_sample_tree,
    ok,
    random_bytes,
    rerun_after_failed_put,
    run_cas,
    run_json,
    snapshot,
)

from cas.backends import Backend
from cas.chunks._chunking import ChunkerParams
from cas.digest import Digest
from cas.errors import (
    BackendError,
    CorruptObjectError,
    KindChangeWarning,
    MissingObjectError,
    RefNotFoundError,
)
from cas.repository import _layout as layout
from cas.store import Store
from cas.testing.faults import FaultyBackend

PARAMS = ChunkerParams.from_average(64 * KiB)


@pytest.fixture
def store(any_backend_uri: str) -> Store:
    return Store.init(any_backend_uri, chunker=PARAMS)


def chunk_keys(backend: Backend) -> set[str]:
    return {info.key for info in backend.list_objects(layout.CHUNKS)}


def chunks_of(store: Store, ref: str, path: str | None = None) -> list[Digest]:
    entries = store.show(ref).entries
    return [c.digest for e in entries if path in (None, e.path) for c in e.chunks]


def test_tree_and_file_round_trip(store: Store, tmp_path: Path) -> None:
    src = build_sample_tree(tmp_path / "src")
    first = store.put(src, "runs/exp", tags=["best"], metrics={"loss": 0.5})
    assert (first.ref, first.tags, first.files) == ("runs/exp@1", ("best",), 5)
    single = tmp_path / "single.bin"
    single.write_bytes(random_bytes(300 * KiB, 1))
    with pytest.warns(KindChangeWarning, match="runs/exp@2 is a single file"):
        store.put(single, "runs/exp")

    store.get("runs/exp:best", tmp_path / "tree", workers=3)
    assert snapshot(tmp_path / "tree") == snapshot(src)
    store.get("runs/exp", tmp_path / "file.bin", workers=1)
    assert (tmp_path / "file.bin").read_bytes() == single.read_bytes()
    assert [v.ref for v in store.log("runs/exp")] == ["runs/exp@2", "runs/exp@1"]
    # A second opening of the same location sees the same store.
    again = Store.open(store.backend.uri, create=False)
    assert again.config.store_id == store.config.store_id
    assert again.show("runs/exp@1").version.metrics == {"loss": 0.5}


def test_dedup_stores_each_chunk_once(store: Store, tmp_path: Path) -> None:
    data = random_bytes(1 * MiB, 2)
    src = tmp_path / "w.bin"
    src.write_bytes(data)
    store.put(src, "k")
    first = chunk_keys(store.backend)
    assert len(first) >= 8
    store.put(src, "k", workers=2)
    store.put(src, "other/key")
    assert chunk_keys(store.backend) == first

    edited = bytearray(data)
    edited[len(data) // 2 : len(data) // 2 + 8] = b"EIGHTBYT"
    src.write_bytes(bytes(edited))
    store.put(src, "k")
    assert 1 <= len(chunk_keys(store.backend) - first) <= 2
    stats = store.stats()
    assert stats.logical_bytes == 4 * len(data)
    assert len(data) < stats.unique_bytes < len(data) + 2 * PARAMS.max_size
    store.get("k", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == bytes(edited)


def test_damaged_and_missing_chunks_are_caught(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(random_bytes(400 * KiB, 3))
    (src / "b.bin").write_bytes(random_bytes(400 * KiB, 4))
    store.put(src, "runs/exp")
    store.put(src, "runs/exp")  # v2 shares every chunk with v1
    (tmp_path / "other.bin").write_bytes(random_bytes(100 * KiB, 5))
    store.put(tmp_path / "other.bin", "other")
    assert store.verify(deep=True).ok

    flipped, gone = (
        chunks_of(store, "runs/exp@2", "a.bin")[1],
        chunks_of(store, "runs/exp@2", "b.bin")[2],
    )
    blob = bytearray(store.backend.get(layout.chunk_key(flipped)))
    blob[len(blob) // 2] ^= 0x01
    store.backend.put(layout.chunk_key(flipped), bytes(blob))
    store.backend.delete([layout.chunk_key(gone)])

    dest = tmp_path / "restore" / "dest"
    with pytest.raises((CorruptObjectError, MissingObjectError)) as info:
        store.get("runs/exp", dest)
    message = str(info.value)
    assert "runs/exp@2" in message
    assert flipped.hex in message or gone.hex in message
    assert not dest.exists()
    assert list((tmp_path / "restore").iterdir()) == [], "a failed get left something behind"

    shallow = store.verify()
    assert [d.ref for d in shallow.damaged] == ["runs/exp@1", "runs/exp@2"]
    assert shallow.missing_chunks == (gone.hex,)
    deep = store.verify(deep=True)
    assert [d.ref for d in deep.damaged] == ["runs/exp@1", "runs/exp@2"]
    assert deep.corrupt_chunks == (flipped.hex,)
    assert deep.missing_chunks == (gone.hex,)
    assert all(set(d.files) == {"a.bin", "b.bin"} for d in deep.damaged)
    store.get("other", tmp_path / "other-out.bin")  # an undamaged version still restores


def test_rm_then_gc_reclaims_only_what_no_version_needs(store: Store, tmp_path: Path) -> None:
    a, b = random_bytes(300 * KiB, 6), random_bytes(300 * KiB, 7)
    (tmp_path / "a.bin").write_bytes(a)
    (tmp_path / "b.bin").write_bytes(b)
    store.put(tmp_path / "a.bin", "k")
    store.put(tmp_path / "b.bin", "k")
    only_v1 = {layout.chunk_key(d) for d in chunks_of(store, "k@1")}
    store.delete("k@1")
    if store.backend.uri.startswith(("s3:", "az:")):
        time.sleep(1.1)  # whole-second times: let "now" pass the objects' second

    # Younger than the grace: kept, and the report says why.
    kept = store.gc(grace=3600)
    assert kept.deleted == 0
    assert kept.kept_by_grace == len(only_v1) + 1  # and v1's manifest
    dry = store.gc(grace=0, dry_run=True)
    assert dry.deleted_chunks == len(only_v1)
    assert only_v1 <= chunk_keys(store.backend)
    real = store.gc(grace=0)
    assert (real.deleted_chunks, real.deleted_manifests) == (len(only_v1), 1)
    assert not only_v1 & chunk_keys(store.backend)
    store.get("k", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == b
    stats = store.stats()
    assert stats.chunks == stats.referenced_chunks
    assert store.verify(deep=True).ok
    with pytest.raises(RefNotFoundError):
        store.get("k@1", tmp_path / "gone.bin")


def test_a_new_store_takes_the_default_chunk_sizes_of_its_backend(
    any_backend_uri: str, tmp_path: Path
) -> None:
    created = Store.open(any_backend_uri)  # created on first use
    remote = created.backend.remote
    assert remote == any(any_backend_uri.startswith(k) for k in ("s3:", "gs:", "az:"))
    expected = ChunkerParams.for_object_store() if remote else ChunkerParams()
    assert created.config.chunker == expected
    if remote:
        assert (expected.min_size, expected.avg_size, expected.max_size) == (
            1 * MiB,
            4 * MiB,
            16 * MiB,
        )
    assert Store.open(any_backend_uri).config.chunker == expected  # fixed for good


# A memory store lives in one process; the CLI runs in another.
@pytest.mark.parametrize("any_backend_uri", ["local", *CLOUD_KINDS], indirect=True)
def test_cli_with_jobs(any_backend_uri: str, tmp_path: Path) -> None:
    uri = any_backend_uri
    ok(run_cas("init", "--chunk-avg", "64K", store=uri))
    src = build_sample_tree(tmp_path / "src")
    put = run_json("put", src, "runs/exp", "--jobs", "3", store=uri)
    assert put["ref"] == "runs/exp@1"
    ok(run_cas("get", "runs/exp", tmp_path / "out", "-j", "2", store=uri))
    assert snapshot(tmp_path / "out") == snapshot(src)
    assert run_json("verify", "--deep", store=uri)["ok"] is True


def test_interrupted_put_leaves_a_consistent_store_and_a_rerun_uploads_only_the_rest(
    store: Store, tmp_path: Path
) -> None:
    kept = tmp_path / "kept.bin"
    kept.write_bytes(random_bytes(200 * KiB, 8))
    store.put(kept, "kept")
    data = random_bytes(1 * MiB, 9)
    (tmp_path / "w.bin").write_bytes(data)

    # The service fails after the first few chunk uploads, and keeps failing.
    flaky = FaultyBackend(store.backend, fail_on={"put"}, prefix=layout.CHUNKS, after=4)
    broken = Store(flaky, store.config, workers=2)
    with pytest.raises(BackendError, match="injected fault"):
        broken.put(tmp_path / "w.bin", "ckpt")
    with pytest.raises(RefNotFoundError):
        store.log("ckpt")
    assert store.verify(deep=True).ok
    # Whatever was written is whole; the re-run uploads only what is missing.
    needed, left = rerun_after_failed_put(store, tmp_path / "w.bin", "ckpt")
    assert len(needed & left) >= 4
    store.get("ckpt", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data


@pytest.mark.slow
@pytest.mark.parametrize("kind", CLOUD_KINDS)
def test_gc_stress_with_concurrent_writers(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """test_gc_stress.py's test as it is, on a cloud backend (it runs on folders itself).

    The writers must run long enough for versions they delete to age past the grace.
    """
    seconds = float(os.environ.get("CAS_GC_STRESS_SECONDS", 2 * REAL_GRACE[kind] + 2))
    monkeypatch.setattr(test_gc_stress, "SECONDS", seconds)
    test_gc_stress.test_writers_and_repeated_gc_lose_nothing(kind, request, tmp_path)
