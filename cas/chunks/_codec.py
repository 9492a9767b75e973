"""Chunk encoding: a 12-byte header, then the payload.

Header: ``b"CAS"``, one codec byte, the raw length as little-endian u64. Any
reader can decode a chunk from its bytes alone, without its manifest; a
delta chunk (codec 3) also needs its base, whose hash follows the header.
Incompressible chunks are stored raw: a cheap zstd probe on a sample decides
before the whole chunk is compressed, so random data costs almost nothing.

Codecs 2 to 5 are for tensor data (see :mod:`cas.chunks._floatcodec`): byte-grouped
elements, and a chunk as a delta of its base chunk, byte-grouped: their XOR
(codec 3), the zigzag-coded integer difference of their elements (codec
4, store format 3), or of fp32 elements and their base's times a factor
(codec 5, store format 4: :mod:`cas.chunks._scaled`). All are chosen by
the writer, which knows the element type; this module only encodes what it
is told and decodes whatever it is given.
"""

from __future__ import annotations

import struct
from enum import IntEnum

import zstandard

from .._zstd import decompress_bounded, decompress_into, zstd_compressor
from ..errors import CorruptObjectError, InvalidInputError, MismatchedObjectError
from . import _floatcodec as floatcodec
from . import _scaled as scaled

MAGIC = b"CAS"
HEADER = struct.Struct("<3sBQ")
DEFAULT_LEVEL = 3

# A chunk whose sample compresses worse than this is stored raw without trying.
_PROBE_SIZE = 64 * 1024
_PROBE_RATIO = 0.97
# Above this sample ratio (float weights land above it) higher zstd levels
# find no more matches than level 1 and take longer: use level 1
# (docs/performance.md, "What makes the local store fast").
_FAST_RATIO = 0.8
# Keep zstd output only if it saves at least this fraction.
_KEEP_RATIO = 0.99


class Codec(IntEnum):
    RAW = 0
    ZSTD = 1
    #: Byte-grouped elements (payload: see cas/chunks/_floatcodec.py).
    GROUPED = 2
    #: XOR with a base chunk, byte-grouped; the base's hash follows the header.
    DELTA = 3
    #: Element-wise integer difference from a base chunk, zigzag-coded and
    #: byte-grouped; the base's hash follows the header. Store format 3.
    DIFFERENCE = 4
    #: Difference of fp32 elements from their base's times a factor, which
    #: follows the base's hash (binary32), then as codec 4. Store format 4.
    SCALED = 5


#: The codecs of chunks that need a base chunk to be decoded.
DELTA_CODECS = frozenset((Codec.DELTA, Codec.DIFFERENCE, Codec.SCALED))


#: What follows the header of a delta chunk: the BLAKE3 of its base's raw bytes.
BASE = struct.Struct("<32s")
#: Default limit of a store's delta chains: a chunk is rebuilt from at most
#: this many chunk reads (itself and its bases). Every link of a chain costs
#: about what decoding a whole chunk does: with 3, a version of a fine-tuning
#: run takes about 2.2 reads per byte and stores in under a quarter of its
#: size in bf16; with 4, about 2.6 reads for about 0.01 less of its size
#: (docs/performance.md, "Deltas without asking").
DEFAULT_DELTA_READS = 3


def _choose_level(data: memoryview, level: int) -> int | None:
    """The zstd level for ``data``, or None to store it raw; decided on a sample."""
    if len(data) <= _PROBE_SIZE * 2:
        return level
    middle = len(data) // 2
    sample = data[middle : middle + _PROBE_SIZE]
    ratio = len(zstd_compressor(1).compress(sample)) / len(sample)
    if ratio >= _PROBE_RATIO:
        return None
    return min(level, 1) if ratio >= _FAST_RATIO else level


def _raw(view: memoryview) -> bytes:
    """A chunk stored as it is, its bytes copied once, into the blob."""
    return b"".join((HEADER.pack(MAGIC, Codec.RAW, len(view)), view))


def encode(data: bytes | bytearray | memoryview, level: int = DEFAULT_LEVEL) -> bytes:
    """Return the stored form of one chunk."""
    view = memoryview(data).cast("B")
    chosen = _choose_level(view, level) if len(view) else None
    if chosen is not None:
        packed = zstd_compressor(chosen).compress(view)
        if len(packed) < _KEEP_RATIO * len(view):
            return HEADER.pack(MAGIC, Codec.ZSTD, len(view)) + packed
    return _raw(view)


