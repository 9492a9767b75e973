"""The writers' side of garbage collection without locks (docs/gc.md has the proof).

A collection deletes an unreachable object only when its modification time,
on the backend's clock, is older than the collection's start minus the grace
period. A put keeps every object it will reference younger than that until
its version ref is created:

* it reads "now" on the backend's clock by touching and reading back a
  marker of its own, ``gc/puts/<id>``: the clock that stamps the objects is
  the only one compared with their times, so local clock skew cannot matter;
* it touches each reused object older than ``grace/2`` (the chunk store
  does that, given the put's reference time), renews its reference time every
  ``grace/4`` and touches again what aged meanwhile;
* right before the commit it reads the backend's clock once more and makes
  sure everything is younger than ``3/4 grace``, so the commit has ``grace/4``
  to land;
* a touch cannot save an object that a running collection already saw with
  its old time and is about to delete (the delete is unconditional). A put
  that touched an object already older than the grace therefore checks for
  running collections (``gc/runs/*``), waits out their deletion window (or
  until their lease has run out, :mod:`cas.gc._lease`), and reads the
  object again; if it is gone, the put aborts with
  :class:`ConcurrentCollectionError` and nothing is committed;
* the commit must land within ``grace/4`` of that last check: a put paused
  past it checks again, and one whose commit landed late confirms it or
  turns it into a tombstone (:meth:`WriteSession.commit`).

The grace writers use lives in ``gc/settings`` so that writers and
collections agree on it; without that object it is :data:`DEFAULT_GRACE`.
"""

from __future__ import annotations

import math
import os
import platform
import threading
import uuid
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from ..backends.base import Backend
from ..chunks._store import PutResult
from ..digest import Digest
from ..errors import ConcurrentCollectionError, InvalidInputError, NotFoundError
from ..repository import _layout as layout
from ..repository._manifest import canonical_json
from ..repository._refs import utc_now
from ._clock import SYSTEM_CLOCK, Clock
from ._lease import PUTS, RUNS, Collection, Lease, iter_collections
from ._settings import (
    DEFAULT_GRACE,
    SETTINGS_KEY,
    GcSettings,
    read_settings,
    write_settings,
)

#: Longest time a collection may take between reading an object's time and
#: deleting it; writers that touched a very old object wait this long.
DEFAULT_WINDOW = 30.0
#: A put renews its reference time after this fraction of the grace.
RENEW_FRACTION = 0.25
#: Before the commit every object must be younger than this fraction of the grace.
COMMIT_FRACTION = 0.75
_MAX_ROUNDS = 8
T = TypeVar("T")

__all__ = [
    "DEFAULT_GRACE",
    "PUTS",
    "RUNS",
    "SETTINGS_KEY",
    "SYSTEM_CLOCK",
    "Clock",
    "GcSettings",
    "WriteSession",
    "deletion_window",
    "marker_body",
    "read_settings",
    "running_collections",
    "write_settings",
]


def deletion_window(grace: float) -> float:
    """The window of a collection with ``grace``: short next to the grace, and positive."""
    return DEFAULT_WINDOW if grace <= 0 else min(DEFAULT_WINDOW, grace / 8)


def marker_body(**fields: object) -> bytes:
    # platform.node() is gethostname() without importing socket, which cost
    # every put start-up time for one string (zstandard loads platform anyway;
    # docs/performance.md, "What changed, and what each change measured").
    return canonical_json(
        {"host": platform.node(), "pid": os.getpid(), "started": utc_now(), **fields}
    )


def running_collections(backend: Backend) -> list[Collection]:
    """Every collection that may delete something: not dry runs, and not finished.

    Dead ones are included: whether a marker has expired depends on "now",
    which the caller has.
    """
    found = iter_collections(backend, RUNS, DEFAULT_WINDOW)
    return [collection for collection in found if not collection.dry_run]


# -- the put's session --------------------------------------------------------------------


# Not slots: frozen slotted dataclasses do not unpickle on Python 3.10, and
# these cross from one process to another.
@dataclass(frozen=True)
class SessionRecords:
    """What one session keeps younger than the grace, for a session in another process.

    A version written by several processes is committed by one of them: the
    others hand it what they stored and reused, with the lower bounds of
    their times, and the committing session keeps all of it young as if it
    had been its own (docs/gc.md). Plain bytes and strings, so it pickles.
    """

    digests: bytes  # 32 bytes per object: its chunk's digest, zeros for a keyed object
    keys: tuple[str, ...]  # the key of an object that is not a chunk, else ""
    lower: bytes  # array("d") of lower bounds of the objects' times
    prior: bytes  # array("d") of times before a touch not yet known safe (NaN if none)


