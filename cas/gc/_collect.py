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
4. **Finish.** Remove markers of puts and collections whose lease ran out
   (they died), and what dead writers left (temporary files, partial
   uploads) older than the threshold; then our own marker, after the last
   delete.

The marker is a lease (:mod:`cas.gc._lease`): renewed while the collection
runs, and no delete goes out once the renewal before its reads is too old,
so a collection paused past its lease deletes nothing when it wakes.

Refs are never deleted: a deleted version is a tombstone of a few dozen
bytes that keeps its number from being handed out again.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..backends.base import Backend, Leftover, ObjectInfo
from ..digest import DIGEST_SIZE, Digest
from ..errors import (
    CasError,
    CorruptObjectError,
    IntegrityError,
    MissingObjectError,
    NotFoundError,
)
from ..repository import _layout as layout
from ..repository._live import LiveVersions
from ..repository._manifest import live_chunk_roles
from ..repository._refs import Refs, VersionRef
from ._digestset import DigestSet
from ._history import record_run
from ._lease import (
    DEFAULT_LEASE,
    Lease,
    delete_deadline,
    expired,
    iter_collections,
    lease_for_window,
)
from ._session import (
    PUTS,
    RUNS,
    SYSTEM_CLOCK,
    Clock,
    deletion_window,
    marker_body,
    read_settings,
)

if TYPE_CHECKING:
    from ..tensors._encoding import TensorCodec
    from ._repack import RepackReport

#: Candidates read again and deleted together.
BATCH = 32

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
    #: Puts whose lease holds: running now.
    puts_in_flight: int = 0
    #: Markers of puts and collections whose lease ran out: they died.
    markers_removed: int = 0
    #: Temporary files and partial uploads of writers that died, older than
    #: the threshold (removed, or with ``dry_run`` that would be).
    leftovers_removed: int = 0
    leftover_bytes: int = 0
    #: How long this collection's marker may go unrenewed before others take
    #: it for dead (and so how long it may take between renewal and delete).
    lease: float = 0.0
    #: Memory held by the mark (the digests), in bytes.
    mark_bytes: int = 0
    seconds: float = 0.0
    #: What repacking did before the collection (None: not asked for).
    repack: RepackReport | None = None

    @property
    def scanned(self) -> int:
        return self.scanned_chunks + self.scanned_manifests

    @property
    def deleted(self) -> int:
        return self.deleted_chunks + self.deleted_manifests

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(scanned=self.scanned, deleted=self.deleted, seconds=round(self.seconds, 3))
        out["repack"] = self.repack.to_dict() if self.repack is not None else None
        return out


@dataclass
class _Tally:
    deleted: int = 0
    deleted_bytes: int = 0
    kept: int = 0
    kept_bytes: int = 0
    deferred: int = 0

    def add(self, other: _Tally) -> None:
        self.deleted += other.deleted
        self.deleted_bytes += other.deleted_bytes
        self.kept += other.kept
        self.kept_bytes += other.kept_bytes
        self.deferred += other.deferred


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
    named, bases = manifest_chunk_roles(backend, manifest_id, label)
    return named + bases


