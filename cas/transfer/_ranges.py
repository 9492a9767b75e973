"""Byte ranges of a version's files, their chunks fetched ahead in parallel.

A process that loads its part of a distributed checkpoint needs some byte
ranges of some files, not whole files: its shards, wherever the writers put
them. The ranges are served in the order asked, each as the slices of the
verified chunks that hold it; the chunks are fetched by worker threads
ahead of the caller, within a bound on the bytes held, and a chunk that
holds the end of one range and the start of the next is fetched once.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from ..chunks._inplace import read_into
from ..chunks._store import ChunkStore
from ..digest import Digest
from ..errors import InvalidInputError, NotFoundError
from ..repository._manifest import ChunkRef, Entry
from ._budget import IN_FLIGHT_BYTES

#: (path, start, end): bytes [start, end) of a file of the version.
Request = tuple[str, int, int]
#: (path, start, end, destination): bytes [start, end) of a file, to be put in destination.
Fill = tuple[str, int, int, memoryview]
_ChunkId = tuple[str, int]
#: Where part of a chunk goes: bytes [low, high) of the chunk, into a destination.
_Piece = tuple[int, int, memoryview]


class RangeReader:
    """Serves byte ranges of the files of one version; ``label`` names it in errors."""

    def __init__(
        self,
        chunks: ChunkStore,
        files: Mapping[str, Entry],
        *,
        workers: int,
        label: str,
        budget: int = IN_FLIGHT_BYTES,
    ) -> None:
        self.chunks = chunks
        self.files = files
        self.workers = workers
        self.label = label
        self.budget = budget
        self._starts: dict[str, list[int]] = {}

    def _chunk_range(self, request: Request) -> list[_ChunkId]:
        path, start, end = request
        entry = self.files.get(path)
        if entry is None:
            raise NotFoundError(f"{self.label}: no file {path!r} in this version")
        if not 0 <= start <= end <= entry.size:
            raise InvalidInputError(
                f"{self.label}: bytes [{start}, {end}) are not within file {path!r} "
                f"of {entry.size} bytes"
            )
        if start == end:
            return []
        starts = self._starts.get(path)
        if starts is None:
            starts = self._starts[path] = entry.chunk_offsets()
        first = bisect.bisect_right(starts, start) - 1
        last = bisect.bisect_left(starts, end) - 1
        return [(path, index) for index in range(first, last + 1)]

    def read(self, requests: Sequence[Request]) -> Iterator[list[memoryview]]:
        """For each request in turn, the pieces that make up its bytes, in order."""
        needs = [self._chunk_range(r) for r in requests]
        order: list[_ChunkId] = []
        last_use: dict[_ChunkId, int] = {}
        for number, chunk_ids in enumerate(needs):
            for chunk_id in chunk_ids:
                if chunk_id not in last_use:
                    order.append(chunk_id)
                last_use[chunk_id] = number
        with ThreadPoolExecutor(self.workers, thread_name_prefix="cas-read") as pool:
            window = _Window(self, pool, order)
            try:
                for number, (request, chunk_ids) in enumerate(zip(requests, needs, strict=True)):
                    pieces = [self._slice(request, c, window.take(c)) for c in chunk_ids]
                    yield pieces
                    window.release(c for c in chunk_ids if last_use[c] == number)
            finally:
                window.cancel()

    def read_into(self, fills: Sequence[Fill]) -> None:
        """Put the bytes of each ``(path, start, end)`` into its destination buffer.

        A chunk that lands whole in one destination is decoded straight into
        it and verified there (:func:`cas.chunks._inplace.read_into`): no
        buffer of its own, no copy. A chunk split between destinations, or
        only partly wanted, is read once and its slices copied. ``workers``
        threads decode at once; the chunks they will reach are hinted to the
        storage ``budget`` bytes ahead.
        """
        plan: dict[_ChunkId, list[_Piece]] = {}
        for path, start, end, destination in fills:
            destination = destination.cast("B")
            if len(destination) != end - start:
                raise InvalidInputError(
                    f"{self.label}: bytes [{start}, {end}) of {path!r} do not fit "
                    f"a buffer of {len(destination)}"
                )
            for chunk_id in self._chunk_range((path, start, end)):
                base = self._starts[path][chunk_id[1]]
                low, high = max(start - base, 0), min(end - base, self._length(chunk_id))
                piece = (low, high, destination[base + low - start : base + high - start])
                plan.setdefault(chunk_id, []).append(piece)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="cas-read") as pool:
            running: deque[tuple[int, Future[None]]] = deque()
            held = 0
            try:
                for chunk_id, pieces in plan.items():
                    while running and held >= self.budget:
                        length, future = running.popleft()
                        future.result()
                        held -= length
                    self.chunks.prefetch([self._chunk(chunk_id).digest])
                    running.append(
                        (self._length(chunk_id), pool.submit(self._fill, chunk_id, pieces))
                    )
                    held += running[-1][0]
                for _, future in running:
                    future.result()
            finally:
                for _, future in running:
                    future.cancel()

    def _fill(self, chunk_id: _ChunkId, pieces: list[_Piece]) -> None:
        chunk = self._chunk(chunk_id)
        if len(pieces) == 1 and pieces[0][:2] == (0, chunk.length):
            read_into(
                self.chunks, chunk, pieces[0][2], context=f"{self.label}: file {chunk_id[0]!r}"
            )
            return
        data = self.fetch(chunk_id)
        for low, high, destination in pieces:
            destination[:] = data[low:high]

    def _chunk(self, chunk_id: _ChunkId) -> ChunkRef:
        return self.files[chunk_id[0]].chunks[chunk_id[1]]

    def _length(self, chunk_id: _ChunkId) -> int:
        return self._chunk(chunk_id).length

    def _slice(self, request: Request, chunk_id: _ChunkId, data: memoryview) -> memoryview:
        path, start, end = request
        base = self._starts[path][chunk_id[1]]
        return data[max(start - base, 0) : min(end - base, len(data))]

    def fetch(self, chunk_id: _ChunkId) -> memoryview:
        path, index = chunk_id
        chunk = self.files[path].chunks[index]
        data = self.chunks.read(chunk, context=f"{self.label}: file {path!r}")
        return memoryview(data).cast("B")


class _Window:
    """The chunks fetched or being fetched, in the order they are first needed."""

    def __init__(self, reader: RangeReader, pool: ThreadPoolExecutor, order: list[_ChunkId]):
        self.reader = reader
        self.pool = pool
        self.order = order
        self.next = 0
        self.held: dict[_ChunkId, Future[memoryview]] = {}
        self.held_bytes = 0

    def _length(self, chunk_id: _ChunkId) -> int:
        return self.reader._length(chunk_id)

    def _submit_next(self, hints: list[Digest]) -> None:
        chunk_id = self.order[self.next]
        self.next += 1
        self.held[chunk_id] = self.pool.submit(self.reader.fetch, chunk_id)
        self.held_bytes += self._length(chunk_id)
        hints.append(self.reader.files[chunk_id[0]].chunks[chunk_id[1]].digest)

    def take(self, chunk_id: _ChunkId) -> memoryview:
        hints: list[Digest] = []
        while chunk_id not in self.held:
            self._submit_next(hints)
        # Keep the workers busy on what comes next, within the budget.
        while self.next < len(self.order) and self.held_bytes < self.reader.budget:
            self._submit_next(hints)
        if hints:
            # The storage reads them ahead while the workers decode earlier
            # ones (page-cache read-ahead on a folder; most services ignore it).
            self.reader.chunks.prefetch(hints)
        return self.held[chunk_id].result()

    def release(self, chunk_ids: Iterator[_ChunkId]) -> None:
        for chunk_id in chunk_ids:
            if self.held.pop(chunk_id, None) is not None:
                self.held_bytes -= self._length(chunk_id)

    def cancel(self) -> None:
        for future in self.held.values():
            future.cancel()
