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
from typing import Protocol

from ..backends.base import TEMP_PREFIX
from ..chunks._cache import LocalCache
from ..chunks._store import ChunkStore, ReadTally
from ..digest import Digest, hasher_for
from ..errors import CorruptObjectError, DestinationExistsError, SourceError
from ..repository._manifest import ChunkRef, Entry, Manifest, check_entries
from ._budget import IN_FLIGHT_BYTES, InFlight

ProgressFn = Callable[[int], None]
#: Reads chunk ``index`` of a file being written: ``read(entry, index, context)``.
ChunkReader = Callable[[Entry, int, str], "bytes | memoryview"]


class FileSink(Protocol):
    """Where the chunks of one file go, in order, as :meth:`Restorer.write_files` drains them."""

    def add(self, index: int, raw: bytes | memoryview) -> None:
        """Chunk ``index`` of the file (verified), after every chunk before it."""

    def finish(self) -> None:
        """After the last chunk: check the file whole and put it where it belongs."""

    def close(self) -> None:
        """Give up (a failure elsewhere): release what is open, leave no file behind."""


#: Makes the sink of a file: ``sink(entry, path)``.
SinkFactory = Callable[[Entry, Path], FileSink]
# setuid, setgid and sticky bits are dropped: a store is not trusted to hand
# out privileges, least of all to a restore run as root.
_SAFE_MODE_BITS = 0o777
# A file shared with the cache by a hard link loses its write bits: written to
# in place, it would change the cache's copy and every other link of it.
_LINKED_MODE_BITS = 0o555


def linked_mode(entry: Entry) -> int:
    """The permission bits of ``entry``'s file when it is linked with the cache."""
    return entry.mode & _LINKED_MODE_BITS


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
        link: bool = False,
    ) -> None:
        self.chunks = chunks
        self.workers = workers
        self.progress = progress
        #: Where the chunk objects came from: the store or the local cache.
        self.tally = tally if tally is not None else ReadTally()
        #: The cache whole files are hard-linked with (``cas get --link``), if any.
        self.links = chunks.cache if link else None
        #: Files (and their bytes) linked from the cache instead of written.
        self.linked_files = self.linked_bytes = 0

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
                self.write_files([(entry, staging)], label)
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
        self.write_files([(e, root / e.path) for e in files], label)
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

    def fetch(
        self,
        entry: Entry,
        index: int,
        context: str,
        *,
        known: dict[bytes, bytes | memoryview] | None = None,
    ) -> bytes | memoryview:
        """The default :data:`ChunkReader`: from the store (through its cache);
        ``known`` holds verified raw bytes of delta bases, by hash."""
        chunk = entry.chunks[index]
        return self.chunks.read(chunk, context=context, tally=self.tally, known=known)

    def write_files(
        self,
        targets: list[tuple[Entry, Path]],
        label: str,
        *,
        read: ChunkReader | None = None,
        sink: SinkFactory | None = None,
    ) -> None:
        """Fetch chunks of all files through one bounded window, hand them in order
        to each file's sink.

        ``read`` supplies each chunk (default: :meth:`fetch`); ``sink`` makes
        what a file's chunks go to (default: a new file at its path, checked
        whole).
        """
        read = read or self.fetch
        if sink is None and self.links is not None:
            targets = self._link_cached(self.links, targets)
        keep = self._keeper()
        make = sink or (lambda entry, path: _NewFile(entry, path, label, keep=keep))
        window: deque[tuple[Entry, int, Future[bytes | memoryview]]] = deque()
        # Drained by this thread alone: it makes room itself before it asks.
        room = InFlight(self.workers * 2 + 2)
        sinks: dict[str, FileSink] = {}
        tasks = [(entry, index) for entry, _ in targets for index in range(len(entry.chunks))]
        ahead = _ReadAhead(self.chunks, [entry.chunks[index] for entry, index in tasks])
        paths = {entry.path: path for entry, path in targets}
        try:
            # A file's sink is made when its first chunk arrives, so about one is
            # open at a time however many the tree holds; empty files are made here.
            for entry, path in targets:
                if not entry.chunks:
                    make(entry, path).finish()
            with ThreadPoolExecutor(self.workers, thread_name_prefix="cas-get") as pool:
                for entry, index in tasks:
                    length = entry.chunks[index].length
                    while room.full(length):
                        self._drain_one(window, sinks, make, paths, room)
                    ahead.submitted(length)
                    room.acquire(length)
                    context = f"{label}: file {entry.path!r}"
                    window.append((entry, index, pool.submit(read, entry, index, context)))
                while window:
                    self._drain_one(window, sinks, make, paths, room)
        finally:
            for future in (f for _, _, f in window):
                future.cancel()
            for open_sink in sinks.values():
                open_sink.close()

    def _link_cached(
        self, cache: LocalCache, targets: list[tuple[Entry, Path]]
    ) -> list[tuple[Entry, Path]]:
        """Link every file the cache holds whole; the targets left to write."""
        left = []
        for entry, path in targets:
            digest = entry.digest
            if digest is not None and cache.link_file(digest, entry.size, linked_mode(entry), path):
                self.linked_files += 1
                self.linked_bytes += entry.size
                if self.progress is not None:
                    self.progress(entry.size)
            else:
                left.append((entry, path))
        return left

    def _keeper(self) -> Callable[[Entry, Path], None] | None:
        """What a new file is handed to once verified: the cache, when linking."""
        cache = self.links
        if cache is None:
            return None

        def keep(entry: Entry, path: Path) -> None:
            os.chmod(path, linked_mode(entry))
            if entry.size and entry.digest is not None:
                cache.keep_file(entry.digest, path)

        return keep

    def _drain_one(
        self,
        window: deque[tuple[Entry, int, Future[bytes | memoryview]]],
        sinks: dict[str, FileSink],
        make: SinkFactory,
        paths: dict[str, Path],
        room: InFlight,
    ) -> None:
        entry, index, future = window.popleft()
        raw = future.result()
        room.release(len(raw))
        file_sink = sinks.get(entry.path)
        if file_sink is None:
            file_sink = sinks[entry.path] = make(entry, paths[entry.path])
        file_sink.add(index, raw)
        if self.progress is not None:
            self.progress(len(raw))
        if index == len(entry.chunks) - 1:
            del sinks[entry.path]
            file_sink.finish()

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


class _NewFile:
    """A file written from its first byte, hashed whole as it is written; a large
    file's hash runs on a thread of its own, beside the writes."""

    def __init__(
        self,
        entry: Entry,
        path: Path,
        label: str,
        *,
        keep: Callable[[Entry, Path], None] | None = None,
    ) -> None:
        self.entry = entry
        self.path = path
        self.label = label
        self.keep = keep
        self.stream = open(path, "wb")  # noqa: SIM115 (closed by finish or close)
        self.hasher = hasher_for(entry.size)

    def add(self, index: int, raw: bytes | memoryview) -> None:
        self.stream.write(raw)
        self.hasher.update(raw)

    def finish(self) -> None:
        try:
            self.stream.close()
        finally:
            digest = self.hasher.digest()  # which also ends a background hasher's thread
        check_whole(self.entry, digest, self.label)
        if self.keep is not None:
            self.keep(self.entry, self.path)
        else:
            os.chmod(self.path, self.entry.mode & _SAFE_MODE_BITS)

    def close(self) -> None:
        self.stream.close()
        self.hasher.close()


def check_whole(entry: Entry, digest: Digest, label: str) -> None:
    if digest != entry.digest:
        raise CorruptObjectError(
            f"{label}: file {entry.path!r} does not match its recorded BLAKE3 after restore"
        )
