"""The cas:// fsspec filesystem, read by pandas, pyarrow, datasets and torch from S3.

Every test reads a version stored on the S3 server the tests start, through
the filesystem fsspec builds for a ``cas://`` URL; the libraries are the real
ones. Random access is checked by counting the chunk requests a read makes.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from helpers import SMALL_PARAMS, KiB, cas_env

from cas.backends.s3 import S3Backend
from cas.errors import BackendError, ConfigurationError
from cas.integrations.fsspec import CasFileSystem
from cas.repository import _layout as layout
from cas.store import Store
from cas.testing.faults import FaultyBackend

pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _registered() -> Iterator[None]:
    """In this process the class is registered by hand (the installed package's
    metadata may predate the entry point); test_the_entry_point_* checks that."""
    fsspec.register_implementation("cas", CasFileSystem, clobber=True)
    CasFileSystem.clear_instance_cache()
    yield
    CasFileSystem.clear_instance_cache()


def _frame(rows: int, seed: int) -> Any:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "id": np.arange(rows) + seed * rows,
            "x": rng.standard_normal(rows),
            "label": [f"row-{i}" for i in range(rows)],
        }
    )


@pytest.fixture
def stored(s3_backend: S3Backend, tmp_path: Path) -> dict[str, Any]:
    """A version of a folder of data on S3: a CSV, parquet shards, tensor files."""
    import torch
    from safetensors.numpy import save_file

    src = tmp_path / "data"
    (src / "shards").mkdir(parents=True)
    table = _frame(3000, 0)
    table.to_csv(src / "table.csv", index=False)
    shards = [_frame(2000, i) for i in range(3)]
    for i, shard in enumerate(shards):
        shard.to_parquet(src / "shards" / f"part-{i}.parquet")
    tensors = {f"layer{i}": np.full((128, 128), i, dtype=np.float32) for i in range(8)}
    save_file(tensors, str(src / "model.safetensors"))
    state = {"w": torch.arange(5000, dtype=torch.float32), "b": torch.ones(3)}
    torch.save(state, src / "weights.pt")
    (src / "latest.csv").symlink_to("table.csv")
    store = Store.init(s3_backend.uri, chunker=SMALL_PARAMS)
    store.put(src, "runs/data", tags=["good"])
    (tmp_path / "one.bin").write_bytes(b"single file version")
    store.put(tmp_path / "one.bin", "runs/single")
    return {
        "uri": s3_backend.uri,
        "backend": s3_backend,
        "table": table,
        "shards": shards,
        "tensors": tensors,
        "state": state,
        "src": src,
    }


def test_ls_and_info_by_number_tag_and_latest(stored: dict[str, Any]) -> None:
    fs = fsspec.filesystem("cas", store=stored["uri"])
    expected = sorted(
        f"runs/data@1/{name}"
        for name in ("latest.csv", "model.safetensors", "shards", "table.csv", "weights.pt")
    )
    for ref in ("runs/data@1", "runs/data:good", "runs/data@latest"):
        assert sorted(fs.ls(ref, detail=False)) == expected, ref
    info = fs.info("cas://runs/data@1/table.csv")
    assert info["type"] == "file"
    assert info["size"] == (stored["src"] / "table.csv").stat().st_size
    assert len(info["blake3"]) == 64
    assert fs.info("runs/data/shards")["type"] == "directory"
    assert fs.isdir("runs/data@1/shards")
    assert fs.cat("runs/data@1/latest.csv") == (stored["src"] / "table.csv").read_bytes()
    assert len(fs.glob("runs/data@1/shards/*.parquet")) == 3
    single = fs.info("runs/single@1")
    assert (single["type"], single["size"]) == ("file", len(b"single file version"))
    assert fs.cat("runs/single@latest") == b"single file version"


def test_ls_lists_keys_at_the_root_and_versions_under_a_key(
    stored: dict[str, Any], tmp_path: Path
) -> None:
    store = Store.open(stored["uri"])
    (tmp_path / "two.bin").write_bytes(b"second")
    for key in ("runs/single", "runs/single", "runs/data/extra", "top"):
        store.put(tmp_path / "two.bin", key)
    store.delete("runs/single@2")
    fs = fsspec.filesystem("cas", store=stored["uri"])
    assert fs.ls("cas://", detail=False) == ["runs", "top"]
    assert fs.ls("cas://runs", detail=False) == ["runs/data", "runs/single"]
    assert fs.ls("runs/single", detail=False) == ["runs/single@1", "runs/single@3"]
    # A key that is also a prefix of keys lists its versions and the keys under it.
    data = {i["name"]: i for i in fs.ls("cas://runs/data/")}
    assert data.keys() == {"runs/data@1", "runs/data/extra"}
    assert data["runs/data@1"]["type"] == "directory"
    assert (data["runs/data@1"]["version"], data["runs/data@1"]["tags"]) == (1, ["good"])
    listed = [*fs.ls(""), *fs.ls("runs"), *data.values(), *fs.ls("runs/single")]
    for entry in listed:  # info and isdir say what the listings say
        info = fs.info(entry["name"])
        assert (info["type"], info["size"]) == (entry["type"], entry["size"]), entry
        assert fs.isdir(entry["name"]) == (entry["type"] == "directory")
    assert fs.info("runs/single@3")["size"] == len(b"second")
    assert fs.info("cas://") == {"name": "", "size": 0, "type": "directory"}
    assert (fs.info("runs/single")["versions"], fs.info("runs/single")["latest"]) == (2, 3)
    assert not fs.isdir("runs/single@2")
    assert not fs.exists("run")
    assert not fs.exists("runs/x")
    # Tags, latest and a path under a key still name versions; a key is not a file.
    assert fs.cat("runs/single@latest") == b"second"
    assert fs.cat("runs/data/table.csv") == (stored["src"] / "table.csv").read_bytes()
    with pytest.raises(IsADirectoryError, match="runs/single"):
        fs.open("runs/single")
    with pytest.raises(FileNotFoundError, match="nothing/here"):
        fs.ls("nothing/here")
    # A walk from the root sees each live version once, by number.
    files = [p.relative_to(stored["src"]).as_posix() for p in stored["src"].rglob("*")]
    expected = [f"runs/data@1/{f}" for f in files if not (stored["src"] / f).is_dir()]
    expected += ["runs/data/extra@1", "runs/single@1", "runs/single@3", "top@1"]
    assert sorted(fs.find("cas://")) == sorted(expected)
    assert fs.du("runs/single") == len(b"single file version") + len(b"second")


def test_pandas_reads_csv_and_parquet(stored: dict[str, Any]) -> None:
    options = {"store": stored["uri"]}
    table = pd.read_csv("cas://runs/data@1/table.csv", storage_options=options)
    pd.testing.assert_frame_equal(table, stored["table"])
    shard = pd.read_parquet("cas://runs/data:good/shards/part-1.parquet", storage_options=options)
    pd.testing.assert_frame_equal(shard, stored["shards"][1])


def test_pyarrow_dataset_over_a_folder_of_shards(stored: dict[str, Any]) -> None:
    import pyarrow.dataset as ds

    fs = fsspec.filesystem("cas", store=stored["uri"])
    dataset = ds.dataset("runs/data@1/shards", filesystem=fs, format="parquet")
    table = dataset.to_table().to_pandas().sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(table, pd.concat(stored["shards"], ignore_index=True))
    picked = dataset.to_table(filter=ds.field("id") < 10, columns=["id"])
    assert picked.num_rows == 10


def test_datasets_load_dataset_with_cas_data_files(
    stored: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    datasets = pytest.importorskip("datasets")
    files = [f"cas://runs/data@1/shards/part-{i}.parquet" for i in range(3)]
    loaded = datasets.load_dataset(
        "parquet",
        data_files={"train": files},
        storage_options={"store": stored["uri"]},
        cache_dir=str(tmp_path / "hf"),
    )
    assert loaded["train"].num_rows == 6000
    assert sorted(loaded["train"]["id"]) == list(range(6000))


def test_torch_load_and_safetensors_on_opened_files(stored: dict[str, Any]) -> None:
    import torch
    from safetensors.numpy import load

    with fsspec.open("cas://runs/data@1/weights.pt", store=stored["uri"]) as stream:
        state = torch.load(stream, weights_only=True)
    assert torch.equal(state["w"], stored["state"]["w"])
    with fsspec.open("cas://runs/data@1/model.safetensors", store=stored["uri"]) as stream:
        tensors = load(stream.read())
    assert np.array_equal(tensors["layer3"], stored["tensors"]["layer3"])


def test_reading_one_tensor_fetches_only_its_chunks_and_the_header(
    stored: dict[str, Any],
) -> None:
    counted = FaultyBackend(stored["backend"])
    opened = Store.open(stored["uri"], cache=False)
    store = Store(counted, opened.config)
    fs = CasFileSystem(store=store)
    entry = next(e for e in store.manifest("runs/data@1").entries if e.path == "model.safetensors")
    with fs.open("runs/data@1/model.safetensors") as stream:
        header_length = int.from_bytes(stream.read(8), "little")
        header = json.loads(stream.read(header_length))
        start, end = header["layer5"]["data_offsets"]
        counted.reset_counts()
        stream.seek(8 + header_length + start)
        data = stream.read(end - start)
    assert np.array_equal(
        np.frombuffer(data, dtype=np.float32).reshape(128, 128), stored["tensors"]["layer5"]
    )
    first, last = 8 + header_length + start, 8 + header_length + end
    needed, offset = set(), 0
    for chunk in entry.chunks:
        if offset < last and offset + chunk.length > first:
            needed.add(layout.chunk_key(chunk.digest))
        offset += chunk.length
    fetched = set(counted.keys["get"])
    # The chunk that held the end of the header is kept decoded; nothing else is read.
    assert fetched <= needed
    assert len(needed - fetched) <= 1
    assert len(fetched) < len(entry.chunks) / 2


def test_a_second_read_is_served_by_the_cache(stored: dict[str, Any], tmp_path: Path) -> None:
    counted = FaultyBackend(stored["backend"])
    opened = Store.open(stored["uri"], cache=tmp_path / "cache")
    store = Store(counted, opened.config, cache=opened.chunks.cache)
    fs = CasFileSystem(store=store)
    first = fs.cat("runs/data@1/table.csv")
    counted.reset_counts()
    assert fs.cat("runs/data@1/table.csv") == first
    assert not [k for k in counted.keys["get"] if k.startswith(layout.CHUNKS)]


def test_missing_refs_and_paths_are_file_not_found_naming_them(stored: dict[str, Any]) -> None:
    fs = fsspec.filesystem("cas", store=stored["uri"])
    with pytest.raises(FileNotFoundError, match=r"runs/data@9"):
        fs.open("runs/data@9/table.csv")
    with pytest.raises(FileNotFoundError, match=r"runs/data@1/nope\.csv"):
        fs.info("runs/data@1/nope.csv")
    with pytest.raises(FileNotFoundError, match="runs/other"):
        pd.read_csv("cas://runs/other/x.csv", storage_options={"store": stored["uri"]})


def test_writes_are_refused(stored: dict[str, Any]) -> None:
    fs = fsspec.filesystem("cas", store=stored["uri"])
    with pytest.raises(PermissionError, match="read-only"):
        fs.open("runs/data@1/new.csv", "wb")
    with pytest.raises(PermissionError, match="read-only"):
        fs.rm("runs/data@1/table.csv")
    with pytest.raises(IsADirectoryError):
        fs.open("runs/data@1/shards")


def test_store_from_the_environment(
    stored: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAS_STORE", stored["uri"])
    with fsspec.open("cas://runs/single@1") as stream:
        assert stream.read() == b"single file version"
    monkeypatch.delenv("CAS_STORE")
    with pytest.raises(ConfigurationError, match="CAS_STORE"):
        fsspec.filesystem("cas")


def test_a_store_that_fails_mid_read_raises_and_returns_no_wrong_byte(
    stored: dict[str, Any],
) -> None:
    faulty = FaultyBackend(
        stored["backend"], fail_on={"get"}, prefix="chunks/", after=2, transient=False
    )
    opened = Store.open(stored["uri"], cache=False)
    fs = CasFileSystem(store=Store(faulty, opened.config))
    got = bytearray()

    def read_all() -> None:
        with fs.open("runs/data@1/table.csv") as stream:
            while block := stream.read(16 * KiB):
                got.extend(block)

    with pytest.raises(BackendError):
        read_all()
    whole = (stored["src"] / "table.csv").read_bytes()
    assert 0 < len(got) < len(whole)
    assert whole.startswith(bytes(got))


def test_the_entry_point_lets_pandas_open_cas_urls_without_importing_cas(
    stored: dict[str, Any], tmp_path: Path
) -> None:
    """A package whose metadata carries pyproject.toml's entry point: fsspec finds
    the filesystem by the protocol alone, in a fresh interpreter."""
    tomllib = pytest.importorskip("tomllib")
    points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    dist = tmp_path / "site" / "cas_store_probe-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cas-store-probe\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items())
            for group, items in points.items()
        )
    )
    script = (
        "import sys, pandas as pd\n"
        "df = pd.read_csv('cas://runs/data@1/table.csv')\n"
        "fs = sys.modules['fsspec'].filesystem('cas')\n"
        "print(len(df), type(fs).__module__, *fs.ls('cas://runs', detail=False))\n"
    )
    env = cas_env(
        {
            "CAS_STORE": stored["uri"],
            "PYTHONPATH": os.pathsep.join([str(dist.parent), str(ROOT)]),
        }
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3000", "cas.integrations.fsspec", "runs/data", "runs/single"]


def test_io_wrappers_read_text(stored: dict[str, Any]) -> None:
    with fsspec.open("cas://runs/data@1/table.csv", "rt", store=stored["uri"]) as stream:
        assert isinstance(stream, io.TextIOBase)
        assert stream.readline().strip() == "id,x,label"
