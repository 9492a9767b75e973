"""Symbolic links in what is put: kept inside the tree, followed out of it.

The Hugging Face hub's cache holds each snapshot as links into
``../../blobs/``, and most downloaded models live there: a put must store
what those links point to. A link that stays inside the tree is stored as a
link; ``--follow-symlinks`` stores what every link points to. Restores
still never write a link that leaves DEST.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import ok, run_cas, run_json, snapshot
from test_tensors import save, weights

from cas.digest import Digest
from cas.errors import SourceError
from cas.store import Store


def hub_cache(root: Path) -> tuple[Path, dict[str, bytes]]:
    """A Hugging Face hub cache of one model, laid out as the hub lays it out:
    ``models--org--name/snapshots/REV/FILE -> ../../blobs/HASH``."""
    model = root / "models--org--tiny"
    (model / "blobs").mkdir(parents=True)
    (model / "refs").mkdir()
    revision = "0123456789abcdef0123456789abcdef01234567"
    (model / "refs" / "main").write_text(revision)
    snap = model / "snapshots" / revision
    (snap / "tokenizer").mkdir(parents=True)
    arrays = {"w": weights(3)["embed.weight"]}
    save(root / "model.tmp", arrays)
    files = {
        "config.json": json.dumps({"hidden_size": 128}).encode(),
        "model.safetensors": (root / "model.tmp").read_bytes(),
        "tokenizer/vocab.txt": b"\n".join(b"tok%d" % i for i in range(500)),
    }
    (root / "model.tmp").unlink()
    for name, data in files.items():
        blob = model / "blobs" / Digest.of(data).hex
        blob.write_bytes(data)
        link = snap / name
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snap, files


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.init(tmp_path / "store")


def test_a_hub_snapshot_is_stored_as_the_files_its_links_point_to(
    store: Store, tmp_path: Path
) -> None:
    snap, files = hub_cache(tmp_path / "hub")
    assert os.readlink(snap / "config.json").startswith("../../blobs/")
    proc = run_cas("put", snap, "models/tiny", store=store.backend.local_root)
    ok(proc)
    entries = {e.path: e for e in store.show("models/tiny").entries}
    assert {p for p, e in entries.items() if e.type == "file"} == set(files)
    store.get("models/tiny", tmp_path / "out")
    for name, data in files.items():
        restored = tmp_path / "out" / name
        assert not restored.is_symlink()
        assert restored.read_bytes() == data
    # Tensor-aware as any safetensors file: one tensor reads back alone.
    tensor = store.read_tensor("models/tiny", "model.safetensors", "w")
    assert tensor.shape == weights(3)["embed.weight"].shape


def test_one_linked_file_and_a_linked_snapshot_can_be_put(store: Store, tmp_path: Path) -> None:
    snap, files = hub_cache(tmp_path / "hub")
    version = store.put(snap / "model.safetensors", "models/weights")
    assert (version.kind, version.size) == ("file", len(files["model.safetensors"]))
    assert store.show("models/weights").entries[0].path == "model.safetensors"
    latest = tmp_path / "latest"
    latest.symlink_to(snap)
    store.put(latest, "models/latest")
    assert {e.path for e in store.show("models/latest").entries if e.type == "file"} == set(files)


def test_links_inside_the_tree_stay_links_unless_all_are_followed(
    store: Store, tmp_path: Path
) -> None:
    snap, files = hub_cache(tmp_path / "hub")
    (snap / "alias.json").symlink_to("config.json")  # inside: a link to a link out
    (snap / "tok").symlink_to("tokenizer")
    store.put(snap, "models/tiny")
    types = {e.path: (e.type, e.target) for e in store.show("models/tiny").entries}
    assert types["alias.json"] == ("symlink", "config.json")
    assert types["tok"] == ("symlink", "tokenizer")
    assert types["config.json"] == ("file", None)
    store.get("models/tiny", tmp_path / "out")
    assert os.readlink(tmp_path / "out" / "alias.json") == "config.json"
    assert (tmp_path / "out" / "alias.json").read_bytes() == files["config.json"]

    out = run_json("put", snap, "models/all", "--follow-symlinks", store=store.backend.local_root)
    assert out["ref"] == "models/all@1"
    entries = {e.path: e.type for e in store.show("models/all").entries}
    assert entries["alias.json"] == "file"
    assert entries["tok"] == "dir"
    assert entries["tok/vocab.txt"] == "file"
    assert "symlink" not in entries.values()


def test_a_linked_directory_out_of_the_tree_is_stored_whole(store: Store, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    (shared / "deep").mkdir(parents=True)
    (shared / "deep" / "data.bin").write_bytes(b"shared data")
    (shared / "alias").symlink_to("deep/data.bin")  # stays in shared/: a link in the copy too
    (tmp_path / "beside.txt").write_bytes(b"beside")
    (shared / "up").symlink_to("../beside.txt")  # leaves shared/: its content is copied
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "own.txt").write_bytes(b"own")
    (tree / "shared").symlink_to(shared)
    store.put(tree, "k")
    store.get("k", tmp_path / "out")
    assert snapshot(tmp_path / "out") == {
        "own.txt": ("file", 0o644, b"own"),
        "shared": ("dir", 0o755),
        "shared/deep": ("dir", 0o755),
        "shared/deep/data.bin": ("file", 0o644, b"shared data"),
        "shared/alias": ("symlink", "deep/data.bin"),
        "shared/up": ("file", 0o644, b"beside"),
    }


def test_links_that_loop_or_lead_nowhere_are_refused(store: Store, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "up").symlink_to("../..")  # out of the tree, and around it again
    with pytest.raises(SourceError, match="loop of symlinks"):
        store.put(tree, "k")
    (tree / "sub" / "up").unlink()
    (tree / "sub" / "gone").symlink_to("../../nothing-here")
    with pytest.raises(
        SourceError, match=r"points outside the directory being stored.*nothing-here"
    ):
        store.put(tree, "k")
    (tree / "sub" / "gone").unlink()
    (tree / "self").symlink_to("self")
    proc = run_cas("put", tree, "k", store=store.backend.local_root)
    assert proc.returncode == 2
    assert "symlink 'self' is part of a loop of links" in proc.stderr
    proc = run_cas("put", tree, "k", "--follow-symlinks", store=store.backend.local_root)
    assert proc.returncode == 2
    assert "points to 'self', which cannot be read (Too many levels" in proc.stderr
    assert "Traceback" not in proc.stderr
    (tree / "self").unlink()
    (tree / "here").symlink_to(".")
    with pytest.raises(SourceError, match=r"'here'.*loop of symlinks"):
        store.put(tree, "k", follow_symlinks=True)
    dangling = tmp_path / "dangling"
    dangling.symlink_to("nowhere")
    with pytest.raises(SourceError, match="symlink to 'nowhere', which does not exist"):
        store.put(dangling, "k")
    assert not list(store.backend.list_objects("refs/"))


def test_followed_links_round_trip_their_modes(store: Store, tmp_path: Path) -> None:
    target = tmp_path / "script.sh"
    target.write_bytes(b"#!/bin/sh\n")
    target.chmod(0o750)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "run").symlink_to(target)
    store.put(tree, "k")
    store.get("k", tmp_path / "out")
    assert ((tmp_path / "out" / "run").stat().st_mode & 0o777) == 0o750
