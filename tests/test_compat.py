"""The familiar storage API and the checkpoint helpers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from helpers import KiB, random_bytes
from servers import Server

import cas
from cas.errors import ConfigurationError, InvalidInputError
from cas.ml.checkpoint import (
    CheckpointManager,
    load_arrays,
    read_safetensors,
    save_arrays,
    write_safetensors,
)
from cas.ml.diff import diff
from cas.ml.plain_storage import (
    Storage,
    Transfer,
    get_default_storage,
    get_storage_backend,
    get_storage_from_uri,
    set_default_storage,
)
from cas.repository._manifest import Entry
from cas.tensors._cutting import cut_local_file

if TYPE_CHECKING:
    from cas.backends.s3 import S3Backend

ENV = ("STORAGE_BACKEND", "STORAGE_BUCKET", "STORAGE_PREFIX", "STORAGE_BASE_PATH")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*ENV, "STORAGE_REGION", "STORAGE_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    set_default_storage(None)


def test_plain_api_round_trip(tmp_path: Path) -> None:
    storage = get_storage_from_uri(tmp_path / "store")
    src = tmp_path / "model.pt"
    src.write_bytes(b"weights v1")
    storage.upload(src, "models/bert/model.pt")
    storage.upload(src, "models/gpt/model.pt")
    assert storage.exists("models/bert/model.pt")
    assert not storage.exists("models/none.pt")
    assert storage.list() == ["models/bert/model.pt", "models/gpt/model.pt"]
    assert storage.list("models/g") == ["models/gpt/model.pt"]
    out = tmp_path / "deep" / "er" / "model.pt"  # parents are created
    storage.download("models/bert/model.pt", out)
    assert out.read_bytes() == b"weights v1"
    src.write_bytes(b"weights v2")
    storage.upload(src, "models/bert/model.pt")
    storage.download("models/bert/model.pt", out)  # replaces, like a plain store
    assert out.read_bytes() == b"weights v2"
    # Every upload is a version underneath.
    assert [v.number for v in storage.store.log("models/bert/model.pt")] == [2, 1]
    storage.delete("models/bert/model.pt")
    assert not storage.exists("models/bert/model.pt")
    assert storage.list() == ["models/gpt/model.pt"]


def test_missing_things_raise_file_not_found(tmp_path: Path) -> None:
    storage = get_storage_from_uri(f"file://{tmp_path / 'store'}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.upload(tmp_path / "nope.bin", "k")
    for call in (
        lambda: storage.download("missing/key", tmp_path / "x"),
        lambda: storage.download_if_newer("missing/key", tmp_path / "x"),
        lambda: storage.delete("missing/key"),
    ):
        with pytest.raises(FileNotFoundError):
            call()
    with pytest.raises(InvalidInputError, match="invalid key"):
        storage.exists("bad key with spaces")


def test_download_if_newer_decides_by_content_and_moves_only_new_chunks(tmp_path: Path) -> None:
    store = cas.Store.init(
        tmp_path / "store", chunker=cas.store.ChunkerParams.from_average(16 * KiB)
    )
    storage = Storage(store)
    data = bytearray(random_bytes(400 * KiB, 5))
    src, local = tmp_path / "src.bin", tmp_path / "local" / "copy.bin"
    src.write_bytes(data)
    storage.upload(src, "ckpt.bin")

    assert storage.download_if_newer("ckpt.bin", local) is True  # nothing local: all of it
    assert storage.last_transfer is not None
    assert storage.last_transfer.fetched_bytes == len(data)
    assert local.read_bytes() == data

    assert storage.download_if_newer("ckpt.bin", local) is False  # same content
    assert storage.last_transfer.fetched_bytes == 0

    data[200 * KiB : 200 * KiB + 16] = b"x" * 16
    src.write_bytes(data)
    storage.upload(src, "ckpt.bin")
    # Touching the local file's time must not matter: content decides.
    assert storage.download_if_newer("ckpt.bin", local) is True
    moved = storage.last_transfer
    assert local.read_bytes() == data
    assert 0 < moved.fetched_bytes < 100 * KiB
    assert moved.reused_bytes + moved.fetched_bytes == len(data)


SMALL_CHUNKS = cas.store.ChunkerParams.from_average(16 * KiB)


def write_weights(path: Path, seed: int, changed: str | None = None) -> None:
    """A safetensors file of 24 fp32 tensors of 32 KiB; ``changed`` gets other values."""
    rng = np.random.default_rng(seed)
    tensors = []
    for i in range(24):
        name = f"layer.{i}.weight"
        values = rng.standard_normal(8192).astype("<f4")
        if name == changed:
            values = values + np.float32(1e-3)
        tensors.append((name, "F32", (8192,), values.tobytes()))
    with path.open("wb") as stream:
        write_safetensors(stream, tensors, {"format": "pt"})


def stored_file(storage: Storage, key: str) -> Entry:
    ref = storage.store.resolve(key)
    (entry,) = storage.store.load_manifest(ref.manifest_id).entries
    return entry


@pytest.mark.parametrize("kind", ["safetensors", "plain"])
def test_a_local_file_is_cut_as_the_store_cut_it(tmp_path: Path, kind: str) -> None:
    storage = Storage(cas.Store.init(tmp_path / "store", chunker=SMALL_CHUNKS))
    src = tmp_path / "model.bin"
    if kind == "safetensors":
        write_weights(src, seed=1)
    else:
        src.write_bytes(random_bytes(600 * KiB, 3))
    storage.upload(src, "model")
    entry = stored_file(storage, "model")
    stored = [c.digest.raw for c in entry.chunks]
    # As a new file, and as the next version of the stored one (through the Store).
    for local in (
        cut_local_file(src, SMALL_CHUNKS, None),
        storage.store.cut_local_file(src, entry),
    ):
        assert local is not None
        assert local.count == len(stored)
        assert set(local.where) == set(stored)
        assert local.digest == entry.digest
    assert storage.store.cut_local_file(tmp_path / "absent", entry) is None


def test_download_if_newer_fetches_only_the_changed_tensor(tmp_path: Path) -> None:
    storage = Storage(cas.Store.init(tmp_path / "store", chunker=SMALL_CHUNKS))
    src, local = tmp_path / "model.safetensors", tmp_path / "local" / "model.safetensors"
    write_weights(src, seed=1)
    storage.upload(src, "model")
    assert storage.download_if_newer("model", local) is True
    stored = stored_file(storage, "model")

    assert storage.download_if_newer("model", local) is False
    assert storage.last_transfer == Transfer(
        reused_bytes=stored.size, reused_chunks=len(stored.chunks)
    )

    write_weights(src, seed=1, changed="layer.7.weight")
    storage.upload(src, "model")
    assert storage.download_if_newer("model", local) is True
    assert local.read_bytes() == src.read_bytes()
    stored = stored_file(storage, "model")
    moved = storage.last_transfer
    assert moved is not None
    # One tensor of 32 KiB, cut in two chunks of the 16 KiB average; the rest is reused.
    assert (moved.fetched_chunks, moved.fetched_bytes) == (2, 32 * KiB)
    assert moved.fetched_chunks + moved.reused_chunks == len(stored.chunks)
    assert moved.fetched_bytes + moved.reused_bytes == stored.size


def test_download_if_newer_with_a_directory(tmp_path: Path) -> None:
    storage = get_storage_from_uri(tmp_path / "store")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_text("a")
    storage.upload(tree, "dataset")
    local = tmp_path / "local"
    assert storage.download_if_newer("dataset", local) is True
    assert storage.download_if_newer("dataset", local) is False
    (local / "sub" / "a.txt").write_text("changed locally")
    assert storage.download_if_newer("dataset", local) is True
    assert (local / "sub" / "a.txt").read_text() == "a"


def test_factory_by_parts_and_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = get_storage_backend("local", base_path=tmp_path / "base", prefix="team-a")
    assert local.uri == (tmp_path / "base" / "team-a").as_uri()
    monkeypatch.setenv("STORAGE_BASE_PATH", str(tmp_path / "env-base"))
    monkeypatch.setenv("STORAGE_PREFIX", "p")
    from_env = get_storage_backend()
    assert from_env.uri == (tmp_path / "env-base" / "p").as_uri()
    default = get_default_storage()
    assert default is get_default_storage()  # one per process
    assert default.uri == from_env.uri


@pytest.mark.parametrize("backend", ["s3", "gcs", "azure"])
def test_cloud_backend_without_bucket_is_a_clear_error(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigurationError, match=f"the {backend} storage backend needs a bucket"):
        get_storage_backend(backend)
    monkeypatch.setenv("STORAGE_BACKEND", backend)
    with pytest.raises(ConfigurationError, match="STORAGE_BUCKET"):
        get_default_storage()


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="unknown storage backend 'ftp'"):
        get_storage_backend("ftp")


def test_s3_by_parts_round_trip_on_a_real_server(
    s3_backend: S3Backend, moto_server: Server, tmp_path: Path
) -> None:
    bucket = s3_backend.bucket
    storage = get_storage_backend(
        "s3", bucket=bucket, prefix="compat", region="us-east-1", endpoint_url=moto_server.endpoint
    )
    assert storage.uri == f"s3://{bucket}/compat"
    try:
        (tmp_path / "f.bin").write_bytes(b"on s3")
        storage.upload(tmp_path / "f.bin", "models/f.bin")
        assert storage.list() == ["models/f.bin"]
        storage.download("models/f.bin", tmp_path / "back.bin")
        assert (tmp_path / "back.bin").read_bytes() == b"on s3"
    finally:
        # The fixture empties only its own prefix before removing the bucket.
        backend = storage.store.backend
        backend.delete([info.key for info in backend.list_objects()])


# -- checkpoints -------------------------------------------------------------------


def test_arrays_round_trip_as_safetensors(tmp_path: Path) -> None:
    store = cas.open(tmp_path / "store")
    arrays = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "ids": np.array([1, -2, 3], dtype=np.int64),
        "mask": np.array([True, False]),
        "half": np.ones((2, 2), dtype=np.float16),
        "scalar": np.float64(2.5),
    }
    version = save_arrays(store, "np/ckpt", arrays, metrics={"loss": 0.5})
    assert version.info.type == "checkpoint"
    back = load_arrays(store, version.ref)
    assert set(back) == set(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == np.asarray(array).dtype
        np.testing.assert_array_equal(back[name], array)
    store.get(version.ref, tmp_path / "restored.safetensors")
    tensors, meta = read_safetensors(tmp_path / "restored.safetensors")
    assert meta == {"format": "np"}
    assert tensors["w"][0] == "F32"
    with pytest.raises(InvalidInputError, match="no safetensors type"):
        save_arrays(store, "np/bad", {"c": np.array([1 + 2j])})


def test_checkpoint_manager_with_numpy(tmp_path: Path) -> None:
    store = cas.open(tmp_path / "store")
    manager = CheckpointManager(store, "exp1")
    assert manager.load_latest() is None
    weights = np.zeros(4096, dtype=np.float32)
    for step, loss in [(100, 0.9), (200, 0.3), (300, 0.5)]:
        weights = weights + 1
        manager.save({"w": weights}, step, {"loss": loss})
    latest = manager.load_latest()
    assert latest is not None
    assert latest.step == 300
    np.testing.assert_array_equal(latest.state["w"], np.full(4096, 3, dtype=np.float32))
    best = manager.load_best("loss")
    assert best is not None
    assert best.step == 200
    assert best.metrics["loss"] == 0.3
    worst = manager.load_best("loss", mode="max")
    assert worst is not None
    assert worst.step == 100
    assert manager.load_best("accuracy") is None
    # Each checkpoint derives from the one before; diff names the tensor.
    assert latest.version.parents == ("runs/exp1/checkpoint@2",)
    [change] = diff(store, "runs/exp1/checkpoint@2", "runs/exp1/checkpoint@3").changes
    assert change.tensors is not None
    assert change.tensors.changed == ("w",)


def test_torch_state_dict_round_trip(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from cas.ml.checkpoint import load_state_dict, save_state_dict

    store = cas.open(tmp_path / "store")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    state = {**model.state_dict(), "bf16": torch.randn(3, 3).to(torch.bfloat16)}
    version = save_state_dict(store, "pt/ckpt", state, metrics={"loss": 1.0})
    back = load_state_dict(store, version.ref)
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype
        assert torch.equal(back[name], tensor)
    with pytest.raises(InvalidInputError, match="not a tensor"):
        save_state_dict(store, "pt/bad", {"step": 3})

    manager = CheckpointManager(store, "torch-run")
    manager.save(model.state_dict(), 1, {"loss": 0.7})
    loaded = manager.load_latest()
    assert loaded is not None
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    fresh.load_state_dict(loaded.state)
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True)
    )
