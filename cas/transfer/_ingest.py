"""Turning a file or a directory into stored chunks and manifest entries.

The pipeline: the calling thread reads each file in large blocks, feeds the
whole-file hash and cuts chunks (FastCDC, or at tensor boundaries for a
safetensors file: :mod:`cas.tensors._writer`); worker threads hash, compress and
upload the chunks. A semaphore bounds the chunks in flight, so memory stays
flat however large the files are. blake3 and zstd release the GIL, so the
workers run in parallel with the reader.
"""

from __future__ import annotations

import functools
import os
import posixpath
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..chunks._chunking import ChunkerParams
from ..chunks._store import ChunkStore, PutResult, SeenSet
from ..digest import BackgroundHasher, Digest, StreamingHasher, hash_bytes, hasher_for
from ..errors import SourceError, UnsafePathError
from ..repository._manifest import (
    ArtifactKind,
    ChunkRef,
    Entry,
    Manifest,
    check_entries,
    check_link_target,
)
from ..tensors._cutting import cut_file, tensor_spans
from ..tensors._safetensors import Span
from ..tensors._writer import FilePlan, Numbered, TensorWriter
from ._budget import InFlight

ProgressFn = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One thing found under the path being stored."""

    path: str  # relative POSIX path inside the artifact
    absolute: Path
    type: str  # "file", "dir" or "symlink"
    mode: int
    size: int = 0
    target: str | None = None


def scan(
    source: Path, *, skip: Path | None = None, follow_symlinks: bool = False
) -> tuple[ArtifactKind, list[SourceItem]]:
    """Walk ``source``; return the artifact kind and its items.

    A symbolic link is kept as a link when it stays inside the tree being
    stored, and replaced by what it points to (a file, or a directory walked
    in turn) when it leads out of it: a Hugging Face snapshot is links into
    ``../../blobs``, and a link out of the tree could never be restored
    anyway. ``follow_symlinks`` replaces every link by what it points to.
    ``source`` itself may be a link. ``skip`` is a directory left out
    wherever it appears: the store itself, when it lives inside the tree
    being stored (``cas put .`` next to ./.cas).
    """
    try:
        st = source.stat()
    except FileNotFoundError:
        if os.path.islink(source):
            target = os.readlink(source)
            raise SourceError(
                f"path to store is a symlink to {target!r}, which does not exist: {source}"
            ) from None
        raise SourceError(f"path to store does not exist: {source}") from None
    except OSError as err:
        raise SourceError(f"cannot read {source}: {err.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        _check_readable(source)
        return "file", [SourceItem(source.name, source, "file", st.st_mode & 0o7777, st.st_size)]
    if not stat.S_ISDIR(st.st_mode):
        raise SourceError(f"path to store is not a regular file or a directory: {source}")
    walk = _Walk(Path(os.path.realpath(source)), skip, follow_symlinks)
    walk.directory(source, "", [(st.st_dev, st.st_ino)])
    return "directory", walk.items


def _check_readable(path: Path) -> None:
    if not os.access(path, os.R_OK):
        raise SourceError(f"cannot read {path}: permission denied")


#: A directory of a walk, as (device, inode): the walk refuses to enter one twice.
_DirId = tuple[int, int]


@dataclass
class _Walk:
    """One walk of a tree to store: its items, in depth-first order, names sorted."""

    root: Path  # real path of the tree being stored
    skip: Path | None
    follow_all: bool
    items: list[SourceItem] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.skip = self.skip.resolve() if self.skip is not None else None

    def directory(self, directory: Path, prefix: str, above: list[_DirId], base: str = "") -> None:
        """Add what ``directory`` holds; ``above`` is it and the directories it is in.

        ``base`` is the artifact path below which the tree is laid out as on
        disk: the root, or a directory reached through a followed link, whose
        copy is whole below it but not beside it. A link is kept as a link
        only if it points below its base: there it finds what it found on disk.
        """
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as err:
            raise SourceError(f"cannot list directory {directory}: {err.strerror}") from None
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                # Manifests are UTF-8 JSON; a name that is not UTF-8 has no faithful form there.
                raise SourceError(
                    f"cannot store {entry.path!r}: its name is not valid UTF-8; rename it first"
                ) from None
            path = Path(entry.path)
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                self._add(path, rel, st, above, base)
            elif not self.follow_all and _points_below(base, rel, target := os.readlink(path)):
                self.items.append(SourceItem(rel, path, "symlink", st.st_mode & 0o7777, 0, target))
            else:
                self._add(path, rel, self._target(path), above, rel + "/")

    def _target(self, link: Path) -> os.stat_result:
        try:
            return link.stat()
        except OSError as err:
            real = Path(os.path.realpath(link))
            where = "" if self.root in real.parents else " outside the directory being stored"
            raise SourceError(
                f"symlink {link} points{where} to {os.readlink(link)!r}, which cannot be read "
                f"({err.strerror})"
            ) from None

    def _add(
        self, path: Path, rel: str, st: os.stat_result, above: list[_DirId], base: str
    ) -> None:
        mode = st.st_mode & 0o7777
        if stat.S_ISDIR(st.st_mode):
            if self.skip is not None and path.resolve() == self.skip:
                return
            if (st.st_dev, st.st_ino) in above:
                raise SourceError(
                    f"cannot store {rel!r} ({path}): it leads back to {path.resolve()}, "
                    "which holds it (a loop of symlinks)"
                )
            self.items.append(SourceItem(rel, path, "dir", mode))
            self.directory(path, rel + "/", [*above, (st.st_dev, st.st_ino)], base)
        elif stat.S_ISREG(st.st_mode):
            _check_readable(path)
            self.items.append(SourceItem(rel, path, "file", mode, st.st_size))
        else:
            raise SourceError(f"cannot store special file (device, socket or fifo): {path}")


def _points_below(base: str, rel: str, target: str) -> bool:
    """Whether link ``rel`` to ``target`` stays below the artifact path ``base``, read as text.

    Links it passes through are resolved later, with the artifact's other
    links (:func:`cas.repository._manifest.check_entries`).
    """
    try:
        check_link_target(rel, target)
    except UnsafePathError:
        return False
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    return not base or f"{resolved}/".startswith(base)


@dataclass
class IngestStats:
    """Counters of one put, updated from several threads."""

    chunks: int = 0
    new_chunks: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, result: PutResult) -> None:
        with self._lock:
            self.chunks += 1
            if result.written:
                self.new_chunks += 1
                self.bytes_written += result.written


class Ingestor:
    """Stores the chunks of many files through one bounded pool of workers."""

    def __init__(
        self,
        chunks: ChunkStore,
        params: ChunkerParams,
        *,
        workers: int,
        reference_time: Callable[[], float | None] = lambda: None,
        progress: ProgressFn | None = None,
        observer: Callable[[PutResult], None] | None = None,
        tensors: TensorWriter | None = None,
        previous: Callable[[str], Entry | None] | None = None,
    ) -> None:
        self.chunks = chunks
        #: The entry of a path in a former version (a parent, or the latest),
        #: whose FastCDC cuts lead the chunking while they recur.
        self.previous = previous
        #: Tensor-aware chunking and codecs, and the delta chains of chunks.
        self.tensors = tensors
        # Told of every chunk stored or reused, for garbage-collection safety.
        self.observer = observer
        self.params = params
        self.workers = workers
        self.reference_time = reference_time
        self.progress = progress
        self.stats = IngestStats()
        self._seen = SeenSet()
        # Each in-flight chunk holds its bytes plus their encoding.
        self._slots = InFlight(min(workers * 2 + 2, 24))
        # The first chunk that failed: reading stops there instead of sending
        # every remaining chunk to a service that is down.
        self._error: BaseException | None = None

    def run(self, items: list[SourceItem]) -> tuple[Entry, ...]:
        with ThreadPoolExecutor(self.workers, thread_name_prefix="cas-put") as pool:
            pending: list[tuple[SourceItem, Digest | None, list[Future[ChunkRef]]]] = []
            try:
                for item in items:
                    if item.type == "file":
                        whole, futures = self._submit_file(pool, item)
                        pending.append((item, whole, futures))
                    else:
                        pending.append((item, None, []))
                return tuple(self._entry(item, whole, fs) for item, whole, fs in pending)
            except BaseException:
                for _, _, futures in pending:
                    for future in futures:
                        future.cancel()
                raise

    def _submit_file(
        self, pool: ThreadPoolExecutor, item: SourceItem
    ) -> tuple[Digest, list[Future[ChunkRef]]]:
        # The whole-file hash of a large file runs on its own thread, beside
        # the reading and cutting here, which are the put's critical path.
        hasher = hasher_for(item.size)
        try:
            return self._submit_chunks(pool, item, hasher)
        finally:
            hasher.close()

    def _submit_chunks(
        self, pool: ThreadPoolExecutor, item: SourceItem, hasher: StreamingHasher
    ) -> tuple[Digest, list[Future[ChunkRef]]]:
        futures: list[Future[ChunkRef]] = []
        try:
            with open(item.absolute, "rb") as stream:
                spans, plan, former = None, None, None
                if self.tensors is not None:
                    spans = tensor_spans(stream, item.size, self.params)
                if self.tensors is not None and spans is not None:
                    plan = self.tensors.plan(item.path, spans)
                elif self.previous is not None:
                    former = self.previous(item.path)
                cuts = cut_file(
                    stream,
                    item.size,
                    self.params,
                    spans=spans,
                    former=former,
                    on_read=self._reader(hasher),
                    name=str(item.absolute),
                )
                self.submit(pool, cuts, plan, futures)
        except OSError as err:
            raise SourceError(f"cannot read {item.absolute}: {err.strerror}") from None
        return hasher.digest(), futures

    def submit(
        self,
        pool: ThreadPoolExecutor,
        work: Iterable[tuple[memoryview, int, Span | None, bytes | None]],
        plan: FilePlan | None,
        futures: list[Future[ChunkRef]],
    ) -> None:
        """Hand each chunk of ``work`` to the workers, waiting while too many are in flight.

        ``futures`` receives one future per chunk, in file order, as they are
        submitted, so that a caller that fails half-way can cancel them.
        """
        for view, index, span, known in work:
            size = len(view)
            self._slots.acquire(size)
            try:
                if self._error is not None:
                    raise self._error
                future = pool.submit(self._store_chunk, view, index, span, plan, known)
            except BaseException:
                self._slots.release(size)
                raise
            future.add_done_callback(functools.partial(self._done, size))
            futures.append(future)

    def run_parts(
        self, path: str, mode: int, spans: Iterable[tuple[memoryview, Span]], plan: FilePlan
    ) -> Entry:
        """Store one file that arrives as spans, in order, instead of being read from disk."""
        hasher = BackgroundHasher()
        on_read = self._reader(hasher)
        futures: list[Future[ChunkRef]] = []

        def work() -> Iterator[tuple[memoryview, int, Span | None, bytes | None]]:
            for index, (view, span) in enumerate(spans):
                on_read(view)
                yield view, index, span, None

        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="cas-put") as pool:
                try:
                    self.submit(pool, work(), plan, futures)
                    chunks = self.chunk_refs(futures)
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
            whole = hasher.digest()
        finally:
            hasher.close()
        return Entry(path, "file", mode, sum(c.length for c in chunks), whole, chunks)

    def _done(self, size: int, future: Future[ChunkRef]) -> None:
        if not future.cancelled() and self._error is None:
            self._error = future.exception()
        self._slots.release(size)

    def _reader(self, hasher: StreamingHasher) -> Callable[[memoryview], None]:
        def on_read(view: memoryview) -> None:
            hasher.update(view)
            with self.stats._lock:
                self.stats.bytes_read += len(view)
            if self.progress is not None:
                self.progress(len(view))

        return on_read

    def _store_chunk(
        self,
        view: memoryview,
        index: int = 0,
        span: Span | None = None,
        plan: FilePlan | None = None,
        known: bytes | None = None,
    ) -> ChunkRef:
        digest = Digest(known if known is not None else hash_bytes(view))
        if self._seen.add(digest):
            encode = None
            if self.tensors is not None and span is not None and plan is not None:
                encode = self.tensors.encoder(view, index, span, plan, digest)
            reference = self.reference_time()
            result = self.chunks.put(view, digest=digest, reference_time=reference, encode=encode)
            if self.tensors is not None:
                # A delta chunk, ours or found, needs its bases kept too.
                chain = self.tensors.chains.settle(digest, bool(result.written))
                self.tensors.keep(chain, reference, self.observer)
            if self.observer is not None:
                self.observer(result)
        else:
            result = PutResult(digest, len(view), 0)
        self.stats.record(result)
        return ChunkRef(digest, len(view))

    def chunk_refs(self, futures: list[Future[ChunkRef]]) -> tuple[ChunkRef, ...]:
        """The chunks of a file once all are stored, each with its chain of delta bases."""
        chunks = tuple(f.result() for f in futures)
        if self.tensors is not None:
            # Every chunk is settled now, those stored twice in this put too.
            of = self.tensors.chains.of
            chunks = tuple(replace(c, bases=of(c.digest)) for c in chunks)
        return chunks

    def _entry(
        self, item: SourceItem, whole: Digest | None, futures: list[Future[ChunkRef]]
    ) -> Entry:
        if item.type == "file":
            chunks = self.chunk_refs(futures)
            size = sum(c.length for c in chunks)
            if size != item.size:
                raise SourceError(
                    f"{item.absolute} changed while it was read ({item.size} -> {size} bytes)"
                )
            return Entry(item.path, "file", item.mode, size, whole, chunks)
        if item.type == "symlink":
            return Entry(item.path, "symlink", item.mode, target=item.target)
        return Entry(item.path, "dir", item.mode)


class FormerFiles:
    """A put's former versions of its files: its parents', then the latest's.

    A file is found by its path, or else, as :func:`cas.tensors._safetensors.find_file`
    finds it, as :attr:`Manifest.only_file` whatever its name: a
    checkpoint saved under a new name at each step (``step-2000.pt`` after
    ``step-1000.pt``) is still cut along its former version. Following a
    file that turns out unrelated costs one chunk's hash, never a wrong cut.
    """

    def __init__(
        self, parents: Sequence[Manifest], latest: Future[Sequence[Numbered]] | Sequence[Numbered]
    ) -> None:
        self._parents = parents
        self._latest = latest
        self._files: dict[str, Entry] | None = None
        self._only_file: Entry | None = None

    def find(self, path: str) -> Entry | None:
        if self._files is None:
            latest = self._latest.result() if isinstance(self._latest, Future) else self._latest
            files: dict[str, Entry] = {}
            for manifest in (*self._parents, *(m for m, _ in latest)):
                for entry in iter_files(manifest.entries):
                    files.setdefault(entry.path, entry)
                if self._only_file is None:
                    self._only_file = manifest.only_file
            self._files = files
        return self._files.get(path, self._only_file)


def iter_files(entries: tuple[Entry, ...]) -> Iterator[Entry]:
    return (e for e in entries if e.type == "file")


def build_entries(items: list[SourceItem], ingestor: Ingestor) -> tuple[Entry, ...]:
    entries = ingestor.run(items)
    check_entries(entries)
    return entries
