"""Chunk encoding: a 12-byte header, then the payload.

Header: ``b"CAS"``, one codec byte, the raw length as little-endian u64. Any
reader can decode a chunk from its bytes alone, without its manifest.
Incompressible chunks are stored raw: a cheap zstd probe on a sample decides
before the whole chunk is compressed, so random data costs almost nothing.
"""

from __future__ import annotations

import struct
import threading
from enum import IntEnum

import zstandard

from .errors import CorruptObjectError

MAGIC = b"CAS"
HEADER = struct.Struct("<3sBQ")
DEFAULT_LEVEL = 3

# A chunk whose sample compresses worse than this is stored raw without trying.
_PROBE_SIZE = 64 * 1024
_PROBE_RATIO = 0.97
# Above this sample ratio (float weights land at 0.85-0.95) higher zstd levels
# find no more matches than level 1 and cost twice the time: use level 1.
_FAST_RATIO = 0.8
# Keep zstd output only if it saves at least this fraction.
_KEEP_RATIO = 0.99


class Codec(IntEnum):
    RAW = 0
    ZSTD = 1


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; one per thread and level is cheap.
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor  # type: ignore[no-any-return]


def _choose_level(data: memoryview, level: int) -> int | None:
    """The zstd level for ``data``, or None to store it raw; decided on a sample."""
    if len(data) <= _PROBE_SIZE * 2:
        return level
    middle = len(data) // 2
    sample = data[middle : middle + _PROBE_SIZE]
    ratio = len(_compressor(1).compress(sample)) / len(sample)
    if ratio >= _PROBE_RATIO:
        return None
    return min(level, 1) if ratio >= _FAST_RATIO else level


def encode(data: bytes | bytearray | memoryview, level: int = DEFAULT_LEVEL) -> bytes:
    """Return the stored form of one chunk."""
    view = memoryview(data).cast("B")
    chosen = _choose_level(view, level) if len(view) else None
    if chosen is not None:
        packed = _compressor(chosen).compress(view)
        if len(packed) < _KEEP_RATIO * len(view):
            return HEADER.pack(MAGIC, Codec.ZSTD, len(view)) + packed
    return HEADER.pack(MAGIC, Codec.RAW, len(view)) + bytes(view)


def decode(blob: bytes, *, name: str = "chunk") -> bytes:
    """Return the raw bytes of a stored chunk; CorruptObjectError names ``name`` on failure."""
    if len(blob) < HEADER.size:
        raise CorruptObjectError(f"{name}: truncated ({len(blob)} bytes, header is {HEADER.size})")
    magic, codec, raw_length = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptObjectError(f"{name}: not a cas chunk (bad magic {magic!r})")
    payload = memoryview(blob)[HEADER.size :]
    if codec == Codec.RAW:
        raw = bytes(payload)
    elif codec == Codec.ZSTD:
        try:
            raw = _decompressor().decompress(payload, max_output_size=raw_length)
        except zstandard.ZstdError as err:
            raise CorruptObjectError(f"{name}: zstd payload is damaged ({err})") from None
    else:
        raise CorruptObjectError(f"{name}: unknown codec id {codec}")
    if len(raw) != raw_length:
        raise CorruptObjectError(
            f"{name}: decoded to {len(raw)} bytes, header promises {raw_length}"
        )
    return raw


def raw_length(blob: bytes) -> int:
    """The raw length recorded in a chunk header, without decoding."""
    if len(blob) < HEADER.size or blob[:3] != MAGIC:
        raise CorruptObjectError("not a cas chunk header")
    return int(HEADER.unpack_from(blob)[2])
