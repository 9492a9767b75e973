"""Byte grouping for arrays of fixed-size elements, and XOR deltas: pure, bytes in, bytes out.

Float weights barely compress as they are: each element mixes a
low-entropy exponent with near-random mantissa bits. Splitting the bytes of
every element into separate streams puts the exponents together, where an
entropy coder shrinks them to under 3 bits, and leaves the mantissa streams
nearly as they are. Each stream is compressed with zstd tuned to be almost a
pure Huffman coder (matches are rare in weights and, when found, cost more
than they save), or kept raw when that is smaller. A store set to FSE (format 2)
codes the exponent stream of each float layout with FSE instead
(:mod:`cas.chunks._entropy`), which codes in fractions of a bit: smaller, and
slower to decode, than Huffman there; mantissa streams, near uniform, stay
with Huffman, which is smaller on them. Picking by role, not by trying
both, keeps encoding to one pass per stream.

The layouts (docs/format.md has them bit by bit):

* ``PLAIN``: stream ``i`` holds byte ``i`` of every element. Any element size;
  used for XOR deltas and for dtypes without a finer layout.
* ``BF16``: 16-bit words with 8 exponent and 7 mantissa bits. The high
  stream holds bits 12..5 (the 6 low exponent bits and the 2 top mantissa
  bits), the low stream bits 15..13 then 4..0 (the sign, the 2 high exponent
  bits, the other 5 mantissa bits). The Huffman coder of the high stream
  then models the top mantissa bits together with the exponent they depend
  on, and the sign, a coin flip, leaves the exponent's stream: 0.004 of raw
  size better on real weights than plain grouping with the sign moved out.
* ``FP16``: 16-bit words with 5 exponent and 10 mantissa bits: the high
  stream holds bits 14..7 (the exponent and the 3 top mantissa bits), the low
  stream bit 15 then bits 6..0 (the sign moved out of the exponent byte).
* ``FP32``: the upper half of each word as ``BF16``, then byte 1, then byte 0.
"""

from __future__ import annotations

import importlib
import struct
import threading
from enum import IntEnum
from typing import TYPE_CHECKING, Any

import zstandard

from .._zstd import decompress_bounded, decompress_into
from ..errors import CorruptObjectError
from . import _entropy as entropy


class Layout(IntEnum):
    PLAIN = 0
    BF16 = 1
    FP16 = 2
    FP32 = 3


#: Element size of each layout (PLAIN takes it from the payload header).
LAYOUT_ITEMSIZE = {Layout.BF16: 2, Layout.FP16: 2, Layout.FP32: 4}

# Payload header: element size, layout, stream count; then per stream its
# method (0 raw, 1 zstd, 2 FSE) and stored length.
_HEAD = struct.Struct("<BBB")
_STREAM = struct.Struct("<BI")
_RAW, _ZSTD, _FSE = 0, 1, 2

# Almost a pure Huffman coder: the fast strategy with a tiny hash table finds
# few matches, and a 128 KiB window keeps zstd's blocks (one Huffman table
# each) at their largest. On bf16 exponents it codes smaller than zstd's
# levels 1 and 3, and faster (docs/performance.md, "Tensor-aware storage").
_PARAMS = zstandard.ZstdCompressionParameters(
    strategy=zstandard.STRATEGY_FAST,
    window_log=17,
    hash_log=6,
    chain_log=6,
    search_log=1,
    min_match=7,
)
_local = threading.local()

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    U8 = npt.NDArray[np.uint8]
    U16 = npt.NDArray[np.uint16]
else:

    class _LazyNumpy:
        """numpy on first use: most commands never touch a tensor codec, and
        importing numpy costs more than the rest of cas together."""

        def __getattr__(self, name: str) -> Any:
            module = importlib.import_module("numpy")
            globals()["np"] = module
            return getattr(module, name)

    np = _LazyNumpy()


def _compressor() -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe: one per thread.
    if not hasattr(_local, "compressor"):
        _local.compressor = zstandard.ZstdCompressor(compression_params=_PARAMS)
    return _local.compressor  # type: ignore[no-any-return]


