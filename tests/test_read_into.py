"""Byte ranges of a version decoded straight into the reader's buffers, and verified there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cas.chunks import _codec as codec
from cas.chunks import _floatcodec as floatcodec
from cas.chunks._chunking import ChunkerParams
from cas.errors import CorruptObjectError, InvalidInputError, MissingObjectError
from cas.repository import _layout as layout
from cas.store import Record, Store, TensorPart, VersionFiles

KiB = 1024
PARAMS = ChunkerParams.from_average(16 * KiB)
rng = np.random.default_rng(11)
Tensors = dict[str, tuple[str, np.ndarray[Any, Any]]]
TENSORS: Tensors = {
    "f32": ("F32", (rng.standard_normal((96, 128)) * 0.02).astype(np.float32)),
    "f16": ("F16", (rng.standard_normal((96, 128)) * 0.02).astype(np.float16)),
    # bf16 as the upper halves of float32 words.
    "b16": (
        "BF16",
        ((rng.standard_normal(96 * 128) * 0.02).astype(np.float32).view(np.uint32) >> 16).astype(
            np.uint16
        ),
    ),
    "i64": ("I64", rng.integers(0, 1000, (32, 96)).astype(np.int64)),
    "small": ("F32", rng.standard_normal(40).astype(np.float32)),
}
NOISE = rng.integers(0, 256, 40 * KiB, dtype=np.uint8).tobytes()  # stored raw
TEXT = b"framing " * 5000  # stored as zstd


def record(key: str, parents: tuple[str, ...] = ()) -> Record:
    return Record.of(
        key, parents=parents, tags=(), metrics=None, metadata=None, message="", info=None
    )


def write(store: Store, tensors: Tensors, parents: tuple[str, ...] = ()) -> str:
    parts: list[bytes | TensorPart] = [TEXT]
    for name, (dtype, array) in tensors.items():
        parts += [b"head", TensorPart(name, dtype, array.shape, array.data), b"tail"]
    parts.append(NOISE)
    with store.shard_writer(record("m", parents), parents=parents) as writer:
        writer.write("f", parts)
        return writer.commit([writer.seal()]).ref


def fill_all(files: VersionFiles, requests: list[tuple[str, int, int]]) -> list[bytes]:
    buffers = [bytearray(end - start) for _, start, end in requests]
    fills = [(*r, memoryview(b)) for r, b in zip(requests, buffers, strict=True)]
    files.read_into(fills, workers=3)
    return [bytes(b) for b in buffers]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.init(tmp_path / "store", chunker=PARAMS)


def shard_ranges(files: VersionFiles) -> list[tuple[str, int, int]]:
    assert files.tensors is not None
    return [(s.file, s.start, s.end) for t in files.tensors.tensors.values() for s in t.shards]


def test_whole_shards_and_any_ranges_read_into_buffers_as_read_ranges_reads_them(
    store: Store,
) -> None:
    files = store.open_version(write(store, TENSORS))
    size = files.size("f")
    odd = [("f", 0, 7), ("f", 5, 40_000), ("f", size // 2, size), ("f", 3, 3)]
    requests = shard_ranges(files) + odd
    expected = [b"".join(pieces) for pieces in files.read_ranges(requests)]
    assert fill_all(files, requests) == expected
    codecs = {store.backend.get(layout.chunk_key(c.digest))[3] for c in files.files["f"].chunks}
    assert {codec.Codec.RAW, codec.Codec.ZSTD, codec.Codec.GROUPED} <= codecs


def test_delta_chunks_read_into_buffers_through_their_bases(store: Store) -> None:
    first = write(store, TENSORS)
    moved = dict(TENSORS)
    dtype, array = TENSORS["f32"]
    moved["f32"] = (dtype, array + np.float32(1e-4))
    files = store.open_version(write(store, moved, parents=(first,)))
    codecs = {store.backend.get(layout.chunk_key(c.digest))[3] for c in files.files["f"].chunks}
    assert codecs & codec.DELTA_CODECS
    requests = shard_ranges(files)
    assert fill_all(files, requests) == [b"".join(p) for p in files.read_ranges(requests)]


def _grouped_chunk(files: VersionFiles, store: Store) -> tuple[tuple[str, int, int], str, bytes]:
    """The range of a byte-grouped chunk of the file, its key and its stored blob."""
    entry = files.files["f"]
    for chunk, start in zip(entry.chunks, entry.chunk_offsets(), strict=True):
        key = layout.chunk_key(chunk.digest)
        blob = store.backend.get(key)
        if blob[3] == codec.Codec.GROUPED:
            return ("f", start, start + chunk.length), key, blob
    raise AssertionError("no byte-grouped chunk")


def test_a_chunk_that_decodes_to_other_bytes_is_refused_after_decoding_into_the_buffer(
    store: Store,
) -> None:
    files = store.open_version(write(store, TENSORS))
    chunk_range, key, blob = _grouped_chunk(files, store)
    # A well-formed chunk of the same length, holding other elements: only the hash tells.
    other = np.frombuffer(codec.decode(blob), dtype=np.uint8).copy()
    other[:4] ^= 0xFF
    store.backend.delete([key])
    store.backend.put(key, codec.encode_grouped(other, 4, floatcodec.Layout.FP32))
    with pytest.raises(CorruptObjectError, match="does not match its hash"):
        fill_all(files, [chunk_range])


def test_a_damaged_or_missing_chunk_is_refused(store: Store) -> None:
    files = store.open_version(write(store, TENSORS))
    chunk_range, key, blob = _grouped_chunk(files, store)
    path, start, end = chunk_range
    damaged = bytearray(blob)
    damaged[-20:] = bytes(20)
    store.backend.delete([key])
    store.backend.put(key, bytes(damaged))
    with pytest.raises(CorruptObjectError):
        fill_all(files, [(path, start, end)])
    store.backend.delete([key])
    with pytest.raises(MissingObjectError, match="missing"):
        fill_all(files, [(path, start, end)])
    with pytest.raises(InvalidInputError, match="do not fit"):
        files.read_into([(path, start, end, memoryview(bytearray(1)))])


@settings(max_examples=60, deadline=None)
@given(
    layout_=st.sampled_from(list(floatcodec.Layout)),
    count=st.integers(0, 3000),
    scale=st.sampled_from([1e-3, 0.02, 1.0, 1e4]),
    seed=st.integers(0, 2**32 - 1),
)
def test_decode_into_equals_decode(
    layout_: floatcodec.Layout, count: int, scale: float, seed: int
) -> None:
    itemsize = floatcodec.LAYOUT_ITEMSIZE.get(layout_, 8)
    values = np.random.default_rng(seed).standard_normal(count) * scale
    dtypes = {2: np.float16, 4: np.float32, 8: np.float64}
    data = values.astype(dtypes[itemsize]).tobytes()
    payload = floatcodec.encode(data, itemsize, layout_)
    out = bytearray(len(data))
    floatcodec.decode_into(payload, memoryview(out))
    assert bytes(out) == bytes(floatcodec.decode(payload, len(data))) == data
