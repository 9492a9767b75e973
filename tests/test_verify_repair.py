"""verify: existence, deep rehashing, random samples, and repair by quarantine."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from gc_helpers import GC_BACKENDS, PARAMS, chunk_keys, random_bytes, stored_keys, write
from helpers import run_cas

from cas.backends.base import Backend
from cas.cli import main
from cas.errors import InvalidInputError
from cas.gc._verify import QUARANTINE
from cas.repository import _layout as layout
from cas.store import Store
from cas.store._config import StoreConfig, write_config

KiB = 1024


@pytest.fixture(params=GC_BACKENDS)
def store(request: pytest.FixtureRequest) -> Store:
    backend: Backend = request.getfixturevalue(f"{request.param}_backend")
    return Store(backend, write_config(backend, StoreConfig(chunker=PARAMS), exist_ok=True))


@pytest.fixture
def filled(store: Store, tmp_path: Path) -> dict[str, bytes]:
    """Three versions: two share a file, one shares nothing."""
    shared = random_bytes(200 * KiB, seed=1)
    write(tmp_path / "v1" / "weights.bin", shared)
    write(tmp_path / "v1" / "notes.txt", b"first")
    store.put(tmp_path / "v1", "runs/exp")
    write(tmp_path / "v2" / "weights.bin", shared)
    write(tmp_path / "v2" / "notes.txt", b"second")
    store.put(tmp_path / "v2", "runs/exp")
    other = random_bytes(100 * KiB, seed=2)
    store.put(write(tmp_path / "other.bin", other), "other")
    return {"shared": shared, "other": other}


def corrupt(store: Store, key: str) -> None:
    blob = bytearray(store.backend.get(key))
    blob[len(blob) // 2] ^= 0x40
    store.backend.put(key, bytes(blob))


def test_deep_verify_finds_a_corrupt_chunk_and_names_versions_and_files(
    store: Store, filled: dict[str, bytes]
) -> None:
    victim = chunk_keys(store, "runs/exp@1")[1]
    corrupt(store, victim)
    assert store.verify().ok, "existence alone cannot see corruption"
    report = store.verify(deep=True)
    assert not report.ok
    assert report.corrupt_chunks == (victim.rpartition("/")[2],)
    assert [d.ref for d in report.damaged] == ["runs/exp@1", "runs/exp@2"]
    assert all(d.files == ("weights.bin",) for d in report.damaged)
    assert report.chunks_read == report.chunks_referenced
    assert report.quarantined == ()
    assert store.backend.exists(victim), "verify without --repair changed the store"


def test_repair_quarantines_and_a_new_put_of_the_same_content_heals(
    store: Store, filled: dict[str, bytes], tmp_path: Path
) -> None:
    victim = chunk_keys(store, "runs/exp@1")[1]
    original = store.backend.get(victim)
    corrupt(store, victim)
    damaged_blob = store.backend.get(victim)
    report = store.verify(deep=True, repair=True)
    assert not report.ok
    assert report.reput == ("runs/exp@1", "runs/exp@2")
    [(chunk, moved_to)] = report.quarantined
    assert chunk == victim.rpartition("/")[2]
    assert moved_to.startswith(QUARANTINE)
    # Moved, never silently deleted: the damaged bytes are kept for inspection.
    assert store.backend.get(moved_to) == damaged_blob
    assert not store.backend.exists(victim)
    assert store.verify().missing_chunks == (chunk,)

    # The same content under any key stores a good copy again.
    store.put(write(tmp_path / "again.bin", filled["shared"]), "heal")
    assert store.backend.get(victim) == original
    assert store.verify(deep=True).ok
    store.get("runs/exp@1", tmp_path / "restored")
    assert (tmp_path / "restored" / "weights.bin").read_bytes() == filled["shared"]
    # gc never looks at the quarantine.
    store.gc(grace=0)
    assert stored_keys(store.backend, QUARANTINE) == {moved_to}


def test_sample_reads_a_random_share(store: Store, filled: dict[str, bytes]) -> None:
    total = store.verify().chunks_referenced
    assert store.verify(sample=100).chunks_read == total
    half = store.verify(sample=50)
    assert half.chunks_read == (total + 1) // 2
    assert half.sample == 50
    assert half.deep

    # A sample finds corruption when it reads the damaged chunk, and repairs it.
    victim = chunk_keys(store, "other@1")[0]
    corrupt(store, victim)
    from cas.gc._verify import verify_store

    hits = [
        verify_store(
            store.refs, store.chunks, store.load_manifest, sample=20, rng=random.Random(seed)
        )
        for seed in range(30)
    ]
    assert any(victim.endswith(h.corrupt_chunks[0]) for h in hits if h.corrupt_chunks)
    assert any(h.ok for h in hits), "a 20% sample should sometimes miss the one bad chunk"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample": 0}, "percentage"),
        ({"sample": 101}, "percentage"),
        ({"repair": True}, "repair needs deep or sample"),
    ],
)
def test_bad_verify_options(store: Store, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        store.verify(**kwargs)


def test_cli_names_the_verify_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Store.init(tmp_path / "store").close()
    assert main(["--store", str(tmp_path / "store"), "verify", "--repair"]) == 2
    assert "--repair needs --deep or --sample" in capsys.readouterr().err


def test_missing_manifest_and_malformed_ref_are_reported_not_raised(
    store: Store, filled: dict[str, bytes]
) -> None:
    manifest_id = store.resolve("other@1").manifest_id
    store.backend.delete([layout.manifest_key(manifest_id)])
    store.backend.put(layout.version_key("runs/exp", 2), b"{not json")
    report = store.verify(deep=True)
    problems = {d.ref: d.problem for d in report.damaged}
    assert set(problems) == {"other@1", "runs/exp@2"}
    assert manifest_id.hex in problems["other@1"]
    assert "malformed" in problems["runs/exp@2"]


def test_cli_verify_repair(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = Store.init(root, chunker=PARAMS)
    data = random_bytes(150 * KiB, seed=3)
    store.put(write(tmp_path / "w.bin", data), "model")
    victim = chunk_keys(store, "model@1")[0]
    corrupt(store, victim)

    proc = run_cas("verify", "--sample", "100", store=root)
    assert proc.returncode == 3, proc.stderr
    assert "DAMAGED model@1" in proc.stdout
    proc = run_cas("verify", "--repair", store=root)
    assert proc.returncode == 2
    assert "--deep or --sample" in proc.stderr

    proc = run_cas("verify", "--deep", "--repair", "--json", store=root)
    assert proc.returncode == 3
    report = json.loads(proc.stdout)
    assert report["reput"] == ["model@1"]
    assert report["quarantined"][0]["chunk"] == victim.rpartition("/")[2]
    proc = run_cas("verify", "--deep", store=root)
    assert proc.returncode == 3
    assert "missing chunk" in proc.stdout

    run_cas("put", write(tmp_path / "again.bin", data), "model", store=root)
    proc = run_cas("verify", "--deep", store=root)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.strip().endswith("ok")


def test_whole_files_are_hashed_once_each_and_appended_files_resume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Versions of a growing file, and one that parts from them: each starts
    # like another, and a deep check reads each chunk once however many
    # versions share it, resuming from hashers saved along the way.
    from cas.backends.memory import MemoryBackend
    from cas.chunks._store import ChunkStore
    from cas.digest import Digest
    from cas.gc import _files
    from cas.gc._files import hash_files
    from cas.repository._manifest import ChunkRef
    from cas.testing.faults import FaultyBackend

    counted = FaultyBackend(MemoryBackend())
    chunks = ChunkStore(counted)
    monkeypatch.setattr(_files, "MAX_SNAPSHOTS", 16)  # files of 34 chunks: every third saved
    pieces = [random_bytes(100 + i, seed=i) for i in range(35)]
    refs = []
    for piece in pieces:
        refs.append(ChunkRef(Digest.of(piece), len(piece)))
        chunks.put(piece)
    files = [(Digest.of(b"".join(pieces[:n])), tuple(refs[:n])) for n in (2, 3, 5, 20, 34)]
    parted = (*refs[:10], refs[34])
    files.append((Digest.of(b"".join([*pieces[:10], pieces[34]])), parted))
    wrong = (Digest.of(b"not these bytes"), tuple(refs[:3]))  # same chunks, another hash
    counted.reset_counts()
    check = hash_files(chunks, [*files, wrong, files[0]], workers=3)
    assert check.mismatched == [wrong]
    assert sorted(counted.keys["get"]) == sorted({layout.chunk_key(r.digest) for r in refs})
    assert check.verified == set(refs)
