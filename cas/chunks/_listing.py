"""Which chunks a store holds, from a listing instead of one request per chunk.

A put asks of every chunk it cuts whether the store has it already, and how
old it is (reused chunks that have aged are touched, for garbage
collection). One ``stat`` per chunk is one request per chunk. On an object
store one listing request answers for a whole page of objects (1,000 on S3
and GCS), so a put of many chunks into a store that is not much larger
costs far fewer requests by listing ``chunks/`` once.

:func:`plan` decides. It reads the first page of ``chunks/``: if that is
the whole store the listing is done, else the hash of the last key on the
page tells what fraction of the (uniform) hash space a page covers, which
estimates the size of the store. It lists only when that costs fewer
requests than one per expected chunk, and only for stores whose listing fits
in :data:`MAX_LISTED` entries of 40 bytes. Large stores are listed in 16 or
256 shards (``chunks/0`` .. ``chunks/f`` or ``chunks/00/`` .. ``chunks/ff/``)
in parallel, in the background, while the put reads and cuts its files; a
lookup waits only for the shard of its digest.

The listed modification times serve the refresh rule of garbage collection
exactly as a ``stat`` would: an object's time only moves forward (touch) or
the object goes away, and the put's write session reads again every reused
object that has aged past its limits before it commits (docs/gc.md). What a
listing cannot tell is the time of a chunk created after it; the chunk
store reads that one when its create-only write finds the chunk there.
"""

from __future__ import annotations

import bisect
import itertools
import math
from array import array
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import overload

from ..backends.base import Backend, ObjectInfo
from ..digest import DIGEST_SIZE, Digest
from ..repository import _layout as layout
from ._chunking import ChunkerParams

#: At most this many listed chunks are held (40 bytes each, 80 MB); larger
#: stores are asked chunk by chunk.
MAX_LISTED = 2_000_000
#: Listing shards by store size: one sequential listing up to a few pages,
#: then 16 and 256 prefixes listed in parallel.
_SHARDS = ((4, 1), (256, 16))
_HEX_BITS = 32  # hex digits of a key read as a fraction of the hash space: 8


def expected_chunks(sizes: Iterable[int], params: ChunkerParams) -> int:
    """About how many chunks files of ``sizes`` cut into (empty files cut into none)."""
    return sum(math.ceil(size / params.avg_size) for size in sizes)


