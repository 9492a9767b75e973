"""Chunks by hash: encode and store once; read, decode and verify before use."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..backends.base import Backend, ObjectInfo
from ..digest import Digest, hash_bytes
from ..errors import (
    AlreadyExistsError,
    CorruptObjectError,
    MismatchedObjectError,
    MissingObjectError,
    NotFoundError,
)
from ..repository import _layout as layout
from ..repository._manifest import MAX_CHAIN, MAX_CHUNK_LENGTH, ChunkRef
from . import _codec as codec
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
    ) -> None:
        self.backend = backend
        self.level = level
        self.refresh_after = refresh_after
        #: A listing of the store's chunks that answers "is it there, how old"
        #: instead of a stat per chunk; see :mod:`cas.chunks._listing`.
        self.index = index

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

    def get(self, chunk: ChunkRef, *, context: str = "") -> bytes:
        """Return the verified raw bytes of a chunk, as its manifest describes it.

        The manifest's length bounds the decoding: a chunk object whose
        header claims another length is refused before anything is
        allocated. ``context`` (e.g. "runs/a@3: file 'w.bin'") prefixes error
        messages so that a failure names the version and the file as well as
        the chunk.
        """
        raw = self.read(chunk, context=context)
        return raw if isinstance(raw, bytes) else bytes(raw)

    def read(self, chunk: ChunkRef, *, context: str = "") -> bytes | memoryview:
        """:meth:`get` without the copy into bytes: for a reader that only
        writes or hashes the chunk (a restore), a view of the decoded data."""
        where = f"{context}: chunk {chunk.digest.hex}" if context else f"chunk {chunk.digest.hex}"
        if not 0 <= chunk.length <= MAX_CHUNK_LENGTH:
            raise CorruptObjectError(f"{where}: a length of {chunk.length} bytes is not possible")
        # Headers may follow a chain the manifest lists, or end it early (a lost
        # delta put back whole), never leave it: garbage collection keeps only
        # the listed bases. Without a list (manifests older than deltas), the
        # headers lead, for at most MAX_CHAIN links.
        return self._get(chunk.digest, chunk.length, chunk.bases or None, where, 0)

    def _get(
        self,
        digest: Digest,
        length: int,
        bases: tuple[Digest, ...] | None,
        where: str,
        depth: int,
        check_links: bool = False,
    ) -> bytes | memoryview:
        """``read``, following a delta chunk down to its base.

        A base is as long as the chunk built on it, so one length bounds the
        chain. Every link's header, codec and length are checked; the hashes
        of the bases only when the chunk's own hash fails (``check_links``),
        to name the damaged link: a base that is not what its name says
        cannot rebuild bytes of the chunk's hash, and hashing each base cost
        a read of a delta chunk a tenth of its time.
        """
        name = f"{where} (delta base {digest.hex})" if depth else where
        try:
            blob = self.backend.get(layout.chunk_key(digest))
        except NotFoundError:
            what = f"{where}: its delta base {digest.hex}" if depth else where
            raise MissingObjectError(f"{what} is missing from the store") from None
        base_raw = codec.delta_base(blob)
        base = None
        if base_raw is not None:
            if depth >= MAX_CHAIN or base_raw == digest.raw:
                raise CorruptObjectError(f"{where}: its chain of delta bases does not end")
            if bases is not None and (not bases or bases[0].raw != base_raw):
                listed = bases[0].hex if bases else "none"
                raise MismatchedObjectError(
                    f"{name}: its header names delta base {base_raw.hex()}, the manifest {listed}"
                )
            rest = bases[1:] if bases is not None else None
            base = self._get(Digest(base_raw), length, rest, where, depth + 1, check_links)
        raw = codec.decode(blob, length=length, name=name, base=base)
        if (depth == 0 or check_links) and hash_bytes(raw) != digest.raw:
            if base is not None and not check_links:
                return self._get(digest, length, bases, where, 0, check_links=True)
            raise CorruptObjectError(f"{name} is corrupt: its content does not match its hash")
        return raw

    def prefetch(self, digests: Iterable[Digest]) -> None:
        """Hint that these chunks will be read soon (see :meth:`Backend.prefetch`)."""
        self.backend.prefetch([layout.chunk_key(d) for d in digests])

    def exists(self, digest: Digest) -> bool:
        return self.backend.exists(layout.chunk_key(digest))

    def list_chunks(self) -> Iterator[tuple[Digest, ObjectInfo]]:
        """Every chunk object in the store, with its stored size and time."""
        for info in self.backend.list_objects(layout.CHUNKS):
            digest = layout.digest_from_key(info.key)
            if digest is not None:
                yield digest, info


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
