"""Byte-grouped and delta chunk codecs: exact round trips of any float bits, damage detected."""

from __future__ import annotations

import struct
from typing import Literal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cas.chunks import _codec as codec
from cas.chunks import _floatcodec as floatcodec
from cas.chunks._floatcodec import Layout
from cas.digest import hash_bytes
from cas.errors import CorruptObjectError, InvalidInputError

# Every layout with the numpy dtype whose bits it groups (bf16 as its raw words).
LAYOUTS = [
    (Layout.FP32, np.dtype("<f4")),
    (Layout.FP16, np.dtype("<f2")),
    (Layout.BF16, np.dtype("<u2")),
    (Layout.PLAIN, np.dtype("<f8")),
    (Layout.PLAIN, np.dtype("<f4")),
    (Layout.PLAIN, np.dtype("<u2")),
    (Layout.PLAIN, np.dtype("u1")),
]
SPECIALS = {
    "<f4": [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-40, 3.4e38, 1.0],
    "<f2": [np.nan, np.inf, -np.inf, 0.0, -0.0, 6e-8, -6e-5, 65504.0],
    "<f8": [np.nan, np.inf, -0.0, 5e-324, 1.7e308],
}
FLOAT_BITS: dict[int, Literal[16, 32, 64]] = {2: 16, 4: 32, 8: 64}


def arrays(dtype: np.dtype) -> st.SearchStrategy[np.ndarray]:
    """Arrays of any length (odd ones too), any bit patterns, plus NaN, inf and denormals."""
    if dtype.kind == "f":
        elements = st.one_of(
            st.sampled_from(SPECIALS[dtype.str]),
            st.floats(width=FLOAT_BITS[dtype.itemsize], allow_nan=True, allow_subnormal=True),
        )
        return hnp.arrays(dtype, st.integers(0, 600), elements=elements)
    return hnp.arrays(dtype, st.integers(0, 600))


def bf16_weights(count: int, seed: int, scale: float = 0.05) -> bytes:
    """Gaussian weights, truncated to bfloat16 words: what real checkpoints look like."""
    values = np.random.default_rng(seed).normal(0, scale, count).astype(np.float32)
    return (values.view(np.uint32) >> 16).astype("<u2").tobytes()


@pytest.mark.parametrize(("layout", "dtype"), LAYOUTS, ids=lambda v: str(v))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_grouped_round_trip(layout: Layout, dtype: np.dtype, data: st.DataObject) -> None:
    array = data.draw(arrays(dtype))
    raw = array.tobytes()
    payload = floatcodec.encode(raw, dtype.itemsize, layout)
    assert floatcodec.decode(payload, len(raw)) == raw
    blob = codec.encode_grouped(raw, dtype.itemsize, layout)
    assert codec.decode(blob) == raw
    assert codec.raw_length(blob) == len(raw)


@pytest.mark.parametrize(("layout", "dtype"), LAYOUTS, ids=lambda v: str(v))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_delta_round_trip(layout: Layout, dtype: np.dtype, data: st.DataObject) -> None:
    del layout  # deltas always group plainly; the dtype gives the element size
    new = data.draw(arrays(dtype))
    flips = data.draw(hnp.arrays(np.uint8, new.nbytes))
    base = (np.frombuffer(new.tobytes(), np.uint8) ^ flips).tobytes()
    blob = codec.encode_delta(new.tobytes(), base, hash_bytes(base), dtype.itemsize)
    assert codec.delta_base(blob) == hash_bytes(base)
    assert codec.decode(blob, base=base) == new.tobytes()


DIFFERENCE_DTYPES = [np.dtype("<f4"), np.dtype("<u2"), np.dtype("<f8"), np.dtype("<f2")]


@pytest.mark.parametrize("dtype", DIFFERENCE_DTYPES, ids=str)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_difference_delta_round_trip(dtype: np.dtype, data: st.DataObject) -> None:
    # Any bits on either side (NaN payloads, infinities, sign flips): the
    # difference wraps around, so nothing is lost.
    new = data.draw(arrays(dtype))
    base = np.frombuffer(data.draw(st.binary(min_size=new.nbytes, max_size=new.nbytes)), dtype)
    blob = codec.encode_delta(
        new.tobytes(),
        base.tobytes(),
        hash_bytes(base.tobytes()),
        dtype.itemsize,
        codec.Codec.DIFFERENCE,
    )
    assert blob[3] == codec.Codec.DIFFERENCE
    assert codec.delta_base(blob) == hash_bytes(base.tobytes())
    assert codec.decode(blob, base=base.tobytes()) == new.tobytes()


