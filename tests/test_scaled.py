"""Scaled difference deltas (codec 5): fp32 elements against their base times a factor."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from test_tensors import PARAMS, entry_chunks, save

from cas.chunks import _codec as codec
from cas.chunks import _floatcodec as floatcodec
from cas.chunks import _scaled as scaled
from cas.chunks._floatcodec import Layout
from cas.digest import hash_bytes
from cas.errors import CorruptObjectError, InvalidInputError
from cas.repository import _layout as layout
from cas.store import Store
from cas.tensors._encoding import Elements, TensorCodec

F32 = np.dtype("<f4")
SCALES = st.floats(0.5, 2.0, exclude_max=True, width=32)


def decaying(seed: int, size: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """Adam's second moment over 20 steps: decayed by 0.999**20, some elements grown."""
    rng = np.random.default_rng(seed)
    before = (rng.standard_normal(size) ** 2 * 1e-6).astype(np.float32)
    grown = rng.random(size) < 0.2
    after = before * np.float32(0.999**20) + grown * (rng.random(size) * 1e-9)
    return before, after.astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), scale=SCALES)
def test_any_bits_round_trip_at_any_factor(data: st.DataObject, scale: float) -> None:
    # NaN payloads, infinities, subnormals, zeros of both signs on either side.
    new = data.draw(arrays(F32, st.integers(0, 300)))
    base = np.frombuffer(data.draw(st.binary(min_size=new.nbytes, max_size=new.nbytes)), F32)
    coded = scaled.difference(new.tobytes(), base.tobytes(), scale)
    assert bytes(scaled.undo_difference(coded, base.tobytes(), scale)) == new.tobytes()


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_scaled_delta_chunk_round_trips(data: st.DataObject) -> None:
    new = data.draw(arrays(F32, st.integers(0, 3000)))
    base = data.draw(
        st.one_of(
            st.just(new * np.float32(0.98)),
            arrays(F32, new.shape),
        )
    )
    blob = codec.encode_delta(
        new.tobytes(), base.tobytes(), hash_bytes(base.tobytes()), 4, codec.Codec.SCALED
    )
    assert blob[3] in (codec.Codec.SCALED, codec.Codec.DIFFERENCE)
    assert codec.delta_base(blob) == hash_bytes(base.tobytes())
    assert codec.decode(blob, length=new.nbytes, base=base.tobytes()) == new.tobytes()


def test_a_scaled_delta_applies_in_place_as_it_decodes() -> None:
    """Chains are rebuilt in one buffer (ChunkStore's fast path): a scaled link
    must give there exactly what decoding it gives, or every such chain would
    be read a second time, link by link."""
    before, after = decaying(1)
    blob = codec.encode_delta(after.data, before.data, b"\0" * 32, 4, codec.Codec.SCALED)
    assert blob[3] == codec.Codec.SCALED
    out = floatcodec.buffer(before.nbytes)
    out[:] = before.tobytes()
    codec.apply_delta(blob, out)
    assert bytes(out) == after.tobytes() == codec.decode(blob, base=before.tobytes())


def test_a_decayed_state_stores_smaller_than_its_plain_difference() -> None:
    before, after = decaying(1)
    blob = codec.encode_delta(after.data, before.data, b"\0" * 32, 4, codec.Codec.SCALED)
    plain = codec.encode_delta(after.data, before.data, b"\0" * 32, 4, codec.Codec.DIFFERENCE)
    assert blob[3] == codec.Codec.SCALED
    (factor,) = scaled.SCALE.unpack_from(blob, codec.HEADER.size + codec.BASE.size)
    assert factor == pytest.approx(0.999**20, abs=2e-3)
    assert len(blob) < 0.8 * len(plain)
    assert codec.decode(blob, base=before.tobytes()) == after.tobytes()


def test_a_state_that_does_not_decay_gets_a_plain_difference() -> None:
    rng = np.random.default_rng(2)
    before = rng.normal(0, 0.05, 50_000).astype(np.float32)
    after = before + (1e-4 * rng.standard_normal(before.size)).astype(np.float32)
    blob = codec.encode_delta(after.data, before.data, b"\0" * 32, 4, codec.Codec.SCALED)
    assert blob[3] == codec.Codec.DIFFERENCE
    assert codec.decode(blob, base=before.tobytes()) == after.tobytes()


def test_only_safe_base_elements_are_scaled() -> None:
    words = np.array(
        [
            0x00000000,  # zero
            0x80000001,  # subnormal
            0x00800000,  # smallest normal (exponent 1): its half would be subnormal
            0x01000000,  # exponent 2
            0x7E800000,  # exponent 253
            0x7F000000,  # exponent 254: its double would overflow
            0x7F800000,  # infinity
            0x7FC00001,  # NaN
        ],
        dtype="<u4",
    )
    predicted = scaled.predict(words.tobytes(), 0.5)
    assert predicted[[0, 1, 2, 5, 6, 7]].tolist() == words[[0, 1, 2, 5, 6, 7]].tolist()
    assert predicted[3] == 0x00800000  # halved to the smallest normal
    assert predicted[4] == 0x7E000000
    assert scaled.predict(words.tobytes(), 1.9921875)[4] == 0x7EFF0000
    for bad in (0.49, 2.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="outside"):
            scaled.predict(words.tobytes(), bad)


