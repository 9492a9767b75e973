"""Whole files for ``verify --deep``: each distinct file hashed as a get hashes it.

A get compares every file it restores with the BLAKE3 its manifest records,
so a verify that is to flag every version a get would refuse must too.
Chunks alone cannot tell: a file's hash covers its bytes in order. A file
of one chunk is checked without reading (its hash is its chunk's name, see
:func:`cas.repository._manifest.check_manifest`); longer files are read
here, each distinct file once.

Files are taken in the order of their chunk lists, and a file whose list
begins like the one before resumes from a copy of that file's hasher,
saved after every chunk (every few chunks in files of more than
:data:`MAX_SNAPSHOTS` chunks, so that the copies stay a few megabytes): a
dataset that grows by appending costs its new chunks per version, not the
whole file again.
Every chunk read here is verified like any read (with its delta bases), so
the chunk pass that follows reads only the chunks no file read.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import blake3

from ..chunks._store import ChunkStore
from ..digest import Digest
from ..errors import IntegrityError
from ..repository._manifest import ChunkRef
from ..transfer._budget import InFlight

#: A file: its recorded BLAKE3 and its chunks.
FileKey = tuple[Digest, tuple[ChunkRef, ...]]
ProgressFn = Callable[[int], None]
#: The most hashers saved along one file for the next file to resume from
#: (a copy of a BLAKE3 hasher is about 2 KB).
MAX_SNAPSHOTS = 1024


def snapshot_every(chunks: int) -> int:
    """How many chunks of a file of ``chunks`` chunks lie between two saved hashers."""
    return max(1, -(-chunks // MAX_SNAPSHOTS))


@dataclass
class FileCheck:
    """What hashing the files found."""

    #: Chunks read and verified, delta bases included: the chunk pass skips them.
    verified: set[ChunkRef] = field(default_factory=set)
    #: Files whose bytes do not hash to their recorded BLAKE3.
    mismatched: list[FileKey] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Plan:
    """One file to hash: from which chunk on, resuming the hasher saved there."""

    key: FileKey
    start: int


def _plans(files: Iterable[FileKey]) -> Iterator[_Plan]:
    """The files in chunk-list order, each resuming where the one before saved a hasher."""
    ordered = sorted(set(files), key=lambda f: [c.digest.raw for c in f[1]])
    previous: tuple[ChunkRef, ...] = ()
    saved = {0}  # positions a hasher will be saved at, in the file before
    for key in ordered:
        chunks = key[1]
        common = 0
        for mine, theirs in zip(chunks, previous, strict=False):
            if mine != theirs:
                break
            common += 1
        start = max(p for p in saved if p <= common)
        yield _Plan(key, start)
        every = snapshot_every(len(chunks))
        saved = {p for p in saved if p <= start}
        saved.update(range(start - start % every + every, len(chunks), every))
        saved.add(len(chunks))
        previous = chunks


class _Hashing:
    """The files' hashers, fed in order as their chunks arrive."""

    def __init__(self) -> None:
        self.result = FileCheck()
        self.saved: dict[int, Any] = {0: blake3.blake3(max_threads=1)}
        self.plan: _Plan | None = None
        self.hasher: Any = None
        self.every = 1

    def begin(self, plan: _Plan) -> None:
        self.finish()
        self.plan = plan
        self.every = snapshot_every(len(plan.key[1]))
        resumed = self.saved.get(plan.start)
        self.saved = {p: h for p, h in self.saved.items() if p <= plan.start}
        # None: the hasher it was to resume from was never saved (a chunk
        # before it failed); the chunk pass reports that chunk.
        self.hasher = resumed.copy() if resumed is not None else None

    def feed(self, position: int, chunk: ChunkRef, raw: bytes | memoryview | None) -> None:
        if raw is None:
            self.hasher = None  # this file cannot be hashed; the chunk pass says why
            return
        self.result.verified.add(chunk)
        self.result.verified.update(
            ChunkRef(base, chunk.length, chunk.bases[i + 1 :]) for i, base in enumerate(chunk.bases)
        )
        if self.hasher is None:
            return
        self.hasher.update(raw)
        if (position + 1) % self.every == 0:
            self.saved[position + 1] = self.hasher.copy()

    def finish(self) -> None:
        if self.plan is None or self.hasher is None:
            return
        digest, chunks = self.plan.key
        self.saved[len(chunks)] = self.hasher.copy()
        if self.hasher.digest() != digest.raw:
            self.result.mismatched.append(self.plan.key)
        self.plan = self.hasher = None


def hash_files(
    chunks: ChunkStore,
    files: Iterable[FileKey],
    *,
    skip: Collection[bytes] = (),
    workers: int = 4,
    progress: ProgressFn | None = None,
) -> FileCheck:
    """Hash each distinct file whole; files with a chunk in ``skip`` (missing) are left out.

    Chunk reads run ``workers`` at a time, over all files at once, within
    the byte budget of a restore; the hashers take them in file order.
    """
    hashing = _Hashing()
    room = InFlight(workers * 2 + 2)
    window: deque[tuple[_Plan, int, Future[bytes | memoryview] | None]] = deque()

    def drain() -> None:
        plan, position, future = window.popleft()
        if position == plan.start:
            hashing.begin(plan)
        if future is None:
            return  # a file that is wholly the one before it: nothing to read
        chunk = plan.key[1][position]
        try:
            raw: bytes | memoryview | None = future.result()
        except IntegrityError:
            raw = None
        finally:
            room.release(chunk.length)
        hashing.feed(position, chunk, raw)
        if progress is not None and raw is not None:
            progress(len(raw))

    wanted = (f for f in files if not any(c.digest.raw in skip for c in f[1]))
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="cas-verify") as pool:
        try:
            for plan in _plans(wanted):
                if plan.start == len(plan.key[1]):
                    window.append((plan, plan.start, None))
                for position in range(plan.start, len(plan.key[1])):
                    chunk = plan.key[1][position]
                    while room.full(chunk.length):
                        drain()
                    room.acquire(chunk.length)
                    window.append((plan, position, pool.submit(chunks.read, chunk)))
            while window:
                drain()
        finally:
            for *_, future in window:
                if future is not None:
                    future.cancel()
    hashing.finish()
    return hashing.result