def test_difference_is_zigzag_coded() -> None:
    new = np.array([5, 4, 6, 0, 0xFFFF], dtype="<u2")
    base = np.array([5, 5, 5, 0xFFFF, 0], dtype="<u2")
    coded = np.frombuffer(floatcodec.difference(new.tobytes(), base.tobytes(), 2), "<u2")
    # 0, -1, +1, +1 (wrapping), -1 (wrapping)
    assert coded.tolist() == [0, 1, 2, 2, 1]
    undone = floatcodec.undo_difference(coded.tobytes(), base.tobytes(), 2)
    assert bytes(undone) == new.tobytes()


def test_difference_delta_of_a_fine_tuning_step_beats_xor() -> None:
    rng = np.random.default_rng(6)
    w1 = rng.normal(0, 0.05, 200_000).astype(np.float32)
    w2 = w1 + (1e-4 * rng.standard_normal(w1.size)).astype(np.float32)
    forms = {
        "fp32": ([w.tobytes() for w in (w1, w2)], 4),
        "bf16": ([(w.view(np.uint32) >> 16).astype("<u2").tobytes() for w in (w1, w2)], 2),
    }
    for (before, after), itemsize in forms.values():
        sizes = {}
        for method in (codec.Codec.DELTA, codec.Codec.DIFFERENCE):
            blob = codec.encode_delta(after, before, hash_bytes(before), itemsize, method)
            assert codec.decode(blob, base=before) == after
            sizes[method] = len(blob)
        assert sizes[codec.Codec.DIFFERENCE] < 0.98 * sizes[codec.Codec.DELTA]


def test_a_difference_delta_of_odd_elements_is_refused_or_damaged() -> None:
    with pytest.raises(ValueError, match="3-byte elements"):
        codec.encode_delta(b"abcdef", b"abcdef", b"\0" * 32, 3, codec.Codec.DIFFERENCE)
    with pytest.raises(ValueError, match="not a delta"):
        codec.encode_delta(b"ab", b"ab", b"\0" * 32, 2, codec.Codec.GROUPED)
    # A grouped payload claiming 3-byte elements cannot be undone: damaged.
    raw = b"abcdef"
    header = codec.HEADER.pack(codec.MAGIC, codec.Codec.DIFFERENCE, len(raw))
    blob = header + codec.BASE.pack(b"\0" * 32) + floatcodec.encode(raw, 3, Layout.PLAIN)
    with pytest.raises(CorruptObjectError, match="difference delta is damaged"):
        codec.decode(blob, base=raw)


def test_every_16_bit_word_survives_each_split_layout() -> None:
    words = np.arange(1 << 16, dtype="<u2").tobytes()
    for layout in (Layout.BF16, Layout.FP16):
        assert floatcodec.decode(floatcodec.encode(words, 2, layout), len(words)) == words
    doubled = np.arange(1 << 16, dtype="<u4") * 65537
    raw = doubled.astype("<u4").tobytes()
    assert floatcodec.decode(floatcodec.encode(raw, 4, Layout.FP32), len(raw)) == raw


def test_bf16_split_puts_exponent_and_top_mantissa_in_the_high_stream() -> None:
    # 0x3F80 is 1.0: sign 0, exponent 127, mantissa 0. Bits 12..5 are 0b11111100.
    word = np.array([0x3F80, 0xBF80 | 0x7F], dtype="<u2")
    high, low = floatcodec._split16(word, Layout.BF16)
    assert high.tolist() == [0b11111100, 0b11111111]
    # The low stream: bits 15..13 (sign, two high exponent bits) then bits 4..0.
    assert low.tolist() == [0b00100000, 0b10111111]


def test_weights_compress_far_better_than_zstd() -> None:
    raw = bf16_weights(200_000, seed=1)
    grouped = codec.encode_grouped(raw, 2, Layout.BF16)
    plain = codec.encode(raw)
    assert codec.decode(grouped) == raw
    assert len(grouped) < 0.72 * len(raw)
    assert len(grouped) < 0.93 * len(plain)
    fp32 = np.random.default_rng(2).normal(0, 0.05, 100_000).astype("<f4").tobytes()
    assert len(codec.encode_grouped(fp32, 4, Layout.FP32)) < 0.87 * len(fp32)