@settings(max_examples=100, deadline=None)
@given(words=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64), scale=SCALES)
def test_predictions_follow_the_format_rule(words: list[int], scale: float) -> None:
    # The rule of docs/format.md, element by element: a product of two
    # binary32 values is exact in binary64, so rounding it once to binary32
    # is the correctly rounded product.
    base = np.array(words, dtype="<u4")
    predicted = scaled.predict(base.tobytes(), scale)
    for word, got in zip(words, predicted.tolist(), strict=True):
        exponent = (word >> 23) & 0xFF
        if 2 <= exponent <= 253:
            (value,) = struct.unpack("<f", struct.pack("<I", word))
            (expected,) = struct.unpack("<I", struct.pack("<f", value * scale))
        else:
            expected = word
        assert got == expected


def _with_factor(blob: bytes, factor: bytes) -> bytes:
    at = codec.HEADER.size + codec.BASE.size
    return blob[:at] + factor + blob[at + scaled.SCALE.size :]


def test_damaged_scaled_deltas_are_refused() -> None:
    before, after = decaying(3, 4000)
    blob = codec.encode_delta(after.data, before.data, b"\0" * 32, 4, codec.Codec.SCALED)
    assert blob[3] == codec.Codec.SCALED
    base = before.tobytes()
    for factor in (0.25, 2.0, float("nan"), float("-inf"), -0.98):
        with pytest.raises(CorruptObjectError, match="scaled delta header is damaged"):
            codec.decode(_with_factor(blob, struct.pack("<f", factor)), base=base)
    at = codec.HEADER.size + codec.BASE.size
    with pytest.raises(CorruptObjectError, match="truncated"):
        codec.decode(blob[: at + 3], base=base)
    # A payload of 2-byte elements under a factor: damaged, not decoded as such.
    header = codec.HEADER.pack(codec.MAGIC, codec.Codec.SCALED, after.nbytes)
    odd = floatcodec.encode(after.tobytes(), 2, Layout.PLAIN)
    forged = header + codec.BASE.pack(b"\0" * 32) + struct.pack("<f", 0.98) + odd
    with pytest.raises(CorruptObjectError, match="2-byte elements"):
        codec.decode(forged, base=base)
    with pytest.raises(CorruptObjectError, match=r"stray bytes|damaged|truncated"):
        codec.decode(blob + b"x", base=base)
    with pytest.raises(InvalidInputError, match="needs its base"):
        codec.decode(blob)
    with pytest.raises(CorruptObjectError, match="delta base holds"):
        codec.decode(blob, base=base[:-4])


@settings(max_examples=60, deadline=None)
@given(tail=st.binary(max_size=64))
def test_random_payloads_fail_cleanly(tail: bytes) -> None:
    header = codec.HEADER.pack(codec.MAGIC, codec.Codec.SCALED, 64)
    blob = header + codec.BASE.pack(b"\0" * 32) + tail
    try:
        out = codec.decode(blob, length=64, base=bytes(64))
    except CorruptObjectError:
        return
    assert len(out) == 64


def test_a_factor_is_for_fp32_elements_only() -> None:
    with pytest.raises(ValueError, match="no scaled delta of 2-byte elements"):
        codec.encode_delta(b"abcd", b"abcd", b"\0" * 32, 2, codec.Codec.SCALED)
    before, after = decaying(4, 40_000)
    coder = TensorCodec(method=codec.Codec.SCALED)
    blob, is_delta = coder.delta_or_whole(
        memoryview(after.tobytes()), Elements(4, Layout.FP32), before.tobytes(), b"\0" * 32
    )
    assert is_delta
    assert blob[3] == codec.Codec.SCALED
    assert Elements.of_blob(blob) == Elements(4, Layout.PLAIN)
    # The same bytes as 32-bit integers (a PLAIN layout) get a plain difference.
    blob, is_delta = coder.delta_or_whole(
        memoryview(after.tobytes()), Elements(4, Layout.PLAIN), before.tobytes(), b"\0" * 32
    )
    assert blob[3] == codec.Codec.DIFFERENCE


def _put_decaying(store: Store, tmp_path: Path) -> Path:
    before, after = decaying(5, 200_000)
    for number, state in enumerate((before, after), 1):
        path = save(tmp_path / f"v{number}.safetensors", {"exp_avg_sq": state}, "F32")
        store.put(path, "run")
    return path


def test_a_default_store_writes_scaled_deltas_and_restores_them(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store", chunker=PARAMS)
    assert store.config.format == layout.SCALED_FORMAT
    path = _put_decaying(store, tmp_path)
    stored = {
        store.backend.get(layout.chunk_key(c.digest))[3] for c in entry_chunks(store, "run@2")
    }
    assert codec.Codec.SCALED in stored
    store.get("run@2", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == path.read_bytes()


def test_a_store_of_plain_differences_stays_readable_by_format_3(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store", chunker=PARAMS, delta_method="difference")
    assert store.config.format == layout.DIFFERENCE_FORMAT
    path = _put_decaying(store, tmp_path)
    stored = {
        store.backend.get(layout.chunk_key(c.digest))[3] for c in entry_chunks(store, "run@2")
    }
    assert codec.Codec.SCALED not in stored
    assert codec.Codec.DIFFERENCE in stored
    store.get("run@2", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == path.read_bytes()


def test_scaled_deltas_of_a_deleted_version_are_repacked_whole(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store", chunker=PARAMS)
    path = _put_decaying(store, tmp_path)
    assert any(c.bases for c in entry_chunks(store, "run@2"))
    store.delete("run@1")
    report = store.gc(grace=0)
    assert report.repack is not None
    assert report.repack.chunks > 0
    kept = entry_chunks(store, "run@2")
    assert not any(c.bases for c in kept)
    # Stored again as the put groups a whole fp32 chunk.
    stored = {store.backend.get(layout.chunk_key(c.digest))[3] for c in kept}
    assert codec.Codec.SCALED not in stored
    assert store.verify(deep=True).ok
    store.get("run@2", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == path.read_bytes()
