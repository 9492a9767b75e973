"""torch.save and numpy files: recognised by their bytes, cut on tensor boundaries, never run."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cas.chunks._chunking import ChunkerParams
from cas.cli import main
from cas.errors import InvalidInputError
from cas.ml.diff import diff
from cas.store import Store
from cas.tensors._formats import sniff
from cas.tensors._safetensors import Header, plan

KiB = 1024
PARAMS = ChunkerParams(min_size=16 * KiB, avg_size=64 * KiB, max_size=256 * KiB)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.init(tmp_path / "store", chunker=PARAMS)


def model(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Embedding(300, 96),
        torch.nn.Linear(96, 160),
        torch.nn.LayerNorm(160),
        torch.nn.Linear(160, 97),
    )


def train(net: torch.nn.Module, steps: int, seed: int = 1) -> torch.optim.Optimizer:
    """Real AdamW steps on a toy objective: every weight and moment moves a little."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    for _ in range(steps):
        tokens = torch.randint(0, 300, (8,))
        loss = net(tokens).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return optimizer


def saved(obj: Any, path: Path) -> Path:
    torch.save(obj, path)
    return path


def header_of(path: Path) -> Header | None:
    with open(path, "rb") as stream:
        return sniff(stream, path.stat().st_size)


def file_chunks(store: Store, ref: str) -> list[Any]:
    version = store.resolve(ref)
    assert version.manifest_id is not None
    (entry,) = [e for e in store.load_manifest(version.manifest_id).entries if e.type == "file"]
    return list(entry.chunks)


def stored_bytes(store: Store) -> int:
    return sum(info.size for _, info in store.chunks.list_chunks())


def round_trip(store: Store, path: Path, key: str, tmp_path: Path) -> Path:
    store.put(path, key)
    out = tmp_path / f"{key}.out"
    store.get(key, out)
    assert out.read_bytes() == path.read_bytes()
    return out


# -- recognising torch.save files -------------------------------------------------------


def test_a_state_dict_is_named_by_its_paths_with_each_dtype(tmp_path: Path) -> None:
    net = model().to(torch.bfloat16)
    state = {**net.state_dict(), "mask": torch.arange(10), "half": torch.ones(4).half()}
    header = header_of(saved(state, tmp_path / "weights.anything"))
    assert header is not None
    assert header.format == "torch"
    dtypes = {t.name: t.dtype for t in header.tensors}
    assert dtypes["0.weight"] == "BF16"
    assert dtypes["3.bias"] == "BF16"
    assert dtypes["mask"] == "I64"
    assert dtypes["half"] == "F16"
    spans = plan(header, (tmp_path / "weights.anything").stat().st_size, PARAMS)
    for span in spans:
        assert len({p.dtype for p in span.pieces}) <= 1
        if span.layout is not None:
            assert span.length % span.itemsize == 0
    assert sum(s.length for s in spans) == (tmp_path / "weights.anything").stat().st_size


def test_small_records_share_chunks_with_the_zip_headers_between_them(tmp_path: Path) -> None:
    state = {f"bias.{i}": torch.randn(100) for i in range(40)}
    state["big"] = torch.randn(20000)
    path = saved(state, tmp_path / "small.pt")
    header = header_of(path)
    assert header is not None
    spans = plan(header, path.stat().st_size, PARAMS)
    assert len(spans) < 10  # not one chunk per record and one per zip header
    [big] = [s for s in spans if s.pieces and s.pieces[0].name == "big"]
    assert big.layout is not None
    assert sum(s.length for s in spans) == path.stat().st_size


