"""The writer's side of tensor-aware storage: boundaries, codecs, delta bases, chains.

For a safetensors file a put cuts tensor-aligned chunks (:func:`cas.tensors._safetensors.plan`)
and encodes each float chunk byte-grouped. When a former version holds the
same tensor range, the chunk may instead be stored as a delta of that
version's chunk: fine-tuning moves every weight a little, so most exponent
bits and many whole elements agree, and the delta (the integer difference
of the elements, or their XOR in stores of format 1 and 2) compresses three
to four times better than bf16 weights themselves. The former version is
the put's first parent that has the file, else the key's latest version:
a delta base is a storage choice, never recorded as lineage. A delta is
kept only when it saves enough to pay for the extra read it costs.

Delta chains are kept short: rebuilding a chunk never takes more than
``max_reads`` reads, and a read of a version takes few on average, since
every link of a chain costs about what decoding a whole chunk does. Each
tensor range follows a cycle of :data:`RENEWAL` versions (see
:func:`chain_level`): it starts from a root, a chunk stored whole; the
:data:`FRONT` versions after it are deltas of the root itself (two reads);
then chains grow one version at a time up to ``max_reads`` reads and start
again from the root. A root only moves forward: at the end of its cycle the
chunk is stored whole, the new root, unless a delta against the old one is
still under :data:`~cas.tensors._encoding.RENEWAL_GAIN` of the chunk stored
whole (little has changed since). The cycles of a file's chunks are
staggered by where each chunk lies in the file, so every version stores
about as many bytes whole, and re-bases about as many, as any other
(docs/performance.md, "Deltas without asking").

Every chunk a manifest names lists its chain of bases, so garbage
collection keeps the chain alive from manifests alone. A put learns the
chain of a chunk it reuses from its parents' manifests, or else from the
chunk's header; it also keeps each base younger than the grace period of
garbage collection, as it does every chunk it reuses (docs/gc.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal

from ..chunks import _codec as codec
from ..chunks._chunking import ChunkerParams
from ..chunks._store import ChunkStore, PutResult, SeenSet
from ..digest import Digest
from ..errors import (
    CasError,
    ConcurrentCollectionError,
    CorruptObjectError,
    NotFoundError,
)
from ..repository import _layout as layout
from ..repository._manifest import MAX_CHAIN, ChunkRef, Entry, Manifest
from ._encoding import DELTA_GAIN, RENEWAL_GAIN, Elements, TensorCodec
from ._formats import parse
from ._index import load_index
from ._safetensors import Header, Piece, Span, StoredFile, chunk_keys, find_file

#: A former version of the key being put, by manifest and version number.
Numbered = tuple[Manifest, int]
#: Where a put takes delta bases from: the parents it names and else the key's
#: latest version, the parents only, or nowhere.
DeltaMode = Literal["latest", "parents", "none"]

#: Versions between two roots of the chains of one tensor range.
RENEWAL = 14
#: Versions after a root that are deltas of the root itself.
FRONT = 4


def chain_level(phase: int, max_reads: int) -> int:
    """How deep a chunk at ``phase`` of its cycle goes: 0 for a root, else the
    number of bases its chain may have (at most ``max_reads - 1``)."""
    step = phase % RENEWAL
    if step == 0:
        return 0
    if step <= FRONT:
        return 1
    return 1 + (step - FRONT - 1) % (max_reads - 1)


@dataclass(frozen=True, slots=True)
class ParentChunk:
    """A chunk of the parent version, as a delta base candidate."""

    digest: Digest
    length: int
    bases: tuple[Digest, ...]


@dataclass(frozen=True, slots=True)
class FilePlan:
    """How a put cuts one safetensors file, and what a former version stored for it."""

    spans: list[Span]
    #: The former version's chunks by what they hold, when it has this file.
    parents: dict[tuple[Piece, ...], ParentChunk]
    #: The former version's number plus one: the re-basing clock.
    clock: int
    #: The former version (key, number) whose chunks are the delta bases.
    source: tuple[str, int] | None = None
    #: The file's size, which staggers its chunks' cycles (0: by chunk index).
    size: int = 0

    def phase(self, index: int, span: Span) -> int:
        """Where chunk ``index`` (``span``) stands in its cycle of chain shapes.

        Offset by its place in the file, so that each version's renewals and
        re-bases take an even share of the file's bytes, however unequal its
        chunks (a file without a known size staggers by chunk index).
        """
        offset = RENEWAL * span.offset // self.size if self.size else index
        return self.clock + offset


_NO_PARENTS = FilePlan([], {}, 0)


class Chains:
    """The chain of delta bases of every chunk a put names; thread-safe."""

    def __init__(self, chunks: ChunkStore) -> None:
        self.chunks = chunks
        self._known: dict[bytes, tuple[Digest, ...]] = {}
        self._pending: dict[bytes, tuple[Digest, ...]] = {}
        self._later: list[Future[Sequence[Numbered]]] = []
        self._lock = threading.Lock()

    def learn_later(self, versions: Future[Sequence[Numbered]]) -> None:
        """Versions still being read: learned before the first header read they could spare."""
        with self._lock:
            self._later.append(versions)

    def _learn_pending(self) -> bool:
        with self._lock:
            pending, self._later = self._later, []
        for future in pending:
            for manifest, _ in future.result():
                self.learn(manifest)
        return bool(pending)

    def learn(self, manifest: Manifest) -> None:
        """What a manifest records: each chunk's chain, and so each base's own chain."""
        with self._lock:
            for entry in manifest.entries:
                for chunk in entry.chunks:
                    chain = chunk.bases
                    self._known.setdefault(chunk.digest.raw, chain)
                    for index, base in enumerate(chain):
                        self._known.setdefault(base.raw, chain[index + 1 :])

    def record(self, digest: Digest, chain: tuple[Digest, ...]) -> None:
        """The chain of a chunk whose stored form the caller has just written or read."""
        with self._lock:
            self._known[digest.raw] = chain

    def named(self, digest: Digest) -> bool:
        """Whether a manifest (or a chunk header) already told this chunk's chain."""
        with self._lock:
            return digest.raw in self._known

    def propose(self, digest: Digest, chain: tuple[Digest, ...]) -> None:
        """The chain of the encoding this put is about to write for ``digest``."""
        with self._lock:
            self._pending[digest.raw] = chain

    def settle(self, digest: Digest, written: bool) -> tuple[Digest, ...]:
        """The chain of a chunk just put: ours if our bytes were stored, else the stored one's."""
        with self._lock:
            proposed = self._pending.pop(digest.raw, None)
            if written:
                chain = proposed if proposed is not None else ()
                self._known[digest.raw] = chain
                return chain
        return self.of(digest)

    def of(self, digest: Digest) -> tuple[Digest, ...]:
        """The chain of a stored chunk: known, or read from the headers along it."""
        with self._lock:
            known = self._known.get(digest.raw)
        if known is None and self._learn_pending():
            with self._lock:
                known = self._known.get(digest.raw)
        if known is not None:
            return known
        chain: list[Digest] = []
        current = digest
        while True:
            base = self._base(current)
            if base is None:
                break
            if len(chain) >= MAX_CHAIN or base == digest:
                raise CorruptObjectError(
                    f"chunk {digest.hex}: its chain of delta bases does not end"
                )
            chain.append(base)
            with self._lock:
                rest = self._known.get(base.raw)
            if rest is not None:
                chain.extend(rest)
                break
            current = base
        result = tuple(chain)
        with self._lock:
            self._known[digest.raw] = result
        return result

    def _base(self, digest: Digest) -> Digest | None:
        try:
            head = self.chunks.backend.get_range(
                layout.chunk_key(digest), 0, codec.HEADER.size + codec.BASE.size
            )
        except NotFoundError:
            raise ConcurrentCollectionError(
                f"chunk {digest.hex} vanished while this put was reusing it; "
                "nothing was committed, run the put again"
            ) from None
        raw = codec.delta_base(head)
        return Digest(raw) if raw is not None else None


