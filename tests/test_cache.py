"""The local chunk cache: reads of a remote store served from disk, verified on every use.

Against the S3 server the tests start (moto): a second get makes no chunk
requests; a damaged entry is dropped, fetched again and reported; a cache
that cannot be written leaves the get working; eviction keeps the folder to
its limit, least recently used first; many processes share one folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    CAS,
    SMALL_PARAMS,
    KiB,
    MiB,
    cas_env,
    chunk_gets,
    counted_cached_store,
    digests,
    ok,
    random_bytes,
    run_cas,
    run_json,
)
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, rule

from cas.backends.s3 import S3Backend
from cas.chunks._cache import LocalCache, evict, store_folder_name, usage
from cas.digest import Digest
from cas.errors import CacheWarning
from cas.store import Store
from cas.testing.faults import FaultyBackend


def _tree(root: Path, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.bin").write_bytes(random_bytes(300 * KiB, seed))
    (root / "b.bin").write_bytes(random_bytes(200 * KiB, seed + 1))
    return root


def _cached_store(backend: S3Backend, cache: Path, limit: int = 64 * MiB) -> Store:
    return counted_cached_store(backend.uri, cache, limit)


def test_second_get_makes_no_chunk_requests(s3_backend: S3Backend, tmp_path: Path) -> None:
    store = _cached_store(s3_backend, tmp_path / "cache")
    store.put(_tree(tmp_path / "src"), "runs/a")
    first = store.restore("runs/a", tmp_path / "one")
    assert first.fetched_chunks > 0
    assert first.cached_chunks == 0
    gets_before = chunk_gets(store)

    second = store.restore("runs/a", tmp_path / "two")

    assert second.fetched_chunks == 0
    assert second.cached_chunks == first.fetched_chunks
    assert second.cached_bytes == second.version.size  # kept decoded: raw bytes
    # The ref and the manifest are read again; no chunk is.
    assert chunk_gets(store) - gets_before <= 2
    assert digests(tmp_path / "two") == digests(tmp_path / "src")


def test_default_is_on_for_object_stores_and_off_for_folders(
    s3_backend: S3Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store.init(s3_backend.uri)
    Store.init(tmp_path / "local")
    monkeypatch.setenv("CAS_CACHE", str(tmp_path / "env-cache"))
    remote = Store.open(s3_backend.uri).chunks.cache
    assert remote is not None
    assert remote.root == tmp_path / "env-cache"
    assert remote.folder.name == store_folder_name(s3_backend.uri)
    assert Store.open(tmp_path / "local").chunks.cache is None
    assert Store.open(s3_backend.uri, cache=False).chunks.cache is None
    # Asked for by name, a cache serves a folder store too (one on NFS, say).
    named = Store.open(tmp_path / "local", cache=tmp_path / "mine").chunks.cache
    assert named is not None
    assert named.root == tmp_path / "mine"
    monkeypatch.setenv("CAS_CACHE", "off")
    assert Store.open(s3_backend.uri).chunks.cache is None
    monkeypatch.delenv("CAS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = Store.open(s3_backend.uri).chunks.cache
    assert default is not None
    assert default.root == tmp_path / "xdg" / "cas"


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_a_damaged_entry_is_dropped_fetched_again_and_reported(
    s3_backend: S3Backend, tmp_path: Path, damage: str
) -> None:
    store = _cached_store(s3_backend, tmp_path / "cache")
    store.put(_tree(tmp_path / "src"), "runs/a")
    store.get("runs/a", tmp_path / "one")
    cache = store.chunks.cache
    assert cache is not None
    entries = sorted((cache.folder / "raw").rglob("*"))
    victim = next(p for p in entries if p.is_file())
    good = victim.read_bytes()
    if damage == "flip":
        victim.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    elif damage == "truncate":
        victim.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        victim.write_bytes(os.urandom(len(good)))
    else:
        victim.write_bytes(b"")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = store.restore("runs/a", tmp_path / "two")

    assert digests(tmp_path / "two") == digests(tmp_path / "src")
    assert restored.fetched_chunks == 1
    assert cache.counts.dropped == 1
    reported = [w for w in caught if issubclass(w.category, CacheWarning)]
    assert len(reported) == 1
    assert victim.name in str(reported[0].message)
    assert victim.read_bytes() == good  # the entry was put back from the store


def test_a_cache_that_cannot_be_written_leaves_the_get_working(
    s3_backend: S3Backend, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    store = _cached_store(s3_backend, blocker / "cache")
    store.put(_tree(tmp_path / "src"), "runs/a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = store.restore("runs/a", tmp_path / "one")
        second = store.restore("runs/a", tmp_path / "two")
    assert digests(tmp_path / "two") == digests(tmp_path / "src")
    assert second.fetched_chunks == first.fetched_chunks > 0
    reported = [w for w in caught if issubclass(w.category, CacheWarning)]
    assert len(reported) == 1  # said once, not once per chunk
    assert "cannot be written" in str(reported[0].message)


def test_a_full_cache_disk_warns_and_the_get_succeeds(
    s3_backend: S3Backend, tmp_path: Path
) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    argv = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    try:
        store = _cached_store(s3_backend, mount / "cache", limit=1024 * MiB)
        store.put(_tree(tmp_path / "src"), "runs/a")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            store.get("runs/a", tmp_path / "one")
        assert digests(tmp_path / "one") == digests(tmp_path / "src")
        messages = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
        assert len(messages) == 1
        assert "No space left" in messages[0]
        assert not list((mount / "cache").rglob(".cas-tmp*"))
        assert not list((mount / "cache").rglob("tmp/*"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_eviction_keeps_the_limit_and_drops_the_least_recently_used(tmp_path: Path) -> None:
    cache = LocalCache(tmp_path, "s3://bucket/x", limit=100 * KiB)
    blobs = {Digest.of(bytes([i]) * 8): random_bytes(10 * KiB, i) for i in range(20)}
    names = list(blobs)
    for digest in names[:8]:
        cache.save(digest, blobs[digest])
    # Make the first two the most recently used, the rest older.
    for age, digest in enumerate(reversed(names[:8])):
        os.utime(cache.entry_path(digest), (1000.0 + age, 1000.0 + age))
    recent = time.time() + 3600  # used after all the saves below
    for digest in names[:2]:
        os.utime(cache.entry_path(digest), (recent, recent))
    for digest in names[8:]:
        cache.save(digest, blobs[digest])
    held = usage(tmp_path)[0]
    assert held.size <= 100 * KiB
    assert all(cache.contains(d) for d in names[:2])
    assert not any(cache.contains(d) for d in names[2:6])
    assert evict(tmp_path, 0) == 0
    assert usage(tmp_path)[0].entries == 0


def test_cli_cache_stats_clear_and_no_cache(s3_backend: S3Backend, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = s3_backend.uri
    ok(run_cas("init", store=store))
    ok(run_cas("put", _tree(tmp_path / "src"), "runs/a", store=store))
    first = run_json("get", "runs/a", tmp_path / "one", "--cache", cache, store=store)
    second = run_json("--cache", str(cache), "get", "runs/a", tmp_path / "two", store=store)
    assert first["fetched_chunks"] > 0
    assert second["fetched_chunks"] == 0
    assert second["cached_chunks"] == first["fetched_chunks"]
    uncached = run_json("get", "runs/a", tmp_path / "three", "--no-cache", store=store)
    assert uncached["fetched_chunks"] == first["fetched_chunks"]
    assert uncached["cached_chunks"] == 0

    stats = run_json("cache", "stats", "--cache", cache)
    assert stats["root"] == str(cache)
    assert stats["entries"] == first["fetched_chunks"]
    assert [s["store"] for s in stats["stores"]] == [store]
    text = ok(run_cas("cache", "stats", "--cache", cache)).stdout
    assert store in text
    cleared = run_json("cache", "clear", "--cache", cache)
    assert cleared["cleared"]["entries"] == stats["entries"]
    assert run_json("cache", "stats", "--cache", cache)["entries"] == 0
    again = run_json("get", "runs/a", tmp_path / "four", "--cache", cache, store=store)
    assert again["fetched_chunks"] == first["fetched_chunks"]


def test_cli_cache_size_is_checked(tmp_path: Path) -> None:
    proc = run_cas("cache", "stats", "--cache-size", "lots")
    assert proc.returncode == 2
    assert "not a size" in proc.stderr
    stats = run_json("cache", "stats", "--cache-size", "1GiB", "--cache", tmp_path)
    assert stats["limit"] == 1024**3


def test_read_tensor_reads_through_the_cache(s3_backend: S3Backend, tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    store = _cached_store(s3_backend, tmp_path / "cache")
    weights = np.arange(64 * 1024, dtype=np.float32).reshape(256, 256)
    save_file({"w": weights, "b": weights[0].copy()}, str(tmp_path / "w.safetensors"))
    store.put(tmp_path / "w.safetensors", "runs/w")
    first = store.read_tensor("runs/w", None, "w")
    gets = chunk_gets(store)
    second = store.read_tensor("runs/w", None, "w")
    assert np.array_equal(first, weights)
    assert np.array_equal(second, weights)
    assert chunk_gets(store) - gets <= 2  # ref and manifest only


def test_processes_share_one_cache_under_eviction(s3_backend: S3Backend, tmp_path: Path) -> None:
    """Six processes get the same version at once through one small cache: every
    file verifies, no entry is ever found damaged, the folder ends within its limit."""
    src = _tree(tmp_path / "src")
    (src / "c.bin").write_bytes(random_bytes(600 * KiB, 7))
    store = s3_backend.uri
    Store.init(store, chunker=SMALL_PARAMS)
    Store.open(store, cache=False).put(src, "runs/a")
    cache = tmp_path / "cache"
    limit = 400 * KiB  # under the version's size: entries are evicted while others read
    procs = [
        subprocess.Popen(
            [
                *_cas_argv(),
                "--store",
                store,
                "--json",
                "--cache",
                str(cache),
                "--cache-size",
                str(limit),
                "get",
                "runs/a",
                str(tmp_path / f"dest{i}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for i in range(6)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        assert "damaged" not in err
        assert json.loads(out)["warnings"] == []
    for i in range(6):
        assert digests(tmp_path / f"dest{i}") == digests(src)
    held = usage(cache)
    assert sum(u.size for u in held) <= limit + 6 * 300 * KiB  # each may overshoot a little
    assert not list(cache.rglob("tmp/*"))


def _cas_argv() -> list[str]:
    return list(CAS)


def _env() -> dict[str, str]:
    return cas_env()


_HAMMER = """
import random, sys
from pathlib import Path
from cas.chunks._cache import LocalCache, evict
from cas.digest import Digest
root, seed = Path(sys.argv[1]), int(sys.argv[2])
blobs = [bytes([i]) * (4096 + 97 * i) for i in range(40)]
names = [Digest.of(b) for b in blobs]
cache = LocalCache(root, "s3://bucket/shared", limit=64 * 1024)
rng = random.Random(seed)
bad = 0
for step in range(400):
    i = rng.randrange(len(blobs))
    if rng.random() < 0.5:
        cache.save(names[i], blobs[i])
    got = cache.load(names[i])
    if got is not None and got != blobs[i]:
        bad += 1
    if step % 50 == 0:
        evict(root, 16 * 1024)
