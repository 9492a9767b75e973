"""The figures that need manifests, read off the request path.

What a key or a version costs needs the chunks each of its versions keeps
alive, which only its manifest says, and the stored size of those chunks
(one listing of ``chunks/``). On a store of 10,000 versions reading every
manifest takes seconds, so a server reads them on a thread of its own: a
page asks for the manifests it needs, waits at most ``wait`` seconds, and
if they are not all read by then shows "computing…" where those figures
go. ``busy`` says whether that thread still has manifests to read; the
server's ``/changes`` answers it, and a page showing "computing…" reloads
itself once the thread is done.

Manifests are named by their hash and never change, so what is read is
kept, here and by the store (which shares it with ``Store.stats``).
A figure is therefore either shown right or not shown at all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import TYPE_CHECKING

from ..errors import IntegrityError

if TYPE_CHECKING:
    from ..store import Store

#: Manifests whose chunk sets are kept at most, the oldest dropped first (the sets
#: themselves are the store's, shared with ``Store.stats``).
MANIFEST_CACHE = 1_000_000
#: Manifests read between two looks at what pages wait for.
SLICE = 64


class Figures:
    """What each manifest keeps alive and what each chunk costs, read by one thread.

    ``wait``: how long a page waits for manifests it needs; None waits until
    they are read (a report, which cannot fill figures in later).
    """

    def __init__(self, store: Store, wait: float | None) -> None:
        self.store = store
        self.wait = wait
        self._cond = threading.Condition()
        self._needs: dict[str, frozenset[bytes]] = {}  # manifest id -> raw digests it keeps alive
        self._damaged: set[str] = set()  # missing or damaged when last read: count as nothing
        self._queue: dict[str, None] = {}  # manifests asked for and not read yet, first first
        self._reading = False  # whether the thread runs
        self._failure: Exception | None = None  # what stopped the thread, for the next page
        self._sizes: dict[bytes, int] = {}  # stored size by raw chunk digest, as last listed
        self._listing = 0  # listings of the chunks under way

    @property
    def busy(self) -> bool:
        """Whether manifests asked for are still being read."""
        with self._cond:
            return self._reading or bool(self._queue)

    def needs(self, manifest_ids: Collection[str]) -> dict[str, frozenset[bytes]] | None:
        """The raw digests each manifest keeps alive (its chunks and their delta bases),
        or None if they are not all read within ``wait``.

        A missing or damaged manifest counts as needing nothing (``cas verify``
        names it); it is read again each time it is asked for, as a repair may
        have healed it. A failure of the store while reading is raised here,
        to the next page that asks, and the next ask after it reads again.
        """
        wanted = set(manifest_ids)
        with self._cond:
            self._raise_failure()
            self._ask(wanted)
            deadline = None if self.wait is None else time.monotonic() + self.wait
            while self._unresolved(wanted) and self._failure is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            self._raise_failure()
            return {m: self._needs.get(m, frozenset()) for m in wanted}

    def read_soon(self, manifest_ids: Collection[str]) -> None:
        """Start reading those of ``manifest_ids`` not read yet, and return at once."""
        with self._cond:
            self._ask(set(manifest_ids))

    def sizes(self, wanted: Iterable[frozenset[bytes]]) -> Mapping[bytes, int]:
        """Stored size by raw chunk digest, listed again if a wanted chunk is not known yet."""
        wanted = list(wanted)
        with self._cond:
            while self._listing:  # one is under way: wait for it rather than list twice
                self._cond.wait()
            known = self._sizes
        if any(not chunks <= known.keys() for chunks in wanted):
            with self._cond:
                self._listing += 1
            known = self._list_sizes()
        return known

    # -- the reading thread -------------------------------------------------------------

    def _ask(self, wanted: set[str]) -> None:
        again = sorted((wanted - self._needs.keys()) | (wanted & self._damaged))
        if again:
            self._queue = dict.fromkeys([*again, *self._queue])  # the latest asked first
            if not self._reading:
                self._reading = True
                threading.Thread(target=self._run, name="cas-ui-figures", daemon=True).start()

    def _unresolved(self, wanted: set[str]) -> bool:
        return bool(wanted - self._needs.keys() - self._damaged)

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _run(self) -> None:
        read: list[frozenset[bytes]] = []
        try:
            with ThreadPoolExecutor(max(1, self.store.workers), "cas-ui") as pool:
                with self._cond:
                    first = not self._sizes and not self._listing
                    self._listing += first
                if first:  # beside the manifests: most chunks they name are there already
                    pool.submit(self._list_sizes)
                while True:
                    batch = self._next_slice()
                    if batch:
                        found = list(pool.map(self._read_one, batch))
                        read += [chunks for chunks in found if chunks is not None]
                        self._keep(batch, found)
                        continue
                    self.sizes(read)  # list chunks again if the manifests named new ones
                    read = []
                    with self._cond:
                        if not self._queue:  # else more was asked for while listing
                            self._reading = False
                            self._cond.notify_all()
                            return
        except Exception as err:  # the store failed: the next page that asks says so
            with self._cond:
                self._failure = err
                self._queue.clear()
                self._reading = False
                self._cond.notify_all()

    def _next_slice(self) -> list[str]:
        with self._cond:
            batch = list(islice(self._queue, SLICE))
            for manifest_id in batch:
                del self._queue[manifest_id]
            return batch

    def _read_one(self, manifest_id: str) -> frozenset[bytes] | None:
        try:
            return self.store.live_chunks(manifest_id)
        except IntegrityError:
            return None

    def _keep(self, batch: list[str], found: list[frozenset[bytes] | None]) -> None:
        with self._cond:
            for manifest_id, chunks in zip(batch, found, strict=True):
                if chunks is None:
                    self._damaged.add(manifest_id)
                else:
                    self._damaged.discard(manifest_id)
                    self._needs[manifest_id] = chunks
            for oldest in list(islice(self._needs, max(0, len(self._needs) - MANIFEST_CACHE))):
                del self._needs[oldest]
            self._cond.notify_all()

    def _list_sizes(self) -> dict[bytes, int]:
        """List the chunks; the caller counted this listing in ``_listing``."""
        try:
            listed = {bytes.fromhex(h): size for h, size in self.store.chunk_sizes().items()}
            with self._cond:
                self._sizes = listed
            return listed
        finally:
            with self._cond:
                self._listing -= 1
                self._cond.notify_all()