def test_delta_of_a_fine_tuning_step_is_small() -> None:
    rng = np.random.default_rng(3)
    w1 = rng.normal(0, 0.05, 200_000).astype(np.float32)
    w2 = w1 + (1e-4 * rng.standard_normal(w1.size)).astype(np.float32)
    as_bf16 = [(w.view(np.uint32) >> 16).astype("<u2").tobytes() for w in (w1, w2)]
    blob = codec.encode_delta(as_bf16[1], as_bf16[0], hash_bytes(as_bf16[0]), 2)
    assert len(blob) < 0.3 * len(as_bf16[1])
    assert codec.decode(blob, base=as_bf16[0]) == as_bf16[1]


def test_incompressible_elements_fall_back_to_raw() -> None:
    raw = np.random.default_rng(4).integers(0, 256, 40_000, dtype=np.uint8).tobytes()
    blob = codec.encode_grouped(raw, 4, Layout.FP32)
    assert blob[3] == codec.Codec.RAW
    assert codec.decode(blob) == raw


def test_grouped_needs_whole_elements() -> None:
    with pytest.raises(ValueError, match="whole"):
        floatcodec.encode(b"\x00" * 7, 2, Layout.BF16)
    with pytest.raises(ValueError, match="needs 4-byte"):
        floatcodec.encode(b"\x00" * 8, 2, Layout.FP32)


def test_a_delta_without_its_base_is_refused() -> None:
    raw = bf16_weights(1000, seed=5)
    blob = codec.encode_delta(raw, raw, hash_bytes(raw), 2)
    with pytest.raises(InvalidInputError, match="needs its base"):
        codec.decode(blob)
    with pytest.raises(CorruptObjectError, match="delta base holds"):
        codec.decode(blob, base=raw[:-2])


def test_plain_chunks_have_no_delta_base() -> None:
    assert codec.delta_base(codec.encode(b"hello" * 100)) is None
    assert codec.delta_base(codec.encode_grouped(bf16_weights(500, 6), 2, Layout.BF16)) is None


@pytest.mark.parametrize(
    "damage",
    ["truncate", "stray", "method", "layout", "stream length", "count"],
)
def test_damaged_grouped_payloads_are_corrupt_not_garbage(damage: str) -> None:
    raw = bf16_weights(5000, seed=7)
    blob = bytearray(codec.encode_grouped(raw, 2, Layout.BF16))
    head = codec.HEADER.size
    if damage == "truncate":
        blob = blob[:-10]
    elif damage == "stray":
        blob += b"xx"
    elif damage == "method":
        blob[head + 3] = 9  # the first stream's method
    elif damage == "layout":
        blob[head + 1] = 77
    elif damage == "stream length":
        struct.pack_into("<I", blob, head + 4, 3)
    else:
        blob[head + 2] = 3
    with pytest.raises(CorruptObjectError):
        codec.decode(bytes(blob))


def test_a_flipped_payload_byte_never_passes_as_the_chunk() -> None:
    # Decoding may succeed with wrong bytes (a raw stream has no checksum);
    # the chunk store's hash check is what catches that, so the bytes must differ.
    raw = bf16_weights(5000, seed=8)
    blob = bytearray(codec.encode_grouped(raw, 2, Layout.BF16))
    blob[-100] ^= 0x40
    try:
        decoded = codec.decode(bytes(blob))
    except CorruptObjectError:
        return
    assert decoded != raw


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_plain_stream_i_holds_byte_i_of_every_element(itemsize: int) -> None:
    data = bytes(range(8 * itemsize))
    streams = floatcodec._streams(memoryview(data), itemsize, Layout.PLAIN)
    assert [bytes(s) for s in streams] == [data[i::itemsize] for i in range(itemsize)]
    assert bytes(floatcodec._merge(streams, itemsize, Layout.PLAIN)) == data


def test_fp32_low_streams_hold_byte_1_then_byte_0() -> None:
    data = bytes(range(32))
    streams = floatcodec._streams(memoryview(data), 4, Layout.FP32)
    assert [bytes(s) for s in streams[2:]] == [data[1::4], data[0::4]]
    assert bytes(floatcodec._merge(streams, 4, Layout.FP32)) == data


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
@pytest.mark.parametrize("method", [codec.Codec.DIFFERENCE, codec.Codec.DELTA])
@pytest.mark.parametrize("spread", [3, 300, 1 << 40])
def test_a_delta_applied_in_place_gives_what_decoding_gives(
    itemsize: int, method: codec.Codec, spread: int
) -> None:
    # Small and large differences alike (high bytes zero, and not), either sign.
    rng = np.random.default_rng(itemsize * 7 + spread % 97)
    words = floatcodec._WORDS[itemsize]
    base = rng.integers(0, 256, 4000 * itemsize, dtype=np.uint8).tobytes()
    step = (rng.standard_normal(4000) * spread).astype(np.int64).astype(np.uint64)
    new = (np.frombuffer(base, words).astype(np.uint64) + step).astype(words).tobytes()
    blob = codec.encode_delta(new, base, hash_bytes(base), itemsize, method)
    out = bytearray(base)
    codec.apply_delta(blob, memoryview(out))
    assert bytes(out) == new == bytes(codec.decode(blob, base=base))