# -- the 16-bit split layouts ----------------------------------------------------------

# Bit ``SHIFT`` of a word is bit 0 of its high-stream byte: the high stream
# holds bits SHIFT+7..SHIFT, the low stream the bits above them (at its top)
# and below them (at its bottom), in their order. Huffman coding does not care
# where bits sit inside a byte, so this order is chosen for the fewest
# operations, not for the ratio.
_SHIFT = {Layout.BF16: 5, Layout.FP16: 7, Layout.FP32: 5}


def _split16(x: U16, layout: Layout) -> tuple[U8, U8]:
    """(high stream, low stream) of 16-bit words; see the module docstring."""
    shift = _SHIFT[layout]
    below = (1 << shift) - 1
    high = (x >> shift).astype(np.uint8)
    low = x >> 8
    low &= 0xFF ^ below
    low |= x & below
    return high, low.astype(np.uint8)


def _join16(high: U8, low: U8, layout: Layout, *, out: U16 | None = None) -> U16:
    shift = _SHIFT[layout]
    below = (1 << shift) - 1
    # ``low * 0x0101`` is the low byte twice over; the mask keeps its upper
    # bits at the top of the word and its lower bits at the bottom, so the
    # low stream lands in one multiply and one AND. Widening happens inside
    # the ufuncs, into two arrays reused throughout: four passes over memory
    # where widening the streams first took six.
    word = np.empty(len(high), np.uint16) if out is None else out
    np.left_shift(high, shift, out=word, dtype=np.uint16)
    part = np.empty(len(high), np.uint16) if out is None else _scratch("part", len(high), "<u2")
    np.multiply(low, 0x0101, out=part, dtype=np.uint16)
    part &= ((0xFF ^ below) << 8) | below
    word |= part
    return word


# -- streams ---------------------------------------------------------------------------


# Streams of 2- and 4-byte elements are split and merged through whole 16-bit
# words: numpy's ufuncs run contiguous and vectorised, where reading or
# writing every n-th byte (a column of an (n, itemsize) grid) goes one byte
# at a time (docs/performance.md, "Tensor-aware storage", has the speed-up).


def _bytes16(words: U16) -> list[U8]:
    """(byte 0, byte 1) of little-endian 16-bit words, each as a stream."""
    low = np.empty(len(words), np.uint8)
    np.bitwise_and(words, 0xFF, out=low, casting="unsafe")
    high = np.empty(len(words), np.uint8)
    np.right_shift(words, 8, out=high, casting="unsafe")
    return [low, high]


def _word16(low: U8, high: U8) -> U16:
    word = np.empty(len(low), "<u2")
    np.left_shift(high, 8, out=word, dtype=np.uint16)
    word |= low
    return word


def _word32(low: U16, high: U16) -> Any:
    word = np.empty(len(low), "<u4")
    np.left_shift(high, 16, out=word, dtype=np.uint32)
    word |= low
    return word


def _streams(data: memoryview, itemsize: int, layout: Layout) -> list[U8]:
    if layout == Layout.PLAIN:
        if itemsize == 2:
            return _bytes16(np.frombuffer(data, dtype="<u2"))
        if itemsize == 4:
            words = np.frombuffer(data, dtype="<u4")
            return _bytes16(words.astype(np.uint16)) + _bytes16((words >> 16).astype(np.uint16))
        grid = np.frombuffer(data, dtype=np.uint8).reshape(-1, itemsize)
        return [np.ascontiguousarray(grid[:, i]) for i in range(itemsize)]
    if layout in (Layout.BF16, Layout.FP16):
        return list(_split16(np.frombuffer(data, dtype="<u2"), layout))
    words = np.frombuffer(data, dtype="<u4")
    high, low = _split16((words >> 16).astype(np.uint16), Layout.FP32)
    byte0, byte1 = _bytes16(words.astype(np.uint16))
    return [high, low, byte1, byte0]