class WriteSession:
    """Everything one put writes or reuses, kept younger than the grace until the commit.

    Thread-safe: the ingest workers report chunks concurrently. Memory is 48
    bytes per distinct chunk of the put, in flat arrays.
    """

    def __init__(self, backend: Backend, *, clock: Clock = SYSTEM_CLOCK, workers: int = 8) -> None:
        self.backend = backend
        self.clock = clock
        self.workers = max(1, workers)
        self.marker = f"{PUTS}{uuid.uuid4().hex}"
        self.lease = Lease(backend, self.marker, marker_body, clock=clock)
        self.grace = DEFAULT_GRACE
        self._lock = threading.RLock()
        # Per object: its key's digest (chunks) or its key (other objects),
        # a lower bound of its modification time, and its time before our
        # first touch when we touched it (NaN otherwise), until that touch
        # is known to have beaten every running collection.
        self._digests = bytearray()
        self._keys: list[str] = []
        self._lower = array("d")
        self._prior = array("d")
        self._reference = 0.0
        self._reference_mono = 0.0
        # Local monotonic time just after the last read of the backend's clock.
        self._read_done = 0.0

    @property
    def refresh_after(self) -> float:
        """Reused objects older than this are touched (DESIGN: ``grace/2``)."""
        return self.grace / 2

    def start(self) -> WriteSession:
        """Write the marker (its lease renewed from now on) and read the backend's clock."""
        mono = self.clock.monotonic()
        self.lease.acquire()
        now = self.backend.stat(self.marker).mtime  # just written: no touch needed
        self._read_settings()
        self._reference, self._reference_mono = now, mono
        self._read_done = self.clock.monotonic()
        return self

    def close(self) -> None:
        """Stop renewing and remove the marker. A put that dies leaves it to expire."""
        self.lease.release()

    def _now(self) -> tuple[float, float]:
        """(the backend's clock now, local monotonic time just before reading it)."""
        # Touching the marker renews it; a collection that took it for a dead
        # put's (we were paused past the lease) has it recreated.
        now, before, self._read_done = self.lease.now()
        self._read_settings()
        return now, before

    def _read_settings(self) -> None:
        settings = read_settings(self.backend)
        self.grace = settings.grace
        self.lease.length = settings.lease

    # -- during the put ---------------------------------------------------------------

    def reference_time(self) -> float:
        """The put's "now" on the backend's clock, renewed every grace/4."""
        with self._lock:
            elapsed = self.clock.monotonic() - self._reference_mono
            if elapsed > self.grace * RENEW_FRACTION:
                now, mono = self._now()
                self._refresh(now)
                self._reference, self._reference_mono = now, mono
            return self._reference

    def observe(self, result: PutResult) -> None:
        """Record a chunk the put stored or reused (the ingest observer)."""
        lower = result.mtime if result.mtime is not None else self._reference
        prior = result.prior_mtime if result.prior_mtime is not None else math.nan
        with self._lock:
            self._digests += result.digest.raw
            self._keys.append("")
            self._lower.append(lower)
            self._prior.append(prior)

    def adopt(self, key: str) -> None:
        """Record an object written or found outside the chunk store (the manifest)."""
        reference = self.reference_time()
        try:
            info = self.backend.stat(key)
        except NotFoundError:
            raise ConcurrentCollectionError(
                f"{key} vanished right after it was written; nothing was committed"
            ) from None
        prior = math.nan
        lower = info.mtime
        if reference - info.mtime > self.refresh_after:
            self._touch(key)
            lower, prior = reference, info.mtime
        with self._lock:
            self._digests += bytes(32)
            self._keys.append(key)
            self._lower.append(lower)
            self._prior.append(prior)

    def export(self) -> SessionRecords:
        """Everything this session recorded, for the session that will commit."""
        with self._lock:
            return SessionRecords(
                bytes(self._digests),
                tuple(self._keys),
                self._lower.tobytes(),
                self._prior.tobytes(),
            )

    def absorb(self, records: SessionRecords) -> None:
        """Keep what another session recorded young too, until this one commits."""
        lower, prior = array("d"), array("d")
        lower.frombytes(records.lower)
        prior.frombytes(records.prior)
        count = len(records.keys)
        if len(records.digests) != 32 * count or len(lower) != count or len(prior) != count:
            raise InvalidInputError("a write session's records do not line up")
        with self._lock:
            self._digests += records.digests
            self._keys.extend(records.keys)
            self._lower.extend(lower)
            self._prior.extend(prior)

    # -- before the commit ------------------------------------------------------------

    def before_commit(self) -> None:
        """Make the commit safe, or raise ConcurrentCollectionError having committed nothing."""
        with self._lock:
            for _ in range(_MAX_ROUNDS):
                now, mono = self._now()
                if any(now - low > self.grace * COMMIT_FRACTION for low in self._lower):
                    self._refresh(now)
                    continue  # the refresh took time: read the clock again
                risky = [i for i, p in enumerate(self._prior) if p < now - self.grace]
                if risky:
                    self._resolve(risky, mono, now)
                    continue
                self._reference, self._reference_mono = now, mono
                return
        raise self._too_slow()

    def _too_slow(self) -> ConcurrentCollectionError:
        return ConcurrentCollectionError(
            f"this put could not bring its objects within the grace period "
            f"({self.grace:g}s) in {_MAX_ROUNDS} rounds; the grace is too short for this "
            "store's speed. Nothing was committed."
        )

    def _key(self, index: int) -> str:
        key = self._keys[index]
        if key:
            return key
        raw = bytes(self._digests[index * 32 : index * 32 + 32])
        return layout.chunk_key(Digest(raw))

    def _touch(self, key: str) -> None:
        try:
            self.backend.touch(key)
        except NotFoundError:
            raise self._lost(key) from None

    @staticmethod
    def _lost(key: str) -> ConcurrentCollectionError:
        return ConcurrentCollectionError(
            f"{key} was removed by a garbage collection while this put was reusing it; "
            "nothing was committed, run the put again"
        )

    def _parallel(self, action: Callable[[int], None], indexes: list[int]) -> None:
        if len(indexes) <= 1:
            for index in indexes:
                action(index)
            return
        with ThreadPoolExecutor(min(self.workers, len(indexes)), "cas-gc-refresh") as pool:
            for _ in pool.map(action, indexes):
                pass

    def _refresh(self, now: float) -> None:
        """Read again every object older than grace/2 and touch those that really are."""
        stale = [i for i, low in enumerate(self._lower) if now - low > self.refresh_after]

        def refresh(index: int) -> None:
            key = self._key(index)
            try:
                mtime = self.backend.stat(key).mtime
            except NotFoundError:
                raise self._lost(key) from None
            if now - mtime > self.refresh_after:
                self._touch(key)
                self._lower[index] = now
                if math.isnan(self._prior[index]):
                    self._prior[index] = mtime
            else:
                self._lower[index] = mtime

        self._parallel(refresh, stale)

    def _resolve(self, risky: list[int], mono: float, now: float) -> None:
        """Make sure touches of very old objects beat every collection that may have seen them.

        A collection deletes an object at most its window after reading its
        time, and only while its lease holds: every delete it sends lands
        before its marker, as last renewed, is a lease old. Every touch here
        happened before ``mono``; once every running collection's window has
        passed since then, or its lease has run out, the objects are either
        gone (we abort) or safe. A collection that finished has removed its
        marker after its last delete, so reading the objects now is enough.
        """
        waits = [0.0]
        for collection in running_collections(self.backend):
            by_window = mono + collection.window
            # ``now`` was read before _read_done: the backend's clock is past
            # it then, so the lease's end is at most this far away.
            by_lease = self._read_done + (collection.mtime + collection.lease - now)
            waits.append(min(by_window, by_lease) - self.clock.monotonic())
        if max(waits) > 0:
            self.clock.sleep(max(waits))

        def check(index: int) -> None:
            key = self._key(index)
            try:
                self.backend.stat(key)
            except NotFoundError:
                raise self._lost(key) from None
            self._prior[index] = math.nan

        self._parallel(check, risky)

    # -- the commit -------------------------------------------------------------------

    def commit(self, write: Callable[[], T], undo: Callable[[T], None]) -> T:
        """Write the commit while the last check holds; undo it if it landed too late.

        The check leaves ``grace/4`` for the commit to land. A put paused
        (or slowed) since then checks again before writing; one paused
        between that check and the write finds out from the time the write
        returned, makes sure of every object the version names, and if one
        is gone undoes the commit (a tombstone) and raises
        ConcurrentCollectionError: nothing it committed stays damaged.
        """
        budget = self.grace * (1 - COMMIT_FRACTION)
        for _ in range(_MAX_ROUNDS):
            if self.clock.monotonic() - self._reference_mono < budget:
                break
            self.before_commit()
        else:
            raise self._too_slow()
        result = write()
        if self.clock.monotonic() - self._reference_mono >= budget:
            try:
                self._confirm_late_commit()
            except ConcurrentCollectionError:
                undo(result)
                raise
        return result

    def _confirm_late_commit(self) -> None:
        """After a commit that may have landed late: is every object it names still there?

        Touching them all makes them young for any collection that reads
        them from now on; waiting out the collections that may have read
        them before, and reading them again, tells whether one was taken.
        """
        with self._lock:
            everything = list(range(len(self._lower)))
            self._parallel(lambda index: self._touch(self._key(index)), everything)
            now, mono = self._now()
            self._resolve(everything, mono, now)
