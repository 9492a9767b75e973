"""Writing a version back to disk: verified, all or nothing.

Everything is written into a staging path beside the destination and moved
into place only after every chunk and every whole-file hash checked out. A
failure, or an interrupt, leaves the destination exactly as it was.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from ..backends.base import TEMP_PREFIX
from ..chunks._store import ChunkStore, ReadTally
from ..digest import StreamingHasher, hasher_for
from ..errors import CorruptObjectError, DestinationExistsError, SourceError
from ..repository._manifest import ChunkRef, Entry, Manifest, check_entries
from ._budget import IN_FLIGHT_BYTES, InFlight

ProgressFn = Callable[[int], None]
#: Reads one chunk of a file being written: ``read(entry, chunk, context)``.
ChunkReader = Callable[[Entry, ChunkRef, str], "bytes | memoryview"]
#: Called once a file is written and verified: ``placed(entry, path)``.
PlacedFn = Callable[[Entry, Path], None]
# setuid, setgid and sticky bits are dropped: a store is not trusted to hand
# out privileges, least of all to a restore run as root.
_SAFE_MODE_BITS = 0o777


class _ReadAhead:
    """Asks the backend for the chunks of a restore some way ahead of the workers.

    Chunk files of a local store that have left the page cache are read from
    disk, one at a time per worker, while its core waits, which showed in
    restores from a store just evicted (docs/performance.md, "What changed,
    and what each change measured"). Hinted ``AHEAD`` bytes in advance, the
    disk serves them while the workers decode earlier ones.
    """

    #: Raw bytes of chunks hinted beyond those handed to the workers.
    AHEAD = IN_FLIGHT_BYTES

    def __init__(self, chunks: ChunkStore, order: list[ChunkRef]) -> None:
        self.chunks = chunks
        self.order = order
        self.next = 0  # index of the first chunk not hinted yet
        self.hinted = 0  # raw bytes hinted
        self.handed = 0  # raw bytes handed to the workers

    def submitted(self, length: int) -> None:
        """Record a chunk handed to the workers, and hint those now in range."""
        self.handed += length
        start = self.next
        while self.next < len(self.order) and self.hinted - self.handed < self.AHEAD:
            self.hinted += self.order[self.next].length
            self.next += 1
        if self.next > start:
            # A delta chunk's bases are read with it: hinted with it.
            self.chunks.prefetch(
                d for c in self.order[start : self.next] for d in (c.digest, *c.bases)
            )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Restorer:
    def __init__(
        self,
        chunks: ChunkStore,
        *,
        workers: int,
        progress: ProgressFn | None = None,
        tally: ReadTally | None = None,
    ) -> None:
        self.chunks = chunks
        self.workers = workers
        self.progress = progress
        #: Where the chunk objects came from: the store or the local cache.
        self.tally = tally if tally is not None else ReadTally()

    def restore(self, manifest: Manifest, dest: Path, *, label: str, force: bool = False) -> None:
        """Write ``manifest`` to ``dest``. ``label`` (e.g. "key@3") prefixes error messages."""
        check_entries(manifest.entries)
        dest = Path(os.path.abspath(dest))
        if os.path.lexists(dest) and not force:
            raise DestinationExistsError.naming(
                "destination {dest} already exists; choose another or {force}",
                dest=dest,
                force="pass force=True",
            )
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SourceError(f"cannot create {dest.parent}: {err.strerror}") from None
        staging = dest.parent / f"{TEMP_PREFIX}-{uuid.uuid4().hex}"
        try:
            if manifest.kind == "file":
                (entry,) = manifest.entries
                self._write_files([(entry, staging)], label)
            else:
                self._write_tree(manifest.entries, staging, label)
            self._move_into_place(staging, dest)
        except BaseException:
            _remove(staging)
            raise

    def _write_tree(self, entries: tuple[Entry, ...], root: Path, label: str) -> None:
        root.mkdir(mode=0o700)
        dirs = [e for e in entries if e.type == "dir"]
        for entry in dirs:
            (root / entry.path).mkdir(parents=True, exist_ok=True)
        files = [e for e in entries if e.type == "file"]
        for entry in files:
            (root / entry.path).parent.mkdir(parents=True, exist_ok=True)
        self._write_files([(e, root / e.path) for e in files], label)
        # Links last: nothing is ever written through one (check_entries
        # refuses paths below a link, this keeps it so while we write).
        for entry in entries:
            if entry.type == "symlink":
                link = root / entry.path
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(entry.target or "", link)
        # Directory modes last, deepest first, so a read-only directory does
        # not stop us filling it.
        for entry in sorted(dirs, key=lambda e: e.path.count("/"), reverse=True):
            os.chmod(root / entry.path, entry.mode & _SAFE_MODE_BITS)
        os.chmod(root, 0o755)

    def fetch(self, entry: Entry, chunk: ChunkRef, context: str) -> bytes | memoryview:
        """The default :data:`ChunkReader`: from the store (through its cache)."""
        return self.chunks.read(chunk, context=context, tally=self.tally)

    def _write_files(
        self,
        targets: list[tuple[Entry, Path]],
        label: str,
        *,
        read: ChunkReader | None = None,
        placed: PlacedFn | None = None,
    ) -> None:
        """Fetch chunks of all files through one bounded window, write them in order.

        ``read`` supplies each chunk (default: :meth:`fetch`); ``placed`` is
        called as each file is complete and verified.
        """
        read = read or self.fetch
        window: deque[tuple[Entry, bool, Future[bytes | memoryview]]] = deque()
        # Drained by this thread alone: it makes room itself before it asks.
        room = InFlight(self.workers * 2 + 2)
        handles: dict[str, tuple[BinaryIO, StreamingHasher]] = {}

        tasks = [
            (entry, chunk, index == len(entry.chunks) - 1)
            for entry, _ in targets
            for index, chunk in enumerate(entry.chunks)
        ]
        ahead = _ReadAhead(self.chunks, [chunk for _, chunk, _ in tasks])
        paths = {entry.path: path for entry, path in targets}
        try:
            # Files open when their first chunk arrives, so about one is open
            # at a time however many the tree holds; empty ones are made here.
            for entry, path in targets:
                if not entry.chunks:
                    self._finish(entry, path, self._open(path, 0), label)
                    if placed is not None:
                        placed(entry, path)
            with ThreadPoolExecutor(self.workers, thread_name_prefix="cas-get") as pool:
                for entry, chunk, is_last in tasks:
                    while room.full(chunk.length):
                        self._drain_one(window, handles, paths, label, room, placed)
                    ahead.submitted(chunk.length)
                    room.acquire(chunk.length)
                    context = f"{label}: file {entry.path!r}"
                    future = pool.submit(read, entry, chunk, context)
                    window.append((entry, is_last, future))
                while window:
                    self._drain_one(window, handles, paths, label, room, placed)
        finally:
            for future in (f for _, _, f in window):
                future.cancel()
            for handle, hasher in handles.values():
                handle.close()
                hasher.close()

    def _drain_one(
        self,
        window: deque[tuple[Entry, bool, Future[bytes | memoryview]]],
        handles: dict[str, tuple[BinaryIO, StreamingHasher]],
        paths: dict[str, Path],
        label: str,
        room: InFlight,
        placed: PlacedFn | None,
    ) -> None:
        entry, is_last, future = window.popleft()
        raw = future.result()
        room.release(len(raw))
        if entry.path not in handles:
            handles[entry.path] = self._open(paths[entry.path], entry.size)
        handle, hasher = handles[entry.path]
        handle.write(raw)
        hasher.update(raw)
        if self.progress is not None:
            self.progress(len(raw))
        if is_last:
            self._finish(entry, paths[entry.path], handles.pop(entry.path), label)
            if placed is not None:
                placed(entry, paths[entry.path])

    @staticmethod
    def _open(path: Path, size: int) -> tuple[BinaryIO, StreamingHasher]:
        # A large file's hash runs on a thread of its own, beside the writes.
        return open(path, "wb"), hasher_for(size)  # closed by _finish

    @staticmethod
    def _finish(
        entry: Entry, path: Path, handle: tuple[BinaryIO, StreamingHasher], label: str
    ) -> None:
        stream, hasher = handle
        try:
            stream.close()
        finally:
            digest = hasher.digest()  # which also ends a background hasher's thread
        if digest != entry.digest:
            raise CorruptObjectError(
                f"{label}: file {entry.path!r} does not match its recorded BLAKE3 after restore"
            )
        os.chmod(path, entry.mode & _SAFE_MODE_BITS)

    @staticmethod
    def _move_into_place(staging: Path, dest: Path) -> None:
        if not os.path.lexists(dest):
            os.rename(staging, dest)
            return
        # --force: move the old one aside first, so a failure between the two
        # renames still leaves one complete copy under a temporary name.
        aside = dest.parent / f"{TEMP_PREFIX}-old-{uuid.uuid4().hex}"
        os.rename(dest, aside)
        try:
            os.rename(staging, dest)
        except BaseException:
            os.rename(aside, dest)
            raise
        _remove(aside)