def encode_grouped(
    data: bytes | bytearray | memoryview,
    itemsize: int,
    layout: floatcodec.Layout,
    *,
    fse: bool = False,
) -> bytes:
    """The stored form of a chunk of ``itemsize``-byte elements, byte-grouped.

    Falls back to raw when grouping does not shrink the chunk. ``fse`` as in
    :func:`cas.chunks._floatcodec.encode`.
    """
    view = memoryview(data).cast("B")
    header = HEADER.pack(MAGIC, Codec.GROUPED, len(view))
    blob = floatcodec.encode(view, itemsize, layout, fse=fse, prefix=header)
    if len(blob) - len(header) >= len(view):
        return _raw(view)
    return blob


def encode_delta(
    data: bytes | bytearray | memoryview,
    base: bytes | bytearray | memoryview,
    base_digest: bytes,
    itemsize: int,
    method: Codec = Codec.DELTA,
) -> bytes:
    """The stored form of ``data`` as a delta of ``base`` (same length), byte-grouped.

    ``method`` is :attr:`Codec.DELTA` (their XOR), :attr:`Codec.DIFFERENCE`
    (the zigzag-coded difference of their ``itemsize``-byte elements, which
    stores close floats smaller: docs/performance.md, "Tensor-aware storage")
    or :attr:`Codec.SCALED` (fp32 only: the difference from the base times the
    factor that codes a sample smallest; a difference, codec 4, when that is
    1). Plain byte grouping, not a float layout: any of these deltas of two
    close floats has zeros in its high bytes, which plain grouping collects.
    """
    view = memoryview(data).cast("B")
    factor = b""
    if method == Codec.SCALED:
        if itemsize != 4:
            raise ValueError(f"no scaled delta of {itemsize}-byte elements")
        scale = scaled.choose(view, base)
        if scale == 1.0:
            method = Codec.DIFFERENCE
        else:
            factor = scaled.SCALE.pack(scale)
    header = HEADER.pack(MAGIC, method, len(view)) + BASE.pack(base_digest) + factor
    if method == Codec.SCALED:
        delta = scaled.difference(view, base, scaled.SCALE.unpack(factor)[0])
    elif method == Codec.DIFFERENCE:
        delta = floatcodec.difference(view, base, itemsize)
    elif method == Codec.DELTA:
        delta = floatcodec.xor(view, base)
    else:
        raise ValueError(f"codec {method!r} is not a delta")
    return floatcodec.encode(delta, itemsize, floatcodec.Layout.PLAIN, prefix=header)


def delta_base(blob: bytes) -> bytes | None:
    """The raw hash of a delta chunk's base, or None for a chunk that needs none."""
    if len(blob) >= HEADER.size and blob[:3] == MAGIC and blob[3] in DELTA_CODECS:
        if len(blob) < HEADER.size + BASE.size:
            raise CorruptObjectError("delta chunk header is truncated")
        return bytes(blob[HEADER.size : HEADER.size + BASE.size])
    return None


def decode(
    blob: bytes,
    *,
    length: int | None = None,
    name: str = "chunk",
    base: bytes | memoryview | None = None,
) -> bytes | memoryview:
    """Return the raw bytes of a stored chunk; CorruptObjectError names ``name`` on failure.

    ``length`` is the raw length the reader expects (a manifest gives it):
    a header that claims another is refused before anything is decoded, and
    no codec allocates more than it. None trusts the header, for a reader
    that has no manifest. ``base`` is the raw bytes of the base of a delta
    chunk (see :func:`delta_base`). The result may be a view (of ``blob``
    for a raw chunk, of the decoded array for a grouped one) rather than
    bytes: nothing is copied only to change type.
    """
    if len(blob) < HEADER.size:
        raise CorruptObjectError(f"{name}: truncated ({len(blob)} bytes, header is {HEADER.size})")
    magic, codec, raw_length = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptObjectError(f"{name}: not a cas chunk (bad magic {magic!r})")
    if length is not None and raw_length != length:
        raise MismatchedObjectError(
            f"{name}: its header says {raw_length} bytes, the manifest {length}"
        )
    payload = memoryview(blob)[HEADER.size :]
    raw: bytes | memoryview
    if codec == Codec.RAW:
        raw = payload
    elif codec == Codec.ZSTD:
        try:
            raw = decompress_bounded(payload, raw_length, exact=True)
        except zstandard.ZstdError as err:
            raise CorruptObjectError(f"{name}: zstd payload is damaged ({err})") from None
    elif codec == Codec.GROUPED:
        raw = floatcodec.decode(payload, raw_length, name=name)
    elif codec in DELTA_CODECS:
        if base is None:
            raise InvalidInputError(f"{name}: a delta chunk needs its base to be decoded")
        if len(base) != raw_length:
            raise CorruptObjectError(
                f"{name}: delta base holds {len(base)} bytes, the chunk {raw_length}"
            )
        raw = _undo_delta(codec, payload[BASE.size :], raw_length, base, name)
    else:
        raise CorruptObjectError(f"{name}: unknown codec id {codec}")
    if len(raw) != raw_length:
        raise CorruptObjectError(
            f"{name}: decoded to {len(raw)} bytes, header promises {raw_length}"
        )
    return raw


