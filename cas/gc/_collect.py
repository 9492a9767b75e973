"""Garbage collection without locks: mark from every version, sweep with a grace period.

The protocol (docs/gc.md explains why it is safe, and what it assumes):

1. **Start.** Write a marker ``gc/runs/<id>``; its modification time is
   ``t0``, "now" on the backend's clock. Nothing older than
   ``threshold = t0 - grace`` may be in use by a put that has not committed.
2. **Mark.** List ``refs/`` once; read every version ref and the manifest of
   every live one (:class:`~cas.repository._live.LiveVersions`); collect the
   chunks each keeps alive (with the delta bases their entries list: a delta
   chunk needs them; :func:`~cas.repository._manifest.live_chunk_names`) in a
   :class:`DigestSet`.
   Tags add no roots: a tag names a version of its key, whose ref is itself
   a root, and deleting a version removes its tags first.
3. **Sweep.** List ``manifests/`` and ``chunks/`` once each, streaming. An
   object that is unreachable and whose listed time is before ``threshold``
   is a candidate. Candidates are read again (``stat``) in small batches and
   deleted only if still that old, and only if the delete is sent within
   half the deletion window of those reads; otherwise they are left for the
   next run. Writers rely on that window (see :mod:`cas.gc._session`).
4. **Finish.** Remove markers of puts and collections that died long ago,
   then our own marker, after the last delete.

Refs are never deleted: a deleted version is a tombstone of a few dozen
bytes that keeps its number from being handed out again.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from ..backends.base import Backend, ObjectInfo
from ..digest import DIGEST_SIZE, Digest
from ..errors import CorruptObjectError, IntegrityError, MissingObjectError, NotFoundError
from ..repository import _layout as layout
from ..repository._live import LiveVersions
from ..repository._manifest import live_chunk_names
from ..repository._refs import Refs, VersionRef
from ._digestset import DigestSet
from ._session import (
    PUTS,
    RUNS,
    SYSTEM_CLOCK,
    Clock,
    deletion_window,
    marker_body,
    read_settings,
)

#: Candidates read again and deleted together.
BATCH = 32
#: A collection touches its marker this often, so others see it is alive.
HEARTBEAT = 60.0
#: Markers not touched for this long belong to dead processes and are removed.
STALE_MARKER_AGE = 3600.0

ProgressFn = Callable[[int], None]


@dataclass
class GcReport:
    """What one collection saw and did. Sizes are stored bytes (what the backend bills)."""

    grace: float
    window: float
    dry_run: bool
    #: Why this run is unsafe while writers run, or None when it is safe.
    unsafe: str | None = None
    #: Backend time of the start, and the age limit it implies.
    started: float = 0.0
    threshold: float = 0.0
    versions: int = 0
    tags: int = 0
    manifests_marked: int = 0
    chunks_marked: int = 0
    scanned_chunks: int = 0
    scanned_manifests: int = 0
    reachable: int = 0
    reachable_bytes: int = 0
    deleted_chunks: int = 0
    deleted_manifests: int = 0
    bytes_reclaimed: int = 0
    #: Unreachable, but younger than the threshold: kept only by the grace period.
    kept_by_grace: int = 0
    bytes_kept_by_grace: int = 0
    #: Candidates left for the next run: their deletion could not be sent in time.
    deferred: int = 0
    puts_in_flight: int = 0
    markers_removed: int = 0
    #: Memory held by the mark (the digests), in bytes.
    mark_bytes: int = 0
    seconds: float = 0.0

    @property
    def scanned(self) -> int:
        return self.scanned_chunks + self.scanned_manifests

    @property
    def deleted(self) -> int:
        return self.deleted_chunks + self.deleted_manifests

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(scanned=self.scanned, deleted=self.deleted, seconds=round(self.seconds, 3))
        return out


@dataclass
class _Tally:
    deleted: int = 0
    deleted_bytes: int = 0
    kept: int = 0
    kept_bytes: int = 0
    deferred: int = 0


@dataclass
class _Sweep:
    """Deletion batches in flight, bounded so memory stays flat however much goes."""

    limit: int
    pending: deque[Future[_Tally]] = field(default_factory=deque)


def manifest_chunks(backend: Backend, manifest_id: Digest, label: str) -> list[bytes]:
    """The raw digests of every chunk a manifest keeps alive, after checking its hash.

    A light parse (no dataclasses) because marking reads every manifest. A
    manifest that is missing or damaged stops the collection: the chunks it
    names are unknown, and deleting them could destroy what a repair needs.
    """
    where = f"version {label}: manifest {manifest_id.hex}"
    try:
        blob = backend.get(layout.manifest_key(manifest_id))
    except NotFoundError:
        raise _stopped(MissingObjectError, f"{where} is missing", label) from None
    if Digest.of(blob) != manifest_id:
        raise _stopped(CorruptObjectError, f"{where} does not match its hash", label)
    try:
        return live_chunk_names(blob, name=where)
    except CorruptObjectError as err:
        raise _stopped(CorruptObjectError, str(err), label) from None


def _stopped(kind: type[IntegrityError], problem: str, label: str) -> IntegrityError:
    return kind.naming(
        "{problem}; garbage collection stopped before deleting anything. {verify}; "
        "if {label} cannot be repaired, {delete_version} lets gc run again",
        problem=problem,
        label=label,
        verify="Verify the store (Store.verify)",
        delete_version=f"deleting {label}",
    )


class Collector:
    """One garbage collection. ``run()`` does it all; tests drive the phases one by one."""

    def __init__(
        self,
        backend: Backend,
        *,
        grace: float | None = None,
        dry_run: bool = False,
        workers: int = 8,
        clock: Clock = SYSTEM_CLOCK,
        progress: ProgressFn | None = None,
    ) -> None:
        if grace is not None and grace < 0:
            raise ValueError("grace must not be negative")
        self.backend = backend
        self.refs = Refs(backend)
        self.requested_grace = grace
        self.workers = max(1, workers)
        self.clock = clock
        self.progress = progress
        self.marker = f"{RUNS}{uuid.uuid4().hex}"
        self.chunks = DigestSet()
        self.manifests = DigestSet()
        self.report = GcReport(grace=0.0, window=0.0, dry_run=dry_run)
        self._heartbeat_at = 0.0
        self._started_at = 0.0

    # -- phases -------------------------------------------------------------------------

    def run(self) -> GcReport:
        self.start()
        try:
            self.mark()
            self.sweep()
            self.cleanup()
        finally:
            self.finish()
        return self.report

    def start(self) -> None:
        """Write our marker and read the backend's clock from it: that is ``t0``."""
        self._started_at = time.perf_counter()
        settings = read_settings(self.backend, with_time=True)
        grace = settings.grace if self.requested_grace is None else self.requested_grace
        report = self.report
        report.grace, report.window = grace, deletion_window(grace)
        body = marker_body(grace=grace, window=report.window, dry_run=report.dry_run)
        self.backend.put(self.marker, body)
        self._heartbeat_at = self.clock.monotonic()
        report.started = self.backend.stat(self.marker).mtime
        report.threshold = report.started - grace
        safe = settings.safe_grace(report.started)
        if grace == 0:
            report.unsafe = (
                "grace 0 is unsafe with concurrent writers: it deletes unreferenced objects "
                "however recent, so a put running now may commit a damaged version. "
                "Use it only when nothing writes to the store"
            )
        elif grace < safe:
            report.unsafe = (
                f"grace {grace:g}s is unsafe with concurrent writers: it is shorter than the "
                f"{safe:g}s they refresh against (gc/settings), so a put running now may lose "
                "chunks. Use it only when nothing writes, or set the store's grace first "
                "(cas gc --set-grace)"
            )

    def mark(self) -> None:
        """Every chunk and manifest reachable from a live version ref."""
        report = self.report
        live = LiveVersions(self.refs, self._live_chunks, workers=self.workers, tick=self._beat)
        for ref, chunks in live:
            report.versions += 1
            if self.manifests.add(ref.manifest_id.raw):
                for raw in chunks:
                    self.chunks.add(raw)
        report.tags = live.tags
        self.chunks.compact()
        report.manifests_marked = len(self.manifests)
        report.chunks_marked = len(self.chunks)
        report.mark_bytes = self.chunks.nbytes + self.manifests.nbytes

    def _live_chunks(self, ref: VersionRef) -> list[bytes]:
        if ref.manifest_id.raw in self.manifests:
            return []  # marked already (the set is written by the main thread only)
        return manifest_chunks(self.backend, ref.manifest_id, ref.label)

    def sweep(self) -> None:
        """Delete what is unreachable and older than the threshold: manifests, then chunks."""
        with ThreadPoolExecutor(self.workers, "cas-gc-sweep") as pool:
            self._sweep(pool, layout.MANIFESTS, self.manifests, "manifests")
            self._sweep(pool, layout.CHUNKS, self.chunks, "chunks")

    def cleanup(self) -> None:
        """Remove markers of puts and collections that died without removing their own."""
        report = self.report
        horizon = report.started - max(report.grace, STALE_MARKER_AGE)
        stale_puts = []
        for info in self.backend.list_objects(PUTS):
            if info.mtime < horizon:
                stale_puts.append(info.key)
            else:
                report.puts_in_flight += 1
        stale_runs = [
            info.key
            for info in self.backend.list_objects(RUNS)
            if info.key != self.marker and info.mtime < report.started - STALE_MARKER_AGE
        ]
        if not report.dry_run:
            self.backend.delete([*stale_puts, *stale_runs])
        report.markers_removed = len(stale_puts) + len(stale_runs)

    def finish(self) -> None:
        """Remove our marker: after it, this collection deletes nothing more."""
        self.backend.delete([self.marker])
        self.report.seconds = time.perf_counter() - self._started_at

    # -- sweeping --------------------------------------------------------------------------

    def _sweep(
        self, pool: ThreadPoolExecutor, prefix: str, reachable: DigestSet, kind: str
    ) -> None:
        report = self.report
        sweep = _Sweep(limit=self.workers * 2)
        batch: list[str] = []
        scanned = 0
        for info in self.backend.list_objects(prefix):
            raw = _digest_of(info.key)
            if raw is None:
                continue  # not ours (a stray file): never touch it
            scanned += 1
            if scanned % 4096 == 0:
                self._beat()
                if self.progress is not None:
                    self.progress(4096)
            if raw in reachable:
                report.reachable += 1
                report.reachable_bytes += info.size
            elif info.mtime >= report.threshold:
                report.kept_by_grace += 1
                report.bytes_kept_by_grace += info.size
            elif report.dry_run:
                self._count(kind, _Tally(deleted=1, deleted_bytes=info.size))
            else:
                batch.append(info.key)
                if len(batch) >= BATCH:
                    self._submit(pool, sweep, batch, kind)
                    batch = []
        if batch:
            self._submit(pool, sweep, batch, kind)
        while sweep.pending:
            self._count(kind, sweep.pending.popleft().result())
        if kind == "chunks":
            report.scanned_chunks += scanned
        else:
            report.scanned_manifests += scanned

    def _submit(self, pool: ThreadPoolExecutor, sweep: _Sweep, batch: list[str], kind: str) -> None:
        sweep.pending.append(pool.submit(self._delete_batch, batch))
        while len(sweep.pending) >= sweep.limit:
            self._count(kind, sweep.pending.popleft().result())

    def _count(self, kind: str, tally: _Tally) -> None:
        report = self.report
        if kind == "chunks":
            report.deleted_chunks += tally.deleted
        else:
            report.deleted_manifests += tally.deleted
        report.bytes_reclaimed += tally.deleted_bytes
        report.kept_by_grace += tally.kept
        report.bytes_kept_by_grace += tally.kept_bytes
        report.deferred += tally.deferred

    def _delete_batch(self, keys: list[str]) -> _Tally:
        """Read each candidate's time again, then delete the still-old ones at once.

        The listing may be minutes old; a put may have touched a candidate
        since. The delete goes out only if the reads are less than half the
        deletion window old, the bound writers wait out (docs/gc.md). When a
        slow service makes a batch miss that, its halves are tried afresh,
        down to single objects; only an object whose own read and delete do
        not fit is left for the next run.
        """
        tally = _Tally()
        began = self.clock.monotonic()
        doomed: list[ObjectInfo] = []
        kept: list[ObjectInfo] = []
        for key in keys:
            try:
                info = self.backend.stat(key)
            except NotFoundError:
                continue
            (doomed if info.mtime < self.report.threshold else kept).append(info)
        if doomed and self.clock.monotonic() - began > self.report.window / 2:
            if len(keys) == 1:
                tally.deferred = 1
                return tally
            middle = len(keys) // 2
            halves = (self._delete_batch(keys[:middle]), self._delete_batch(keys[middle:]))
            for half in halves:
                tally.deleted += half.deleted
                tally.deleted_bytes += half.deleted_bytes
                tally.kept += half.kept
                tally.kept_bytes += half.kept_bytes
                tally.deferred += half.deferred
            return tally
        if doomed:
            self.backend.delete([info.key for info in doomed])
        tally.deleted = len(doomed)
        tally.deleted_bytes = sum(info.size for info in doomed)
        tally.kept = len(kept)
        tally.kept_bytes = sum(info.size for info in kept)
        return tally

    def _beat(self) -> None:
        """Touch our marker now and then, so other collections see we are alive."""
        now = self.clock.monotonic()
        if now - self._heartbeat_at < HEARTBEAT:
            return
        self._heartbeat_at = now
        try:
            self.backend.touch(self.marker)
        except NotFoundError:
            body = marker_body(
                grace=self.report.grace, window=self.report.window, dry_run=self.report.dry_run
            )
            self.backend.put(self.marker, body)


def _digest_of(key: str) -> bytes | None:
    name = key.rpartition("/")[2]
    if len(name) != 2 * DIGEST_SIZE:
        return None
    try:
        raw = bytes.fromhex(name)
    except ValueError:
        return None
    # fromhex also takes upper case and spaces: only our own spelling counts.
    return raw if raw.hex() == name else None


def collect(
    backend: Backend,
    *,
    grace: float | None = None,
    dry_run: bool = False,
    workers: int = 8,
    clock: Clock = SYSTEM_CLOCK,
    progress: ProgressFn | None = None,
) -> GcReport:
    """Run one garbage collection; ``grace`` None means the store's setting."""
    collector = Collector(
        backend, grace=grace, dry_run=dry_run, workers=workers, clock=clock, progress=progress
    )
    return collector.run()