def manifest_chunk_roles(
    backend: Backend, manifest_id: Digest, label: str
) -> tuple[list[bytes], list[bytes]]:
    """(the chunks a manifest's files are made of, the delta bases they list), as raw
    digests; a base may repeat, or be a chunk of a file too. See :func:`manifest_chunks`."""
    where = f"version {label}: manifest {manifest_id.hex}"
    try:
        blob = backend.get(layout.manifest_key(manifest_id))
    except NotFoundError:
        raise _stopped(MissingObjectError, f"{where} is missing", label) from None
    if Digest.of(blob) != manifest_id:
        raise _stopped(CorruptObjectError, f"{where} does not match its hash", label)
    try:
        return live_chunk_roles(blob, name=where)
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
        self.lease = Lease(backend, self.marker, self._marker_body, clock=clock)
        #: Lease of the puts' markers (the store's setting).
        self.put_lease = DEFAULT_LEASE
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
        if not self.report.dry_run:
            record_run(self.backend, self.report)
        return self.report

    def start(self) -> None:
        """Write our marker and read the backend's clock from it: that is ``t0``."""
        self._started_at = time.perf_counter()
        settings = read_settings(self.backend, with_time=True)
        grace = settings.grace if self.requested_grace is None else self.requested_grace
        report = self.report
        report.grace, report.window = grace, deletion_window(grace)
        report.lease = self.lease.length = lease_for_window(settings.lease, report.window)
        self.put_lease = settings.lease
        self.lease.acquire()
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
        """Remove what dead processes left: markers whose lease ran out, temp files, uploads."""
        report = self.report
        now = self.lease.now()[0]
        stale_puts = []
        for info in self.backend.list_objects(PUTS):
            if expired(info.mtime, self.put_lease, now):
                stale_puts.append(info.key)
            else:
                report.puts_in_flight += 1
        stale_runs = [
            run.key
            for run in iter_collections(self.backend, RUNS, report.window)
            if run.key != self.marker and expired(run.mtime, run.lease, now)
        ]
        leftovers = [x for x in self.backend.list_leftovers() if x.mtime < report.threshold]
        if not report.dry_run:
            self.backend.delete([*stale_puts, *stale_runs])
            self._remove_leftovers(leftovers)
        report.markers_removed = len(stale_puts) + len(stale_runs)
        report.leftovers_removed = len(leftovers)
        report.leftover_bytes = sum(x.size for x in leftovers)

    def _remove_leftovers(self, leftovers: list[Leftover]) -> None:
        # Nothing refers to a leftover: its writer died before the rename or
        # the completion that would have made it an object.
        for start in range(0, len(leftovers), BATCH):
            self._beat()
            self.backend.remove_leftovers(leftovers[start : start + BATCH])

    def finish(self) -> None:
        """Remove our marker: after it, this collection deletes nothing more."""
        self.lease.release()
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
        deletion window old, the bound writers wait out, and while the lease
        under which they were made holds (docs/gc.md). When a slow service
        (or a pause) makes a batch miss that, its halves are tried afresh,
        down to single objects; only an object whose own read and delete do
        not fit is left for the next run.
        """
        tally = _Tally()
        began = self.clock.monotonic()
        renewed = self.lease.renewed  # the lease these reads are made under
        doomed: list[ObjectInfo] = []
        kept: list[ObjectInfo] = []
        for key in keys:
            try:
                info = self.backend.stat(key)
            except NotFoundError:
                continue
            (doomed if info.mtime < self.report.threshold else kept).append(info)
        if doomed and not self._may_delete(began, renewed):
            return self._in_halves(keys)
        # Every request of the delete, retries included, goes out in time or
        # not at all: what a slow batch leaves unsent is read again.
        unsent: set[str] = set()
        if doomed:
            unsent.update(
                self.backend.delete_in_time(
                    [info.key for info in doomed],
                    lambda: self._may_delete(began, renewed, beat=False),
                )
            )
        tally.deleted = len(doomed) - len(unsent)
        tally.deleted_bytes = sum(info.size for info in doomed if info.key not in unsent)
        tally.kept = len(kept)
        tally.kept_bytes = sum(info.size for info in kept)
        if unsent:
            tally.add(self._in_halves([key for key in keys if key in unsent]))
        return tally

    def _in_halves(self, keys: list[str]) -> _Tally:
        """Try ``keys`` again as two batches, with fresh reads; a single key is deferred."""
        if len(keys) == 1:
            return _Tally(deferred=1)
        middle = len(keys) // 2
        tally = self._delete_batch(keys[:middle])
        tally.add(self._delete_batch(keys[middle:]))
        return tally

    def _may_delete(self, began: float, renewed: float, *, beat: bool = True) -> bool:
        """Whether a delete decided by reads from ``began`` on may still go out now.

        Within half the window of the reads (writers wait out the window),
        and within the delete deadline of the lease renewal that preceded
        them: a collection paused past its lease may be taken for dead by a
        writer, which then stops waiting for it (docs/gc.md). ``beat``: renew
        the lease when that is why not; the backend's threads, which ask
        before each request, leave it to the next batch rather than touch
        the marker many times at once.
        """
        now = self.clock.monotonic()
        report = self.report
        if now - began > report.window / 2:
            return False
        if now - renewed >= delete_deadline(report.lease, report.window):
            if beat:
                self._beat()  # the renewal thread fell behind: later batches may go
            return False
        return True

    def _beat(self) -> None:
        """Renew our marker if its renewal is due (the renewal thread normally does it).

        A renewal that fails is not an error: deletes wait for one that works.
        """
        with contextlib.suppress(CasError):
            self.lease.renew_if_due()

    def _marker_body(self) -> bytes:
        report = self.report
        return marker_body(
            grace=report.grace, window=report.window, dry_run=report.dry_run, lease=report.lease
        )


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
    repack: TensorCodec | None = None,
) -> GcReport:
    """Run one garbage collection; ``grace`` None means the store's setting.

    With ``repack`` (how the store codes tensor chunks), chunks that live
    versions need only as delta bases of deleted versions are first made
    unneeded (:mod:`cas.gc._repack`), so that this collection frees them if
    they are older than its grace, or a later one does.
    """
    repacked = None
    if repack is not None:
        from ._repack import Repacker
        from ._repack_plan import plan

        # A collection with no grace assumes nothing else reads or writes: the old
        # bases need not stay for readers, and go in this very collection.
        readers = grace is None or grace > 0
        repacker = Repacker(
            backend, repack, workers=workers, clock=clock, progress=progress, readers=readers
        )
        repacked = repacker.run(plan(Refs(backend), workers=workers), dry_run=dry_run)
    collector = Collector(
        backend, grace=grace, dry_run=dry_run, workers=workers, clock=clock, progress=progress
    )
    # A collection frees space: on a full device its marker may use the
    # reserve, which is set aside again once space is back.
    with backend.drawing_on_reserve():
        report = collector.run()
        report.repack = repacked
    backend.ensure_reserve()
    return report
