"""Chunks by hash: encode and store once; read, decode and verify before use."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from ..backends.base import Backend, ObjectInfo
from ..digest import Digest, hash_bytes
from ..errors import (
    AlreadyExistsError,
    CorruptObjectError,
    IntegrityError,
    MismatchedObjectError,
    MissingObjectError,
    NotFoundError,
)
from ..repository import _layout as layout
from ..repository._manifest import MAX_CHAIN, MAX_CHUNK_LENGTH, ChunkRef
from . import _codec as codec
from . import _floatcodec as floatcodec
from ._cache import LocalCache
from ._listing import ChunkIndex


@dataclass(frozen=True, slots=True)
class PutResult:
    """What storing one chunk did."""

    digest: Digest
    length: int
    #: Stored bytes written by this call; 0 when the chunk was already there.
    written: int
    #: A lower bound of the chunk's modification time after this call, on the
    #: backend's clock (None without a reference time): what a put must keep
    #: younger than the grace period of garbage collection.
    mtime: float | None = None
    #: When this call touched an existing chunk: its modification time before.
    prior_mtime: float | None = None


class ChunkStore:
    """Writes each chunk once (create-only) and verifies every chunk it reads.

    ``refresh_after`` is the age (in seconds, on the backend's clock as seen
    through object times) beyond which a reused chunk is touched, so that a
    concurrent garbage collection sees it as recent; see docs/gc.md.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        level: int = codec.DEFAULT_LEVEL,
        refresh_after: float | None = None,
        index: ChunkIndex | None = None,
        cache: LocalCache | None = None,
    ) -> None:
        self.backend = backend
        self.level = level
        self.refresh_after = refresh_after
        #: A listing of the store's chunks that answers "is it there, how old"
        #: instead of a stat per chunk; see :mod:`cas.chunks._listing`.
        self.index = index
        #: Chunk objects kept on local disk for the next read (remote stores);
        #: every object taken from it is verified as one from the store is.
        self.cache = cache

    def put(
        self,
        data: bytes | memoryview,
        *,
        digest: Digest | None = None,
        reference_time: float | None = None,
        encode: Callable[[], bytes] | None = None,
    ) -> PutResult:
        """Store one chunk unless present.

        ``digest`` may be passed when the caller hashed ``data`` already;
        ``reference_time`` is "now" on the backend's clock, for refreshes.
        ``encode`` returns the stored form when the chunk must be written
        (tensor chunks: byte-grouped or a delta); the default is the store's
        zstd, decided per chunk. It runs only for chunks not already present.
        """
        if digest is None:
            digest = Digest(hash_bytes(data))
        key = layout.chunk_key(digest)
        if self.index is None or not self.index.listed():
            return self._put_checked(data, digest, key, reference_time, encode)
        listed = self.index.mtime(digest)
        if listed is not None:
            times = self._refresh(key, listed, reference_time)
            if times is not None:
                return PutResult(digest, len(data), 0, *times)
        stored = self._create(data, digest, key, reference_time, encode)
        if stored is None:
            # Stored by someone else since the listing, which may be older
            # than reference_time: read its real time, as a stat would have.
            return self._put_checked(data, digest, key, reference_time, encode)
        return stored

    def _put_checked(
        self,
        data: bytes | memoryview,
        digest: Digest,
        key: str,
        reference_time: float | None,
        encode: Callable[[], bytes] | None = None,
    ) -> PutResult:
        """Stat the chunk; refresh it if present, else store it create-only."""
        try:
            info = self.backend.stat(key)
        except NotFoundError:
            pass
        else:
            times = self._refresh(key, info.mtime, reference_time)
            if times is not None:
                return PutResult(digest, len(data), 0, *times)
        stored = self._create(data, digest, key, reference_time, encode)
        if stored is None:
            # A concurrent writer stored the same bytes first (after our stat,
            # so after reference_time); same name, same content.
            return PutResult(digest, len(data), 0, reference_time)
        return stored

    def _create(
        self,
        data: bytes | memoryview,
        digest: Digest,
        key: str,
        reference_time: float | None,
        encode: Callable[[], bytes] | None,
    ) -> PutResult | None:
        """Encode and store the chunk create-only; None if it exists already."""
        blob = encode() if encode is not None else codec.encode(data, self.level)
        try:
            self.backend.put(key, blob, if_absent=True)
        except AlreadyExistsError:
            return None
        return PutResult(digest, len(data), len(blob), reference_time)

    def _refresh(
        self, key: str, mtime: float, reference_time: float | None
    ) -> tuple[float, float | None] | None:
        """Touch an old reused chunk; None if it vanished meanwhile (then store it again).

        Returns (lower bound of its mtime now, its mtime before a touch or None).
        """
        if self.refresh_after is None or reference_time is None:
            return mtime, None
        if reference_time - mtime > self.refresh_after:
            try:
                self.backend.touch(key)
            except NotFoundError:
                return None
            return reference_time, mtime
        return mtime, None

    def get(self, chunk: ChunkRef, *, context: str = "", tally: ReadTally | None = None) -> bytes:
        """Return the verified raw bytes of a chunk, as its manifest describes it.

        The manifest's length bounds the decoding: a chunk object whose
        header claims another length is refused before anything is
        allocated. ``context`` (e.g. "runs/a@3: file 'w.bin'") prefixes error
        messages so that a failure names the version and the file as well as
        the chunk. ``tally`` counts where the chunk objects came from.
        """
        raw = self.read(chunk, context=context, tally=tally)
        return raw if isinstance(raw, bytes) else bytes(raw)

    def read(
        self,
        chunk: ChunkRef,
        *,
        context: str = "",
        tally: ReadTally | None = None,
        known: Mapping[bytes, bytes | memoryview] | None = None,
    ) -> bytes | memoryview:
        """:meth:`get` without the copy into bytes: for a reader that only
        writes or hashes the chunk (a restore), a view of the decoded data.

        ``known`` gives raw bytes of delta bases the caller holds and has
        verified against their hashes (an update: the old copy of a changed
        chunk), by raw hash: a chain that reaches one of them reads no further.
        """
        where = f"{context}: chunk {chunk.digest.hex}" if context else f"chunk {chunk.digest.hex}"
        if not 0 <= chunk.length <= MAX_CHUNK_LENGTH:
            raise CorruptObjectError(f"{where}: a length of {chunk.length} bytes is not possible")
        # Headers may follow a chain the manifest lists, or end it early (a lost
        # delta put back whole), never leave it: garbage collection keeps only
        # the listed bases. Without a list (manifests older than deltas), the
        # headers lead, for at most MAX_CHAIN links.
        link = _Link(chunk.digest, chunk.length, chunk.bases or None, where, 0)
        reading = _Reading(tally if tally is not None else ReadTally(), known=known or {})
        if chunk.bases:
            built = self._build(link, reading)
            if built is not None:
                return built
        return self._get(link, reading)

    def _build(self, top: _Link, read: _Reading) -> memoryview | None:
        """A delta chunk rebuilt in one buffer, or None when anything did not check out.

        The chain's objects are read from the top down (each header names the
        next) until a root, or a base the caller holds or the cache keeps
        decoded; then that bottom goes into one buffer and each delta is
        applied to it in place from the bottom up (:func:`codec.apply_delta`):
        no buffer per link and no copy of a base. The result is hashed, as
        :meth:`_get` hashes it, and it and the root are kept in the cache. A
        damaged cache entry is dropped and its link fetched; on any other fault
        the chain is read again by :meth:`_get`, which names the damaged link.
        """
        chain: list[bytes] = []  # the objects fetched, top first
        start: bytes | memoryview | None = None  # raw bytes the chain ends on
        from_cache = False
        link = top
        try:
            while True:
                if link.depth and link.digest.raw in read.known:
                    start = read.known[link.digest.raw]
                    break
                kept = self._checked_entry(link) if self.cache is not None else None
                if kept is not None:
                    start, from_cache = kept, True
                    break
                blob = self._fetch(link.digest)
                if blob is None:
                    return None
                chain.append(blob)
                base_raw = codec.delta_base(blob)
                if base_raw is None:
                    break
                link = link.base(base_raw)
            out = floatcodec.buffer(top.length)
            deltas, root = chain, None
            if start is not None:
                out[:] = start
            elif codec.decode_into(chain[-1], out, top.where):
                deltas = chain[:-1]  # the last one fetched is the root
                if deltas and self.cache is not None:
                    root = (link.digest, bytes(out))  # other versions' chains end on it too
            else:
                return None
            for blob in reversed(deltas):
                codec.apply_delta(blob, out, top.where)
        except IntegrityError:
            return None
        if hash_bytes(out) != top.digest.raw:
            return None
        if from_cache:
            read.tally.add(cached=top.length)
        for blob in chain:
            read.tally.add(fetched=len(blob))
        if self.cache is not None and chain:
            self.cache.save(top.digest, out)
            if root is not None:
                self.cache.save(*root)  # checked on every use, as every entry is
        return out

    def _fetch(self, digest: Digest) -> bytes | None:
        try:
            return self.backend.get(layout.chunk_key(digest))
        except NotFoundError:
            return None

    def _get(self, link: _Link, read: _Reading) -> bytes | memoryview:
        """``read`` of one link of a delta chain: from the cache if it holds a good
        copy, else from the store.

        A base is as long as the chunk built on it, so one length bounds the
        chain. Every link's header, codec and length are checked; the hashes
        of the bases only when the chunk's own hash fails (``read.check_links``),
        to name the damaged link: a base that is not what its name says
        cannot rebuild bytes of the chunk's hash, and hashing each base cost
        a read of a delta chunk a tenth of its time. The cache keeps chunks
        decoded, so what it gives is hashed at once, at any depth; what the
        store gave is kept there once the chunk it rebuilds checked out.
        """
        if link.depth and link.digest.raw in read.known:
            return read.known[link.digest.raw]
        if self.cache is not None:
            cached = self._cached(link, read)
            if cached is not None:
                return cached
        try:
            blob = self.backend.get(layout.chunk_key(link.digest))
        except NotFoundError:
            what = f"{link.where}: its delta base {link.digest.hex}" if link.depth else link.where
            raise MissingObjectError(f"{what} is missing from the store") from None
        read.tally.add(fetched=len(blob))
        try:
            raw = self._decode(blob, link, read)
        except _Damaged as damage:
            raise damage.error from None
        read.fetched.append((link.digest, raw))
        self._keep_fetched(link, read)
        return raw

    def _cached(self, link: _Link, read: _Reading) -> bytes | None:
        """:meth:`_checked_entry`, counted, and the chain's fetched links kept once
        it is the top."""
        raw = self._checked_entry(link)
        if raw is not None:
            read.tally.add(cached=len(raw))
            self._keep_fetched(link, read)
        return raw

    def _checked_entry(self, link: _Link) -> bytes | None:
        """The link's raw bytes from the cache if it holds them and they hash to its
        name; a damaged entry is dropped (and reported), and the store asked instead."""
        assert self.cache is not None
        raw = self.cache.load(link.digest)
        if raw is None:
            return None
        if len(raw) != link.length:
            damage = f"{len(raw)} bytes where the chunk has {link.length}"
        elif hash_bytes(raw) != link.digest.raw:
            damage = f"{link.name} is corrupt: its content does not match its hash"
        else:
            return raw
        self.cache.discard(link.digest, damage)
        return None

    def _keep_fetched(self, link: _Link, read: _Reading) -> None:
        """Once a whole chain checked out (its top link), cache what it fetched, decoded."""
        if link.depth == 0:
            if self.cache is not None:
                for digest, raw in read.fetched:
                    self.cache.save(digest, raw)
            read.fetched.clear()

    def _decode(self, blob: bytes, link: _Link, read: _Reading) -> bytes | memoryview:
        """The raw bytes of ``blob``, following its delta base down, checked as
        :meth:`_get` says. Faults of this object itself come out as
        :class:`_Damaged` (carrying the error to report), faults of its bases
        as themselves.
        """
        try:
            base_raw = codec.delta_base(blob)
            if base_raw is not None:
                base_link = link.base(base_raw)
        except IntegrityError as err:
            raise _Damaged(err) from err
        base = self._get(base_link, read) if base_raw is not None else None
        try:
            raw = codec.decode(blob, length=link.length, name=link.name, base=base)
        except IntegrityError as err:
            raise _Damaged(err) from err
        if (link.depth == 0 or read.check_links) and hash_bytes(raw) != link.digest.raw:
            if base is not None and not read.check_links:
                # Read the chain again, each link checked, to name the bad one.
                read.check_links = True
                read.fetched.clear()
                return self._get(link, read)
            error = CorruptObjectError(
                f"{link.name} is corrupt: its content does not match its hash"
            )
            raise _Damaged(error)
        return raw

    def prefetch(self, digests: Iterable[Digest]) -> None:
        """Hint that these chunks will be read soon (see :meth:`Backend.prefetch`);
        chunks the cache holds are left out."""
        cache = self.cache
        keys = [layout.chunk_key(d) for d in digests if cache is None or not cache.contains(d)]
        if keys:
            self.backend.prefetch(keys)

    def exists(self, digest: Digest) -> bool:
        return self.backend.exists(layout.chunk_key(digest))

    def list_chunks(self) -> Iterator[tuple[Digest, ObjectInfo]]:
        """Every chunk object in the store, with its stored size and time."""
        for info in self.backend.list_objects(layout.CHUNKS):
            digest = layout.digest_from_key(info.key)
            if digest is not None:
                yield digest, info


