"""Versions written by several processes at once, and read back by byte ranges.

A distributed checkpoint is written by every rank of a job, each holding
its own shards. Each process opens a :class:`ShardWriter` and writes its
files from memory (chunked, hashed, compressed and uploaded by itself, in
parallel with the others), then seals them into a :class:`ShardPart`: a
small, picklable account of its files, its tensors and what its write
session keeps young. One process, the coordinator, gathers the parts and
commits exactly one version, under the same rules as a put: chunks durable
first, then the manifest, then the version ref, and every object the
version names younger than the grace of garbage collection at the commit
(docs/gc.md). A process that dies or fails before the commit leaves no
version, only unreferenced objects that garbage collection reclaims.

:class:`VersionFiles` is the reading side: byte ranges of a version's
files, fetched in parallel and verified, and the version's tensor index.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InvalidInputError, NotFoundError
from ..gc._session import SessionRecords, WriteSession
from ..repository._manifest import DeltaBase, Entry, Manifest, check_entries, check_relative_path

# What cas.store offers with the writer, from where it lives.
from ..tensors._index import INDEX_PATH as INDEX_PATH
from ..tensors._index import IndexedTensor as IndexedTensor
from ..tensors._index import Shard as Shard
from ..tensors._index import TensorIndex as TensorIndex
from ..tensors._index import load_index
from ..transfer._sharded import IndexRow, Part, PartsCutter
from ..transfer._sharded import TensorPart as TensorPart
from ._values import Version
from ._writing import Record as Record
from ._writing import VersionWriter

if TYPE_CHECKING:
    # Imported where used, as the put's modules are by the facade: a command
    # that does not write or read a version in parts does not load them.
    from ..chunks._listing import ChunkIndex
    from ..tensors._writer import DeltaMode, FilePlan
    from ..transfer._ingest import Ingestor, ProgressFn
    from ..transfer._ranges import Fill, RangeReader, Request
    from ._facade import Store

#: Files of a version written in parts get ordinary permissions.
FILE_MODE = 0o644


# Not slots: it crosses processes, and frozen slotted dataclasses do not
# unpickle on Python 3.10.
@dataclass(frozen=True)
class ShardPart:
    """What one process wrote of a version, for the process that commits it. Pickles."""

    writer: str  # the writer's id: a coordinator skips its own part
    files: bytes  # the entries of its files, as a manifest
    tensors: bytes  # the tensor index of its files
    records: SessionRecords
    #: The version (key, number) whose chunks its delta chunks were coded against.
    delta_source: tuple[str, int] | None = None


class ShardWriter:
    """One process's share of a version written by several: its files, uploaded now.

    Make one with :meth:`Store.shard_writer` in every process. Each calls
    :meth:`write` for its files and :meth:`seal` when done, and sends the
    :class:`ShardPart` to the coordinator, whose own writer then
    :meth:`commit`\\ s the version from all the parts. :meth:`close` ends a
    writer (it does not undo uploads: unreferenced chunks are garbage).

    Tensors are stored as deltas of the same tensors (by name and range) in
    the first parent, else in the key's latest version, as a put stores
    them (``deltas``); ``latest`` pins the number of that latest version, so
    that every process codes against the same one. The commit records the
    version the deltas were coded against as the manifest's delta base.
    """

    def __init__(
        self,
        store: Store,
        record: Record,
        *,
        parents: Sequence[str] | None = None,
        size_hint: int = 0,
        workers: int | None = None,
        progress: ProgressFn | None = None,
        deltas: DeltaMode = "latest",
        latest: int | None = None,
    ) -> None:
        self.store = store
        self.record = record
        self.id = uuid.uuid4().hex
        chosen = record.parents if parents is None else parents
        self.parents = tuple(dict.fromkeys(store._parent(p) for p in chosen))
        self._deltas = deltas
        self._latest_number = latest
        self.entries: dict[str, Entry] = {}
        self.rows: list[IndexRow] = []
        self._writer = VersionWriter(
            store.backend, store.config, store.refs, store.clock, store.load_manifest, store.summary
        )
        workers = store._check_workers(workers)
        self.session = WriteSession(store.backend, clock=store.clock, workers=workers).start()
        self._latest = ThreadPoolExecutor(1, thread_name_prefix="cas-latest")
        self._index: ChunkIndex | None = None
        try:
            self.ingestor, self._plan = self._pipeline(workers, size_hint, progress)
        except BaseException:
            self.close()
            raise

    def _pipeline(
        self, workers: int, size_hint: int, progress: ProgressFn | None
    ) -> tuple[Ingestor, FilePlan]:
        """A put's pipeline, with this writer's session, parents and chunk listing."""
        from ..chunks._listing import plan_in_background

        store = self.store
        expected = -(-size_hint // store.config.chunker.avg_size)
        self._index = plan_in_background(store.backend, expected, workers=workers)
        latest = self._latest.submit(
            self._writer.latest_manifest, self.record.key, self.parents, self._latest_number
        )
        parent_manifests = [store.load_manifest(p.manifest_id) for p in self.parents]
        ingestor = self._writer.ingestor(
            self.session,
            self._index,
            self.parents,
            parent_manifests,
            latest,
            progress,
            workers,
            deltas=self._deltas,
        )
        assert ingestor.tensors is not None
        return ingestor, ingestor.tensors.plan_parts()

    def write(self, path: str, parts: Iterable[Part], *, mode: int = FILE_MODE) -> int:
        """Store file ``path`` of the version from ``parts``, in order; returns its size."""
        if path == INDEX_PATH:
            raise InvalidInputError(f"{INDEX_PATH!r} is the version's tensor index, written by cas")
        return self._write(path, parts, mode)

    def _write(self, path: str, parts: Iterable[Part], mode: int) -> int:
        check_relative_path(path)
        if path in self.entries:
            raise InvalidInputError(f"file {path!r} was already written")
        cutter = PartsCutter(path, self.store.config.chunker)
        entry = self.ingestor.run_parts(path, mode, cutter.spans(parts), self._plan)
        self.entries[path] = entry
        self.rows.extend(cutter.rows)
        return entry.size

    def seal(self) -> ShardPart:
        """Make what was written durable and young, and describe it for the coordinator."""
        self.store.backend.flush()
        self.session.before_commit()
        files = Manifest(self.record.key, "directory", "", tuple(self.entries.values()))
        return ShardPart(
            self.id,
            files.to_bytes(),
            TensorIndex.build(self.rows).to_bytes(),
            self.session.export(),
            self._delta_source(),
        )

    def _delta_source(self) -> tuple[str, int] | None:
        tensors = self.ingestor.tensors
        return tensors.delta_source if tensors is not None else None

    def commit(self, parts: Iterable[ShardPart]) -> Version:
        """Commit the version made of this writer's files and every other part's (coordinator)."""
        entries = dict(self.entries)
        rows = list(self.rows)
        sources = [self._delta_source()]
        for part in parts:
            sources.append(part.delta_source)
            if part.writer == self.id:
                continue  # our own, as sealed: what we hold now is newer
            for entry in Manifest.from_bytes(part.files, name="a process's files").entries:
                if entry.path in entries:
                    raise InvalidInputError(f"two processes wrote file {entry.path!r}")
                entries[entry.path] = entry
            rows.extend(TensorIndex.from_bytes(part.tensors).rows())
            self.session.absorb(part.records)
        if rows:
            self._write(INDEX_PATH, [TensorIndex.build(rows).to_bytes()], FILE_MODE)
            entries[INDEX_PATH] = self.entries[INDEX_PATH]
        ordered = tuple(entries[path] for path in sorted(entries))
        check_entries(ordered)
        key = self.record.key
        # Every process took its bases from the same pinned version, if any.
        source = next((s for s in sources if s is not None), None)
        delta_base = DeltaBase(*source) if source is not None else None
        manifest = self.record.manifest("directory", self.parents, ordered, delta_base)
        former_kind = self._latest.submit(self._writer.former_kind, key)
        # Every process flushed its chunks when it sealed; this commits.
        ref = self._writer.commit_manifest(self.session, manifest, former_kind, None, stacklevel=4)
        for tag in self.record.tags:
            self.store.refs.set_tag(key, tag, ref.number)
        return self.store._catalog().version(ref, manifest, self.record.tags)

    def close(self) -> None:
        """End this writer: its marker goes; nothing it wrote is referenced unless committed."""
        self._latest.shutdown(wait=True)
        if self._index is not None:
            self._index.close()
        self.session.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VersionFiles:
    """The files of one version, read by byte ranges (a loader of shards needs no more)."""

    def __init__(self, store: Store, ref: str) -> None:
        version_ref = store.resolve(ref)
        manifest = store.load_manifest(version_ref.manifest_id)
        self.store = store
        self.version: Version = store._catalog().version(version_ref, manifest)
        self.files = {e.path: e for e in manifest.entries if e.type == "file"}
        #: Where each tensor lies, for a version written in parts; None for others.
        self.tensors: TensorIndex | None = load_index(
            store.chunks, manifest, label=self.version.ref
        )

    def size(self, path: str) -> int:
        entry = self.files.get(path)
        if entry is None:
            raise NotFoundError(f"{self.version.ref}: no file {path!r} in this version")
        return entry.size

    def read(self, path: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes [start, end) of file ``path`` (to its end by default), verified."""
        stop = self.size(path) if end is None else end
        (pieces,) = self.read_ranges([(path, start, stop)])
        return b"".join(pieces)

    def read_ranges(
        self, requests: Sequence[Request], *, workers: int | None = None
    ) -> Iterator[list[memoryview]]:
        """For each ``(path, start, end)`` in turn, the pieces of its bytes, in order.

        Chunks are fetched ahead by ``workers`` threads (default: the
        store's), within a bound on the bytes held; a chunk shared by two
        neighbouring ranges is fetched once. The pieces are views of the
        chunks: holding them holds the chunks.
        """
        return self._range_reader(workers).read(requests)

    def read_into(self, fills: Sequence[Fill], *, workers: int | None = None) -> None:
        """For each ``(path, start, end, buffer)``, put those bytes of the file in ``buffer``.

        The chunks are decoded straight into the buffers where they fit
        whole, by ``workers`` threads (default: the store's), and verified
        there; a buffer holds nothing to trust if this raises.
        """
        self._range_reader(workers).read_into(fills)

    def _range_reader(self, workers: int | None) -> RangeReader:
        from ..transfer._ranges import RangeReader

        workers = self.store._check_workers(workers)
        return RangeReader(self.store.chunks, self.files, workers=workers, label=self.version.ref)
