"""Content-defined chunking: streaming gives the whole-buffer boundaries, and params are checked."""

from __future__ import annotations

import io
import itertools

import pytest
from helpers import KiB, MiB, random_bytes, text_bytes
from hypothesis import given, settings
from hypothesis import strategies as st

from cas.chunks._chunking import ChunkerParams, cut_points, iter_chunks
from cas.errors import InvalidInputError

TINY = ChunkerParams(min_size=64, avg_size=256, max_size=1024)
SMALL = ChunkerParams.from_average(16 * KiB)


class TrickleReader:
    """A stream that hands out at most ``step`` bytes per read, like a slow pipe."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step
        self.reads = 0

    def readinto(self, buffer: memoryview) -> int:
        self.reads += 1
        n = min(len(buffer), self._step, len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def whole(data: bytes, params: ChunkerParams) -> list[tuple[int, int]]:
    return list(cut_points(memoryview(data), params))


def streamed(
    data: bytes, params: ChunkerParams, *, block_size: int, step: int | None = None
) -> list[tuple[int, int]]:
    stream = TrickleReader(data, step) if step else io.BytesIO(data)
    out, offset = [], 0
    for view in iter_chunks(stream, params, block_size=block_size):
        out.append((offset, len(view)))
        offset += len(view)
    return out


def mixed_data(size: int, seed: int) -> bytes:
    """Random, text-like and constant runs: cut points of every kind."""
    third = size // 3
    return random_bytes(third, seed) + text_bytes(third, seed) + b"\0" * (size - 2 * third)


@pytest.mark.parametrize("params", [TINY, SMALL], ids=["tiny", "small"])
@pytest.mark.parametrize("block_size", [1, 4 * KiB, 100_000, 1 * MiB])
def test_streaming_matches_whole_buffer(params: ChunkerParams, block_size: int) -> None:
    data = mixed_data(3 * MiB + 12345, seed=block_size)
    expected = whole(data, params)
    assert len(expected) > 20, "the data must span many chunks for this test to mean anything"
    assert streamed(data, params, block_size=block_size) == expected


def test_streaming_with_short_reads_matches_whole_buffer() -> None:
    data = mixed_data(700 * KiB + 3, seed=7)
    reader = TrickleReader(data, 997)
    offsets = []
    offset = 0
    for view in iter_chunks(reader, SMALL, block_size=1):
        offsets.append((offset, len(view)))
        offset += len(view)
    assert reader.reads > 700  # the reader really was consulted in small pieces
    assert offsets == whole(data, SMALL)


def test_streaming_default_params_across_several_blocks() -> None:
    # Default params: window 4 MiB, so blocks are at least 8 MiB; 21 MiB spans three.
    params = ChunkerParams()
    data = random_bytes(21 * MiB + 5, seed=3)
    expected = whole(data, params)
    assert streamed(data, params, block_size=1) == expected
    assert sum(n for _, n in expected) == len(data)


def test_chunks_cover_the_input_in_order_and_respect_sizes() -> None:
    data = mixed_data(2 * MiB, seed=11)
    views = list(iter_chunks(io.BytesIO(data), SMALL, block_size=1))
    assert b"".join(bytes(v) for v in views) == data
    *body, last = [len(v) for v in views]
    assert all(SMALL.min_size <= n <= SMALL.max_size for n in body)
    assert 0 < last <= SMALL.max_size
    # Constant data has no content-defined cut: every chunk but the last is max size.
    zeros = list(iter_chunks(io.BytesIO(b"\0" * (5 * SMALL.max_size + 1)), SMALL))
    assert [len(v) for v in zeros] == [SMALL.max_size] * 5 + [1]


def test_views_stay_valid_after_later_reads() -> None:
    data = random_bytes(1 * MiB, seed=5)
    views = list(iter_chunks(TrickleReader(data, 4096), TINY, block_size=1))
    # All views were kept while reading continued: none was overwritten by a later block.
    assert b"".join(bytes(v) for v in views) == data
    assert all(v.readonly for v in views)


def test_on_read_sees_every_byte_once_in_order() -> None:
    data = mixed_data(900 * KiB, seed=2)
    seen = bytearray()
    list(iter_chunks(io.BytesIO(data), SMALL, block_size=1, on_read=seen.extend))
    assert bytes(seen) == data


@pytest.mark.parametrize("size", [1, 63, 64, 1000, SMALL.min_size - 1, SMALL.min_size])
def test_input_up_to_the_minimum_is_one_chunk(size: int) -> None:
    data = random_bytes(size, seed=size)
    params = TINY if size <= 64 else SMALL
    views = list(iter_chunks(io.BytesIO(data), params))
    assert [bytes(v) for v in views] == [data]
    assert whole(data, params) == [(0, size)]


def test_empty_input_has_no_chunks() -> None:
    assert list(iter_chunks(io.BytesIO(b""), SMALL)) == []
    assert whole(b"", SMALL) == []


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(0, 300 * KiB),
    seed=st.integers(0, 2**32),
    step=st.sampled_from([None, 1, 511, 4096, 65536]),
    kind=st.sampled_from(["random", "text", "mixed"]),
)
def test_streaming_matches_whole_buffer_for_any_input(
    size: int, seed: int, step: int | None, kind: str
) -> None:
    if kind == "random":
        data = random_bytes(size, seed)
    elif kind == "text":
        data = text_bytes(size, seed)
    else:
        data = mixed_data(size, seed)
    if step == 1:
        data = data[: 20 * KiB]  # byte-by-byte reads are slow; keep the input short
    assert streamed(data, TINY, block_size=1, step=step) == whole(data, TINY)


def test_params_defaults_and_from_average() -> None:
    default = ChunkerParams()
    assert (default.min_size, default.avg_size, default.max_size) == (256 * KiB, MiB, 4 * MiB)
    p = ChunkerParams.from_average(64 * KiB)
    assert (p.min_size, p.avg_size, p.max_size) == (16 * KiB, 64 * KiB, 256 * KiB)
    assert ChunkerParams.from_dict(p.to_dict()) == p
    assert p.to_dict()["algorithm"] == "fastcdc"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"min_size": 32, "avg_size": 256, "max_size": 1024}, "minimum"),
        ({"min_size": 64, "avg_size": 100, "max_size": 1024}, "average"),
        ({"min_size": 64, "avg_size": 256, "max_size": 512}, "maximum"),
        ({"min_size": 64, "avg_size": 256, "max_size": 2 * 1024**3}, "maximum"),
        ({"min_size": 4096, "avg_size": 1024, "max_size": 8192}, "min <= avg <= max"),
        ({"min_size": 1024, "avg_size": 8192, "max_size": 4096}, "min <= avg <= max"),
    ],
)
def test_params_validation(kwargs: dict[str, int], words: str) -> None:
    with pytest.raises(InvalidInputError, match=words):
        ChunkerParams(**kwargs)


def test_params_validation_from_average_and_dict() -> None:
    with pytest.raises(InvalidInputError):
        ChunkerParams.from_average(100)
    with pytest.raises(InvalidInputError, match="unknown chunker"):
        ChunkerParams.from_dict({"algorithm": "rabin", "min_size": 1, "avg_size": 2, "max_size": 3})
    # InvalidInputError is also a ValueError, for callers that only know the builtins.
    with pytest.raises(ValueError, match="average"):
        ChunkerParams(min_size=64, avg_size=10**10, max_size=10**10)


@pytest.mark.parametrize("params", [TINY, SMALL, ChunkerParams()], ids=["tiny", "small", "default"])
@pytest.mark.parametrize("hint_delta", [0, 1, -1, 1000, -1000, "zero", "half"])
def test_size_hint_never_changes_boundaries_and_stays_cheap(
    params: ChunkerParams, hint_delta: int | str
) -> None:
    # A file can grow or shrink between the scan that gave its size and the read:
    # the hint is then wrong, which may cost a read or two but never the result
    # (nor one tiny block per byte, which would be quadratic).
    data = mixed_data(600 * KiB + 17, seed=8)
    if hint_delta == "zero":
        hint = 0
    elif hint_delta == "half":
        hint = len(data) // 2
    else:
        hint = len(data) + int(hint_delta)
    reader = TrickleReader(data, len(data))
    out, offset = [], 0
    for view in iter_chunks(reader, params, size_hint=hint):
        out.append((offset, len(view)))
        offset += len(view)
    assert out == whole(data, params)
    assert reader.reads <= 6, f"{reader.reads} reads for a {len(data)}-byte input"


@pytest.mark.parametrize("params", [TINY, SMALL], ids=["tiny", "small"])
def test_data_up_to_the_minimum_is_one_chunk_as_fastcdc_cuts_it(params: ChunkerParams) -> None:
    from fastcdc.fastcdc_cy import fastcdc_cy

    for size in (1, params.min_size // 2, params.min_size - 1, params.min_size):
        data = mixed_data(size, seed=size)
        expected = [
            (c.offset, c.length)
            for c in fastcdc_cy(data, params.min_size, params.avg_size, params.max_size)
        ]
        assert whole(data, params) == expected == [(0, size)]
    # Past the minimum, the cuts are FastCDC's own.
    for size in (params.min_size + 1, 3 * params.max_size + 5):
        data = mixed_data(size, seed=size)
        expected = [
            (c.offset, c.length)
            for c in fastcdc_cy(data, params.min_size, params.avg_size, params.max_size)
        ]
        assert whole(data, params) == expected


# -- cuts led by a former version -----------------------------------------------------


def followed(
    new: bytes, former: bytes, params: ChunkerParams
) -> tuple[list[tuple[int, int]], int, bytes]:
    from cas.digest import hash_bytes

    previous = [(n, hash_bytes(former[o : o + n])) for o, n in whole(former, params)]
    return follow(new, previous, len(former), params)


def follow(
    new: bytes, previous: list[tuple[int, bytes]], former_size: int, params: ChunkerParams
) -> tuple[list[tuple[int, int]], int, bytes]:
    """(cuts, chunks taken from the former version, bytes seen by on_read)."""
    from cas.chunks._chunking import follow_chunks
    from cas.digest import hash_bytes

    seen = bytearray()
    out, offset, reused = [], 0, 0
    chunks = follow_chunks(
        io.BufferedReader(io.BytesIO(new)),
        params,
        previous,
        former_size,
        len(new),
        on_read=seen.extend,
    )
    for view, digest in chunks:
        if digest is not None:
            assert digest == hash_bytes(view)
            reused += 1
        out.append((offset, len(view)))
        offset += len(view)
    return out, reused, bytes(seen)


EDITS = ["same", "append", "prepend", "insert", "delete", "overwrite", "truncate", "grow_tail"]


def edited(data: bytes, edit: str, at: int, piece: bytes) -> bytes:
    at %= max(len(data), 1)
    return {
        "same": data,
        "append": data + piece,
        "prepend": piece + data,
        "insert": data[:at] + piece + data[at:],
        "delete": data[:at] + data[at + len(piece) :],
        "overwrite": data[:at] + piece + data[at + len(piece) :],
        "truncate": data[:at],
        "grow_tail": data[: len(data) - len(piece)] + piece + piece,
    }[edit]


@pytest.mark.parametrize("params", [TINY, SMALL], ids=["tiny", "small"])
@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(0, 400_000),
    edit=st.sampled_from(EDITS),
    at=st.integers(0, 1 << 30),
    piece_size=st.integers(1, 70_000),
    seed=st.integers(0, 1000),
)
def test_cuts_led_by_a_former_version_are_fastcdc_cuts(
    params: ChunkerParams, size: int, edit: str, at: int, piece_size: int, seed: int
) -> None:
    former = mixed_data(size, seed)
    new = edited(former, edit, at, random_bytes(piece_size, seed + 1))
    cuts, _, seen = followed(new, former, params)
    assert cuts == whole(new, params)
    assert seen == new  # every byte to the whole-file hash, once, in order


def test_an_appended_shard_reuses_every_former_chunk_but_the_last() -> None:
    former = mixed_data(3 * MiB, seed=4)
    new = former + text_bytes(1 * MiB, seed=5)
    cuts, reused, _ = followed(new, former, SMALL)
    assert cuts == whole(new, SMALL)
    # All but the chunks within a window of the former end were taken as they were.
    tail = sum(1 for o, _ in whole(former, SMALL) if len(former) - o < SMALL.window)
    assert reused == len(whole(former, SMALL)) - tail
    assert reused > 20
    same, reused_all, _ = followed(former, former, SMALL)
    assert same == whole(former, SMALL)
    assert reused_all == len(same)


def test_a_former_tensor_header_chunk_is_not_followed() -> None:
    # A safetensors version was cut as cas.tensors._safetensors.plan cuts it: its header
    # (8 + header length bytes) in pieces of at most the maximum, then at
    # tensor boundaries; not by FastCDC. The same bytes, now cut by FastCDC,
    # must not follow those cuts.
    from cas.digest import hash_bytes

    for header_size in (1_000, 300_000):
        header = b"{" + b" " * (header_size - 2) + b"}"
        data = len(header).to_bytes(8, "little") + header + random_bytes(2 * MiB, 9)
        end = 8 + len(header)
        bounds = [*range(0, end, SMALL.max_size), *range(end, len(data), 50_000), len(data)]
        previous = [(b - a, hash_bytes(data[a:b])) for a, b in itertools.pairwise(bounds)]
        assert_not_followed(data, previous)


def assert_not_followed(data: bytes, previous: list[tuple[int, bytes]]) -> None:
    cuts, reused, seen = follow(data, previous, len(data), SMALL)
    assert reused == 0  # nothing was taken from the former version
    assert cuts == whole(data, SMALL)
    assert seen == data