class _Digests(Sequence[bytes]):
    """Sorted 32-byte digests back to back in one bytes object, for bisect."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def __len__(self) -> int:
        return len(self.blob) // DIGEST_SIZE

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(index, slice):
            raise TypeError("slicing is not supported")
        start = index * DIGEST_SIZE
        return self.blob[start : start + DIGEST_SIZE]


class _Shard:
    """The listed chunks of one prefix: digests and their times, sorted by digest."""

    def __init__(self, infos: Iterable[ObjectInfo]) -> None:
        pairs = []
        for info in infos:
            digest = layout.digest_from_key(info.key)
            if digest is not None:
                pairs.append((digest.raw, info.mtime))
        # Listings come sorted by key, and so by digest; sorting again is
        # cheap then and keeps lookups exact on a backend that does not.
        pairs.sort()
        self.digests = _Digests(b"".join(raw for raw, _ in pairs))
        self.mtimes = array("d", (mtime for _, mtime in pairs))

    def mtime(self, raw: bytes) -> float | None:
        index = bisect.bisect_left(self.digests, raw)
        if index < len(self.digests) and self.digests[index] == raw:
            return self.mtimes[index]
        return None


class ChunkIndex:
    """The answer of one listing of ``chunks/``, shard by shard as it arrives."""

    def __init__(self, shards: int) -> None:
        self.shards = shards
        self.requests = 0  # listing requests this index cost, about
        self._futures: list[Future[_Shard]] = []
        self._pool: ThreadPoolExecutor | None = None

    def _shard_of(self, raw: bytes) -> int:
        if self.shards == 1:
            return 0
        if self.shards == 16:
            return raw[0] >> 4
        return raw[0]

    def listed(self) -> bool:
        """Whether this index answers for chunks; if not, ask the backend chunk by chunk."""
        return True

    def mtime(self, digest: Digest) -> float | None:
        """The listed modification time of a chunk, or None if the listing did not show it.

        Waits for the shard of ``digest``; re-raises the error of its listing.
        """
        return self._futures[self._shard_of(digest.raw)].result().mtime(digest.raw)

    def close(self) -> None:
        for future in self._futures:
            future.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ChunkIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building -----------------------------------------------------------------

    @classmethod
    def complete(cls, infos: Iterable[ObjectInfo], requests: int) -> ChunkIndex:
        index = cls(1)
        future: Future[_Shard] = Future()
        future.set_result(_Shard(infos))
        index._futures.append(future)
        index.requests = requests
        return index

    @classmethod
    def listing(cls, backend: Backend, shards: int, workers: int) -> ChunkIndex:
        """List ``chunks/`` in ``shards`` prefixes on ``workers`` background threads."""
        index = cls(shards)
        if shards == 1:
            prefixes = [layout.CHUNKS]
        elif shards == 16:
            prefixes = [f"{layout.CHUNKS}{d:x}" for d in range(16)]
        else:
            prefixes = [f"{layout.CHUNKS}{b:02x}/" for b in range(256)]
        pool = ThreadPoolExecutor(max(1, min(workers, shards)), thread_name_prefix="cas-list")
        index._pool = pool
        index._futures = [pool.submit(_list_shard, backend, prefix) for prefix in prefixes]
        return index


class DeferredIndex(ChunkIndex):
    """:func:`plan` run in the background, so that its first listing request
    overlaps the reading of the files instead of delaying the put."""

    def __init__(self, backend: Backend, expected: int, *, workers: int) -> None:
        super().__init__(1)
        self._planner = ThreadPoolExecutor(1, thread_name_prefix="cas-list")
        self._decision = self._planner.submit(plan, backend, expected, workers=workers)

    def _inner(self) -> ChunkIndex | None:
        return self._decision.result()

    def listed(self) -> bool:
        return self._inner() is not None

    def mtime(self, digest: Digest) -> float | None:
        inner = self._inner()
        if inner is None:
            raise RuntimeError("mtime() of an index that decided not to list: check listed()")
        return inner.mtime(digest)

    def close(self) -> None:
        self._planner.shutdown(wait=True)
        if self._decision.exception() is None:
            inner = self._decision.result()
            if inner is not None:
                inner.close()


def plan_in_background(backend: Backend, expected: int, *, workers: int) -> ChunkIndex | None:
    """:func:`plan`, decided on a thread of its own; None at once where it would be None."""
    if backend.list_page_size <= 0 or expected < 2:
        return None
    return DeferredIndex(backend, expected, workers=workers)


def _list_shard(backend: Backend, prefix: str) -> _Shard:
    return _Shard(backend.list_objects(prefix))


def plan(
    backend: Backend, expected: int, *, workers: int, max_listed: int = MAX_LISTED
) -> ChunkIndex | None:
    """A listing of the store's chunks when it is cheaper than a stat per chunk, else None.

    ``expected`` is about how many chunks the put will ask about.
    """
    page = backend.list_page_size
    if page <= 0 or expected < 2:
        return None  # a listing is no cheaper per object than a stat here
    listing: Iterator[ObjectInfo] = iter(backend.list_objects(layout.CHUNKS))
    first = list(itertools.islice(listing, page))
    if len(first) < page:
        return ChunkIndex.complete(first, requests=1)  # the whole store in one page
    estimate = _estimate_store(first)
    shards = _shards_for(estimate, page)
    requests = shards + math.ceil(estimate / page)
    if estimate > max_listed or requests >= expected:
        return None
    if shards == 1:
        # Go on with the same listing, from its second page.
        index = ChunkIndex(1)
        pool = ThreadPoolExecutor(1, thread_name_prefix="cas-list")
        index._pool = pool
        index._futures = [pool.submit(lambda: _Shard(itertools.chain(first, listing)))]
    else:
        index = ChunkIndex.listing(backend, shards, workers)
    index.requests = requests
    return index


def _shards_for(estimate: int, page: int) -> int:
    for pages, shards in _SHARDS:
        if estimate <= pages * page:
            return shards
    return 256


def _estimate_store(page: list[ObjectInfo]) -> int:
    """The number of chunks in a store whose listing starts with ``page`` (sorted)."""
    for info in reversed(page):
        digest = layout.digest_from_key(info.key)
        if digest is not None:
            covered = int(digest.hex[: _HEX_BITS // 4], 16) + 1
            return math.ceil(len(page) * (1 << _HEX_BITS) / covered)
    return len(page)