def test_a_damaged_delta_applied_in_place_is_refused() -> None:
    base = np.arange(1000, dtype="<u2").tobytes()
    new = (np.arange(1000, dtype="<u2") + 3).tobytes()
    blob = codec.encode_delta(new, base, hash_bytes(base), 2, codec.Codec.DIFFERENCE)
    with pytest.raises(CorruptObjectError):
        codec.apply_delta(blob[:-5], memoryview(bytearray(base)))
    with pytest.raises(CorruptObjectError, match="not a delta"):
        codec.apply_delta(codec.encode(new), memoryview(bytearray(base)))
    with pytest.raises(CorruptObjectError, match="manifest"):
        codec.apply_delta(blob, memoryview(bytearray(base[:-2])))


def unzigzag_added(codes: list[int], base: list[int]) -> list[int]:
    """The reference for 32-bit difference links: each code (the little-endian
    merge of its four bytes) unzigzagged, then added to its base word mod 2**32."""
    out = []
    for code, word in zip(codes, base, strict=True):
        difference = (code >> 1) ^ (0xFFFFFFFF if code & 1 else 0)
        out.append((word + difference) & 0xFFFFFFFF)
    return out


def zigzag32(difference: int) -> int:
    signed = difference - (1 << 32) if difference >= 1 << 31 else difference
    return ((signed << 1) ^ (signed >> 31)) & 0xFFFFFFFF


# Codes of the extreme differences: 0x7fffffff, 0x80000000 (the most negative),
# 0xffffffff (-1), 1, 0; then byte patterns that put ones in each byte.
EDGE_CODES = [zigzag32(d) for d in (0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1, 0)] + [
    0xFFFFFFFE,
    0xFFFFFFFF,
    0x00000001,
    0x80000000,
    0x7FFFFFFF,
    0x00FFFFFF,
    0x0000FFFF,
    0x000000FF,
    0x01000000,
    0x00010000,
    0x00000100,
]


@settings(max_examples=200, deadline=None)
@given(
    codes=st.lists(
        st.one_of(st.sampled_from(EDGE_CODES), st.integers(0, 2**32 - 1)), min_size=1, max_size=300
    ),
    zeroed=st.sampled_from([0, 1, 2, 3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_32_bit_difference_link_adds_what_the_reference_does(
    codes: list[int], zeroed: int, seed: int
) -> None:
    # ``zeroed`` top byte streams are all zeros (differences under 2**23,
    # 2**15, 2**7: fine-tuning steps), or none; the other streams keep any bytes.
    mask = 0xFFFFFFFF >> (8 * zeroed)
    codes = [code & mask for code in codes]
    base = np.random.default_rng(seed).integers(0, 2**32, len(codes), dtype=np.uint64).tolist()
    expected = unzigzag_added(codes, base)
    coded = np.array(codes, dtype="<u4")
    streams = floatcodec._streams(memoryview(coded.tobytes()), 4, Layout.PLAIN)
    words = floatcodec._unzigzag32(streams)
    assert ((np.array(base, dtype="<u4") + words).tolist()) == expected
    # The same link as a restore applies it: grouped, compressed, in place.
    out = bytearray(np.array(base, dtype="<u4").tobytes())
    payload = floatcodec.encode(coded.tobytes(), 4, Layout.PLAIN)
    floatcodec.apply_delta(payload, memoryview(out), difference=True)
    assert np.frombuffer(out, "<u4").tolist() == expected


def test_a_32_bit_difference_link_with_one_top_byte_set_among_zeros() -> None:
    # A top stream almost all zeros (as for fine-tuning steps): the single
    # elements that need its bytes get them.
    codes = [0x00012345] * 5000
    codes[4321] = 0xFE012345
    codes[17] = 0x00FF0000
    base = list(range(5000))
    out = bytearray(np.array(base, dtype="<u4").tobytes())
    payload = floatcodec.encode(np.array(codes, dtype="<u4").tobytes(), 4, Layout.PLAIN)
    floatcodec.apply_delta(payload, memoryview(out), difference=True)
    assert np.frombuffer(out, "<u4").tolist() == unzigzag_added(codes, base)
