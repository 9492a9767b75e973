"""Saves that do not stall training: uploads on worker threads, within a memory budget.

A background save is two halves. The caller's half copies what it saves
(tensors to host memory, or a checkpoint folder by hard links) and returns;
the worker's half writes the copy into the store. :class:`BackgroundUploader`
runs the second halves:

- one upload per key at a time, in the order they were submitted, so each
  version's parent is the one saved before it;
- the host copies together stay within ``memory_budget`` bytes: a save that
  would exceed it waits until earlier uploads finish, instead of growing;
- a failed upload is never silent: the next :meth:`check` (every save calls
  it), :meth:`wait` and interpreter exit raise
  :class:`~cas.errors.BackgroundSaveError`, chained to the cause.

When the interpreter shuts down, the uploads still pending are waited for
(a checkpoint is not dropped because the script ended), and a failure among
them is raised at exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import BackgroundSaveError, InvalidInputError
from ..units import format_size

log = logging.getLogger("cas.background")

T = TypeVar("T")

#: Used when the machine's memory cannot be read.
FALLBACK_MEMORY_BUDGET = 4 << 30


def default_memory_budget() -> int:
    """A quarter of the machine's physical memory: room for a few snapshots of a model."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return FALLBACK_MEMORY_BUDGET
    return max(total // 4, 1 << 20)


@dataclass
class _Job:
    label: str
    run: Callable[[], Any] | None
    hold: int
    future: Future[Any] = field(default_factory=Future)


class BackgroundUploader:
    """Runs upload jobs on worker threads: in order per key, within a memory budget."""

    def __init__(self, memory_budget: int | None = None) -> None:
        budget = default_memory_budget() if memory_budget is None else memory_budget
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise InvalidInputError(f"memory_budget must be a number of bytes >= 1, got {budget!r}")
        self.memory_budget = budget
        #: Bytes of host copies held now, and the most ever held at once.
        self.held_bytes = 0
        self.peak_held_bytes = 0
        self._cond = threading.Condition()
        self._queues: dict[str, deque[_Job]] = {}
        self._failures: list[BackgroundSaveError] = []
        _live.add(self)

    # -- the caller's side -----------------------------------------------------------

    def check(self) -> None:
        """Raise the first failure no one has been told of yet (and forget it)."""
        with self._cond:
            if not self._failures:
                return
            failure, *others = self._failures
            self._failures.clear()
        if others:
            # Each was logged when it happened; one exception says how many there were.
            more = BackgroundSaveError(f"{failure} (and {len(others)} later background saves)")
            more.__cause__ = failure.__cause__
            failure = more
        raise failure

    def reserve(self, nbytes: int, what: str) -> None:
        """Claim ``nbytes`` of the budget for a host copy; wait while it is full."""
        if nbytes > self.memory_budget:
            raise InvalidInputError(
                f"{what} needs {format_size(nbytes)} of host memory for a background save, "
                f"more than the budget of {format_size(self.memory_budget)}; "
                "give a larger memory_budget or save in the foreground"
            )
        with self._cond:
            while self.held_bytes + nbytes > self.memory_budget:
                self._cond.wait()
            self.held_bytes += nbytes
            self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.held_bytes -= nbytes
            self._cond.notify_all()

    def submit(self, key: str, label: str, run: Callable[[], T], *, hold: int = 0) -> Future[T]:
        """Queue ``run`` behind the jobs of ``key``; release ``hold`` reserved bytes after it."""
        job = _Job(label, run, hold)
        with self._cond:
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = deque()
                threading.Thread(
                    target=self._drain, args=(key,), name=f"cas-save {key}", daemon=True
                ).start()
            queue.append(job)
        return job.future

    def pending(self, key: str | None = None) -> int:
        """Jobs queued or running, for ``key`` or for all keys."""
        with self._cond:
            if key is not None:
                return len(self._queues.get(key, ()))
            return sum(len(q) for q in self._queues.values())

    def wait_below(self, key: str, limit: int) -> None:
        """Wait until fewer than ``limit`` jobs of ``key`` are queued or running."""
        with self._cond:
            while len(self._queues.get(key, ())) >= limit:
                self._cond.wait()

    def wait(self, key: str | None = None) -> None:
        """Wait for the jobs of ``key`` (or of every key), then raise any failure not yet raised."""
        if key is None:
            self._wait_all()
        else:
            self.wait_below(key, 1)
        self.check()

    def _wait_all(self) -> None:
        with self._cond:
            while self._queues:
                self._cond.wait()

    # -- the workers' side ------------------------------------------------------------

    def _drain(self, key: str) -> None:
        while True:
            with self._cond:
                queue = self._queues[key]
                job = queue[0]
            self._run(job)
            with self._cond:
                queue.popleft()
                if not queue:
                    del self._queues[key]
                self._cond.notify_all()
                if key not in self._queues:
                    return

    def _run(self, job: _Job) -> None:
        assert job.run is not None
        try:
            job.future.set_result(job.run())
        except BaseException as err:  # every failure must reach the caller
            failure = BackgroundSaveError(f"background save of {job.label} failed: {err}")
            failure.__cause__ = err
            log.error("%s", failure)
            with self._cond:
                self._failures.append(failure)
            job.future.set_exception(failure)
        finally:
            # Drop the job's copy before the budget says it is free.
            job.run = None
            if job.hold:
                self.release(job.hold)


_live: weakref.WeakSet[BackgroundUploader] = weakref.WeakSet()
_unreported: list[BackgroundSaveError] = []


def _finish_pending() -> None:
    # Daemon workers would die with the interpreter: finish what was queued.
    for uploader in list(_live):
        try:
            uploader.wait()
        except BackgroundSaveError as err:
            _unreported.append(err)


@atexit.register
def _raise_unreported() -> None:
    # A failure that no one was told of is raised here, for Python to print.
    if _unreported:
        raise _unreported[0]


# Pending uploads finish when the interpreter starts to shut down, as the
# standard thread pools do: before the atexit handlers, which may remove the
# temporary folders an upload still reads.
_register = getattr(threading, "_register_atexit", atexit.register)
_register(_finish_pending)
