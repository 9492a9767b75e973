"""Tensor-aware storage: safetensors detection, tensor-aligned chunks, read_tensor, deltas."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import ok, run_cas

from cas.chunks import _codec as codec
from cas.chunks._chunking import ChunkerParams
from cas.digest import Digest
from cas.errors import (
    CorruptObjectError,
    InvalidInputError,
    MissingObjectError,
    NotFoundError,
    SourceError,
)
from cas.ml.checkpoint import write_safetensors
from cas.repository import _layout as layout
from cas.store import Store
from cas.tensors._cutting import read_spans
from cas.tensors._formats import sniff
from cas.tensors._safetensors import Span, chunk_keys, parse_header, plan

KiB = 1024
PARAMS = ChunkerParams(min_size=16 * KiB, avg_size=64 * KiB, max_size=256 * KiB)
# Shapes of a toy model: a tensor split in several chunks, one just over the
# minimum, small ones grouped, an odd element count, an integer tensor.
SHAPES: dict[str, tuple[int, ...]] = {
    "embed.weight": (600, 128),
    "layer.0.weight": (128, 130),
    "layer.0.bias": (130,),
    "norm.weight": (128,),
    "norm.bias": (128,),
    "head.weight": (97, 101),
}


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0, 0.05, shape).astype(np.float32) for name, shape in SHAPES.items()}


def bf16(array: np.ndarray) -> bytes:
    return (array.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


def save(
    path: Path,
    arrays: dict[str, np.ndarray],
    dtype: str = "BF16",
    metadata: dict[str, str] | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    items: list[tuple[str, str, tuple[int, ...], bytes]] = []
    for name, array in sorted(arrays.items()):
        if dtype == "BF16":
            data = bf16(array)
        else:
            data = array.astype({"F32": "<f4", "F16": "<f2"}[dtype]).tobytes()
        items.append((name, dtype, array.shape, data))
    for name, array in (extra or {}).items():
        items.append((name, "I64", array.shape, array.astype("<i8").tobytes()))
    with open(path, "wb") as stream:
        write_safetensors(stream, items, metadata)
    return path


def step(arrays: dict[str, np.ndarray], seed: int, scale: float = 1e-4) -> dict[str, np.ndarray]:
    """One fine-tuning step: every weight moves a little."""
    rng = np.random.default_rng(seed)
    return {
        k: (a + scale * rng.standard_normal(a.shape)).astype(np.float32) for k, a in arrays.items()
    }


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.init(tmp_path / "store", chunker=PARAMS)


def entry_chunks(store: Store, ref: str) -> list[Any]:
    version = store.resolve(ref)
    manifest = store.load_manifest(version.manifest_id)
    (entry,) = [e for e in manifest.entries if e.type == "file"]
    return list(entry.chunks)


def stored_bytes(store: Store) -> int:
    return sum(info.size for _, info in store.chunks.list_chunks())


def read_header(path: Path) -> Any:
    with open(path, "rb") as stream:
        return sniff(stream, path.stat().st_size)


# -- detection and boundaries -----------------------------------------------------------


def test_plan_covers_the_file_with_one_dtype_per_chunk(tmp_path: Path) -> None:
    path = save(tmp_path / "m.safetensors", weights(), extra={"ids": np.arange(40)})
    header = read_header(path)
    assert header is not None
    spans = plan(header, path.stat().st_size, PARAMS)
    assert spans[0] == Span(0, header.length)  # the header alone
    offset = 0
    for span in spans:
        assert span.offset == offset
        offset += span.length
        assert span.length <= PARAMS.max_size
        dtypes = {p.dtype for p in span.pieces}
        assert len(dtypes) <= 1
        if span.pieces:
            assert span.length % span.itemsize == 0
            assert all((p.end - p.start) % span.itemsize == 0 for p in span.pieces)
    assert offset == path.stat().st_size
    embed = [s for s in spans if s.pieces and s.pieces[0].name == "embed.weight"]
    assert len(embed) == round(600 * 128 * 2 / PARAMS.avg_size)
    assert all(PARAMS.min_size <= s.length <= PARAMS.max_size for s in embed)
    small = [s for s in spans if len(s.pieces) > 1]
    assert {p.name for s in small for p in s.pieces} >= {"norm.weight", "norm.bias"}
    assert all(s.length <= PARAMS.avg_size for s in small)


def test_files_are_recognised_by_header_not_name(tmp_path: Path) -> None:
    real = save(tmp_path / "weights.bin", weights())
    assert read_header(real) is not None
    fakes = {
        "short.safetensors": b"\x05\x00",
        "json.safetensors": (16).to_bytes(8, "little") + b'{"a": [1, 2, 3]}',
        "text.safetensors": b"hello world, this is not a tensor file at all",
        "huge.safetensors": (10**9).to_bytes(8, "little") + b"{}",
        "random.safetensors": np.random.default_rng(1).bytes(5000),
    }
    for name, data in fakes.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert read_header(path) is None, name


def test_header_parse_refuses_ranges_that_do_not_match_shapes() -> None:
    header = json.dumps({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    blob = len(header).to_bytes(8, "little") + header + bytes(12)
    with pytest.raises(InvalidInputError, match="does not match its shape"):
        parse_header(lambda o, n: blob[o : o + n], len(blob))


def test_put_cuts_a_safetensors_file_at_tensor_boundaries(store: Store, tmp_path: Path) -> None:
    path = save(tmp_path / "model.bin", weights())
    store.put(path, "m")
    header = read_header(path)
    expected = [s.length for s in plan(header, path.stat().st_size, PARAMS)]
    assert [c.length for c in entry_chunks(store, "m")] == expected


def test_a_growing_header_stores_almost_nothing_new(store: Store, tmp_path: Path) -> None:
    arrays = weights()
    first = save(tmp_path / "v1.safetensors", arrays)
    store.put(first, "m")
    before = stored_bytes(store)
    second = save(tmp_path / "v2.safetensors", arrays, metadata={"note": "x" * 3000})
    assert second.stat().st_size > first.stat().st_size  # every tensor moved
    store.put(second, "m", parents=["m@1"])
    added = stored_bytes(store) - before
    assert added < 0.01 * second.stat().st_size
    old, new = entry_chunks(store, "m@1"), entry_chunks(store, "m@2")
    assert [c.digest for c in old[1:]] == [c.digest for c in new[1:]]


def test_a_changed_tensor_touches_only_its_own_chunks(store: Store, tmp_path: Path) -> None:
    arrays = weights()
    store.put(save(tmp_path / "a.safetensors", arrays), "m")
    changed = dict(arrays, **{"norm.weight": arrays["norm.weight"] + 1.0})
    path = save(tmp_path / "b.safetensors", changed)
    store.put(path, "m")
    header = read_header(path)
    keys = list(chunk_keys(header, [c.length for c in entry_chunks(store, "m@2")]))
    old = {c.digest for c in entry_chunks(store, "m@1")}
    new = [(k, c) for k, c in zip(keys, entry_chunks(store, "m@2"), strict=True)]
    fresh = [k for k, c in new if c.digest not in old]
    # The header (same length, same offsets: identical) is reused; only the group
    # holding norm.weight is new.
    assert len(fresh) == 1
    assert fresh[0] is not None
    assert "norm.weight" in {p.name for p in fresh[0]}


# -- read_tensor ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_read_tensor_returns_exact_values(store: Store, tmp_path: Path, dtype: str) -> None:
    arrays = weights(3)
    ids = np.arange(-20, 37)
    store.put(save(tmp_path / "m.safetensors", arrays, dtype, extra={"ids": ids}), "m")
    for name, array in arrays.items():
        got = store.read_tensor("m", "m.safetensors", name)
        if dtype == "F32":
            expected = array
        elif dtype == "F16":
            expected = array.astype(np.float16)
        else:
            expected = np.frombuffer(bf16(array), "<u2").astype(np.uint32) << 16
            expected = expected.view(np.float32).reshape(array.shape)
        assert got.shape == array.shape
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(store.read_tensor("m", None, "ids"), ids)


def test_read_tensor_fetches_only_the_chunks_that_hold_it(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = weights(4)
    path = save(tmp_path / "m.safetensors", arrays)
    store.put(path, "m")
    chunks = entry_chunks(store, "m")
    header = read_header(path)
    info = header.tensor("head.weight")
    starts = np.cumsum([0] + [c.length for c in chunks])
    needed = {0} | {
        i for i in range(len(chunks)) if starts[i] < info.end and starts[i + 1] > info.start
    }
    fetched: list[str] = []
    backend = store.chunks.backend
    original = backend.get

    def counting_get(key: str) -> bytes:
        fetched.append(key)
        return original(key)

    monkeypatch.setattr(backend, "get", counting_get)
    got = store.read_tensor("m", None, "head.weight")
    assert got.shape == SHAPES["head.weight"]
    fetched_chunks = {k.rpartition("/")[2] for k in fetched if k.startswith("chunks/")}
    assert fetched_chunks == {chunks[i].digest.hex for i in needed}
    assert len(fetched_chunks) < len(chunks) / 2


def test_read_tensor_errors(store: Store, tmp_path: Path) -> None:
    store.put(save(tmp_path / "m.safetensors", weights()), "m")
    with pytest.raises(NotFoundError, match="no tensor"):
        store.read_tensor("m", None, "missing.weight")
    plain = tmp_path / "notes.txt"
    plain.write_text("not tensors " * 100)
    store.put(plain, "notes")
    with pytest.raises(InvalidInputError, match="not a tensor file"):
        store.read_tensor("notes", None, "x")


# -- deltas against the parent version ------------------------------------------------------


def fine_tune(store: Store, tmp_path: Path, versions: int, dtype: str = "BF16") -> list[Path]:
    arrays = weights(5)
    paths = []
    for number in range(1, versions + 1):
        path = save(tmp_path / f"v{number}.safetensors", arrays, dtype)
        store.put(path, "ft", parents=[f"ft@{number - 1}"] if number > 1 else [])
        paths.append(path)
        arrays = step(arrays, seed=number)
    return paths


def test_fine_tuning_versions_are_stored_as_small_deltas(store: Store, tmp_path: Path) -> None:
    sizes = []
    arrays = weights(5)
    for number in range(1, 5):
        path = save(tmp_path / f"v{number}.safetensors", arrays)
        before = stored_bytes(store)
        store.put(path, "ft", parents=[f"ft@{number - 1}"] if number > 1 else [])
        sizes.append((stored_bytes(store) - before) / path.stat().st_size)
        arrays = step(arrays, seed=number)
    assert sizes[0] < 0.75
    assert all(size < 0.3 for size in sizes[1:]), sizes
    chunks = entry_chunks(store, "ft@4")
    assert sum(1 for c in chunks if c.bases) >= len(chunks) - 2  # all but header / tiny ones
    for number in range(1, 5):
        store.get(f"ft@{number}", tmp_path / f"out{number}")
        assert (tmp_path / f"out{number}").read_bytes() == (
            tmp_path / f"v{number}.safetensors"
        ).read_bytes()


@pytest.mark.parametrize("max_reads", [2, 3, 8])
def test_delta_chains_never_need_more_than_max_reads(tmp_path: Path, max_reads: int) -> None:
    store = Store.init(tmp_path / "store", chunker=PARAMS, max_delta_reads=max_reads)
    paths = fine_tune(store, tmp_path, versions=12)
    depths = set()
    for number in range(1, 13):
        for chunk in entry_chunks(store, f"ft@{number}"):
            depths.add(len(chunk.bases))
            # The manifest's chain is the chunk headers' chain.
            chain = []
            current = chunk.digest
            while True:
                blob = store.backend.get(layout.chunk_key(current))
                base = codec.delta_base(blob)
                if base is None:
                    break
                chain.append(base)
                current = Digest(base)
            assert tuple(b.raw for b in chunk.bases) == tuple(chain)
    assert max(depths) + 1 <= max_reads
    assert max(depths) >= 1
    store.get("ft@12", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == paths[-1].read_bytes()


def test_no_deltas_with_one_read(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store", chunker=PARAMS, max_delta_reads=1)
    fine_tune(store, tmp_path, versions=3)
    assert not any(c.bases for c in entry_chunks(store, "ft@3"))
    reopened = Store.open(tmp_path / "store")
    assert reopened.config.max_delta_reads == 1


def test_manifest_schema_marks_delta_entries(store: Store, tmp_path: Path) -> None:
    fine_tune(store, tmp_path, versions=2)
    schemas = []
    for number in (1, 2):
        version = store.resolve(f"ft@{number}")
        schemas.append(store.load_manifest(version.manifest_id).to_dict()["schema"])
    assert schemas == [1, 2]


def test_deleting_parents_never_breaks_a_child(store: Store, tmp_path: Path) -> None:
    paths = fine_tune(store, tmp_path, versions=4)
    for number in (1, 2, 3):
        store.delete(f"ft@{number}")
    report = store.gc(grace=0)
    # The 3 deleted versions' manifests, and ft@4's from before its repack.
    assert report.repack is not None
    assert report.repack.versions == 1
    assert report.deleted_manifests == 4
    assert report.deleted_chunks > 0  # chunks no chain needs did go
    assert store.verify(deep=True).ok
    store.get("ft@4", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == paths[-1].read_bytes()
    np.testing.assert_array_equal(
        store.read_tensor("ft@4", None, "norm.bias").shape, np.array(SHAPES["norm.bias"])
    )


def test_a_reused_delta_chunk_keeps_its_chain_under_another_key(
    store: Store, tmp_path: Path
) -> None:
    paths = fine_tune(store, tmp_path, versions=3)
    # The same file under a new key, no parent: its chunks exist, as deltas.
    store.put(paths[-1], "copy")
    assert any(c.bases for c in entry_chunks(store, "copy"))
    store.delete_all("ft")
    store.gc(grace=0)
    store.get("copy", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == paths[-1].read_bytes()
    assert store.verify(deep=True).ok


def test_deep_verify_decodes_chains_and_names_the_damage(store: Store, tmp_path: Path) -> None:
    fine_tune(store, tmp_path, versions=3)
    child = next(c for c in entry_chunks(store, "ft@3") if c.bases)
    root = child.bases[-1]
    key = f"chunks/{root.hex[:2]}/{root.hex}"
    path = tmp_path / "store" / key
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(blob))
    assert store.verify().ok  # every chunk exists
    report = store.verify(deep=True)
    assert not report.ok
    assert root.hex in report.corrupt_chunks
    assert "ft@3" in {d.ref for d in report.damaged}
    with pytest.raises(CorruptObjectError, match="delta base"):
        store.chunks.get(child)


def test_a_base_that_decodes_to_other_bytes_is_named(store: Store, tmp_path: Path) -> None:
    """A chain is checked by the hash of the chunk it rebuilds; when that fails, the links
    are checked one by one, so the error names the base that is not what its name says."""
    fine_tune(store, tmp_path, versions=6)
    child = next(c for c in entry_chunks(store, "ft@6") if len(c.bases) > 1)
    root = child.bases[-1]
    path = tmp_path / "store" / f"chunks/{root.hex[:2]}/{root.hex}"
    (ref,) = {n for n in range(1, 7) if root in {c.digest for c in entry_chunks(store, f"ft@{n}")}}
    other = bytearray(store.chunks.get(chunk_ref_of(store, f"ft@{ref}", root)))
    other[0] ^= 1
    path.chmod(0o644)
    path.write_bytes(codec.encode(bytes(other)))  # well-formed, of the right length
    with pytest.raises(CorruptObjectError, match=f"delta base {root.hex}\\) is corrupt"):
        store.chunks.get(child)
    with pytest.raises(CorruptObjectError, match=f"delta base {root.hex}"):
        store.get("ft@6", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def chunk_ref_of(store: Store, ref: str, digest: Digest) -> Any:
    return next(c for c in entry_chunks(store, ref) if c.digest == digest)


def test_a_missing_base_is_reported_missing(store: Store, tmp_path: Path) -> None:
    fine_tune(store, tmp_path, versions=2)
    child = next(c for c in entry_chunks(store, "ft@2") if c.bases)
    (tmp_path / "store" / f"chunks/{child.bases[0].hex[:2]}/{child.bases[0].hex}").unlink()
    report = store.verify()
    assert child.bases[0].hex in report.missing_chunks
    with pytest.raises(MissingObjectError, match="delta base"):
        store.chunks.get(child)


def test_a_file_that_grows_while_read_is_refused() -> None:
    stream = io.BytesIO(b"x" * 10)
    spans = [Span(0, 4), Span(4, 4)]
    with pytest.raises(SourceError, match="grew while it was read"):
        list(read_spans(stream, spans, lambda _view: None, "w.safetensors"))


def test_cli_init_sets_the_delta_chain_limit(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    ok(run_cas("init", "--max-delta-reads", "2", "--json", store=store_dir))
    config = json.loads((store_dir / "config").read_bytes())
    assert config["delta"] == {"max_reads": 2, "method": "scaled"}
    assert Store.open(store_dir).config.max_delta_reads == 2
    bad = run_cas("init", "--max-delta-reads", "0", store=tmp_path / "other")
    assert bad.returncode == 2
    assert "delta chains" in bad.stderr
    # A store of XOR deltas has the config of format 1, as it always was: no delta field.
    ok(run_cas("init", "--delta-method", "xor", store=tmp_path / "plain"))
    plain = json.loads((tmp_path / "plain" / "config").read_bytes())
    assert "delta" not in plain
    assert plain["format"] == 1
    # A store of plain differences is format 3.
    ok(run_cas("init", "--delta-method", "difference", store=tmp_path / "difference"))
    difference = json.loads((tmp_path / "difference" / "config").read_bytes())
    assert difference["delta"] == {"method": "difference"}
    assert difference["format"] == 3
    # A default store codes deltas as scaled differences, which only format 4 allows.
    ok(run_cas("init", store=tmp_path / "default"))
    default = json.loads((tmp_path / "default" / "config").read_bytes())
    assert default["delta"] == {"method": "scaled"}
    assert default["format"] == 4