def test_optimizer_and_lightning_state_get_stable_names(tmp_path: Path) -> None:
    net = model()
    optimizer = train(net, 2)
    lightning = {
        "epoch": 3,
        "state_dict": net.state_dict(),
        "optimizer_states": [optimizer.state_dict()],
    }
    header = header_of(saved(lightning, tmp_path / "last.ckpt"))
    assert header is not None
    names = {t.name for t in header.tensors}
    assert {"state_dict.0.weight", "state_dict.3.bias"} <= names
    assert {"optimizer_states.0.state.0.exp_avg", "optimizer_states.0.state.3.exp_avg_sq"} <= names
    plain = header_of(saved(optimizer.state_dict(), tmp_path / "optimizer.pt"))
    assert plain is not None
    assert {"state.1.exp_avg", "state.1.exp_avg_sq", "state.1.step"} <= {
        t.name for t in plain.tensors
    }


def test_names_follow_the_state_dict_not_the_record_numbers(tmp_path: Path) -> None:
    a, b = torch.ones(5), torch.zeros(7)
    first = header_of(saved({"a": a, "b": b}, tmp_path / "1.pt"))
    second = header_of(saved({"b": b, "a": a}, tmp_path / "2.pt"))
    assert first is not None
    assert second is not None
    assert {t.name: t.end - t.start for t in first.tensors} == {
        t.name: t.end - t.start for t in second.tensors
    }


def test_put_get_is_byte_identical_and_loads_with_weights_only(
    store: Store, tmp_path: Path
) -> None:
    net = model()
    optimizer = train(net, 1)
    path = saved({"model": net.state_dict(), "opt": optimizer.state_dict()}, tmp_path / "c.pt")
    out = round_trip(store, path, "ckpt", tmp_path)
    loaded = torch.load(out, weights_only=True)
    for name, value in net.state_dict().items():
        assert torch.equal(loaded["model"][name], value)
    assert any(c.length < 4 * KiB for c in file_chunks(store, "ckpt"))  # cut, not FastCDC


def test_fine_tuned_torch_files_are_stored_as_deltas(store: Store, tmp_path: Path) -> None:
    net = model().to(torch.bfloat16)
    sizes = []
    for number in range(1, 4):
        path = saved(net.state_dict(), tmp_path / f"v{number}.pth")
        before = stored_bytes(store)
        store.put(path, "ft", parents=[f"ft@{number - 1}"] if number > 1 else [])
        sizes.append((stored_bytes(store) - before) / path.stat().st_size)
        with torch.no_grad():
            for parameter in net.parameters():
                parameter.add_(torch.randn_like(parameter) * 1e-3 * parameter.abs())
    assert sizes[0] < 0.8
    assert all(size < 0.4 for size in sizes[1:]), sizes
    big = [c for c in file_chunks(store, "ft@3") if c.length >= PARAMS.min_size]
    assert big
    assert all(c.bases for c in big)
    for number in range(1, 4):
        store.get(f"ft@{number}", tmp_path / f"out{number}")
        assert (tmp_path / f"out{number}").read_bytes() == (
            tmp_path / f"v{number}.pth"
        ).read_bytes()


# -- numpy -------------------------------------------------------------------------------


def test_npy_and_uncompressed_npz_are_cut_compressed_npz_is_plain(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 64)).astype(np.float32), np.arange(50)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "packed.npz", x=x, y=y)
    npy = header_of(tmp_path / "x.npy")
    assert npy is not None
    assert [(t.name, t.dtype) for t in npy.tensors] == [("array", "F32")]
    npz = header_of(tmp_path / "data.npz")
    assert npz is not None
    assert {(t.name, t.dtype) for t in npz.tensors} == {
        ("x", "F32"),
        ("y", "I64"),
    }
    assert header_of(tmp_path / "packed.npz") is None


@pytest.mark.parametrize("descr", ["|O", "<c8", ">f4", "[('a', '<f4')]"])
def test_npy_dtypes_the_reader_does_not_know_stay_plain(tmp_path: Path, descr: str) -> None:
    path = tmp_path / "odd.npy"
    np.save(path, np.ones(8, dtype=np.float32))
    text = descr if descr.startswith("[") else repr(descr)
    path.write_bytes(path.read_bytes().replace(b"'<f4'", text.encode()))
    assert header_of(path) is None


