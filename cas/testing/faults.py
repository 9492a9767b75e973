"""A Backend wrapper that fails on purpose and counts what it is asked.

What a failure leaves behind is the part of a store's behaviour that is
hardest to test against a real service: the service would have to fail at
the right moment. This wrapper does it on demand::

    flaky = FaultyBackend(backend, fail_on={"put"}, prefix="chunks/", after=10)
    Store(flaky, config).put(path, "key")  # BackendError after ten chunk uploads

The error is the one a backend raises for a service failure
(:class:`~cas.errors.BackendError`, transient unless told otherwise), so
everything above the backend sees what it would see of a real outage.
:attr:`FaultyBackend.calls` counts requests by operation, so a test can also
check how many of them a put made.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import TypeVar

from ..backends import Backend, DelegatingBackend
from ..errors import BackendError

T = TypeVar("T")

OPERATIONS = frozenset(
    {"put", "get", "get_versioned", "get_range", "stat", "list", "delete", "touch"}
)


class FaultyBackend(DelegatingBackend):
    """Delegates to ``inner``; fails the matching calls after the first ``after`` of them.

    A call matches when its operation is in ``fail_on`` and one of its keys
    starts with ``prefix``. Matching calls number ``after + 1`` onwards fail,
    ``times`` of them (None: every one until :meth:`disarm`).
    """

    def __init__(
        self,
        inner: Backend,
        *,
        fail_on: Collection[str] = (),
        prefix: str = "",
        after: int = 0,
        times: int | None = None,
        transient: bool = True,
        message: str = "injected fault",
    ) -> None:
        unknown = set(fail_on) - OPERATIONS
        if unknown:
            raise ValueError(f"unknown operations {sorted(unknown)}; known: {sorted(OPERATIONS)}")
        super().__init__(inner)
        self.fail_on = frozenset(fail_on)
        self.prefix = prefix
        self.after = after
        self.times = times
        self.transient = transient
        self.message = message
        #: Calls by operation, failed ones included.
        self.calls: Counter[str] = Counter()
        #: Keys of the calls by operation (a listing records its prefix).
        self.keys: dict[str, list[str]] = {op: [] for op in OPERATIONS}
        self.matched = 0
        self.failures = 0
        self._lock = threading.Lock()

    def disarm(self) -> None:
        """Let every call through from now on (counting goes on)."""
        with self._lock:
            self.fail_on = frozenset()

    def reset_counts(self) -> None:
        with self._lock:
            self.calls.clear()
            for keys in self.keys.values():
                keys.clear()

    def _enter(self, op: str, keys: Sequence[str]) -> None:
        with self._lock:
            self.calls[op] += 1
            self.keys[op].extend(keys)
            if op not in self.fail_on or not any(k.startswith(self.prefix) for k in keys):
                return
            self.matched += 1
            if self.matched <= self.after:
                return
            if self.times is not None and self.failures >= self.times:
                return
            self.failures += 1
        raise BackendError(
            f"{self.message}: {op} {', '.join(keys[:3])} on {self.uri}", is_transient=self.transient
        )

    def _call(self, op: str, keys: Sequence[str], request: Callable[[], T]) -> T:
        self._enter(op, keys)
        return request()
