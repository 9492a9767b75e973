"""FSE streams: exact round trips, smaller skewed streams, the store setting that allows them."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import ok, run_cas
from hypothesis import given, settings
from hypothesis import strategies as st
from test_floatcodec import LAYOUTS, arrays, bf16_weights
from test_tensors import PARAMS, entry_chunks, fine_tune, stored_bytes

from cas.chunks import _codec as codec
from cas.chunks import _entropy as entropy
from cas.chunks import _floatcodec as floatcodec
from cas.chunks._floatcodec import Layout
from cas.errors import CorruptObjectError, InvalidInputError, NotAStoreError, UnsupportedFormatError
from cas.repository import _layout as layout
from cas.store import Store
from cas.store._config import StoreConfig

HEAD = codec.HEADER.size


def stream_methods(blob: bytes) -> list[int]:
    """The method byte of each stream of a grouped or delta chunk."""
    start = HEAD + (codec.BASE.size if codec.delta_base(blob) is not None else 0)
    count = blob[start + 2]
    return [blob[start + 3 + 5 * i] for i in range(count)]


@pytest.mark.parametrize(("layout_", "dtype"), LAYOUTS, ids=lambda v: str(v))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_fse_round_trip(layout_: Layout, dtype: np.dtype, data: st.DataObject) -> None:
    raw = data.draw(arrays(dtype)).tobytes()
    blob = codec.encode_grouped(raw, dtype.itemsize, layout_, fse=True)
    assert codec.decode(blob) == raw


def test_fse_codes_the_exponent_stream_and_huffman_the_rest() -> None:
    raw = bf16_weights(200_000, seed=3)
    fse = codec.encode_grouped(raw, 2, Layout.BF16, fse=True)
    huffman = codec.encode_grouped(raw, 2, Layout.BF16)
    assert stream_methods(fse) == [2, 1]
    assert stream_methods(huffman) == [1, 1]
    assert len(fse) < len(huffman)
    assert codec.decode(fse) == codec.decode(huffman) == raw
    fp32 = np.random.default_rng(3).normal(0, 0.05, 100_000).astype("<f4").tobytes()
    assert stream_methods(codec.encode_grouped(fp32, 4, Layout.FP32, fse=True))[:2] == [2, 1]
    # Plain grouping (F64, deltas) keeps Huffman: FSE decodes too slowly there.
    fp64 = np.random.default_rng(3).normal(0, 0.05, 50_000).astype("<f8").tobytes()
    assert 2 not in stream_methods(codec.encode_grouped(fp64, 8, Layout.PLAIN, fse=True))


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_fse_stream_is_corrupt_and_named(damage: str) -> None:
    raw = bf16_weights(50_000, seed=6)
    blob = bytearray(codec.encode_grouped(raw, 2, Layout.BF16, fse=True))
    (length,) = struct.unpack_from("<I", blob, HEAD + 4)
    body = HEAD + 3 + 2 * 5  # the FSE stream's bytes come first
    if damage == "truncate":
        struct.pack_into("<I", blob, HEAD + 4, length - 7)
        del blob[body + length - 7 : body + length]
    elif damage == "flip":
        blob[body + 5] ^= 0xFF  # inside the frame header
    else:
        blob[body : body + length] = b"\x00" * length
    with pytest.raises(CorruptObjectError, match=r"weights\.bin: stream 0"):
        codec.decode(bytes(blob), name="weights.bin")


def test_an_fse_stream_of_the_wrong_length_is_corrupt() -> None:
    frame = entropy.encode(np.arange(100, dtype=np.uint8))
    assert entropy.decode(frame, 100, name="c", index=0).tobytes() == bytes(range(100))
    with pytest.raises(CorruptObjectError, match="holds 100 bytes, not 101"):
        entropy.decode(frame, 101, name="c", index=0)


def test_an_fse_store_is_format_2_and_stores_less(tmp_path: Path) -> None:
    # XOR deltas, which format 1 holds: FSE alone then decides the format.
    huffman = Store.init(tmp_path / "huffman", chunker=PARAMS, delta_method="xor")
    fse = Store.init(tmp_path / "fse", chunker=PARAMS, entropy="fse", delta_method="xor")
    assert huffman.config.format == 1
    assert "entropy" not in json.loads(huffman.config.to_bytes())
    config = json.loads((tmp_path / "fse" / "config").read_bytes())
    assert config["format"] == 2
    assert config["codec"]["entropy"] == "fse"
    assert Store.open(tmp_path / "fse").config.holds_fse
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fse_paths = fine_tune(fse, tmp_path / "a", versions=3)
    fine_tune(huffman, tmp_path / "b", versions=3)
    assert stored_bytes(fse) < stored_bytes(huffman)
    blobs = [fse.backend.get(layout.chunk_key(c.digest)) for c in entry_chunks(fse, "ft@1")]
    assert any(stream_methods(b)[:1] == [2] for b in blobs if b[3] == codec.Codec.GROUPED)
    assert fse.verify(deep=True).ok
    fse.get("ft@3", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == fse_paths[2].read_bytes()
    # A format-1 store never holds an FSE stream.
    for digest, _ in huffman.chunks.list_chunks():
        blob = huffman.backend.get(layout.chunk_key(digest))
        if blob[3] in (codec.Codec.GROUPED, codec.Codec.DELTA):
            assert 2 not in stream_methods(blob)


def test_bad_entropy_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="entropy coder 'ans'"):
        Store.init(tmp_path / "store", entropy="ans")
    assert not (tmp_path / "store").exists()
    with pytest.raises(InvalidInputError, match="needs store format 2"):
        StoreConfig(entropy="fse", format=1)
    store = Store.init(tmp_path / "fse", entropy="fse", delta_method="xor")
    config = json.loads((tmp_path / "fse" / "config").read_bytes())
    store.close()
    (tmp_path / "fse" / "config").write_text(json.dumps({**config, "format": 1}))
    with pytest.raises(NotAStoreError, match="needs store format 2"):
        Store.open(tmp_path / "fse")
    (tmp_path / "fse" / "config").write_text(json.dumps({**config, "format": 5}))
    with pytest.raises(UnsupportedFormatError, match="reads formats 1, 2, 3 and 4 only"):
        Store.open(tmp_path / "fse")


def test_cli_init_chooses_the_entropy_coder(tmp_path: Path) -> None:
    done = ok(run_cas("init", "--entropy", "fse", "--json", store=tmp_path / "s"))
    shown = json.loads(done.stdout)
    assert shown["config"]["format"] == 4  # FSE and scaled deltas, the default
    assert shown["config"]["codec"]["entropy"] == "fse"
    done = ok(run_cas("init", "--entropy", "fse", "--delta-method", "xor", store=tmp_path / "x"))
    assert "FSE exponents, format 2" in done.stdout
    bad = run_cas("init", "--entropy", "ans", store=tmp_path / "other")
    assert bad.returncode == 2
    assert "--entropy" in bad.stderr
    assert "'ans'" in bad.stderr
    assert not (tmp_path / "other").exists()


def test_floatcodec_without_fse_writes_format_1_streams() -> None:
    raw = bf16_weights(100_000, seed=9)
    payload = floatcodec.encode(raw, 2, Layout.BF16)
    assert {payload[3 + 5 * i] for i in range(payload[2])} <= {0, 1}