def _merge(streams: list[U8], itemsize: int, layout: Layout) -> memoryview:
    """The elements the streams came from, as a view of a fresh array (no copy to bytes)."""
    if layout == Layout.PLAIN:
        if itemsize == 2:
            return _bytes_view(_word16(streams[0], streams[1]))
        if itemsize == 4:
            low, high = _word16(streams[0], streams[1]), _word16(streams[2], streams[3])
            return _bytes_view(_word32(low, high))
        grid = np.empty((len(streams[0]), itemsize), dtype=np.uint8)
        for i, stream in enumerate(streams):
            grid[:, i] = stream
        return _bytes_view(grid)
    if layout in (Layout.BF16, Layout.FP16):
        return _bytes_view(_join16(streams[0], streams[1], layout))
    low = _word16(streams[3], streams[2])
    return _bytes_view(_word32(low, _join16(streams[0], streams[1], Layout.FP32)))


def _bytes_view(array: Any) -> memoryview:
    return memoryview(array).cast("B")


def _exponents(layout: Layout, index: int) -> bool:
    """Whether stream ``index`` of ``layout`` holds exponents, where FSE beats Huffman.

    The float layouts put the exponents in stream 0; their other streams are
    mantissa bits, near uniform, where Huffman is smaller. PLAIN streams (XOR
    deltas, F64) stay with Huffman: FSE would shrink deltas a little more but
    decode them below the codecs' floor of speed (docs/performance.md,
    "Tensor-aware storage").
    """
    return layout != Layout.PLAIN and index == 0


def encode(
    data: bytes | bytearray | memoryview,
    itemsize: int,
    layout: Layout,
    *,
    fse: bool = False,
    prefix: bytes = b"",
) -> bytes:
    """The grouped payload of ``data``, whose length must be a multiple of ``itemsize``.

    ``fse=True`` codes the exponent stream with FSE, as stores of format 2
    set to it do; otherwise every stream is zstd or raw, as format 1 has it.
    ``prefix`` (a chunk's header) starts the result: joined here, with the
    streams, rather than by the caller in a second copy of the whole payload.
    """
    view = memoryview(data).cast("B")
    if layout != Layout.PLAIN and LAYOUT_ITEMSIZE[layout] != itemsize:
        raise ValueError(f"layout {layout.name} needs {LAYOUT_ITEMSIZE[layout]}-byte elements")
    if not 1 <= itemsize <= 255 or len(view) % itemsize:
        raise ValueError(f"{len(view)} bytes are not whole {itemsize}-byte elements")
    streams = _streams(view, itemsize, layout) if len(view) else []
    parts: list[bytes | memoryview] = [prefix, _HEAD.pack(itemsize, layout, len(streams))]
    bodies: list[bytes | memoryview] = []
    compressor = _compressor()
    for index, stream in enumerate(streams):
        if fse and _exponents(layout, index):
            method, packed = _FSE, entropy.encode(stream)
        else:
            method, packed = _ZSTD, compressor.compress(stream.data)
        if len(packed) < len(stream):
            parts.append(_STREAM.pack(method, len(packed)))
            bodies.append(packed)
        else:
            parts.append(_STREAM.pack(_RAW, len(stream)))
            bodies.append(stream.data)
    return b"".join(parts + bodies)


def decode(
    payload: bytes | memoryview, raw_length: int, *, name: str = "chunk"
) -> bytes | memoryview:
    """The bytes a grouped payload stands for; CorruptObjectError naming ``name`` if damaged.

    A view of the decoded array where there is one: copying it into bytes
    would cost a pass over every restored tensor for nothing.
    """
    itemsize, layout, bodies = _parse(payload, raw_length, name)
    elements = raw_length // itemsize if itemsize else 0
    streams = [_stream(body, method, elements, name, i) for i, (method, body) in enumerate(bodies)]
    return _merge(streams, itemsize, layout) if streams else b""


