"""zstd contexts per thread: a zstd context must not be used by two threads at once."""

from __future__ import annotations

import threading

import zstandard

_local = threading.local()


def zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's zstd compressor at ``level``: zstd contexts are not thread-safe."""
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def zstd_decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor."""
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor  # type: ignore[no-any-return]


def decompress_bounded(frame: bytes | memoryview, limit: int, *, exact: bool = False) -> bytes:
    """One zstd frame that decodes to at most ``limit`` bytes (exactly, if ``exact``).

    python-zstandard sizes its output by the size a frame declares and then
    ignores ``max_output_size``: a frame of a few kilobytes that declares
    gigabytes gets them, filled. The declared size is checked first, so
    nothing larger than ``limit`` is ever allocated. Raises ZstdError.
    """
    declared = zstandard.frame_content_size(frame)  # -1: not declared
    if declared > limit or (exact and declared not in (-1, limit)):
        what = f"exactly {limit}" if exact else f"at most {limit}"
        raise zstandard.ZstdError(f"frame declares {declared} bytes where {what} may be")
    if limit == 0:
        # max_output_size=0 would mean "unbounded" to python-zstandard.
        if declared != 0:
            raise zstandard.ZstdError("frame does not declare its size, which must be 0")
        return b""
    return zstd_decompressor().decompress(frame, max_output_size=limit)


def decompress_into(frame: bytes | memoryview, out: memoryview) -> None:
    """One zstd frame decoded into ``out``, which it must fill exactly. Raises ZstdError.

    A loader decoding into its destination saves the new buffer
    :func:`decompress_bounded` returns, whose pages the kernel must fault in
    and zero before zstd writes them: on tensor streams that cost as much as
    the decoding (docs/performance.md, "Distributed checkpoints").
    """
    declared = zstandard.frame_content_size(frame)
    if declared not in (-1, len(out)):
        raise zstandard.ZstdError(f"frame declares {declared} bytes where {len(out)} must be")
    filled = 0
    with zstd_decompressor().stream_reader(frame) as reader:
        while filled < len(out):
            count = reader.readinto(out[filled:])
            if not count:
                break
            filled += count
        extra = reader.read(1)
    if filled != len(out) or extra:
        raise zstandard.ZstdError(f"frame does not hold exactly {len(out)} bytes")
