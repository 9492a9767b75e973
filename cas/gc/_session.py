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
  running collections (``gc/runs/*``), waits out their deletion window, and
  reads the object again; if it is gone, the put aborts with
  :class:`ConcurrentCollectionError` and nothing is committed.

The grace writers use lives in ``gc/settings`` so that writers and
collections agree on it; without that object it is :data:`DEFAULT_GRACE`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import threading
import time
import uuid
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..backends.base import Backend
from ..chunks._store import PutResult
from ..digest import Digest
from ..errors import (
    CasError,
    ConcurrentCollectionError,
    InvalidInputError,
    NotFoundError,
    PreconditionFailedError,
)
from ..repository import _layout as layout
from ..repository._manifest import canonical_json
from ..repository._refs import utc_now

#: Default grace period: long enough for any put to finish many times over.
DEFAULT_GRACE = 6 * 3600.0
#: Longest time a collection may take between reading an object's time and
#: deleting it; writers that touched a very old object wait this long.
DEFAULT_WINDOW = 30.0
SETTINGS_KEY = f"{layout.GC}settings"
RUNS = f"{layout.GC}runs/"
PUTS = f"{layout.GC}puts/"
#: A put renews its reference time after this fraction of the grace.
RENEW_FRACTION = 0.25
#: Before the commit every object must be younger than this fraction of the grace.
COMMIT_FRACTION = 0.75
_MAX_ROUNDS = 8


class Clock:
    """Local elapsed time and sleeping; tests swap in a fake one.

    Only durations are measured with it, never instants that are compared
    with object times: those come from the backend.
    """

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


SYSTEM_CLOCK = Clock()


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


# -- settings ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GcSettings:
    """The grace writers refresh against, and the one before its last change."""

    grace: float = DEFAULT_GRACE
    previous: float | None = None
    #: Backend time of the last change (the settings object's mtime), if known.
    changed: float | None = None

    def safe_grace(self, now: float) -> float:
        """The shortest grace a collection starting at ``now`` may use while puts run.

        Puts read the setting when they start and again every grace/4, so for
        a while after the grace was lowered some of them still work with the
        old one; until half the old grace has passed, the old one is the floor.
        """
        recent = (
            self.previous is not None
            and self.changed is not None
            and now - self.changed < self.previous / 2
        )
        return max(self.grace, self.previous or 0.0) if recent else self.grace


def _parse_settings(blob: bytes) -> tuple[float, float | None]:
    try:
        data = json.loads(blob)
        grace = float(data["grace"])
        previous = data.get("previous")
        return grace, None if previous is None else float(previous)
    except (ValueError, KeyError, TypeError) as err:
        raise CasError(f"{SETTINGS_KEY} is malformed ({err})") from None


def read_settings(backend: Backend, *, with_time: bool = False) -> GcSettings:
    """The store's settings (defaults when never set); ``with_time`` also reads their mtime."""
    try:
        blob = backend.get(SETTINGS_KEY)
        changed = backend.stat(SETTINGS_KEY).mtime if with_time else None
    except NotFoundError:
        return GcSettings()
    grace, previous = _parse_settings(blob)
    return GcSettings(grace, previous, changed)


def write_settings(backend: Backend, grace: float) -> GcSettings:
    """Set the grace writers use; compare-and-swap so concurrent changes are not lost."""
    if not math.isfinite(grace) or grace <= 0:
        raise InvalidInputError.naming(
            "the store's grace must be more than 0 seconds; "
            "for one collection without writers use {grace_zero}",
            grace_zero="gc(grace=0)",
        )
    while True:
        try:
            blob, token = backend.get_versioned(SETTINGS_KEY)
        except NotFoundError:
            blob, token = b"", None
        old_grace, old_previous = _parse_settings(blob) if token else (DEFAULT_GRACE, None)
        # Keep the larger of the older values: collections use it as a floor
        # until it can no longer matter (see GcSettings.safe_grace).
        previous = max(old_grace, old_previous or 0.0)
        body = canonical_json({"grace": grace, "previous": previous, "set": utc_now()})
        try:
            if token is None:
                backend.put(SETTINGS_KEY, body, if_absent=True)
            else:
                backend.put(SETTINGS_KEY, body, if_match=token)
        except (PreconditionFailedError, FileExistsError):
            continue  # someone else changed it meanwhile: apply ours on top
        backend.flush()
        break
    # A put writes its marker before it reads the setting, so if no marker
    # exists now, no put can still be working with the old value: the floor
    # is not needed (a put starting from here on reads the new one).
    if next(iter(backend.list_objects(PUTS)), None) is None:
        with contextlib.suppress(PreconditionFailedError, NotFoundError):
            _, token = backend.get_versioned(SETTINGS_KEY)
            body = canonical_json({"grace": grace, "previous": None, "set": utc_now()})
            backend.put(SETTINGS_KEY, body, if_match=token)
    return read_settings(backend, with_time=True)


def running_collections(backend: Backend) -> Iterator[tuple[str, float]]:
    """(marker key, deletion window) of every collection that may delete something."""
    for info in backend.list_objects(RUNS):
        try:
            data = json.loads(backend.get(info.key))
            if data.get("dry_run") is True:
                continue  # a dry run deletes nothing
            window = float(data.get("window", DEFAULT_WINDOW))
        except NotFoundError:
            continue  # it finished while we listed: its deletions are over
        except (ValueError, TypeError, AttributeError):
            window = DEFAULT_WINDOW
        yield info.key, window


# -- the put's session --------------------------------------------------------------------


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

    @property
    def refresh_after(self) -> float:
        """Reused objects older than this are touched (DESIGN: ``grace/2``)."""
        return self.grace / 2

    def start(self) -> WriteSession:
        self.backend.put(self.marker, marker_body())
        self._reference, self._reference_mono = self._now()
        return self

    def close(self) -> None:
        """Remove the marker. A put that dies leaves it; collections remove old ones."""
        with contextlib.suppress(CasError):
            self.backend.delete([self.marker])

    def _now(self) -> tuple[float, float]:
        """(the backend's clock now, local monotonic time just before reading it)."""
        mono = self.clock.monotonic()
        try:
            self.backend.touch(self.marker)
        except NotFoundError:
            # A collection took our marker for a dead put's: we are alive.
            self.backend.put(self.marker, marker_body())
        now = self.backend.stat(self.marker).mtime
        self.grace = read_settings(self.backend).grace
        return now, mono

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
                    self._resolve(risky, mono)
                    continue
                self._reference, self._reference_mono = now, mono
                return
        raise ConcurrentCollectionError(
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

    def _resolve(self, risky: list[int], mono: float) -> None:
        """Make sure touches of very old objects beat every collection that may have seen them.

        A collection deletes an object at most its window after reading its
        time. Every touch here happened before ``mono``; after that plus the
        window of every running collection, the objects are either gone (we
        abort) or safe. A collection that finished has removed its marker
        after its last delete, so reading the objects now is enough.
        """
        windows = [window for _, window in running_collections(self.backend)]
        if windows:
            remaining = mono + max(windows) - self.clock.monotonic()
            if remaining > 0:
                self.clock.sleep(remaining)

        def check(index: int) -> None:
            key = self._key(index)
            try:
                self.backend.stat(key)
            except NotFoundError:
                raise self._lost(key) from None
            self._prior[index] = math.nan

        self._parallel(check, risky)
