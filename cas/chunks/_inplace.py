"""Reading a chunk straight into the caller's buffer, verified there.

:meth:`ChunkStore.read` returns each chunk in a buffer of its own, which a
loader then copies to where the bytes belong (a tensor's storage). On a
tensor checkpoint the new buffers cost more than the copy: every page of
each is faulted in and zeroed by the kernel before the decoder writes it,
and so is every buffer the decoder makes on the way. :func:`read_into`
decodes into the destination instead, through scratch buffers each thread
reuses, then hashes the destination where it lies: the chunk is verified
exactly as :meth:`ChunkStore.read` verifies it, and a mismatch raises
:class:`~cas.errors.CorruptObjectError` (what the destination then holds
must not be used).

A delta chunk, which needs its chain of bases, is read the usual way and
copied; so is a chunk of any codec this module does not know.
"""

from __future__ import annotations

from ..digest import hash_bytes
from ..errors import (
    CorruptObjectError,
    MissingObjectError,
    NotFoundError,
)
from ..repository import _layout as layout
from ..repository._manifest import MAX_CHUNK_LENGTH, ChunkRef
from . import _codec as codec
from ._store import ChunkStore


def read_into(chunks: ChunkStore, chunk: ChunkRef, out: memoryview, *, context: str = "") -> None:
    """Fill ``out`` (a writable buffer of ``chunk.length`` bytes) with the chunk, verified."""
    where = f"{context}: chunk {chunk.digest.hex}" if context else f"chunk {chunk.digest.hex}"
    out = out.cast("B")
    if len(out) != chunk.length:
        raise ValueError(f"{where}: {chunk.length} bytes do not fit a buffer of {len(out)}")
    if not 0 <= chunk.length <= MAX_CHUNK_LENGTH:
        raise CorruptObjectError(f"{where}: a length of {chunk.length} bytes is not possible")
    if chunks.cache is not None and _from_cache(chunks, chunk, out, where, context):
        return
    try:
        blob = chunks.backend.get(layout.chunk_key(chunk.digest))
    except NotFoundError:
        raise MissingObjectError(f"{where} is missing from the store") from None
    if not codec.decode_into(blob, out, where):
        out[:] = chunks.read(chunk, context=context)
        return
    if hash_bytes(out) != chunk.digest.raw:
        raise CorruptObjectError(f"{where} is corrupt: its content does not match its hash")
    if chunks.cache is not None:
        chunks.cache.save(chunk.digest, out)


def _from_cache(
    chunks: ChunkStore, chunk: ChunkRef, out: memoryview, where: str, context: str
) -> bool:
    """Fill ``out`` from the local chunk cache (which keeps chunks decoded) if it
    holds the chunk and it checks out; a damaged entry is dropped (and reported)
    and the store asked instead."""
    assert chunks.cache is not None
    raw = chunks.cache.load(chunk.digest)
    if raw is None:
        return False
    if len(raw) != len(out):
        damage = f"{len(raw)} bytes where the chunk has {len(out)}"
    elif hash_bytes(raw) != chunk.digest.raw:
        damage = f"{where} is corrupt: its content does not match its hash"
    else:
        out[:] = raw
        return True
    chunks.cache.discard(chunk.digest, damage)
    return False
