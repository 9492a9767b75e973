"""Shared pieces of the garbage-collection tests: clocks, a hookable backend, worlds.

A *world* is a backend plus the clock that times it and a grace period that
suits its modification-time resolution. On the in-memory backend the clock
is fake: time moves only when a test moves it, so every interleaving is
replayed exactly. On the other backends time is real, the grace is short,
and "advance" sleeps; the same tests then check the same invariants, though
which of the safe paths a race takes may differ (``world.deterministic``).

``GC_BACKENDS`` (env ``CAS_GC_BACKENDS``, default ``memory,local``) lists the
kinds to run; the cloud kinds (``s3``, ``gcs``, ``azure``) use the backend
fixtures of ``backend_fixtures.py`` unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import pytest

from cas.backends import Backend, DelegatingBackend
from cas.chunks._chunking import ChunkerParams
from cas.gc._session import Clock, WriteSession
from cas.store import Store
from cas.store._config import StoreConfig, write_config

GC_BACKENDS = [k for k in os.environ.get("CAS_GC_BACKENDS", "memory,local").split(",") if k]
#: Real-clock grace per kind: many times the service's mtime resolution
#: (S3 and Azure stamp whole seconds), yet short enough to wait out in a test.
REAL_GRACE = {"local": 1.0, "s3": 6.0, "gcs": 3.0, "azure": 6.0}
#: How coarse each kind's modification times are (S3 and Azure: whole seconds).
RESOLUTION = {"memory": 0.001, "local": 0.01, "s3": 1.1, "gcs": 0.01, "azure": 1.1}
#: Small chunks: a few hundred KiB give files of many chunks.
PARAMS = ChunkerParams.from_average(16 * 1024)

T = TypeVar("T")


class FakeClock(Clock):
    """Time that moves only when told. Also the MemoryBackend's clock (``time``)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []
        #: Called with the duration before a sleep advances time; may block.
        self.on_sleep: Callable[[float], None] | None = None

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.on_sleep is not None:
            self.on_sleep(seconds)
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RealClock(Clock):
    """The system clock, with the same hooks as FakeClock."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[float], None] | None = None

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.on_sleep is not None:
            self.on_sleep(seconds)
        time.sleep(seconds)

    def advance(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass
class _Hook:
    op: str
    when: str  # "before" or "after"
    match: Callable[[str], bool]
    action: Callable[[str], None]
    once: bool
    thread_prefix: str | None
    fired: int = 0


class HookedBackend(DelegatingBackend):
    """Delegates to another backend, running test code before or after chosen calls."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self._hooks: list[_Hook] = []
        self._lock = threading.Lock()

    def on(
        self,
        op: str,
        match: Callable[[str], bool],
        action: Callable[[str], None],
        *,
        when: str = "before",
        once: bool = True,
        thread_prefix: str | None = None,
    ) -> _Hook:
        hook = _Hook(op, when, match, action, once, thread_prefix)
        self._hooks.append(hook)
        return hook

    def clear(self) -> None:
        self._hooks.clear()

    def _fire(self, op: str, when: str, keys: Iterable[str]) -> None:
        thread = threading.current_thread().name
        for key in keys:
            for hook in list(self._hooks):
                if hook.op != op or hook.when != when or not hook.match(key):
                    continue
                if hook.thread_prefix is not None and not thread.startswith(hook.thread_prefix):
                    continue
                with self._lock:
                    if hook.once and hook.fired:
                        continue
                    hook.fired += 1
                hook.action(key)

    def _call(self, op: str, keys: Sequence[str], request: Callable[[], T]) -> T:
        self._fire(op, "before", keys)
        result = request()
        self._fire(op, "after", keys)
        return result


@dataclass
class World:
    kind: str
    backend: HookedBackend
    clock: FakeClock | RealClock
    grace: float
    deterministic: bool
    stores: list[Store] = field(default_factory=list)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def tick(self) -> None:
        """Let enough time pass that the next write gets a later modification time."""
        self.clock.advance(RESOLUTION[self.kind])

    def store(self, *, workers: int = 2) -> Store:
        """A store on this world's backend, whose writers use the world's grace."""
        config = write_config(self.backend, StoreConfig(chunker=PARAMS), exist_ok=True)
        store = Store(self.backend, config, workers=workers)
        store.clock = self.clock
        if not self.stores:
            store.set_gc_grace(self.grace)
        self.stores.append(store)
        return store


def make_world(kind: str, backend: Backend | None) -> World:
    if kind == "memory":
        from cas.backends import MemoryBackend

        fake = FakeClock()
        inner: Backend = MemoryBackend(clock=fake.time)
        return World(kind, HookedBackend(inner), fake, grace=600.0, deterministic=True)
    assert backend is not None
    return World(kind, HookedBackend(backend), RealClock(), REAL_GRACE[kind], False)


