"""A bound on the chunks a pipeline holds at once, by count and by bytes.

A count alone bounds memory only as well as the chunk size does: the same
24 chunks are 24 MiB on a store of 1 MiB chunks and 384 MiB on one whose
chunks reach 16 MiB. Whichever limit is reached first makes the producer
wait.
"""

from __future__ import annotations

import threading

#: Raw chunk bytes a put or a get keeps in flight at most (their encodings
#: come on top). Sixteen 4 MiB chunks: enough to keep an object store's
#: parallel requests busy.
IN_FLIGHT_BYTES = 64 << 20


class InFlight:
    """Admits work of a given size while both limits hold; one item always fits."""

    def __init__(self, count: int, nbytes: int | None = None) -> None:
        nbytes = IN_FLIGHT_BYTES if nbytes is None else nbytes
        if count < 1 or nbytes < 1:
            raise ValueError("limits must be positive")
        self.count = count
        self.nbytes = nbytes
        self._items = 0
        self._bytes = 0
        self._changed = threading.Condition()

    def _fits(self, size: int) -> bool:
        if self._items == 0:
            return True  # a chunk above the byte limit must still get through, alone
        return self._items < self.count and self._bytes + size <= self.nbytes

    def acquire(self, size: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._fits(size))
            self._items += 1
            self._bytes += size

    def full(self, size: int) -> bool:
        """True if ``size`` more bytes would have to wait (for a caller that drains itself)."""
        with self._changed:
            return not self._fits(size)

    def release(self, size: int) -> None:
        with self._changed:
            self._items -= 1
            self._bytes -= size
            self._changed.notify_all()

    @property
    def held(self) -> tuple[int, int]:
        """(items, bytes) in flight now."""
        with self._changed:
            return self._items, self._bytes
