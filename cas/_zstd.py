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
