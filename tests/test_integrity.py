"""Damaged stores: a restore fails loudly, names what is wrong, and leaves DEST as it was."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import (
    KiB,
    build_sample_tree,
    ok,
    random_bytes,
    run_cas,
    small_store,
    snapshot,
    temp_leftovers,
    text_bytes,
)

from cas.digest import Digest
from cas.repository import _layout as layout
from cas.store import Store

DAMAGES = ["flip", "truncate", "missing"]


def damage(store_root: Path, digest: Digest, how: str) -> None:
    path = store_root / layout.chunk_key(digest)
    blob = bytearray(path.read_bytes())
    if how == "flip":
        blob[len(blob) // 2] ^= 0x01
        path.write_bytes(bytes(blob))
    elif how == "truncate":
        path.write_bytes(bytes(blob[: len(blob) // 2]))
    elif how == "missing":
        path.unlink()
    else:
        raise AssertionError(how)


def chunk_of(store: Store, ref: str, path: str, index: int = 0) -> Digest:
    entry = next(e for e in store.show(ref).entries if e.path == path)
    return entry.chunks[index].digest


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Store, Path]:
    root = tmp_path / "store"
    store = small_store(root)
    src = build_sample_tree(tmp_path / "src")
    (src / "sub" / "log.txt").write_bytes(text_bytes(200 * KiB, 3))  # zstd-coded chunks
    store.put(src, "runs/exp")
    store.put(src, "runs/exp")  # v2 shares every chunk with v1
    other = tmp_path / "other.bin"
    other.write_bytes(random_bytes(50 * KiB, 77))
    store.put(other, "unrelated")
    return root, store, src


def assert_failed_cleanly(proc: subprocess.CompletedProcess[str], dest_parent: Path) -> None:
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert temp_leftovers(dest_parent) == []


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("victim", ["weights.bin", "sub/log.txt"], ids=["raw", "zstd"])
def test_get_fails_naming_version_file_and_chunk(
    setup: tuple[Path, Store, Path], tmp_path: Path, how: str, victim: str
) -> None:
    root, store, _ = setup
    digest = chunk_of(store, "runs/exp@2", victim, index=1)
    damage(root, digest, how)
    out_dir = tmp_path / "restore"
    out_dir.mkdir()
    dest = out_dir / "dest"
    proc = run_cas("get", "runs/exp@2", dest, store=root)
    assert_failed_cleanly(proc, out_dir)
    assert "runs/exp@2" in proc.stderr
    assert repr(victim) in proc.stderr or victim in proc.stderr
    assert digest.hex in proc.stderr
    assert not dest.exists()
    assert list(out_dir.iterdir()) == []

    # The latest-version form names the number it resolved to.
    proc = run_cas("get", "runs/exp", dest, store=root)
    assert_failed_cleanly(proc, out_dir)
    assert "runs/exp@2" in proc.stderr
    assert not dest.exists()


@pytest.mark.parametrize("how", DAMAGES)
def test_failed_forced_get_leaves_existing_dest_unchanged(
    setup: tuple[Path, Store, Path], tmp_path: Path, how: str
) -> None:
    root, store, _ = setup
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine.txt").write_text("precious")
    (dest / "keep").mkdir()
    (dest / "keep" / "x").write_bytes(b"\0" * 10)
    before = snapshot(dest)
    damage(root, chunk_of(store, "runs/exp@1", "sub/log.txt"), how)
    proc = run_cas("get", "runs/exp@1", dest, "--force", store=root)
    assert_failed_cleanly(proc, tmp_path)
    assert "runs/exp@1" in proc.stderr
    assert snapshot(dest) == before


@pytest.mark.parametrize("how", DAMAGES)
def test_single_file_artifact(tmp_path: Path, how: str) -> None:
    root = tmp_path / "store"
    store = small_store(root)
    src = tmp_path / "model.safetensors"
    src.write_bytes(random_bytes(300 * KiB, 1))
    store.put(src, "model")
    digest = chunk_of(store, "model@1", "model.safetensors", index=-1)
    damage(root, digest, how)
    dest = tmp_path / "out" / "model.bin"
    dest.parent.mkdir()
    proc = run_cas("get", "model@1", dest, store=root)
    assert_failed_cleanly(proc, dest.parent)
    assert "model@1" in proc.stderr
    assert "model.safetensors" in proc.stderr
    assert digest.hex in proc.stderr
    assert not dest.exists()
    # An existing file stays as it was under --force.
    dest.write_bytes(b"old contents")
    proc = run_cas("get", "model@1", dest, "--force", store=root)
    assert_failed_cleanly(proc, dest.parent)
    assert dest.read_bytes() == b"old contents"


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_deep_verify_names_every_damaged_version(setup: tuple[Path, Store, Path], how: str) -> None:
    root, store, _ = setup
    assert ok(run_cas("verify", "--deep", store=root)).stdout.strip().endswith("ok")
    digest = chunk_of(store, "runs/exp@1", "weights.bin", index=1)
    damage(root, digest, how)
    proc = run_cas("verify", "--deep", store=root)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "DAMAGED runs/exp@1" in proc.stdout
    assert "DAMAGED runs/exp@2" in proc.stdout
    assert "unrelated" not in proc.stdout
    assert digest.hex in proc.stdout
    assert "weights.bin" in proc.stdout

    proc = run_cas("verify", "--deep", "--json", store=root)
    assert proc.returncode == 3
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    assert report["deep"] is True
    assert report["corrupt_chunks"] == [digest.hex]
    assert report["missing_chunks"] == []
    assert [d["ref"] for d in report["damaged"]] == ["runs/exp@1", "runs/exp@2"]
    assert all(d["files"] == ["weights.bin"] for d in report["damaged"])
    assert report["versions"] == 3


def test_verify_reports_missing_chunk(setup: tuple[Path, Store, Path]) -> None:
    root, store, _ = setup
    digest = chunk_of(store, "runs/exp@1", "sub/notes.txt")
    damage(root, digest, "missing")
    for args in (["verify"], ["verify", "--deep"]):
        proc = run_cas(*args, store=root)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "DAMAGED runs/exp@1" in proc.stdout
        assert "DAMAGED runs/exp@2" in proc.stdout
        assert "missing" in proc.stdout
        assert digest.hex in proc.stdout
        assert "sub/notes.txt" in proc.stdout
        assert "unrelated" not in proc.stdout
    report = json.loads(run_cas("verify", "--json", store=root).stdout)
    assert report["ok"] is False
    assert report["missing_chunks"] == [digest.hex]
    assert {d["ref"] for d in report["damaged"]} == {"runs/exp@1", "runs/exp@2"}
    # Versions that do not need the chunk still restore.
    ok(run_cas("get", "unrelated", root.parent / "fine.bin", store=root))


def test_damaged_manifest(setup: tuple[Path, Store, Path], tmp_path: Path) -> None:
    root, store, _ = setup
    manifest_id = store.resolve("runs/exp@1").manifest_id
    path = root / layout.manifest_key(manifest_id)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x10
    path.write_bytes(bytes(blob))
    dest = tmp_path / "dest"
    proc = run_cas("get", "runs/exp@1", dest, store=root)
    assert_failed_cleanly(proc, tmp_path)
    assert manifest_id.hex in proc.stderr
    assert not dest.exists()
    proc = run_cas("verify", store=root)
    assert proc.returncode == 3
    assert "DAMAGED runs/exp@1" in proc.stdout
    assert manifest_id.hex in proc.stdout


def test_chunk_swapped_for_another_valid_chunk(
    setup: tuple[Path, Store, Path], tmp_path: Path
) -> None:
    # A well-formed chunk under the wrong name decodes fine; only its hash tells.
    root, store, _ = setup
    victim = chunk_of(store, "runs/exp@1", "weights.bin", index=0)
    donor = chunk_of(store, "runs/exp@1", "weights.bin", index=1)
    (root / layout.chunk_key(victim)).write_bytes((root / layout.chunk_key(donor)).read_bytes())
    dest = tmp_path / "dest"
    proc = run_cas("get", "runs/exp@1", dest, store=root)
    assert_failed_cleanly(proc, tmp_path)
    assert victim.hex in proc.stderr
    assert "weights.bin" in proc.stderr
    assert not dest.exists()
    proc = run_cas("verify", "--deep", store=root)
    assert proc.returncode == 3
    assert victim.hex in proc.stdout


def test_api_get_raises_integrity_errors(setup: tuple[Path, Store, Path], tmp_path: Path) -> None:
    from cas.errors import CorruptObjectError, IntegrityError, MissingObjectError

    root, store, _ = setup
    a = chunk_of(store, "runs/exp@1", "weights.bin")
    damage(root, a, "flip")
    with pytest.raises(CorruptObjectError, match=a.hex):
        store.get("runs/exp@1", tmp_path / "a")
    damage(root, a, "missing")
    with pytest.raises(MissingObjectError, match=a.hex) as info:
        store.get("runs/exp@1", tmp_path / "a")
    assert isinstance(info.value, IntegrityError)
    assert not (tmp_path / "a").exists()
    assert temp_leftovers(tmp_path) == []


def test_putting_the_same_data_again_restores_a_missing_chunk(
    setup: tuple[Path, Store, Path], tmp_path: Path
) -> None:
    root, store, src = setup
    digest = chunk_of(store, "runs/exp@1", "weights.bin", index=1)
    damage(root, digest, "missing")
    assert run_cas("verify", store=root).returncode == 3
    ok(run_cas("put", src, "runs/exp", store=root))  # uploads what is missing
    assert (root / layout.chunk_key(digest)).is_file()
    ok(run_cas("verify", "--deep", store=root))
    ok(run_cas("get", "runs/exp@1", tmp_path / "healed", store=root))
    assert snapshot(tmp_path / "healed") == snapshot(src)