class TensorWriter:
    """Plans and encodes the chunks of safetensors files for one put."""

    def __init__(
        self,
        chunks: ChunkStore,
        params: ChunkerParams,
        *,
        parents: Sequence[Numbered] = (),
        latest: Sequence[Numbered] | Future[Sequence[Numbered]] = (),
        max_reads: int = codec.DEFAULT_DELTA_READS,
        level: int = codec.DEFAULT_LEVEL,
        fse: bool = False,
        method: codec.Codec = codec.Codec.DELTA,
        deltas: DeltaMode = "latest",
    ) -> None:
        """``parents`` are the versions the put names as parents; ``latest`` is
        the key's latest version unless it is one of them. ``deltas`` says where
        delta bases come from: the parents only, the parents else the latest
        version (the default), or nowhere. ``method`` is the delta codec."""
        self.chunks = chunks
        self.params = params
        self.parents = list(parents)
        self.max_reads = max_reads if deltas != "none" else 1
        self.level = level
        self.codec = TensorCodec(level, fse, method)
        self.chains = Chains(chunks)
        for manifest, _ in self.parents:
            self.chains.learn(manifest)
        # The latest version tells chains too: a reused chunk it names costs no
        # read of its header. It may still be on its way (a Future), read
        # while the put reads its files.
        self._latest = latest
        self._auto = deltas == "latest" and not self.parents
        if isinstance(latest, Future):
            self.chains.learn_later(latest)
        else:
            for manifest, _ in latest:
                self.chains.learn(manifest)
        self._kept = SeenSet()
        #: The version whose chunks served as delta bases of chunks this put wrote.
        self.delta_source: tuple[str, int] | None = None

    # -- the reader's side: what to cut ------------------------------------------------

    def plan(self, path: str, spans: list[Span]) -> FilePlan:
        """A safetensors file's plan: its tensor-aligned ``spans`` and a former version's chunks."""
        if self.max_reads < 2:
            return FilePlan(spans, {}, 0)
        return self._former_chunks(path, spans)

    def plan_parts(self) -> FilePlan:
        """The plan of the files of a version written in parts: only their delta bases.

        Such a version says where its tensors lie in its tensor index, so
        every file of the former version that the index describes offers
        bases: a shard that moved to another rank's file keeps its base. The
        former version is the first parent written in parts, else (without
        parents) the key's latest version, as for a put.
        """
        if self.max_reads < 2:
            return _NO_PARENTS
        for manifest, number in self._bases_from():
            index = load_index(self.chunks, manifest, label=f"{manifest.key}@{number}")
            if index is None:
                continue
            found: dict[tuple[Piece, ...], ParentChunk] = {}
            for entry in manifest.entries:
                if entry.type == "file" and entry.path in index.files:
                    found.update(self._keyed(entry, index.header(entry.path)))
            return FilePlan([], found, number + 1, (manifest.key, number))
        return _NO_PARENTS

    def _bases_from(self) -> Sequence[Numbered]:
        """The versions delta bases may come from, in order of preference."""
        if not self._auto:
            return self.parents
        latest = self._latest
        return latest.result() if isinstance(latest, Future) else latest

    def _former_chunks(self, path: str, spans: list[Span]) -> FilePlan:
        for manifest, number in self._bases_from():
            try:
                entry = find_file(manifest, path)
            except CasError:
                continue
            header = self._stored_header(entry, f"{manifest.key}@{number}")
            if header is None:
                continue
            size = spans[-1].offset + spans[-1].length if spans else 0
            keyed = self._keyed(entry, header)
            return FilePlan(spans, keyed, number + 1, (manifest.key, number), size)
        return FilePlan(spans, {}, 0)

    @staticmethod
    def _keyed(entry: Entry, header: Header) -> dict[tuple[Piece, ...], ParentChunk]:
        """The chunks of a stored file that hold whole tensor pieces, by what they hold."""
        lengths = [c.length for c in entry.chunks]
        out = {}
        for key, chunk in zip(chunk_keys(header, lengths), entry.chunks, strict=True):
            if key is not None:
                out[key] = ParentChunk(chunk.digest, chunk.length, chunk.bases)
        return out

    def _stored_header(self, entry: Entry, label: str) -> Header | None:
        try:
            return parse(StoredFile(self.chunks, entry, label).read, entry.size)
        except ValueError:
            return None  # the parent's file is not a tensor file: no bases from it

    # -- the workers' side: how to store ---------------------------------------------------

    def encoder(
        self, view: memoryview, index: int, span: Span, file_plan: FilePlan, digest: Digest
    ) -> Callable[[], bytes]:
        """The stored form of a span, computed only if the chunk must be written."""

        def encode() -> bytes:
            if self.chains.named(digest):
                # A live manifest names this chunk with the chain it had, yet it
                # is missing (moved to quarantine, say): a chain other than that
                # one would go unmarked once this put's version is deleted. A
                # chunk with no base is safe under any recorded chain.
                blob, chain = self._encode(view, index, span, _NO_PARENTS)
            else:
                blob, chain = self._encode(view, index, span, file_plan)
            self.chains.propose(digest, chain)
            return blob

        return encode

    def _encode(
        self, view: memoryview, index: int, span: Span, file_plan: FilePlan
    ) -> tuple[bytes, tuple[Digest, ...]]:
        if span.layout is None or len(view) % span.itemsize:
            return codec.encode(view, self.level), ()
        parent = file_plan.parents.get(span.key)
        if parent is None or parent.length != len(view) or self.max_reads < 2:
            return self._grouped(view, span), ()
        level = chain_level(file_plan.phase(index, span), self.max_reads)
        base, chain = self._base(parent, level)
        # The base is as long as the parent chunk, and its own chain follows it in ours.
        base_ref = ChunkRef(base, parent.length, chain[1:])
        base_raw = self.chunks.read(base_ref, context=f"delta base for {span.key[0].name!r}")
        # A root due for renewal: the delta against it must be small to be kept.
        gain = RENEWAL_GAIN if level == 0 and parent.bases else DELTA_GAIN
        elements = _elements(span)
        blob, is_delta = self.codec.delta_or_whole(view, elements, base_raw, base.raw, gain)
        if not is_delta:
            return blob, ()
        self.delta_source = file_plan.source
        return blob, chain

    @staticmethod
    def _base(parent: ParentChunk, level: int) -> tuple[Digest, tuple[Digest, ...]]:
        """The base to delta against, and the chain that gives the new chunk: the
        latest chunk of the parent's chain that leaves the new one at most
        ``level`` bases deep (a root due for renewal: its root)."""
        chain = (parent.digest, *parent.bases)
        for index, base in enumerate(chain):
            if len(chain) - 1 - index < max(level, 1):
                return base, chain[index:]
        raise AssertionError("a chain ends at its root")  # pragma: no cover

    def _grouped(self, view: memoryview, span: Span) -> bytes:
        return self.codec.grouped(view, _elements(span))

    def keep(
        self,
        chain: tuple[Digest, ...],
        reference_time: float | None,
        observer: Callable[[PutResult], None] | None,
    ) -> None:
        """Keep each base of a chain younger than the grace, as a reused chunk is kept."""
        refresh_after = self.chunks.refresh_after
        for base in chain:
            if not self._kept.add(base):
                continue
            key = layout.chunk_key(base)
            try:
                mtime = self.chunks.backend.stat(key).mtime
                prior = None
                if (
                    refresh_after is not None
                    and reference_time is not None
                    and reference_time - mtime > refresh_after
                ):
                    self.chunks.backend.touch(key)
                    prior, mtime = mtime, reference_time
            except NotFoundError:
                raise ConcurrentCollectionError(
                    f"delta base {base.hex} vanished while this put was using it; "
                    "nothing was committed, run the put again"
                ) from None
            if observer is not None:
                observer(PutResult(base, 0, 0, mtime, prior))


def _elements(span: Span) -> Elements:
    assert span.layout is not None
    return Elements(span.itemsize, span.layout)
