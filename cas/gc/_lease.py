"""Leases: how a running put or collection shows it is alive, and how others see it died.

A put keeps a marker ``gc/puts/<id>`` and a collection a marker
``gc/runs/<id>``. While it runs, a process renews its marker (touches it)
every sixth of its *lease*, on a thread of its own, so the marker's
modification time on the backend's clock is never more than a lease old.
Anyone who reads the backend's clock and finds a marker more than its lease
older than that takes the marker for the leftover of a dead process:
collections remove such markers, and puts stop waiting for such
collections. A collection's marker names its lease, so readers never need
to agree with it on one; a marker without a lease is from an older cas that
renewed it every minute, and is read as an hour-long lease, as that cas did.

Mistaking a live but slow put for a dead one is harmless: its marker is
only informative (and recreated at its next renewal); the put's safety
rests on the times of its objects and its check before the commit. A
collection must never be mistaken for dead while it can still delete, so it
sends a delete only if the renewal that preceded the reads deciding that
delete started less than :func:`delete_deadline` ago (local monotonic
time): a collection paused past its lease (SIGSTOP, a VM pause) finds its
deadline passed when it wakes and leaves its candidates for the next run.
docs/gc.md has the argument in full.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..backends.base import Backend
from ..errors import CasError, NotFoundError
from ..repository import _layout as layout
from ._clock import SYSTEM_CLOCK, Clock

#: Where running collections and puts keep their markers.
RUNS = f"{layout.GC}runs/"
PUTS = f"{layout.GC}puts/"

#: Lease of a put's or a collection's marker unless the store sets another.
DEFAULT_LEASE = 30.0
#: Shortest lease a store may set: a few renewals fit in it even on a
#: service that stamps whole seconds.
MIN_LEASE = 3.0
#: The lease a marker without one is read with: older cas touched its
#: collection marker every minute and removed markers an hour old.
LEGACY_LEASE = 3600.0
#: A marker is renewed this many times per lease.
RENEWALS = 6
#: Margin for coarse modification times: S3 and Azure stamp whole seconds,
#: so a marker may look up to a second older than its last renewal.
TIME_SLACK = 2.0


def lease_for_window(lease: float, window: float) -> float:
    """The lease of a collection with deletion window ``window``: at least ``lease``.

    Long enough that the delete deadline is a third of it or more, room for
    two renewals.
    """
    return max(lease, 0.75 * window + 1.5 * TIME_SLACK, MIN_LEASE)


def delete_deadline(lease: float, window: float) -> float:
    """How long after a renewal's start a collection may still send a delete.

    A delete lands at most ``window/2`` after it is sent (an assumption of
    the protocol), and the renewal's time may read up to TIME_SLACK early;
    so every delete lands before the marker can look expired to anyone.
    """
    return lease - window / 2 - TIME_SLACK


def expired(mtime: float, lease: float, now: float) -> bool:
    """Whether a marker of time ``mtime`` is dead at backend time ``now``."""
    return now - mtime > lease


@dataclass(frozen=True, slots=True)
class Collection:
    """A collection marker as readers see it."""

    key: str
    mtime: float
    #: How long after reading an object's time it may still delete it.
    window: float
    lease: float
    dry_run: bool


def read_collection(backend: Backend, key: str, mtime: float, window: float) -> Collection | None:
    """The collection whose marker is ``key``; None if it finished while we looked.

    A marker that cannot be parsed gets the defaults: ``window`` and the
    legacy lease, the cautious choice.
    """
    try:
        data = json.loads(backend.get(key))
    except NotFoundError:
        return None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return Collection(key, mtime, window, LEGACY_LEASE, dry_run=False)
    return Collection(
        key,
        mtime,
        _number(data.get("window"), window),
        _number(data.get("lease"), LEGACY_LEASE),
        dry_run=data.get("dry_run") is True,
    )


def _number(value: object, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return default


class Lease:
    """A marker object renewed on a thread while its owner works.

    ``renewed`` is the local monotonic time at which the last successful
    renewal started: the backend stamped the marker after that moment.
    """

    def __init__(
        self,
        backend: Backend,
        key: str,
        body: Callable[[], bytes],
        *,
        length: float = DEFAULT_LEASE,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.backend = backend
        self.key = key
        self.length = length
        self.clock = clock
        self.renewed = -math.inf
        self._body = body
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Write the marker and start renewing it."""
        started = self.clock.monotonic()
        self.backend.put(self.key, self._body())
        self._note(started)
        self._thread = threading.Thread(target=self._keep, name="cas-lease", daemon=True)
        self._thread.start()

    def renew(self) -> None:
        """Touch the marker now; recreate it if someone took it for a dead process's."""
        started = self.clock.monotonic()
        try:
            self.backend.touch(self.key)
        except NotFoundError:
            self.backend.put(self.key, self._body())
        self._note(started)

    def now(self) -> tuple[float, float, float]:
        """The backend's clock read through the marker (which renews it).

        Returns (backend time, monotonic time before the read, monotonic time
        after it): the backend time lies between the two.
        """
        before = self.clock.monotonic()
        self.renew()
        mtime = self.backend.stat(self.key).mtime
        return mtime, before, self.clock.monotonic()

    def age(self) -> float:
        """Local time since the last successful renewal started."""
        with self._lock:
            return self.clock.monotonic() - self.renewed

    def renew_if_due(self) -> None:
        """Renew from the owner's thread when the renewal thread has fallen behind."""
        if self.age() >= self.length / RENEWALS:
            self.renew()

    def release(self) -> None:
        """Stop renewing and remove the marker. A process that dies leaves it to expire."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(CasError):
            self.backend.delete([self.key])

    def _note(self, started: float) -> None:
        with self._lock:
            self.renewed = max(self.renewed, started)

    def _keep(self) -> None:
        while not self._stop.wait(self.length / RENEWALS):
            with contextlib.suppress(CasError):
                self.renew()  # a failed renewal is retried at the next tick


def iter_collections(backend: Backend, prefix: str, window: float) -> Iterator[Collection]:
    """Every collection marker under ``prefix``, read (those that vanish are skipped)."""
    for info in backend.list_objects(prefix):
        found = read_collection(backend, info.key, info.mtime, window)
        if found is not None:
            yield found
