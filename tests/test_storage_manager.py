"""The RLHF storage-layer API (StorageManager, ArtifactMetadata) over cas stores."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import servers
from backend_fixtures import unique_name
from helpers import build_sample_tree, snapshot

import cas
from cas.errors import InvalidInputError, NotFoundError
from cas.ml.storage_manager import ROOT_VARIABLE
from cas.store import Store

WHEN = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)


def record(artifact_id: str, **fields: object) -> cas.ArtifactMetadata:
    """A record as code written for the replaced layer builds it (size and path unknown yet)."""
    values: dict[str, object] = {
        "artifact_id": artifact_id,
        "artifact_type": "checkpoint",
        "job_name": "dpo-run-7",
        "algorithm": "dpo",
        "created_at": WHEN,
        "size_bytes": 0,
        "storage_path": "",
        **fields,
    }
    return cas.ArtifactMetadata(**values)  # type: ignore[arg-type]


@pytest.fixture
def local_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "rlhf_storage"
    monkeypatch.setenv(ROOT_VARIABLE, str(root))
    monkeypatch.chdir(tmp_path)
    return root


def test_upload_records_typed_fields_and_reads_them_back(local_root: Path, tmp_path: Path) -> None:
    source = build_sample_tree(tmp_path / "step_1000")
    manager = cas.StorageManager()
    metadata = record(
        "ckpt-1000",
        base_model="gpt2",
        peft_method="lora",
        final_loss=0.42,
        total_steps=1000,
        version="2.1.0",
        tags={"team": "rl", "stage": "dpo"},
    )
    uri = manager.upload(source, "experiments/dpo/step_1000", metadata=metadata)
    assert uri == f"file://{local_root.as_posix()}/experiments/dpo/step_1000@1"

    version = Store.open(local_root).show("experiments/dpo/step_1000").version
    assert version.info.to_dict() | {"created": None} == {
        "type": "checkpoint",
        "job": "dpo-run-7",
        "algorithm": "dpo",
        "base_model": "gpt2",
        "fine_tuning": "lora",
        "metrics": {"loss": 0.42, "step": 1000},
        "created": None,
        "version": 1,
        "parents": [],
        "tags": [],
        "labels": {"team": "rl", "stage": "dpo"},
    }

    back = manager.get_metadata(uri)
    assert back.to_dict() == {
        **metadata.to_dict(),
        "created_at": back.created_at.isoformat(),
        "size_bytes": version.size,
        "storage_path": uri,
    }
    assert back.created_at.tzinfo is not None
    assert manager.download(uri, tmp_path / "restored") == str(tmp_path / "restored")
    assert snapshot(tmp_path / "restored") == snapshot(source)


def test_uris_name_keys_of_the_local_store(local_root: Path, tmp_path: Path) -> None:
    source = tmp_path / "model.bin"
    source.write_bytes(b"weights" * 100)
    manager = cas.StorageManager()
    first = manager.upload(source, "models/a")
    second = manager.upload(source, f"file://{local_root}/models/a")
    third = manager.upload(source, str(local_root / "models" / "a"))
    assert [u.rsplit("@", 1)[1] for u in (first, second, third)] == ["1", "2", "3"]
    # @N and :TAG name one version; a bare key the latest.
    assert manager.get_metadata("models/a@2").storage_path == second
    assert manager.get_metadata("models/a").version == "3"
    assert manager.get_metadata(first).artifact_id == "models/a@1"

    with pytest.raises(InvalidInputError, match=ROOT_VARIABLE):
        manager.upload(source, str(tmp_path / "elsewhere" / "x"))
    with pytest.raises(InvalidInputError, match="unsupported storage scheme 'ftp'"):
        manager.download("ftp://host/x", tmp_path / "x")
    with pytest.raises(InvalidInputError, match="names a whole store"):
        manager.upload(source, "s3://bucket/")
    with pytest.raises(NotFoundError):
        manager.upload(tmp_path / "missing", "models/b")
    with pytest.raises(NotFoundError):
        manager.download("models/never", tmp_path / "x")


def test_list_filters_by_prefix_and_type_newest_first(local_root: Path, tmp_path: Path) -> None:
    source = tmp_path / "f.bin"
    source.write_bytes(b"x" * 10)
    manager = cas.get_storage_manager.__wrapped__()  # a fresh one: the env is this test's
    manager.upload(source, "experiments/dpo/step_1", metadata=record("a"))
    manager.upload(source, "experiments/dpo/step_2", metadata=record("b"))
    manager.upload(source, "experiments/dpo/final", metadata=record("c", artifact_type="model"))
    manager.upload(source, "experiments/ppo/step_1", metadata=record("d", algorithm="ppo"))

    everything = manager.list(f"file://{local_root}")
    assert [m.artifact_id for m in everything] == ["d", "c", "b", "a"]
    dpo = manager.list(str(local_root / "experiments"), prefix="dpo")
    assert [m.artifact_id for m in dpo] == ["c", "b", "a"]
    models = manager.list("experiments", artifact_type="model")
    assert [(m.artifact_id, m.artifact_type) for m in models] == [("c", "model")]

    manager.delete("experiments/dpo/step_1")
    manager.delete("experiments/dpo/step_1")  # already gone: nothing to do, as before
    assert [m.artifact_id for m in manager.list("experiments/dpo")] == ["c", "b"]


def test_parent_artifact_id_becomes_lineage_when_it_names_a_version(
    local_root: Path, tmp_path: Path
) -> None:
    source = tmp_path / "f.bin"
    source.write_bytes(b"y" * 10)
    manager = cas.StorageManager()
    base = manager.upload(source, "models/base", metadata=record("base", artifact_type="model"))
    child = manager.upload(source, "runs/child", metadata=record("c1", parent_artifact_id=base))
    opaque = manager.upload(
        source, "runs/other", metadata=record("c2", parent_artifact_id="uuid-9")
    )
    store = Store.open(local_root)
    assert store.show("runs/child").version.parents == ("models/base@1",)
    assert store.show("runs/other").version.parents == ()
    assert manager.get_metadata(child).parent_artifact_id == base
    assert manager.get_metadata(opaque).parent_artifact_id == "uuid-9"


def test_metadata_dict_round_trip_and_bad_records() -> None:
    metadata = record("x", final_loss=1.5, total_steps=3, tags={"a": "b"})
    assert cas.ArtifactMetadata.from_dict(metadata.to_dict()) == metadata
    legacy = {**metadata.to_dict(), "tags": None}  # the replaced layer's default
    assert cas.ArtifactMetadata.from_dict(legacy).tags == {}
    with pytest.raises(InvalidInputError, match="'colour'"):
        cas.ArtifactMetadata.from_dict({**metadata.to_dict(), "colour": "red"})
    with pytest.raises(InvalidInputError, match="created_at"):
        cas.ArtifactMetadata.from_dict({**metadata.to_dict(), "created_at": "yesterday"})
    with pytest.raises(InvalidInputError, match="unknown artifact type 'weights'"):
        record("y", artifact_type="weights").to_info()


def test_get_storage_manager_is_one_per_process() -> None:
    assert cas.get_storage_manager() is cas.get_storage_manager()
    assert "StorageManager" in cas.__all__


@pytest.fixture
def s3_bucket(moto_server: servers.Server) -> Iterator[str]:
    """An empty bucket whose root holds the store, as ``s3://bucket/KEY`` URIs name it."""
    from cas.backends.s3 import S3Backend

    backend = S3Backend(unique_name("s3"), endpoint_url=moto_server.endpoint, region="us-east-1")
    backend.create_bucket()
    try:
        yield backend.bucket
    finally:
        backend.delete([info.key for info in backend.list_objects()])
        backend._client.delete_bucket(Bucket=backend.bucket)
        backend.close()


def test_bucket_uris_name_a_store_and_a_key(s3_bucket: str, tmp_path: Path) -> None:
    source = build_sample_tree(tmp_path / "step_1000")
    manager = cas.StorageManager()
    uri = manager.upload(
        source, f"s3://{s3_bucket}/experiments/dpo/step_1000", metadata=record("s3-1")
    )
    assert uri == f"s3://{s3_bucket}/experiments/dpo/step_1000@1"
    listed = manager.list(f"s3://{s3_bucket}/experiments")
    assert [(m.artifact_id, m.storage_path) for m in listed] == [("s3-1", uri)]
    manager.download(f"s3://{s3_bucket}/experiments/dpo/step_1000", tmp_path / "back")
    assert snapshot(tmp_path / "back") == snapshot(source)
    assert Store.open(f"s3://{s3_bucket}").show("experiments/dpo/step_1000").version.info.job == (
        "dpo-run-7"
    )
    manager.delete(uri)
    assert manager.list(f"s3://{s3_bucket}") == []
    manager.close()
