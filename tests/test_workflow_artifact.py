"""The typed artifact record: exact round trips, validation, storage in manifests and refs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import small_store
from hypothesis import given
from hypothesis import strategies as st

from cas.cli import main
from cas.digest import Digest
from cas.errors import InvalidInputError
from cas.repository import _layout as layout
from cas.repository._manifest import Manifest
from cas.repository._metadata import ARTIFACT_TYPES, SUMMARY_LIMIT, ArtifactInfo, Summary
from cas.store import Store

text = st.text(min_size=1, max_size=12).filter(lambda s: s.strip() != "")
numbers = st.one_of(st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False))
infos = st.builds(
    ArtifactInfo,
    type=st.sampled_from(ARTIFACT_TYPES),
    job=st.none() | text,
    algorithm=st.none() | text,
    base_model=st.none() | text,
    fine_tuning=st.none() | text,
    metrics=st.dictionaries(text, numbers, max_size=4),
    created=st.none() | st.just("2026-01-02T03:04:05.000006Z"),
    version=st.none() | st.integers(1, 10**6),
    parents=st.lists(text, max_size=3).map(tuple),
    tags=st.lists(text, max_size=3).map(tuple),
    labels=st.dictionaries(text, st.text(max_size=8), max_size=3),
)


@given(infos)
def test_to_dict_from_dict_round_trip_exactly(info: ArtifactInfo) -> None:
    data = info.to_dict()
    again = ArtifactInfo.from_dict(data)
    assert again == info
    assert again.to_dict() == data
    # Through JSON text too, as a --meta-file or a --json output carries it.
    assert ArtifactInfo.from_dict(json.loads(json.dumps(data))) == info
    # Integer metrics stay integers, floats stay floats.
    for name, value in info.metrics.items():
        assert type(again.metrics[name]) is type(value)


def test_to_dict_always_has_every_field() -> None:
    assert ArtifactInfo().to_dict() == {
        "type": "other",
        "job": None,
        "algorithm": None,
        "base_model": None,
        "fine_tuning": None,
        "metrics": {},
        "created": None,
        "version": None,
        "parents": [],
        "tags": [],
        "labels": {},
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"type": "weights"}, "unknown artifact type 'weights'"),
        ({"jobb": "x"}, "unknown artifact field(s) 'jobb'"),
        ({"metrics": {"loss": "low"}}, "metric 'loss' must be a finite number"),
        ({"metrics": {"loss": float("nan")}}, "metric 'loss' must be a finite number"),
        ({"metrics": {"ok": True}}, "metric 'ok' must be a finite number"),
        ({"labels": {"team": 3}}, "label 'team'"),
        ({"job": ""}, "job must be non-empty text"),
        ({"parents": "a@1"}, "parents must be a list"),
        ({"version": 0}, "version must be a number >= 1"),
    ],
)
def test_bad_records_are_refused_with_the_field_named(data: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        ArtifactInfo.from_dict(data)
    assert message in str(err.value)


def test_put_keeps_the_record_and_version_info_rebuilds_it(tmp_path: Path) -> None:
    store = small_store(tmp_path / "store")
    (tmp_path / "data.txt").write_text("corpus")
    (tmp_path / "w.bin").write_bytes(b"weights")
    data = store.put(tmp_path / "data.txt", "datasets/corpus", info=ArtifactInfo(type="dataset"))
    info = ArtifactInfo(
        type="model",
        job="ft-7",
        algorithm="adamw",
        base_model="llama-3-8b",
        fine_tuning="lora",
        metrics={"loss": 0.25, "step": 900},
        parents=("datasets/corpus",),
        tags=("candidate",),
        labels={"team": "nlp"},
    )
    version = store.put(tmp_path / "w.bin", "models/ft", info=info, metrics={"loss": 0.2})
    got = store.show("models/ft@1").version.info
    assert got == ArtifactInfo(
        type="model",
        job="ft-7",
        algorithm="adamw",
        base_model="llama-3-8b",
        fine_tuning="lora",
        metrics={"loss": 0.2, "step": 900},  # the explicit metric wins
        created=version.created,
        version=1,
        parents=(data.ref,),  # recorded as KEY@N
        tags=("candidate",),
        labels={"team": "nlp"},
    )
    assert store.log("models/ft")[0].info == got


def test_manifest_without_artifact_field_keeps_its_bytes(tmp_path: Path) -> None:
    store = small_store(tmp_path / "store")
    (tmp_path / "f").write_text("x")
    version = store.put(tmp_path / "f", "plain")
    details = store.show("plain")
    manifest = store.load_manifest(Digest.parse(version.manifest_id))
    assert "artifact" not in manifest.to_dict()  # older readers see the schema they know
    assert details.version.info.type == "other"
    data = manifest.to_dict()
    data["artifact"] = {"type": "model"}
    assert Manifest.from_dict(data).artifact == {"type": "model"}


def _ref_path(root: Path, key: str, number: int) -> Path:
    return root / layout.version_key(key, number)


def test_version_ref_carries_a_summary_and_queries_need_no_manifest(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = small_store(root)
    (tmp_path / "f").write_text("x")
    store.put(tmp_path / "f", "k", metrics={"loss": 0.5}, info=ArtifactInfo(type="config"))
    ref = json.loads(_ref_path(root, "k", 1).read_text())
    assert ref["summary"]["metrics"] == {"loss": 0.5}
    assert ref["summary"]["artifact"] == {"type": "config"}
    # With every manifest gone, log still answers from refs alone.
    for path in (root / "manifests").rglob("*"):
        if path.is_file():
            path.unlink()
    [v] = store.log("k")
    assert v.metrics == {"loss": 0.5}
    assert v.artifact == {"type": "config"}


def test_refs_without_or_with_a_broken_summary_fall_back_to_the_manifest(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = small_store(root)
    (tmp_path / "f").write_text("x")
    store.put(tmp_path / "f", "k", metrics={"loss": 0.5}, info=ArtifactInfo(job="j"))
    store.put(tmp_path / "f", "k", metrics={"loss": 0.4})
    old_style = json.loads(_ref_path(root, "k", 1).read_text())
    del old_style["summary"]  # as written before summaries existed
    _ref_path(root, "k", 1).write_text(json.dumps(old_style))
    broken = json.loads(_ref_path(root, "k", 2).read_text())
    broken["summary"]["metrics"] = {"loss": "lies"}
    _ref_path(root, "k", 2).write_text(json.dumps(broken))
    newest, oldest = Store.open(root).log("k")
    assert oldest.metrics == {"loss": 0.5}
    assert oldest.artifact == {"job": "j"}
    assert newest.metrics == {"loss": 0.4}


def test_a_huge_summary_is_left_out_of_the_ref(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = small_store(root)
    (tmp_path / "f").write_text("x")
    store.put(tmp_path / "f", "k", metadata={"notes": "n" * SUMMARY_LIMIT})
    assert "summary" not in json.loads(_ref_path(root, "k", 1).read_text())
    assert store.log("k")[0].metadata == {"notes": "n" * SUMMARY_LIMIT}


def test_summary_from_ref_rejects_malformed_data() -> None:
    good = Summary(kind="file", size=1, files=1).to_dict()
    assert Summary.from_ref(good) == Summary(kind="file", size=1, files=1)
    assert Summary.from_ref(None) is None
    assert Summary.from_ref({**good, "artifact": {"type": 5}}) is None
    assert Summary.from_ref({k: v for k, v in good.items() if k != "size"}) is None


# -- the put flags ------------------------------------------------------------------


def test_put_flags_and_meta_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "store"
    (tmp_path / "f").write_text("x")
    meta = tmp_path / "meta.json"
    meta.write_text(
        json.dumps(
            {
                "type": "checkpoint",
                "job": "from-file",
                "algorithm": "sgd",
                "metrics": {"loss": 0.9, "step": 10},
                "labels": {"team": "vision", "site": "a"},
                "tags": ["from-file"],
                "metadata": {"lr": 0.1},
                "message": "file message",
                "created": "ignored",
                "version": 99,
            }
        )
    )
    args = ["--store", str(root), "put", str(tmp_path / "f"), "runs/r", "--json"]
    flags = ["--meta-file", str(meta), "--job", "from-flag", "--base-model", "bert"]
    flags += ["--fine-tuning", "lora", "--label", "site=b", "--metric", "loss=0.5"]
    assert main([*args, *flags]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["artifact"] == {
        "type": "checkpoint",
        "job": "from-flag",
        "algorithm": "sgd",
        "base_model": "bert",
        "fine_tuning": "lora",
        "labels": {"team": "vision", "site": "b"},
    }
    assert out["metrics"] == {"loss": 0.5, "step": 10}
    assert out["tags"] == ["from-file"]
    assert out["metadata"] == {"lr": 0.1}
    assert out["message"] == "file message"
    assert out["version"] == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"type": "weights"}', "unknown artifact type 'weights'"),
        ('{"metadata": 3}', "'metadata' must be a JSON object"),
        ('{"colour": "red"}', "unknown artifact field(s) 'colour'"),
    ],
)
def test_bad_meta_file_exits_2_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    (tmp_path / "f").write_text("x")
    meta = tmp_path / "meta.json"
    meta.write_text(content)
    argv = ["--store", str(tmp_path / "s"), "put", str(tmp_path / "f"), "k"]
    assert main([*argv, "--meta-file", str(meta)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "meta.json" in err


def test_missing_meta_file_and_bad_type_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "f").write_text("x")
    argv = ["--store", str(tmp_path / "s"), "put", str(tmp_path / "f"), "k"]
    assert main([*argv, "--meta-file", str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--type", "weights"])
    assert exit_info.value.code == 2
