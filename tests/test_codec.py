"""Chunk encoding: header, raw for incompressible data, zstd for compressible, decode errors."""

from __future__ import annotations

import struct

import pytest
import zstandard
from helpers import KiB, MiB, random_bytes, text_bytes

from cas.chunks import _codec as codec
from cas.errors import CorruptObjectError, IntegrityError


def header(blob: bytes) -> tuple[bytes, int, int]:
    magic, codec_id, length = struct.unpack_from("<3sBQ", blob)
    return magic, codec_id, length


def test_header_layout() -> None:
    data = text_bytes(10 * KiB, seed=1)
    blob = codec.encode(data)
    assert codec.HEADER.size == 12
    assert blob[:3] == b"CAS"
    assert header(blob) == (b"CAS", codec.Codec.ZSTD, len(data))
    assert codec.raw_length(blob) == len(data)


@pytest.mark.parametrize("size", [1, 100, 64 * KiB, 200 * KiB, 1 * MiB])
def test_incompressible_is_stored_raw(size: int) -> None:
    data = random_bytes(size, seed=size)
    blob = codec.encode(data)
    assert header(blob) == (b"CAS", codec.Codec.RAW, size)
    assert blob[12:] == data
    assert codec.decode(blob) == data


@pytest.mark.parametrize("size", [200, 64 * KiB, 1 * MiB])
def test_compressible_is_stored_zstd(size: int) -> None:
    data = text_bytes(size, seed=size)
    blob = codec.encode(data)
    magic, codec_id, length = header(blob)
    assert (magic, codec_id, length) == (b"CAS", codec.Codec.ZSTD, size)
    assert len(blob) < (size if size < 1024 else size // 2)
    # The payload is a plain zstd frame.
    assert zstandard.ZstdDecompressor().decompress(blob[12:], max_output_size=size) == data
    assert codec.decode(blob) == data


def test_zeros_compress_very_well() -> None:
    blob = codec.encode(bytes(4 * MiB))
    assert header(blob)[1] == codec.Codec.ZSTD
    assert len(blob) < 4 * KiB
    assert codec.decode(blob) == bytes(4 * MiB)


def test_mostly_random_chunk_with_compressible_middle() -> None:
    # The probe samples the middle; whatever it decides, the round trip must hold
    # and the stored form must never be larger than raw plus the header.
    data = random_bytes(300 * KiB, 1) + bytes(100 * KiB) + random_bytes(300 * KiB, 2)
    blob = codec.encode(data)
    assert codec.decode(blob) == data
    assert len(blob) <= len(data) + codec.HEADER.size


def test_empty_chunk_round_trips() -> None:
    blob = codec.encode(b"")
    assert header(blob) == (b"CAS", codec.Codec.RAW, 0)
    assert codec.decode(blob) == b""


def test_accepts_memoryview_and_bytearray() -> None:
    data = text_bytes(50 * KiB, seed=3)
    assert codec.decode(codec.encode(memoryview(data))) == data
    assert codec.decode(codec.encode(bytearray(data))) == data
    assert codec.encode(memoryview(data)) == codec.encode(data)


def test_levels_all_decode() -> None:
    data = text_bytes(100 * KiB, seed=4)
    sizes = {}
    for level in (1, 3, 19):
        blob = codec.encode(data, level)
        assert codec.decode(blob) == data
        sizes[level] = len(blob)
    assert sizes[19] <= sizes[1]


# -- decode errors ------------------------------------------------------------------


def test_truncated_header() -> None:
    with pytest.raises(CorruptObjectError, match="truncated"):
        codec.decode(b"CAS\x00")


def test_bad_magic_names_the_object() -> None:
    blob = bytearray(codec.encode(b"hello"))
    blob[0:3] = b"XYZ"
    with pytest.raises(CorruptObjectError, match=r"chunk abc.*bad magic"):
        codec.decode(bytes(blob), name="chunk abc")


def test_unknown_codec_id() -> None:
    blob = bytearray(codec.encode(b"hello"))
    blob[3] = 9
    with pytest.raises(CorruptObjectError, match="unknown codec id 9"):
        codec.decode(bytes(blob))


def test_raw_payload_shorter_than_header_promises() -> None:
    blob = codec.encode(random_bytes(1000, 1))
    with pytest.raises(CorruptObjectError, match="header promises 1000"):
        codec.decode(blob[:-1])


def test_raw_length_field_mismatch() -> None:
    data = random_bytes(1000, 1)
    blob = struct.pack("<3sBQ", b"CAS", 0, 999) + data
    with pytest.raises(CorruptObjectError, match="decoded to 1000 bytes"):
        codec.decode(blob)


def test_truncated_zstd_payload() -> None:
    blob = codec.encode(text_bytes(100 * KiB, seed=5))
    assert header(blob)[1] == codec.Codec.ZSTD
    with pytest.raises(CorruptObjectError):
        codec.decode(blob[: len(blob) // 2])


def test_damaged_zstd_payload() -> None:
    blob = bytearray(codec.encode(text_bytes(100 * KiB, seed=6)))
    for i in range(20, 60):
        blob[i] ^= 0xFF
    with pytest.raises(CorruptObjectError, match="my-chunk"):
        codec.decode(bytes(blob), name="my-chunk")


def test_zstd_payload_longer_than_header_promises() -> None:
    data = text_bytes(10 * KiB, seed=7)
    payload = zstandard.ZstdCompressor().compress(data)
    blob = struct.pack("<3sBQ", b"CAS", 1, 5 * KiB) + payload
    with pytest.raises(CorruptObjectError):
        codec.decode(blob)


def test_decode_errors_are_integrity_errors() -> None:
    with pytest.raises(IntegrityError):
        codec.decode(b"")


def test_raw_length_rejects_non_chunks() -> None:
    with pytest.raises(CorruptObjectError):
        codec.raw_length(b"nope, not a chunk")
    with pytest.raises(CorruptObjectError):
        codec.raw_length(b"CAS")


def test_chunk_reads_skip_the_copy_that_gets_make() -> None:
    import numpy as np

    from cas.backends.memory import MemoryBackend
    from cas.chunks import _floatcodec as floatcodec
    from cas.chunks._store import ChunkStore
    from cas.digest import Digest
    from cas.repository._manifest import ChunkRef

    chunks = ChunkStore(MemoryBackend())
    weights = np.random.default_rng(3).normal(0, 0.02, 50_000).astype("<f4").tobytes()
    digest = Digest.of(weights)
    grouped = codec.encode_grouped(weights, 4, floatcodec.Layout.FP32)
    chunks.put(weights, digest=digest, encode=lambda: grouped)
    view = chunks.read(ChunkRef(digest, len(weights)))
    assert isinstance(view, memoryview)  # the decoded array itself
    assert view == weights
    got = chunks.get(ChunkRef(digest, len(weights)))
    assert isinstance(got, bytes)
    assert got == weights