# -- reading tensors back, and diffs -------------------------------------------------------


def test_read_tensor_of_torch_views_and_numpy_records(store: Store, tmp_path: Path) -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {"w": base, "t": base.t(), "row": base[2], "b": torch.ones(3, dtype=torch.bfloat16)}
    store.put(saved(state, tmp_path / "v.pt"), "views")
    for name, tensor in state.items():
        got = store.read_tensor("views", None, name)
        assert np.array_equal(got, tensor.float().numpy()), name
    fortran = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    np.savez(tmp_path / "d.npz", f=fortran, i=np.arange(5, dtype=np.int32))
    store.put(tmp_path / "d.npz", "npz")
    assert np.array_equal(store.read_tensor("npz", None, "f"), fortran)
    assert np.array_equal(store.read_tensor("npz", None, "i"), np.arange(5))


def test_diff_names_the_changed_tensors_of_a_torch_checkpoint(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net = model()
    optimizer = train(net, 1)
    path = tmp_path / "optimizer.pt"
    store.put(saved({"model": net.state_dict(), "opt": optimizer.state_dict()}, path), "c")
    with torch.no_grad():
        head = net[3]
        assert isinstance(head, torch.nn.Linear)
        head.bias.add_(1.0)
    store.put(saved({"model": net.state_dict(), "opt": optimizer.state_dict()}, path), "c")
    [change] = diff(store, "c@1", "c@2").changes
    assert change.tensors is not None
    assert change.tensors.error is None
    assert change.tensors.changed == ("model.3.bias",)
    assert "opt.state.0.exp_avg" not in change.tensors.changed
    assert main(["--store", str(tmp_path / "store"), "diff", "c@1", "c@2"]) == 0
    assert "~ model.3.bias" in capsys.readouterr().out


# -- hostile files: stored as the bytes they are, never run --------------------------------


class _CreatesAFile:
    """Unpickling this opens (and so creates) a file: what a hostile checkpoint would do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.target), "w"))


def test_a_pickle_that_would_create_a_file_creates_none(store: Store, tmp_path: Path) -> None:
    target = tmp_path / "created-by-the-pickle"
    path = tmp_path / "x.pt"
    saved({"weight": torch.ones(4096), "payload": _CreatesAFile(target)}, path)
    original = path.read_bytes()
    assert header_of(path) is None  # plain bytes: builtins.open is not one of torch's globals
    store.put(path, "hostile")
    store.put(saved({"weight": torch.zeros(4096)}, path), "hostile")
    store.get("hostile@1", tmp_path / "out.pt")
    report = diff(store, "hostile@1", "hostile@2")
    assert report.changes[0].tensors is None  # compared as a whole file: not a tensor file
    assert store.verify(deep=True).damaged == ()
    with pytest.raises(InvalidInputError, match="not a tensor file"):
        store.read_tensor("hostile@1", None, "weight")
    assert store.read_tensor("hostile@2", None, "weight").sum() == 0
    assert not target.exists()
    assert (tmp_path / "out.pt").read_bytes() == original
    # The test can fail: loading the restored file the unsafe way does create the file.
    torch.load(tmp_path / "out.pt", weights_only=False)
    assert target.exists()


def _directory_entry(data: bytes, name: bytes) -> int:
    """Offset of the central directory entry of the record ``name``."""
    position = data.index(b"PK\x01\x02")
    while True:
        name_length, extra, comment = struct.unpack_from("<HHH", data, position + 28)
        if data[position + 46 : position + 46 + name_length] == name:
            return position
        position += 46 + name_length + extra + comment


def _patched(data: bytes, name: bytes, field: int, value: int) -> bytes:
    at = _directory_entry(data, name) + field
    return data[:at] + struct.pack("<I", value) + data[at + 4 :]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (42, 1 << 31),  # the local header lies outside the file
        (42, 0),  # two records at one local header: names disagree
        (20, 1 << 20),  # sizes that reach past the next record
        (24, 1 << 20),
        (20, 8),  # sizes that do not fit the storage the pickle names
    ],
)
def test_a_lying_central_directory_makes_the_file_plain(
    store: Store, tmp_path: Path, field: int, value: int
) -> None:
    path = saved({"a": torch.ones(3000), "b": torch.zeros(3000)}, tmp_path / "z.pt")
    data = _patched(path.read_bytes(), b"z/data/1", field, value)
    if field == 20:
        data = _patched(data, b"z/data/1", 24, value)
    path.write_bytes(data)
    assert header_of(path) is None
    round_trip(store, path, "lying", tmp_path)


def test_compressed_legacy_and_unknown_torch_files_stay_plain(store: Store, tmp_path: Path) -> None:
    state = {"w": torch.randn(2000)}
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    deflated = tmp_path / "deflated.pt"
    source = saved(state, tmp_path / "d.pt")
    with (
        zipfile.ZipFile(source) as src,
        zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    complex_ = saved({"c": torch.randn(100, dtype=torch.complex64)}, tmp_path / "c.pt")
    for path in (legacy, deflated, complex_):
        assert header_of(path) is None, path.name
        round_trip(store, path, path.stem, tmp_path)
    assert torch.load(tmp_path / "deflated.out", weights_only=True)["w"].shape == (2000,)


def _torch_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(64), "o": {"state": {0: {"m": torch.zeros(8)}}}}, buffer)
    return buffer.getvalue()


def _npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, a=np.ones(5), b=np.zeros((2, 3), dtype=np.float16))
    return buffer.getvalue()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), make=st.sampled_from([_torch_bytes, _npz_bytes]))
def test_damaged_tensor_files_are_cut_safely_or_not_at_all(data: st.DataObject, make: Any) -> None:
    raw = bytearray(make())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    header = sniff(io.BytesIO(bytes(raw)), len(raw))
    if header is not None:
        position = 0
        for info in header.tensors:
            assert position <= info.start <= info.end <= len(raw)
            position = info.end


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 40), max_size=3)),
        min_size=1,
        max_size=6,
    ),
    seed=st.integers(0, 2**16),
)
def test_any_state_dict_round_trips(
    tmp_path_factory: pytest.TempPathFactory, shapes: list[tuple[torch.dtype, list[int]]], seed: int
) -> None:
    tmp_path = tmp_path_factory.mktemp("rt")
    generator = torch.Generator().manual_seed(seed)
    state = {
        f"layer.{i}": (torch.rand(shape, generator=generator) * 100).to(dtype)
        for i, (dtype, shape) in enumerate(shapes)
    }
    path = saved(state, tmp_path / "s.pt")
    header = header_of(path)
    assert header is not None
    assert {t.name for t in header.named} == set(state)
    store = Store.init(tmp_path / "store", chunker=PARAMS)
    out = round_trip(store, path, "s", tmp_path)
    loaded = torch.load(out, weights_only=True)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor)
        got = store.read_tensor("s", None, name)
        assert np.array_equal(
            got, tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        )


def test_a_local_copy_is_cut_as_the_put_cut_it(store: Store, tmp_path: Path) -> None:
    """Downloads and checkouts find stored chunks in a local torch.save file by the same cuts."""
    from cas.tensors._cutting import cut_local_file

    path = saved(model().state_dict(), tmp_path / "model.bin")
    store.put(path, "local")
    chunks = file_chunks(store, "local")
    header = header_of(path)
    assert header is not None
    assert len(chunks) == len(plan(header, path.stat().st_size, PARAMS))  # cut on tensors
    local = cut_local_file(path, PARAMS, None)
    assert local is not None
    assert local.count == len(chunks)
    assert {c.digest.raw for c in chunks} == set(local.where)