class ReadTally:
    """Where the chunks of one operation came from: fetched from the store (stored
    bytes) or taken from the local cache (raw bytes, kept decoded); delta bases included."""

    def __init__(self) -> None:
        self.fetched_chunks = self.fetched_bytes = 0
        self.cached_chunks = self.cached_bytes = 0
        self._lock = threading.Lock()

    def add(self, *, fetched: int | None = None, cached: int | None = None) -> None:
        with self._lock:
            if fetched is not None:
                self.fetched_chunks += 1
                self.fetched_bytes += fetched
            if cached is not None:
                self.cached_chunks += 1
                self.cached_bytes += cached


@dataclass
class _Reading:
    """One chunk being read: where its objects came from, whether every link's
    hash is checked, and the links fetched (decoded), kept in the cache once checked."""

    tally: ReadTally
    check_links: bool = False
    fetched: list[tuple[Digest, bytes | memoryview]] = field(default_factory=list)
    #: Verified raw bytes of bases the caller holds, by raw hash.
    known: Mapping[bytes, bytes | memoryview] = field(default_factory=dict)


class _Damaged(Exception):
    """A chunk object that does not decode to its hash (``error`` says how)."""

    def __init__(self, error: IntegrityError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True, slots=True)
class _Link:
    """One object of a delta chain being read, and what the manifest says of it."""

    digest: Digest
    length: int
    #: The bases the manifest lists below this link (None: no list, headers lead).
    bases: tuple[Digest, ...] | None
    where: str
    depth: int

    @property
    def name(self) -> str:
        return f"{self.where} (delta base {self.digest.hex})" if self.depth else self.where

    def base(self, base_raw: bytes) -> _Link:
        """The link below, once its header named ``base_raw`` (checked against the list)."""
        if self.depth >= MAX_CHAIN or base_raw == self.digest.raw:
            raise CorruptObjectError(f"{self.where}: its chain of delta bases does not end")
        bases = self.bases
        if bases is not None and (not bases or bases[0].raw != base_raw):
            listed = bases[0].hex if bases else "none"
            raise MismatchedObjectError(
                f"{self.name}: its header names delta base {base_raw.hex()}, the manifest {listed}"
            )
        rest = bases[1:] if bases is not None else None
        return _Link(Digest(base_raw), self.length, rest, self.where, self.depth + 1)


class SeenSet:
    """Digests already handled in one operation; thread-safe check-and-add."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self._lock = threading.Lock()

    def add(self, digest: Digest) -> bool:
        """Add ``digest``; True if it was new."""
        with self._lock:
            if digest.raw in self._seen:
                return False
            self._seen.add(digest.raw)
            return True