def _undo_delta(
    codec: int, payload: memoryview, raw_length: int, base: bytes | memoryview, name: str
) -> bytes | memoryview:
    scale = 1.0
    if codec == Codec.SCALED:
        if len(payload) < scaled.SCALE.size + 1:
            raise CorruptObjectError(f"{name}: scaled delta header is truncated")
        (scale,) = scaled.SCALE.unpack_from(payload)
        payload = payload[scaled.SCALE.size :]
        if not scaled.valid(scale) or payload[0] != 4:
            raise CorruptObjectError(
                f"{name}: scaled delta header is damaged (factor {scale!r}, "
                f"{payload[0]}-byte elements)"
            )
    grouped = floatcodec.decode(payload, raw_length, name=name)
    if codec == Codec.DELTA:
        return floatcodec.xor(grouped, base)
    try:
        if codec == Codec.SCALED:
            return scaled.undo_difference(grouped, base, scale)
        return floatcodec.undo_difference(grouped, base, payload[0] if raw_length else 1)
    except ValueError as err:
        raise CorruptObjectError(f"{name}: difference delta is damaged ({err})") from None


def raw_length(blob: bytes) -> int:
    """The raw length recorded in a chunk header, without decoding."""
    if len(blob) < HEADER.size or blob[:3] != MAGIC:
        raise CorruptObjectError("not a cas chunk header")
    return int(HEADER.unpack_from(blob)[2])


def _header_for(blob: bytes, out: memoryview, name: str) -> tuple[int, memoryview]:
    """(codec id, payload) of a chunk object about to be decoded into ``out``, checked."""
    if len(blob) < HEADER.size:
        raise CorruptObjectError(f"{name}: truncated ({len(blob)} bytes, header is {HEADER.size})")
    magic, codec, raw_length = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptObjectError(f"{name}: not a cas chunk (bad magic {magic!r})")
    if raw_length != len(out):
        raise MismatchedObjectError(
            f"{name}: its header says {raw_length} bytes, the manifest {len(out)}"
        )
    return codec, memoryview(blob)[HEADER.size :]


def decode_into(blob: bytes, out: memoryview, name: str = "chunk") -> bool:
    """Decode ``blob`` into ``out`` (its raw length); False, with nothing done, for a
    delta (which needs its base: :func:`apply_delta`) or a codec this function does
    not know (which :func:`decode` judges). What ``out`` holds is unverified."""
    codec, payload = _header_for(blob, out, name)
    if codec == Codec.RAW:
        if len(payload) != len(out):
            raise CorruptObjectError(
                f"{name}: decoded to {len(payload)} bytes, header promises {len(out)}"
            )
        out[:] = payload
    elif codec == Codec.ZSTD:
        try:
            decompress_into(payload, out)
        except zstandard.ZstdError as err:
            raise CorruptObjectError(f"{name}: zstd payload is damaged ({err})") from None
    elif codec == Codec.GROUPED:
        floatcodec.decode_into(payload, out, name=name)
    else:
        return False
    return True


def apply_delta(blob: bytes, out: memoryview, name: str = "chunk") -> None:
    """Rebuild a delta chunk in place: ``out`` holds its base's raw bytes, and then its own.

    The caller has checked that ``blob`` names that base (:func:`delta_base`);
    what ``out`` then holds is unverified: the caller hashes it.
    """
    codec, payload = _header_for(blob, out, name)
    if codec not in DELTA_CODECS:
        raise CorruptObjectError(f"{name}: codec {codec} is not a delta")
    if len(payload) < BASE.size:
        raise CorruptObjectError("delta chunk header is truncated")
    if codec == Codec.SCALED:
        # Base times a factor, then the difference: not a pass over ``out`` in
        # place, so decoded beside it (the whole result is built before the copy).
        out[:] = _undo_delta(codec, payload[BASE.size :], len(out), out, name)
        return
    try:
        floatcodec.apply_delta(
            payload[BASE.size :], out, difference=codec == Codec.DIFFERENCE, name=name
        )
    except ValueError as err:
        raise CorruptObjectError(f"{name}: delta is damaged ({err})") from None
