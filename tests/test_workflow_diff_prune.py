"""diff (files, safetensors tensors, bytes) and prune (policies, reclaimable bytes)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import KiB, random_bytes, small_store

from cas.cli import main
from cas.errors import InvalidInputError
from cas.ml.checkpoint import write_safetensors
from cas.ml.diff import diff
from cas.ml.prune import Policy, prune
from cas.store import Store


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    out = io.BytesIO()
    write_safetensors(
        out,
        [(n, "F32", tuple(a.shape), a.astype("<f4").tobytes()) for n, a in tensors.items()],
        {"format": "np"},
    )
    return out.getvalue()


def layers(seed: int, count: int = 6, size: int = 24 * KiB) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layer.{i}.weight": rng.standard_normal(size // 4).astype("<f4") for i in range(count)}


# -- diff --------------------------------------------------------------------------


def test_diff_directories_files_and_bytes(tmp_path: Path) -> None:
    store = small_store(tmp_path / "store")
    tree = tmp_path / "tree"
    tree.mkdir()
    big = random_bytes(200 * KiB, 1)
    (tree / "big.bin").write_bytes(big)
    (tree / "same.txt").write_text("unchanged")
    (tree / "gone.txt").write_text("bye")
    store.put(tree, "k")
    (tree / "gone.txt").unlink()
    (tree / "new.txt").write_text("hello")
    (tree / "big.bin").write_bytes(big[: 100 * KiB] + b"edit" + big[100 * KiB + 4 :])
    store.put(tree, "k")

    report = diff(store, "k@1", "k@2")
    assert [c.path for c in report.of_status("added")] == ["new.txt"]
    assert [c.path for c in report.of_status("removed")] == ["gone.txt"]
    assert [c.path for c in report.of_status("changed")] == ["big.bin"]
    assert report.unchanged == 1
    # Content-defined chunks: the edit costs a chunk or two, not the whole file.
    assert report.new_bytes < 100 * KiB
    assert report.shared_bytes > 100 * KiB
    assert report.shared_bytes + report.new_bytes == 200 * KiB + len("hello") + len("unchanged")
    # Reversed, added and removed swap.
    back = diff(store, "k@2", "k@1")
    assert [c.path for c in back.of_status("added")] == ["gone.txt"]
    assert back.new_bytes == report.dropped_bytes


def test_diff_names_the_tensors_that_changed(tmp_path: Path) -> None:
    store = small_store(tmp_path / "store")
    path = tmp_path / "model.safetensors"
    old = layers(0)
    path.write_bytes(safetensors_bytes(old))
    store.put(path, "m")
    new = dict(old)
    new["layer.3.weight"] = old["layer.3.weight"] + 1
    new["layer.5.weight"] = old["layer.5.weight"].copy()
    new["layer.5.weight"][7] = 42.0
    del new["layer.0.weight"]
    new["head.bias"] = np.zeros(8, dtype="<f4")
    path.write_bytes(safetensors_bytes(new))
    store.put(path, "m")

    [change] = diff(store, "m@1", "m@2").changes
    assert change.tensors is not None
    assert change.tensors.changed == ("layer.3.weight", "layer.5.weight")
    assert change.tensors.added == ("head.bias",)
    assert change.tensors.removed == ("layer.0.weight",)
    assert change.tensors.unchanged == 3
    assert change.tensors.error is None


def test_tensor_diff_sees_a_shifted_but_equal_tensor_as_unchanged(tmp_path: Path) -> None:
    """A header that grows moves every tensor: equal bytes at other offsets are unchanged."""
    store = small_store(tmp_path / "store")
    path = tmp_path / "model.safetensors"
    old = layers(1, count=3)
    path.write_bytes(safetensors_bytes(old))
    store.put(path, "m")
    renamed = {"a" * 200 + "-extra": np.ones(4, dtype="<f4"), **old}
    path.write_bytes(safetensors_bytes(renamed))
    store.put(path, "m")
    [change] = diff(store, "m@1", "m@2").changes
    assert change.tensors is not None
    assert change.tensors.changed == ()
    assert change.tensors.unchanged == 3


def test_diff_of_a_broken_safetensors_file_still_reports_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = small_store(tmp_path / "store")
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\xff" * 64)
    store.put(path, "bad")
    path.write_bytes(b"\xfe" * 64)
    store.put(path, "bad")
    [change] = diff(store, "bad@1", "bad@2").changes
    assert change.tensors is not None
    assert change.tensors.error is not None
    assert "not a readable safetensors file" in change.tensors.error
    assert main(["--store", str(tmp_path / "store"), "diff", "bad@1", "bad@2"]) == 0
    out = capsys.readouterr().out
    assert "M  x.safetensors" in out
    assert "tensors: not a readable safetensors file" in out


def test_cli_diff_single_files_under_different_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "store"
    store = small_store(root)
    (tmp_path / "model-1.safetensors").write_bytes(safetensors_bytes(layers(0, count=2)))
    store.put(tmp_path / "model-1.safetensors", "m", metrics={"loss": 0.5})
    changed = layers(0, count=2)
    changed["layer.1.weight"] *= 2
    (tmp_path / "model-2.safetensors").write_bytes(safetensors_bytes(changed))
    store.put(tmp_path / "model-2.safetensors", "m", metrics={"loss": 0.25})
    assert main(["--store", str(root), "diff", "m@1", "m@2"]) == 0
    out = capsys.readouterr().out
    assert "M  model-2.safetensors (was model-1.safetensors)" in out
    assert "tensors changed: 1 of 2" in out
    assert "~ layer.1.weight" in out
    assert "metric loss: 0.5 -> 0.25" in out
    assert "files: 0 added, 0 removed, 1 changed, 0 unchanged" in out
    assert main(["--store", str(root), "diff", "m@1", "m@2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["changed"][0]["tensors"]["changed"] == ["layer.1.weight"]
    assert (
        data["shared_bytes"] + data["new_bytes"]
        == (tmp_path / "model-2.safetensors").stat().st_size
    )
    assert main(["--store", str(root), "diff", "m@1", "m@9"]) == 2


# -- prune -------------------------------------------------------------------------


@pytest.fixture
def run(tmp_path: Path) -> Store:
    """runs/x: six versions, each with its own 40 KiB of data and 40 KiB shared by all.

    loss by version: 1 -> 0.6, 2 -> 0.2, 3 -> 0.5, 4 -> 0.1, 5 -> 0.4, 6 -> 0.3.
    Version 2 is tagged "paper"; models/x@1 derives from version 3.
    """
    store = small_store(tmp_path / "store")
    shared = random_bytes(40 * KiB, 99)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "shared.bin").write_bytes(shared)
    for number, loss in enumerate([0.6, 0.2, 0.5, 0.1, 0.4, 0.3], start=1):
        (tree / "own.bin").write_bytes(random_bytes(40 * KiB, number))
        store.put(tree, "runs/x", metrics={"loss": loss, "acc": 1 - loss})
    store.tag("runs/x@2", "paper")
    (tmp_path / "m").write_bytes(b"model")
    store.put(tmp_path / "m", "models/x", parents=["runs/x@3"])
    return store


def numbers(store: Store) -> list[int]:
    return sorted(v.number for v in store.log("runs/x"))


@pytest.mark.parametrize(
    ("policy", "kept"),
    [
        (Policy(keep_last=2), [5, 6]),
        (Policy(keep_best=2, metric="loss", direction="min"), [2, 4]),
        (Policy(keep_best=1, metric="acc", direction="max"), [4]),
        (Policy(keep_tagged=True), [2]),
        (Policy(keep_ancestors_of=("models/x",)), [3]),
        (
            Policy(keep_last=1, keep_best=1, metric="loss", direction="min", keep_tagged=True),
            [2, 4, 6],
        ),
    ],
)
def test_prune_keeps_what_any_rule_keeps(run: Store, policy: Policy, kept: list[int]) -> None:
    report = prune(run, "runs/x", policy)
    assert sorted(v.number for v in report.kept) == kept
    assert numbers(run) == kept
    assert sorted(v.number for v in report.deleted) == sorted(set(range(1, 7)) - set(kept))
    # A deleted tagged version loses its tag; prune never removes chunks itself.
    assert ("paper" in run.refs.tags("runs/x")) == (2 in kept)


def test_prune_dry_run_deletes_nothing_and_reports_the_same(run: Store) -> None:
    policy = Policy(keep_last=2)
    dry = prune(run, "runs/x", policy, dry_run=True)
    assert numbers(run) == [1, 2, 3, 4, 5, 6]
    assert dry.dry_run
    real = prune(run, "runs/x", policy)
    assert [v.ref for v in dry.deleted] == [v.ref for v in real.deleted]
    assert dry.reclaimable_bytes == real.reclaimable_bytes


def test_reclaimable_bytes_are_unique_bytes_not_logical_size(run: Store) -> None:
    report = prune(run, "runs/x", Policy(keep_last=2), dry_run=True)
    # Four versions go; each had 40 KiB of its own; the shared 40 KiB stays in use.
    assert report.reclaimable_bytes == 4 * 40 * KiB
    assert report.reclaimable_stored_bytes > 4 * 40 * KiB  # random data: no compression
    assert report.reclaimable_chunks >= 4
    # And that is what disappears from the store's unique bytes.
    before = run.stats().unique_bytes
    prune(run, "runs/x", Policy(keep_last=2))
    assert before - run.stats().unique_bytes == report.reclaimable_bytes


def test_chunks_used_by_another_key_are_not_reclaimable(run: Store, tmp_path: Path) -> None:
    # Another key stores version 1's own data: pruning runs/x@1 frees none of it.
    run.get("runs/x@1", tmp_path / "copy")
    run.put(tmp_path / "copy" / "own.bin", "elsewhere")
    report = prune(run, "runs/x", Policy(keep_last=5), dry_run=True)
    assert [v.ref for v in report.deleted] == ["runs/x@1"]
    assert report.reclaimable_bytes == 0


@pytest.mark.parametrize(
    ("policy_args", "flags", "message", "library_message"),
    [
        ({}, [], "no retention rule given", "pass keep_last, keep_best"),
        ({"keep_last": 0}, ["--keep-last", "0"], "--keep-last must be at least 1", "keep_last"),
        ({"keep_best": 2}, ["--keep-best", "2"], "--keep-best needs --metric", "a metric"),
        (
            {"keep_best": 2, "metric": "loss"},
            ["--keep-best", "2", "--metric", "loss"],
            "--keep-best needs --min",
            "direction 'min'",
        ),
        (
            {"keep_last": 1, "metric": "loss"},
            ["--keep-last", "1", "--metric", "loss"],
            "go with --keep-best",
            "metric and direction go with keep_best",
        ),
    ],
)
def test_bad_policies_are_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    policy_args: dict[str, Any],
    flags: list[str],
    message: str,
    library_message: str,
) -> None:
    # The library names its own arguments; the command line names its flags.
    with pytest.raises(InvalidInputError, match=library_message) as err:
        Policy(**policy_args)
    assert "--" not in str(err.value)
    assert main(["--store", str(tmp_path / "store"), "prune", "k", *flags]) == 2
    assert message in capsys.readouterr().err


def test_cli_prune(run: Store, capsys: pytest.CaptureFixture[str]) -> None:
    uri = run.backend.uri
    argv = ["--store", uri, "prune", "runs/x", "--keep-best", "1", "--metric", "loss", "--min"]
    assert main([*argv, "--keep-tagged", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "keep          runs/x@4  (best 1 by min loss)" in out
    assert "keep          runs/x@2  (tagged paper)" in out
    assert "would delete  runs/x@6" in out
    assert "2 kept, 4 to delete; the next gc would reclaim 160.0 KiB" in out
    assert numbers(run) == [1, 2, 3, 4, 5, 6]
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["deleted"] == ["runs/x@6", "runs/x@5", "runs/x@3", "runs/x@2", "runs/x@1"]
    assert numbers(run) == [4]
    assert main(["--store", uri, "prune", "runs/x@4", "--keep-last", "1"]) == 2
    assert "takes a KEY" in capsys.readouterr().err
    assert main(["--store", uri, "prune", "runs/x"]) == 2
    assert "no retention rule given" in capsys.readouterr().err
    assert main(["--store", uri, "prune", "runs/none", "--keep-last", "1"]) == 2
