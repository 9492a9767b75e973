"""Gets that hard-link whole files with the local cache (``cas get --link``)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import warnings
from pathlib import Path

import pytest
from helpers import (
    CAS,
    SMALL_PARAMS,
    KiB,
    cas_env,
    chunk_gets,
    counted_cached_store,
    digests,
    ok,
    random_bytes,
    run_cas,
    run_json,
)

from cas.backends.s3 import S3Backend
from cas.chunks._cache import LocalCache, clear, evict, usage
from cas.digest import Digest, hash_file
from cas.errors import CacheWarning, InvalidInputError
from cas.store import Store


def _tree(root: Path, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.bin").write_bytes(random_bytes(600 * KiB, seed))
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "opt.bin").write_bytes(random_bytes(300 * KiB, seed + 1))
    (root / "empty").write_bytes(b"")
    return root


def _store(backend: S3Backend, cache: Path) -> Store:
    return counted_cached_store(backend.uri, cache)


def _linked_once(backend: S3Backend, tmp_path: Path, seed: int) -> tuple[Store, Path]:
    """A store holding a tree as ``runs/a``, got once with ``link=True`` into ``one``."""
    store = _store(backend, tmp_path / "cache")
    src = _tree(tmp_path / "src", seed=seed)
    store.put(src, "runs/a")
    store.restore("runs/a", tmp_path / "one", link=True)
    return store, src


def _cache(store: Store) -> LocalCache:
    assert store.chunks.cache is not None
    return store.chunks.cache


def _cached_file(store: Store, path: Path) -> Path:
    return _cache(store).file_path(Digest.of(path.read_bytes()))


def test_a_second_linked_get_shares_the_files_and_asks_for_no_chunk(
    s3_backend: S3Backend, tmp_path: Path
) -> None:
    store = _store(s3_backend, tmp_path / "cache")
    src = _tree(tmp_path / "src")
    store.put(src, "runs/a")

    first = store.restore("runs/a", tmp_path / "one", link=True)
    assert (first.linked_files, first.fetched_chunks > 0) == (0, True)
    one = tmp_path / "one" / "model.bin"
    # Written once, read-only, and the cache's entry is the same file.
    assert stat.S_IMODE(one.stat().st_mode) & 0o222 == 0
    assert _cached_file(store, one).stat().st_ino == one.stat().st_ino
    gets = chunk_gets(store)

    second = store.restore("runs/a", tmp_path / "two", link=True)

    assert second.linked_files == 2  # the empty file is written, never linked
    assert second.linked_bytes == 900 * KiB
    assert (second.fetched_chunks, second.cached_chunks) == (0, 0)
    assert chunk_gets(store) - gets <= 2  # the ref and the manifest
    assert digests(tmp_path / "two") == digests(src)
    two = tmp_path / "two" / "model.bin"
    assert two.stat().st_ino == one.stat().st_ino
    assert second.to_dict()["linked_files"] == 2


def test_a_linked_copy_written_in_place_is_dropped_and_restored_from_chunks(
    s3_backend: S3Backend, tmp_path: Path
) -> None:
    store, src = _linked_once(s3_backend, tmp_path, seed=3)
    # What a user running as root (or after chmod) could do to a linked file.
    victim = tmp_path / "one" / "model.bin"
    entry = _cached_file(store, victim)
    os.chmod(victim, 0o644)
    with open(victim, "r+b") as stream:
        stream.write(b"\0" * 64)
    os.chmod(victim, 0o444)

    with pytest.warns(CacheWarning, match="cached file .* was damaged"):
        again = store.restore("runs/a", tmp_path / "two", link=True)

    assert again.linked_files == 1  # sub/opt.bin; model.bin came from its chunks
    assert digests(tmp_path / "two") == digests(src)
    # The damaged entry is gone and the good file is kept in its place.
    assert entry.stat().st_ino == (tmp_path / "two" / "model.bin").stat().st_ino
    assert entry.read_bytes() == (src / "model.bin").read_bytes()


def test_an_entry_of_other_permissions_is_not_linked(s3_backend: S3Backend, tmp_path: Path) -> None:
    store, src = _linked_once(s3_backend, tmp_path, seed=5)
    os.chmod(_cached_file(store, tmp_path / "one" / "model.bin"), 0o555)

    again = store.restore("runs/a", tmp_path / "two", link=True)

    assert again.linked_files == 1
    model = tmp_path / "two" / "model.bin"
    assert stat.S_IMODE(model.stat().st_mode) == 0o444
    assert model.read_bytes() == (src / "model.bin").read_bytes()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_an_entry_another_user_owns_is_not_linked(s3_backend: S3Backend, tmp_path: Path) -> None:
    store, src = _linked_once(s3_backend, tmp_path, seed=6)
    os.chown(_cached_file(store, tmp_path / "one" / "model.bin"), 65534, 65534)

    again = store.restore("runs/a", tmp_path / "two", link=True)

    assert again.linked_files == 1
    model = tmp_path / "two" / "model.bin"
    assert model.stat().st_uid == os.geteuid()
    assert model.read_bytes() == (src / "model.bin").read_bytes()


def test_force_links_over_an_existing_dest(s3_backend: S3Backend, tmp_path: Path) -> None:
    store = _store(s3_backend, tmp_path / "cache")
    src = _tree(tmp_path / "src", seed=7)
    store.put(src / "model.bin", "weights")
    store.get("weights", tmp_path / "one.bin", link=True)
    (tmp_path / "dest.bin").write_bytes(b"old")

    again = store.restore("weights", tmp_path / "dest.bin", force=True, link=True)

    assert again.linked_files == 1
    assert (tmp_path / "dest.bin").read_bytes() == (src / "model.bin").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cas")]


def test_file_entries_are_counted_evicted_and_cleared(
    s3_backend: S3Backend, tmp_path: Path
) -> None:
    # A folder named like the cache's own is no whole file.
    store = _store(s3_backend, tmp_path / "files" / "cache")
    store.put(_tree(tmp_path / "src", seed=9), "runs/a")
    store.restore("runs/a", tmp_path / "one", link=True)
    cache = _cache(store)
    files = list((cache.folder / "files").rglob("*"))
    assert len([f for f in files if f.is_file()]) == 2
    (held,) = usage(cache.root)
    assert held.files == 2
    # Chunks (900 KiB) and whole files (900 KiB, shared with the restored ones).
    assert held.size == 1800 * KiB

    # The file entries are the least recently used: eviction takes them first.
    old = 1_000_000_000
    for path in (cache.folder / "files").rglob("*"):
        if path.is_file():
            os.utime(path, (old, old))
    assert evict(cache.root, 1000 * KiB) <= 1000 * KiB
    assert not [p for p in (cache.folder / "files").rglob("*") if p.is_file()]
    # What the restore linked is still whole: eviction only drops the cache's name.
    assert (tmp_path / "one" / "model.bin").stat().st_nlink == 1

    store.restore("runs/a", tmp_path / "two", link=True)
    assert clear(cache.root).entries > 0
    assert not (cache.folder / "files").exists()
    assert digests(tmp_path / "two") == digests(tmp_path / "src")


def test_a_dest_on_another_filesystem_is_written_with_one_warning(
    s3_backend: S3Backend, tmp_path: Path
) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a second filesystem at /dev/shm")
    cache_dir = shm / f"cas-links-{os.getpid()}-{tmp_path.name}"
    try:
        store = _store(s3_backend, cache_dir)
        src = _tree(tmp_path / "src", seed=11)
        store.put(src, "runs/a")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = store.restore("runs/a", tmp_path / "one", link=True)
            second = store.restore("runs/a", tmp_path / "two", link=True)
        reported = [w for w in caught if issubclass(w.category, CacheWarning)]
        assert len(reported) == 1
        assert "cannot hard-link" in str(reported[0].message)
        assert (first.linked_files, second.linked_files) == (0, 0)
        assert second.cached_chunks > 0  # the chunk cache still serves
        assert digests(tmp_path / "two") == digests(src)
    finally:
        clear(cache_dir)
        os.rmdir(cache_dir)


def test_link_is_refused_with_update_and_without_a_cache(
    s3_backend: S3Backend, tmp_path: Path
) -> None:
    local = Store.init(tmp_path / "local")
    local.put(_tree(tmp_path / "src"), "a")
    with pytest.raises(InvalidInputError, match="without one"):
        local.restore("a", tmp_path / "out", link=True)
    store = _store(s3_backend, tmp_path / "cache")
    store.put(tmp_path / "src", "a")
    store.restore("a", tmp_path / "out")
    with pytest.raises(InvalidInputError, match="give one of"):
        store.restore("a", tmp_path / "out", update=True, link=True)
    assert not (tmp_path / "out2").exists()


def test_cli_get_link(s3_backend: S3Backend, tmp_path: Path) -> None:
    store = s3_backend.uri
    cache = ["--cache", str(tmp_path / "cache")]
    ok(run_cas("init", store=store))
    src = _tree(tmp_path / "src", seed=13)
    ok(run_cas("put", src, "runs/a", store=store))

    first = run_json(*cache, "get", "runs/a", tmp_path / "one", "--link", store=store)
    second = run_json(*cache, "get", "runs/a", tmp_path / "two", "--link", store=store)
    text = ok(run_cas(*cache, "get", "runs/a", tmp_path / "three", "--link", store=store))

    assert (first["linked_files"], second["linked_files"]) == (0, 2)
    assert second["linked_bytes"] == 900 * KiB
    assert "2 files (900.0 KiB) linked from the cache" in text.stdout
    assert digests(tmp_path / "three") == digests(src)
    stats = run_json("cache", "stats", *cache)
    assert (stats["files"], stats["stores"][0]["files"]) == (2, 2)
    assert stats["entries"] > stats["files"]
    assert "2 whole files" in ok(run_cas("cache", "stats", *cache)).stdout

    both = run_cas(*cache, "get", "runs/a", tmp_path / "one", "--link", "--update", store=store)
    assert both.returncode == 2
    assert "--link" in both.stderr
    assert "--update" in both.stderr
    local = tmp_path / "local"
    ok(run_cas("init", store=local))
    ok(run_cas("put", src, "a", store=local))
    uncached = run_cas("get", "a", tmp_path / "four", "--link", store=local)
    assert uncached.returncode == 2
    assert "--link" in uncached.stderr
    assert "--cache DIR" in uncached.stderr
    assert not (tmp_path / "four").exists()


def test_processes_link_from_one_cache_under_eviction(
    s3_backend: S3Backend, tmp_path: Path
) -> None:
    """Six processes get with --link at once through a cache smaller than the
    version: files are kept, linked and evicted under each other; every get
    verifies, none finds a damaged entry, no temporary file is left."""
    src = _tree(tmp_path / "src", seed=17)
    Store.init(s3_backend.uri, chunker=SMALL_PARAMS)
    Store.open(s3_backend.uri, cache=False).put(src, "runs/a")
    cache = tmp_path / "cache"
    argv = [
        *CAS, "--store", s3_backend.uri, "--json", "--cache", str(cache),
        "--cache-size", str(1200 * KiB), "get", "runs/a",
    ]  # fmt: skip
    linked = 0
    for round_ in range(2):
        procs = [
            subprocess.Popen(
                [*argv, str(tmp_path / f"dest{round_}-{i}"), "--link"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=cas_env(),
            )
            for i in range(3)
        ]
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            assert "damaged" not in err
            linked += json.loads(out)["linked_files"]
        for i in range(3):
            assert digests(tmp_path / f"dest{round_}-{i}") == digests(src)
    assert linked > 0  # the second round found files the first one kept
    assert not list(cache.rglob("tmp/*"))


@pytest.mark.parametrize("size", [0, 1, (16 << 20) - 1, 16 << 20, (16 << 20) + 12345])
def test_hash_file_is_the_blake3_of_the_whole_content(tmp_path: Path, size: int) -> None:
    data = random_bytes(size, size)
    (tmp_path / "f").write_bytes(data)
    assert hash_file(tmp_path / "f") == Digest.of(data)


def test_an_update_gives_a_linked_file_its_mode_without_touching_the_cache(
    s3_backend: S3Backend, tmp_path: Path
) -> None:
    store, src = _linked_once(s3_backend, tmp_path, seed=19)
    model = tmp_path / "one" / "model.bin"
    entry = _cached_file(store, model)
    assert model.stat().st_nlink == 2

    updated = store.restore("runs/a", tmp_path / "one", update=True)

    assert updated.files_kept == 3
    # The version's mode (the source's 0o644), on a file of its own now ...
    assert stat.S_IMODE(model.stat().st_mode) == stat.S_IMODE((src / "model.bin").stat().st_mode)
    assert model.stat().st_nlink == 1
    assert model.read_bytes() == (src / "model.bin").read_bytes()
    # ... while the cache's copy stays read-only, and is linked again.
    assert stat.S_IMODE(entry.stat().st_mode) == 0o444
    assert store.restore("runs/a", tmp_path / "two", link=True).linked_files == 2