print(bad, cache.counts.hits)
"""


def test_writers_readers_and_evictions_in_many_processes_never_show_a_partial_entry(
    tmp_path: Path,
) -> None:
    """Four processes save, load and evict the same entries at once: a load gives
    the whole entry or nothing, never a torn or foreign one."""
    procs = [
        subprocess.Popen(
            [CAS[0], "-c", _HAMMER, str(tmp_path), str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cas_env(),
        )
        for seed in range(4)
    ]
    hits = 0
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        bad, served = map(int, out.split())
        assert bad == 0
        hits += served
    assert hits > 0  # the processes did read each other's entries


def test_diff_reads_through_the_cache(s3_backend: S3Backend, tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    from cas.ml.diff import diff

    store = _cached_store(s3_backend, tmp_path / "cache")
    weights = {f"t{i}": np.full((64, 64), i, dtype=np.float32) for i in range(6)}
    save_file(weights, str(tmp_path / "m.safetensors"))
    store.put(tmp_path / "m.safetensors", "runs/m")
    weights["t2"] = weights["t2"] + 1
    save_file(weights, str(tmp_path / "m.safetensors"))
    store.put(tmp_path / "m.safetensors", "runs/m")
    first = diff(store, "runs/m@1", "runs/m@2")
    gets = chunk_gets(store)
    second = diff(store, "runs/m@1", "runs/m@2")
    assert second == first
    backend = store.backend
    assert isinstance(backend, FaultyBackend)
    assert not [k for k in backend.keys["get"][gets:] if k.startswith("chunks/")]


class _CacheModel(RuleBasedStateMachine):
    """Saves, loads, damage and evictions in any order: a load gives the bytes saved
    or nothing, and the folder never ends a save above its limit."""

    LIMIT = 40 * KiB

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="cas-cache-model-"))
        self.cache = LocalCache(self.root, "s3://bucket/model", limit=self.LIMIT)

    blobs = Bundle("blobs")

    @rule(target=blobs, size=st.integers(0, 12 * KiB), seed=st.integers(0, 1000))
    def make(self, size: int, seed: int) -> tuple[Any, bytes]:
        data = random_bytes(size, seed)
        return Digest.of(data), data

    @rule(blob=blobs)
    def save(self, blob: tuple[Any, bytes]) -> None:
        self.cache.save(*blob)
        assert sum(u.size for u in usage(self.root)) <= self.LIMIT

    @rule(blob=blobs)
    def load(self, blob: tuple[Any, bytes]) -> None:
        got = self.cache.load(blob[0])
        assert got is None or got == blob[1]

    @rule(blob=blobs)
    def drop(self, blob: tuple[Any, bytes]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CacheWarning)
            self.cache.discard(blob[0], "a test drops it")
        assert not self.cache.contains(blob[0])

    @rule(limit=st.integers(0, 40 * KiB))
    def evict(self, limit: int) -> None:
        left = evict(self.root, limit)
        assert left <= limit
        assert sum(u.size for u in usage(self.root)) == left

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


_CacheModel.TestCase.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)
test_cache_model = _CacheModel.TestCase


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
def test_every_object_store_reads_through_the_cache_by_default(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    backend = request.getfixturevalue(f"{kind}_backend")
    Store.init(backend.uri, chunker=SMALL_PARAMS).put(_tree(tmp_path / "src"), "runs/a")
    store = Store.open(backend.uri)
    assert store.chunks.cache is not None
    first = store.restore("runs/a", tmp_path / "one")
    second = Store.open(backend.uri).restore("runs/a", tmp_path / "two")
    assert first.fetched_chunks > 0
    assert (second.fetched_chunks, second.cached_chunks) == (0, first.fetched_chunks)
    assert digests(tmp_path / "two") == digests(tmp_path / "src")


def test_a_read_only_cache_still_serves_what_it_holds(
    s3_backend: S3Backend, tmp_path: Path
) -> None:
    """A cache filled once and then mounted read-only (a shared image, say): hits
    are served, misses are fetched, and the one failed write is reported once."""
    mount = tmp_path / "ro"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        store = _cached_store(s3_backend, mount / "cache")
        store.put(_tree(tmp_path / "src"), "runs/a")
        filled = store.restore("runs/a", tmp_path / "one")
        (tmp_path / "more").mkdir()
        (tmp_path / "more" / "c.bin").write_bytes(random_bytes(100 * KiB, 42))
        store.put(tmp_path / "more", "runs/b")
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = store.restore("runs/a", tmp_path / "two")
            other = store.restore("runs/b", tmp_path / "three")
        assert (again.fetched_chunks, again.cached_chunks) == (0, filled.fetched_chunks)
        assert other.fetched_chunks > 0
        assert digests(tmp_path / "three") == digests(tmp_path / "more")
        messages = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
        assert len(messages) == 1
        assert "Read-only file system" in messages[0]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_damaged_cached_delta_base_is_found_dropped_and_fetched_again(
    s3_backend: S3Backend, tmp_path: Path
) -> None:
    """A version stored as deltas of the one before: its chunks and their bases
    are cached, decoded. With the chunks themselves gone from the cache, their
    chains are read again: a damaged base fails its hash, and only it is
    dropped and fetched beside the chunks."""
    import numpy as np
    from safetensors.numpy import save_file

    store = _cached_store(s3_backend, tmp_path / "cache")
    rng = np.random.default_rng(0)
    weights = {f"t{i}": rng.standard_normal((256, 256)).astype(np.float32) for i in range(4)}
    save_file(weights, str(tmp_path / "m.safetensors"))
    store.put(tmp_path / "m.safetensors", "runs/m")
    for name in weights:
        weights[name] = weights[name] + np.float32(1e-3)
    save_file(weights, str(tmp_path / "m.safetensors"))
    store.put(tmp_path / "m.safetensors", "runs/m")
    bases = {b for c in store.manifest("runs/m@2").entries[0].chunks for b in c.bases}
    if not bases:
        pytest.skip("this store did not keep version 2 as deltas")
    store.get("runs/m@2", tmp_path / "one")
    cache = store.chunks.cache
    assert cache is not None
    # Headers may end a listed chain early; the bases the get read are cached.
    cached_bases = sorted((b for b in bases if cache.contains(b)), key=lambda d: d.hex)
    assert cached_bases
    deltas = {c.digest for c in store.manifest("runs/m@2").entries[0].chunks if c.bases}
    for digest in deltas:
        cache.entry_path(digest).unlink()
    victim = cache.entry_path(cached_bases[0])
    good = victim.read_bytes()
    victim.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = store.restore("runs/m@2", tmp_path / "two")
    assert (tmp_path / "two").read_bytes() == (tmp_path / "m.safetensors").read_bytes()
    assert again.fetched_chunks == len(deltas) + 1
    reported = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert len(reported) == 1
    assert victim.name in reported[0]
    assert victim.read_bytes() == good


def test_in_place_reads_go_through_the_cache(s3_backend: S3Backend, tmp_path: Path) -> None:
    from cas.chunks._inplace import read_into

    store = _cached_store(s3_backend, tmp_path / "cache")
    data = random_bytes(300 * KiB, 11)
    (tmp_path / "w.bin").write_bytes(data)
    store.put(tmp_path / "w.bin", "runs/w")
    entry = store.manifest("runs/w").entries[0]
    for round_ in range(2):
        gets = chunk_gets(store)
        out = bytearray()
        for chunk in entry.chunks:
            buffer = bytearray(chunk.length)
            read_into(store.chunks, chunk, memoryview(buffer))
            out += buffer
        assert bytes(out) == data
        fetched = chunk_gets(store) - gets
        assert fetched == (len(entry.chunks) if round_ == 0 else 0)


def test_entries_are_kept_decoded_and_a_former_cache_is_evicted_never_read(
    s3_backend: S3Backend, tmp_path: Path
) -> None:
    """An entry holds the chunk's raw bytes (a warm read decodes nothing); entries of
    a cache that kept stored objects under chunks/ are counted and evicted, not read."""
    store = _cached_store(s3_backend, tmp_path / "cache")
    src = _tree(tmp_path / "src")
    store.put(src, "runs/a")
    store.get("runs/a", tmp_path / "one")
    cache = store.chunks.cache
    assert cache is not None
    entry = store.manifest("runs/a").entries[0]
    data, offset = (src / entry.path).read_bytes(), 0
    for chunk in entry.chunks:
        kept = cache.entry_path(chunk.digest).read_bytes()
        assert kept == data[offset : offset + chunk.length]
        offset += chunk.length
    former = cache.folder / "chunks" / "ab" / ("ab" + "0" * 62)
    former.parent.mkdir(parents=True)
    former.write_bytes(b"x" * 1000)
    held = usage(cache.root)[0]
    assert held.entries == len(list((cache.folder / "raw").rglob("*/*"))) + 1
    assert evict(cache.root, 0) == 0
    assert not former.exists()