def decode_into(payload: bytes | memoryview, out: memoryview, *, name: str = "chunk") -> None:
    """:func:`decode` into ``out`` (exactly the raw length): no buffer of the size of the chunk.

    zstd streams are decoded into this thread's scratch buffers and the
    elements merged from them straight into ``out``; raw streams are read
    where they lie in ``payload``. What ``out`` holds is unverified: the
    caller hashes it.
    """
    itemsize, layout, bodies = _parse(payload, len(out), name)
    if not bodies:
        return
    elements = len(out) // itemsize
    streams = _scratch_streams(bodies, elements, name)
    if layout in (Layout.BF16, Layout.FP16):
        _join16(streams[0], streams[1], layout, out=np.frombuffer(out, dtype="<u2"))
    elif layout == Layout.FP32:
        high = _join16(streams[0], streams[1], Layout.FP32, out=_scratch("high", elements, "<u2"))
        word = np.frombuffer(out, dtype="<u4")
        np.left_shift(high, 16, out=word, dtype=np.uint32)
        low = _scratch("low", elements, "<u2")
        np.left_shift(streams[2], 8, out=low, dtype=np.uint16)
        low |= streams[3]
        word |= low
    else:
        out[:] = _merge(streams, itemsize, layout)


def buffer(length: int) -> memoryview:
    """A writable buffer of ``length`` bytes, not zeroed: for a decoder that fills all of it."""
    return _bytes_view(np.empty(length, np.uint8))


def _scratch_streams(bodies: list[tuple[int, memoryview]], elements: int, name: str) -> list[U8]:
    """The streams of a grouped payload, zstd ones decoded into this thread's scratch buffers."""
    streams = []
    for index, (method, body) in enumerate(bodies):
        if method == _ZSTD:
            scratch = _scratch(f"stream{index}", elements, np.uint8)
            try:
                decompress_into(body, memoryview(scratch))
            except zstandard.ZstdError as err:
                raise CorruptObjectError(f"{name}: stream {index} is damaged ({err})") from None
            streams.append(scratch)
        else:
            streams.append(_stream(body, method, elements, name, index))
    return streams


def _scratch(role: str, length: int, dtype: Any) -> Any:
    """This thread's scratch array for ``role``, of ``length`` elements, reused call to call.

    A fresh array per chunk would have its pages faulted in and zeroed
    each time, which on 1 MiB chunks costs about what decoding them does.
    """
    arrays: dict[str, Any] = _local.__dict__.setdefault("scratch", {})
    array = arrays.get(role)
    if array is None or len(array) < length:
        array = arrays[role] = np.empty(length, dtype)
    return array[:length]


def _parse(
    payload: bytes | memoryview, raw_length: int, name: str
) -> tuple[int, Layout, list[tuple[int, memoryview]]]:
    """(element size, layout, (method, body) of each stream) of a grouped payload, checked."""
    view = memoryview(payload)
    try:
        itemsize, layout_id, count = _HEAD.unpack_from(view)
        layout = Layout(layout_id)
    except (struct.error, ValueError):
        raise CorruptObjectError(f"{name}: byte-grouped header is damaged") from None
    if layout == Layout.PLAIN:
        expected = itemsize if raw_length else 0
    else:
        if itemsize != LAYOUT_ITEMSIZE[layout]:
            raise CorruptObjectError(f"{name}: layout {layout.name} with {itemsize}-byte elements")
        expected = (4 if layout == Layout.FP32 else 2) if raw_length else 0
    if itemsize == 0 or raw_length % itemsize or count != expected:
        raise CorruptObjectError(f"{name}: byte-grouped header does not fit {raw_length} bytes")
    offset = _HEAD.size + count * _STREAM.size
    bodies: list[tuple[int, memoryview]] = []
    for index in range(count):
        try:
            method, length = _STREAM.unpack_from(view, _HEAD.size + index * _STREAM.size)
        except struct.error:
            raise CorruptObjectError(f"{name}: byte-grouped header is truncated") from None
        body = view[offset : offset + length]
        offset += length
        if len(body) != length:
            raise CorruptObjectError(f"{name}: stream {index} is truncated")
        bodies.append((method, body))
    if offset != len(view):
        raise CorruptObjectError(f"{name}: {len(view) - offset} stray bytes after the streams")
    return itemsize, layout, bodies


