"""FSE coding of one byte stream: near its order-0 entropy, for skewed streams.

zstd codes literals with Huffman, whose whole-bit code lengths cost up to a
few percent over the entropy on skewed streams: the exponent bytes of float
weights and the XOR of a weight with its fine-tuned self. FSE, the tANS
coder behind zstd's sequences, codes in fractions of a bit. OpenZL (Meta's
format-aware successor to zstd) is the maintained library that exposes it
as a coder of a plain byte stream; its frames carry their own format
version, so any later OpenZL decodes what an earlier one wrote. On float
exponent streams it stores a little less than zstd's Huffman but decodes
several times slower, and on near-uniform streams Huffman stays smaller
(docs/performance.md, "Tensor-aware storage", has the figures). So it is a
store's choice (``cas init --entropy fse``), and floatcodec applies it to
exponent streams only.

Checksums inside the frame are off: every chunk is rehashed (BLAKE3) after
decoding anyway.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from ..errors import CorruptObjectError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    U8 = npt.NDArray[np.uint8]

_local = threading.local()
_DISABLE = 2  # OpenZL's ternary parameter: 0 auto, 1 on, 2 off


def _zl() -> Any:
    # Imported on first use: only tensor chunks need it, and the import costs
    # as much as a small command's start-up.
    import openzl.ext

    return openzl.ext


def _cctx() -> tuple[Any, Any]:
    # OpenZL contexts are not thread-safe: one per thread.
    if not hasattr(_local, "cctx"):
        zl = _zl()
        compressor = zl.Compressor()
        compressor.select_starting_graph(zl.graphs.Fse()(compressor))
        # The newest frame version this OpenZL writes: pinning an older one
        # would stop working when OpenZL drops encoding it, while decoders
        # keep reading every version back to their minimum.
        compressor.set_parameter(zl.CParam.FormatVersion, zl.MAX_FORMAT_VERSION)
        compressor.set_parameter(zl.CParam.ContentChecksum, _DISABLE)
        compressor.set_parameter(zl.CParam.CompressedChecksum, _DISABLE)
        _local.cctx = (zl.CCtx(), compressor)
    return _local.cctx  # type: ignore[no-any-return]


def _dctx() -> Any:
    if not hasattr(_local, "dctx"):
        _local.dctx = _zl().DCtx()
    return _local.dctx


def encode(stream: U8) -> bytes:
    """One OpenZL frame holding ``stream`` (a contiguous uint8 array), FSE-coded."""
    zl = _zl()
    cctx, compressor = _cctx()
    # Each compression consumes the context's reference to its graph.
    cctx.ref_compressor(compressor)
    return cctx.compress([zl.Input(zl.Type.Serial, stream)])  # type: ignore[no-any-return]


def decode(body: bytes | memoryview, elements: int, *, name: str, index: int) -> U8:
    """The ``elements`` bytes of an ``encode`` frame; CorruptObjectError naming the chunk.

    The frame's header says how much it holds; it is read first, so that a
    frame declaring more than ``elements`` is refused before OpenZL
    allocates its output.
    """
    zl = _zl()
    frame = bytes(body)
    try:
        info = zl.FrameInfo(frame)
        if info.num_outputs != 1 or info.output_type(0) != zl.Type.Serial:
            raise CorruptObjectError(f"{name}: stream {index} is not one byte stream")
        declared = info.output_content_size(0)
    except RuntimeError as err:
        raise CorruptObjectError(
            f"{name}: stream {index} is damaged ({_first_line(err)})"
        ) from None
    if declared != elements:
        raise CorruptObjectError(
            f"{name}: stream {index} holds {declared} bytes, not {elements} (by its header)"
        )
    try:
        decoded = _dctx().decompress(frame)
    except RuntimeError as err:
        raise CorruptObjectError(
            f"{name}: stream {index} is damaged ({_first_line(err)})"
        ) from None
    if len(decoded) != 1 or decoded[0].type != zl.Type.Serial:
        raise CorruptObjectError(f"{name}: stream {index} is not one byte stream")
    stream: U8 = decoded[0].content.as_nparray()
    if stream.size != elements:
        raise CorruptObjectError(
            f"{name}: stream {index} holds {stream.size} bytes, not {elements}"
        )
    return stream


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "undecodable"