def random_bytes(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def chunk_keys(store: Store, ref: str) -> list[str]:
    """Keys of the chunks of one version, in file order."""
    from cas.repository import _layout as layout

    details = store.show(ref)
    return [layout.chunk_key(c.digest) for e in details.entries for c in e.chunks]


def live_objects(store: Store) -> tuple[set[str], set[str]]:
    """(chunk keys, manifest keys) that live versions reference."""
    from cas.repository import _layout as layout

    chunks: set[str] = set()
    manifests: set[str] = set()
    for key, _ in store.refs.iter_keys():
        for ref in store.refs.live_versions(key):
            manifests.add(layout.manifest_key(ref.manifest_id))
            for entry in store.load_manifest(ref.manifest_id).entries:
                chunks.update(layout.chunk_key(c.digest) for c in entry.chunks)
    return chunks, manifests


def needed_chunks(store: Store) -> set[str]:
    """Keys of the chunks live versions name, and of the delta bases they list."""
    from cas.repository import _layout as layout

    out: set[str] = set()
    for key in store.list_keys():
        for version in store.log(key.key):
            for entry in store.show(version.ref).entries:
                for chunk in entry.chunks:
                    out.update(layout.chunk_key(d) for d in (chunk.digest, *chunk.bases))
    return out


def stored_keys(backend: Backend, prefix: str) -> set[str]:
    return {info.key for info in backend.list_objects(prefix)}


def assert_intact(store: Store, expected: dict[str, bytes], tmp_path: Path) -> None:
    """Every expected version restores byte for byte and the store verifies deep."""
    for ref, data in expected.items():
        dest = tmp_path / "restored" / ref.replace("/", "_").replace("@", "_")
        store.get(ref, dest)
        assert dest.read_bytes() == data, ref
    report = store.verify(deep=True)
    assert report.ok, report.damaged


def count_attempts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the put attempts (write sessions) started from now on."""
    started: list[int] = []
    original = WriteSession.start

    def start(self: WriteSession) -> WriteSession:
        started.append(1)
        return original(self)

    monkeypatch.setattr(WriteSession, "start", start)
    return started


@dataclass
class StressRun(Generic[T]):
    """What writer processes logged while a loop of the main process ran beside them."""

    events: list[dict[str, Any]]
    results: list[T]

    def refs(self, event: str) -> dict[str, dict[str, Any]]:
        return {e["ref"]: e for e in self.events if e["event"] == event}

    @property
    def committed(self) -> dict[str, dict[str, Any]]:
        return self.refs("put")

    @property
    def live(self) -> dict[str, dict[str, Any]]:
        """Committed versions not deleted since, by reference."""
        deleted = self.refs("rm")
        return {ref: e for ref, e in self.committed.items() if ref not in deleted}

    @property
    def aborted(self) -> int:
        return sum(1 for e in self.events if e["event"] == "aborted")


def run_writers(
    script: str, argv: Sequence[str], count: int, tmp_path: Path, meanwhile: Callable[[], T]
) -> StressRun[T]:
    """Run ``count`` writer processes (``python script writer <argv> i log tmp_path``), and
    ``meanwhile`` over and over until they end; what they logged (JSON lines), and its results."""
    logs = [tmp_path / f"writer{i}.log" for i in range(count)]
    procs = [
        subprocess.Popen(
            [sys.executable, script, "writer", *argv, str(i), str(log), str(tmp_path)],
            cwd=Path(script).parent,
        )
        for i, log in enumerate(logs)
    ]
    results: list[T] = []
    try:
        while any(p.poll() is None for p in procs):
            results.append(meanwhile())
            time.sleep(0.05)
    finally:
        for proc in procs:
            proc.wait(timeout=120)
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]
    events = [json.loads(line) for log in logs for line in log.read_text().splitlines()]
    return StressRun(events, results)


def stress_store(kind: str, backend_uri: str | None, tmp_path: Path) -> tuple[str, Store, float]:
    """(uri, store, grace) of a stress test's store on ``kind``: a folder under
    ``tmp_path``, or the test server's bucket, with the grace that suits the kind."""
    uri = str(tmp_path / "store") if backend_uri is None else backend_uri
    grace = REAL_GRACE[kind]
    store = Store.init(uri, chunker=PARAMS)
    store.set_gc_grace(grace)
    return uri, store, grace


def check_live(store: Store, live: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """Every committed, undeleted version restores byte for byte (the SHA-256 its writer
    logged), no other version is live, and a deep verify passes."""
    import hashlib

    for ref, event in live.items():
        dest = tmp_path / "restored" / ref.replace("/", "_").replace("@", "_")
        store.get(ref, dest)
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == event["sha256"], ref
    assert {f"{v.key}@{v.number}" for k in store.list_keys() for v in store.log(k.key)} == set(live)
    report = store.verify(deep=True)
    assert report.ok, report.damaged