def _stream(body: memoryview, method: int, elements: int, name: str, index: int) -> U8:
    if method == _RAW:
        raw: bytes | memoryview = body
    elif method == _ZSTD:
        try:
            raw = decompress_bounded(body, elements, exact=True)
        except zstandard.ZstdError as err:
            raise CorruptObjectError(f"{name}: stream {index} is damaged ({err})") from None
    elif method == _FSE:
        return entropy.decode(body, elements, name=name, index=index)
    else:
        raise CorruptObjectError(f"{name}: stream {index} has unknown method {method}")
    if len(raw) != elements:
        raise CorruptObjectError(f"{name}: stream {index} holds {len(raw)} bytes, not {elements}")
    return np.frombuffer(raw, dtype=np.uint8)


#: Unsigned integer type of each element size a difference delta handles.
_WORDS = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}


def _words(data: bytes | bytearray | memoryview, itemsize: int) -> Any:
    if itemsize not in _WORDS:
        raise ValueError(f"no difference delta of {itemsize}-byte elements")
    view = memoryview(data).cast("B")
    if len(view) % itemsize:
        raise ValueError(f"{len(view)} bytes are not whole {itemsize}-byte elements")
    return np.frombuffer(view, dtype=_WORDS[itemsize])


def difference(
    data: bytes | bytearray | memoryview, base: bytes | bytearray | memoryview, itemsize: int
) -> memoryview:
    """Each element of ``data`` minus the same element of ``base``, zigzag-coded.

    Elements are read as unsigned little-endian integers and subtracted
    modulo 2**bits, so any bits round-trip (NaN payloads too). For floats of
    one sign the integer order is the value order: a small change of a weight
    is a small integer, across an exponent boundary too, where an XOR spreads
    it over every bit below the highest one that differs. Zigzag coding
    (0, -1, 1, -2... to 0, 1, 2, 3...) then leaves high bytes at zero for
    both signs of change, which byte grouping collects in streams of zeros.
    """
    new, old = _words(data, itemsize), _words(base, itemsize)
    if new.shape != old.shape:
        raise ValueError(f"delta of {new.size} elements against a base of {old.size}")
    delta = new - old
    # Zigzag: (d << 1) ^ (all ones when d is negative), on unsigned words.
    sign = delta >> (8 * itemsize - 1)
    np.negative(sign, out=sign)
    delta <<= 1
    delta ^= sign
    return _bytes_view(delta)


def undo_difference(
    coded: bytes | bytearray | memoryview, base: bytes | bytearray | memoryview, itemsize: int
) -> memoryview:
    """The elements :func:`difference` was given, from its result and the same base.

    Works in place when ``coded`` is writable (a freshly decoded array): one
    pass less over memory on every link of a chain a read follows.
    """
    delta, old = _words(coded, itemsize), _words(base, itemsize)
    if delta.shape != old.shape:
        raise ValueError(f"delta of {delta.size} elements against a base of {old.size}")
    if not delta.flags.writeable:
        delta = delta.copy()
    sign = delta & 1
    np.negative(sign, out=sign)
    delta >>= 1
    delta ^= sign
    delta += old
    return _bytes_view(delta)


def apply_delta(
    payload: bytes | memoryview, out: memoryview, *, difference: bool, name: str = "chunk"
) -> None:
    """Undo a delta in place: ``out`` holds the base, and then the chunk built on it.

    ``payload`` is a grouped delta (:func:`difference` if ``difference``, else
    :func:`xor`) of as many bytes as ``out``. Its streams are decoded into this
    thread's scratch buffers, merged into words and zigzag-decoded there, then
    added to (or XORed into) ``out``: a link of a delta chain allocates
    nothing, where decoding it into new arrays cost about as much as the
    arithmetic (docs/performance.md, "Deltas without asking"). What ``out``
    then holds is unverified: the caller hashes it.
    """
    itemsize, layout, bodies = _parse(payload, len(out), name)
    if not bodies:
        return
    if layout != Layout.PLAIN or itemsize not in _WORDS:
        raise CorruptObjectError(f"{name}: a delta must be grouped plainly, in 1 to 8-byte words")
    elements = len(out) // itemsize
    streams = _scratch_streams(bodies, elements, name)
    target = np.frombuffer(out, dtype=_WORDS[itemsize])
    if difference and itemsize == 2:
        target += _unzigzag16(streams[0], streams[1])
        return
    if difference and itemsize == 4:
        target += _unzigzag32(streams)
        return
    words = _merge_words(streams, itemsize)
    if not difference:
        target ^= words
        return
    sign = _scratch(f"sign{itemsize}", elements, _WORDS[itemsize])
    np.bitwise_and(words, 1, out=sign)
    np.negative(sign, out=sign)
    words >>= 1
    words ^= sign
    target += words


