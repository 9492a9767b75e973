"""The figures that need manifests, read off the request path.

What a key or a version costs needs the chunks each of its versions keeps
alive, which only its manifest says, and the stored size of those chunks
(one listing of ``chunks/``). On a store of 10,000 versions reading every
manifest takes seconds, so a server reads them, and lists the chunks, on a
thread of its own: a page asks for the manifests it needs, waits at most
``wait`` seconds, and if they are not all read (and their chunks listed) by
then shows "computing…" where those figures go. ``busy`` says whether that
thread still has work; the server's ``/changes`` answers it, and a page
showing "computing…" reloads itself once the thread is done.

Manifests are named by their hash and never change, so what is read is
kept, here and by the store (which shares it with ``Store.stats``). Chunk
sizes are listed again when a manifest names a chunk the last listing did
not have. A figure is therefore either shown right or not shown at all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
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

#: What each manifest asked for keeps alive (raw chunk digests), and stored sizes by
#: raw chunk digest (a chunk missing from the store counts as 0).
Read = tuple[dict[str, frozenset[bytes]], Mapping[bytes, int]]


class Figures:
    """What each manifest keeps alive and what each chunk costs, read by one thread.

    ``wait``: how long a page waits for what it needs; None waits until it
    is read (a report, which cannot fill figures in later).
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
        self._failures = 0  # times the thread stopped on a failure
        self._last_failure: Exception | None = None  # for the pages that waited on it
        self._sizes: dict[bytes, int] = {}  # stored size by raw chunk digest, as last listed
        self._lists_asked = 0  # listings of the chunks asked for, numbered
        self._begun = 0  # the number of the last asked for when the last listing began
        self._listed = 0  # and when the last listing done began

    @property
    def busy(self) -> bool:
        """Whether manifests or chunks asked for are still being read."""
        with self._cond:
            return self._reading or bool(self._queue)

    def read(self, manifest_ids: Collection[str]) -> Read | None:
        """What the manifests keep alive and what their chunks cost, or None if that is
        not all known within ``wait``.

        A missing or damaged manifest counts as needing nothing (``cas verify``
        names it); it is read again each time it is asked for, as a repair may
        have healed it. A failure of the store while reading is raised here,
        to the next page that asks, and the next ask after it reads again.
        """
        wanted = set(manifest_ids)
        deadline = None if self.wait is None else time.monotonic() + self.wait
        with self._cond:
            self._raise_failure()
            failures = self._failures
            self._ask(wanted)
            # A listing that begins from now on has every chunk these versions name.
            listing = self._lists_asked if self._lists_asked > self._begun else 0
            while True:
                if not self._unresolved(wanted):
                    needs = {m: self._needs.get(m, frozenset()) for m in wanted}
                    if (listing and self._listed >= listing) or self._all_listed(needs.values()):
                        return needs, self._sizes
                    if not listing:  # a chunk the last listing did not have: list again
                        self._lists_asked += 1
                        listing = self._lists_asked
                        self._start()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
                if self._failures != failures and self._last_failure is not None:
                    self._failure = None  # told: the next ask reads again
                    raise self._last_failure

    def read_soon(self, manifest_ids: Collection[str]) -> None:
        """Start reading those of ``manifest_ids`` not read yet, and return at once."""
        with self._cond:
            self._ask(set(manifest_ids))

    # -- what the thread is asked for ---------------------------------------------------

    def _ask(self, wanted: set[str]) -> None:
        again = sorted((wanted - self._needs.keys()) | (wanted & self._damaged))
        if again:
            self._queue = dict.fromkeys([*again, *self._queue])  # the latest asked first
            if not self._sizes and self._begun == self._lists_asked:
                self._lists_asked += 1  # none yet: listed beside the manifests
            self._start()

    def _start(self) -> None:
        if not self._reading:
            self._reading = True
            threading.Thread(target=self._run, name="cas-ui-figures", daemon=True).start()

    def _unresolved(self, wanted: set[str]) -> bool:
        return bool(wanted - self._needs.keys() - self._damaged)

    def _all_listed(self, chunk_sets: Collection[frozenset[bytes]]) -> bool:
        known = self._sizes.keys()
        return all(chunks <= known for chunks in chunk_sets)

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    # -- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        read: list[frozenset[bytes]] = []  # what this run read, to list chunks again for
        listing: Future[None] | None = None
        try:
            with ThreadPoolExecutor(max(1, self.store.workers), "cas-ui") as pool:
                while True:
                    with self._cond:
                        batch = list(islice(self._queue, SLICE))
                        for manifest_id in batch:
                            del self._queue[manifest_id]
                        if listing is None and self._begun < self._lists_asked:
                            self._begun = self._lists_asked
                            listing = pool.submit(self._list_sizes, self._begun)
                        elif not batch and listing is None:
                            if self._all_listed(read):
                                self._reading = False
                                self._cond.notify_all()
                                return
                            self._lists_asked += 1  # they name chunks not listed yet
                            read = []
                            continue
                    if batch:
                        found = list(pool.map(self._read_one, batch))
                        read += [chunks for chunks in found if chunks is not None]
                        self._keep(batch, found)
                    elif listing is not None:
                        listing.result()  # raises what the listing raised
                        listing = None
        except Exception as err:  # the store failed: the next page that asks says so
            with self._cond:
                self._failure = self._last_failure = err
                self._failures += 1
                self._queue.clear()
                self._begun = self._listed = self._lists_asked
                self._reading = False
                self._cond.notify_all()

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

    def _list_sizes(self, asked: int) -> None:
        """List the chunks: what every listing asked for up to number ``asked`` waits for."""
        listed = {bytes.fromhex(h): size for h, size in self.store.chunk_sizes().items()}
        with self._cond:
            self._sizes = listed
            self._listed = max(self._listed, asked)
            self._cond.notify_all()
