"""Shared helpers of the core tests: running the CLI, building and comparing trees."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from cas.chunks._chunking import ChunkerParams
from cas.chunks._codec import HEADER, raw_length
from cas.digest import Digest
from cas.repository import _layout as layout
from cas.repository._manifest import ChunkRef
from cas.store import Store
from cas.testing.faults import FaultyBackend

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
#: ``python -m cas``: the same code as the ``cas`` script, without relying on PATH.
CAS = [PYTHON, "-m", "cas"]
CAS_SCRIPT = Path(PYTHON).parent / "cas"

KiB = 1024
MiB = 1024 * KiB

#: Small chunks keep tests fast while still giving multi-chunk files.
SMALL_PARAMS = ChunkerParams.from_average(16 * KiB)


def cas_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a CLI subprocess: no inherited $CAS_STORE unless given."""
    env = {k: v for k, v in os.environ.items() if k != "CAS_STORE"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cas(
    *args: str | os.PathLike[str],
    store: str | os.PathLike[str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    command: list[str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``cas ARGS`` as a subprocess and return the finished process (never raises on rc)."""
    argv = [*(command or CAS)]
    if store is not None:
        argv += ["--store", os.fspath(store)]
    argv += [os.fspath(a) for a in args]
    return subprocess.run(
        argv,
        cwd=cwd,
        env=cas_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def load_script(name: str) -> ModuleType:
    """The module of scripts/NAME.py (scripts/ is not a package), loaded once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """Assert the command succeeded, showing its output when it did not."""
    assert proc.returncode == 0, (
        f"{proc.args} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    )
    return proc


def run_json(*args: str | os.PathLike[str], **kwargs: Any) -> Any:
    """Run ``cas --json ARGS``, assert success, and return the parsed output."""
    proc = ok(run_cas(*args, "--json", **kwargs))
    return json.loads(proc.stdout)


def random_bytes(size: int, seed: int) -> bytes:
    """Incompressible bytes, reproducible from ``seed``, generated quickly."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 2**64 - 1, size=(size + 7) // 8, dtype=np.uint64, endpoint=True)
    return words.tobytes()[:size]


def text_bytes(size: int, seed: int) -> bytes:
    """Compressible, text-like bytes."""
    rng = np.random.default_rng(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"loss", b"step", b"epoch", b"\n"]
    picks = rng.integers(0, len(words), size=size // 4 + 1)
    return b" ".join(words[i] for i in picks)[:size]


def snapshot(path: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a restore must reproduce below ``path``, keyed by relative path.

    Files: (type, mode, content); directories: (type, mode); links: (type, target).
    A single file is keyed by "". The mode of ``path`` itself is left out when it
    is a directory (a store does not record it).
    """
    out: dict[str, tuple[Any, ...]] = {}
    st = path.lstat()
    if stat.S_ISREG(st.st_mode):
        return {"": ("file", stat.S_IMODE(st.st_mode), path.read_bytes())}
    for dirpath, dirnames, filenames in os.walk(path):
        base = Path(dirpath)
        for name in dirnames + filenames:
            full = base / name
            rel = full.relative_to(path).as_posix()
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), full.read_bytes())
    return out


def digests(path: Path) -> dict[str, str]:
    """BLAKE3 of every regular file below ``path`` (or of ``path`` itself, keyed "")."""
    if path.is_file() and not path.is_symlink():
        return {"": Digest.of(path.read_bytes()).hex}
    out = {}
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            full = Path(dirpath) / name
            if not full.is_symlink():
                out[full.relative_to(path).as_posix()] = Digest.of(full.read_bytes()).hex
    return out


def chunk_files(store_root: Path) -> set[str]:
    """Names of the chunk objects of a local store (temporary files excluded)."""
    chunks = store_root / "chunks"
    if not chunks.exists():
        return set()
    return {p.name for p in chunks.rglob("*") if p.is_file() and not p.name.startswith(".cas-tmp")}


def chunk_paths(store_root: Path) -> list[Path]:
    return sorted(
        p
        for p in (store_root / "chunks").rglob("*")
        if p.is_file() and not p.name.startswith(".cas-tmp")
    )


def temp_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".cas-tmp"))


def small_store(path: Path, params: ChunkerParams = SMALL_PARAMS) -> Store:
    return Store.init(path, chunker=params)


def build_sample_tree(root: Path, seed: int = 0) -> Path:
    """A small directory with nested dirs, an empty dir, an empty file, a link, modes."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "weights.bin").write_bytes(random_bytes(150 * KiB, seed))
    (root / "sub" / "notes.txt").write_bytes(text_bytes(40 * KiB, seed))
    (root / "sub" / "deeper" / "tiny").write_bytes(b"x")
    (root / "sub" / "empty").write_bytes(b"")
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o755)
    os.chmod(root / "sub" / "notes.txt", 0o600)
    (root / "latest").symlink_to("weights.bin")
    (root / "sub" / "up").symlink_to("../run.sh")
    return root


def rerun_after_failed_put(store: Store, source: Path, key: str) -> tuple[set[str], set[str]]:
    """After a put of ``source`` failed half-way: check what it left, then put it again.

    Every chunk object the failed put left must be whole (decode to its
    name), and the re-run must upload exactly the chunks still missing.
    Returns (chunk keys the version needs, chunk keys that were left).
    """
    left = {info.key for info in store.backend.list_objects(layout.CHUNKS)}
    for name in left:
        digest = layout.digest_from_key(name)
        assert digest is not None
        # No manifest names these yet: the header's own length is the one to trust.
        length = raw_length(store.backend.get_range(name, 0, HEADER.size))
        store.chunks.get(ChunkRef(digest, length))
    counted = FaultyBackend(store.backend)
    Store(counted, store.config, workers=2).put(source, key)
    uploaded = {k for k in counted.keys["put"] if k.startswith(layout.CHUNKS)}
    needed = {layout.chunk_key(c.digest) for e in store.show(key).entries for c in e.chunks}
    assert uploaded == needed - left
    return needed, left


def counted_cached_store(uri: str, cache: Path, limit: int = 64 << 20) -> Store:
    """A new store at ``uri`` (small chunks) reading through the chunk cache in
    ``cache``, its requests counted (``chunk_gets``)."""
    Store.init(uri, chunker=SMALL_PARAMS)
    opened = Store.open(uri, cache=cache, cache_size=limit)
    return Store(FaultyBackend(opened.backend), opened.config, cache=opened.chunks.cache)


def chunk_gets(store: Store) -> int:
    """The GETs a store made by :func:`counted_cached_store` has sent so far."""
    backend = store.backend
    assert isinstance(backend, FaultyBackend)
    return backend.calls["get"]