def _unzigzag16(low: U8, high: U8) -> U16:
    """The 16-bit differences whose zigzag codes have bytes ``low`` and ``high``.

    Undone a byte at a time: the low byte's own zigzag decoding, as a
    signed byte, widened, is the difference but for the high byte's bits,
    which land above bit 6 unchanged: ``((z >> 1) ^ -(z & 1))`` equals
    ``sext8((lo >> 1) ^ -(lo & 1)) ^ (hi << 7)``. Half the passes over
    16-bit words of merging the bytes first; deltas of bf16 weights have
    almost every high byte zero.
    """
    elements = len(low)
    small = _scratch("small", elements, np.uint8)
    np.bitwise_and(low, 1, out=small)
    np.negative(small, out=small)
    half = _scratch("half8", elements, np.uint8)
    np.right_shift(low, 1, out=half)
    small ^= half
    words: U16 = _scratch("words2", elements, "<u2")
    np.left_shift(high, 7, out=words, dtype=np.uint16)
    signed = words.view(np.int16)
    np.bitwise_xor(signed, small.view(np.int8), out=signed)
    return words


def _unzigzag32(streams: list[U8]) -> Any:
    """:func:`_unzigzag16` of 32-bit codes: the low half's decoding, as a signed
    16-bit word, widened, XOR the high half shifted by 15."""
    elements = len(streams[0])
    low = _unzigzag16(streams[0], streams[1])
    words = _scratch("words4", elements, "<u4")
    np.left_shift(streams[3], 23, out=words, dtype=np.uint32)
    part = _scratch("part4", elements, "<u4")
    np.left_shift(streams[2], 15, out=part, dtype=np.uint32)
    words |= part
    signed = words.view(np.int32)
    np.bitwise_xor(signed, low.view(np.int16), out=signed)
    return words


def _merge_words(streams: list[U8], itemsize: int) -> Any:
    """The words of PLAIN streams, merged into this thread's scratch buffer of their type."""
    elements = len(streams[0])
    words = _scratch(f"words{itemsize}", elements, _WORDS[itemsize])
    if itemsize == 1:
        words[:] = streams[0]
        return words
    if itemsize == 2:
        np.left_shift(streams[1], 8, out=words, dtype=np.uint16)
        words |= streams[0]
        return words
    if itemsize == 4:
        half = _scratch("half", elements, "<u2")
        np.left_shift(streams[3], 8, out=half, dtype=np.uint16)
        half |= streams[2]
        np.left_shift(half, 16, out=words, dtype=np.uint32)
        np.left_shift(streams[1], 8, out=half, dtype=np.uint16)
        half |= streams[0]
        words |= half
        return words
    words.view(np.uint8).reshape(elements, itemsize)[:] = np.stack(streams, axis=1)
    return words


def xor(data: bytes | bytearray | memoryview, base: bytes | bytearray | memoryview) -> memoryview:
    """``data`` XOR ``base``, byte by byte (equal lengths): a delta, or a delta undone."""
    left = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    right = np.frombuffer(memoryview(base).cast("B"), dtype=np.uint8)
    if left.shape != right.shape:
        raise ValueError(f"delta of {left.size} bytes against a base of {right.size}")
    # Whole words where possible: eight times fewer steps than bytes.
    if left.size % 8 == 0:
        return _bytes_view(np.bitwise_xor(left.view(np.uint64), right.view(np.uint64)))
    return _bytes_view(np.bitwise_xor(left, right))
