"""Restores never reach outside their destination and never grant privileges."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import cas
from cas.chunks._chunking import ChunkerParams
from cas.errors import InvalidInputError, SourceError, UnsafePathError
from cas.repository._manifest import Entry, check_entries


def link(path: str, target: str) -> Entry:
    return Entry(path, "symlink", 0o777, target=target)


@pytest.mark.parametrize(
    "entries",
    [
        (link("p/q/y", "../.."), link("z", "p/q/y/..")),
        (link("d/l", ".."), link("d/l2", "l/..")),
        (link("a", "b"), link("b", "a/..")),
    ],
    ids=["chain-up", "sibling-chain", "loop"],
)
def test_link_chains_that_leave_the_tree_are_refused(entries: tuple[Entry, ...]) -> None:
    with pytest.raises(UnsafePathError):
        check_entries(entries)


@pytest.mark.parametrize(
    "entries",
    [
        (link("a", "b"),),
        (Entry("d", "dir", 0o755), link("d/l", "..")),
        (link("x", "y/../z"), link("y", "w")),
    ],
)
def test_links_that_stay_inside_are_kept(entries: tuple[Entry, ...]) -> None:
    check_entries(entries)


def test_put_refuses_a_tree_whose_links_chain_outside(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "p" / "q").mkdir(parents=True)
    os.symlink("../..", src / "p" / "q" / "y")
    os.symlink("p/q/y/..", src / "z")
    store = cas.open(tmp_path / "store")
    with pytest.raises(UnsafePathError, match="'z'"):
        store.put(src, "k")


def test_restore_drops_setuid_setgid_and_sticky_bits(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    tool = src / "tool"
    tool.write_bytes(b"#!/bin/sh\n")
    os.chmod(tool, 0o4755)
    shared = src / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    store = cas.open(tmp_path / "store")
    store.put(src, "k")
    store.get("k", tmp_path / "out")
    assert stat.S_IMODE((tmp_path / "out" / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "shared").stat().st_mode) == 0o777


def test_chunk_average_out_of_range_names_the_average() -> None:
    with pytest.raises(InvalidInputError, match="average chunk size 314572800"):
        ChunkerParams.from_average(300 * 1024 * 1024)


def test_putting_the_directory_that_holds_the_store_leaves_the_store_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.bin").write_bytes(b"weights" * 1000)
    store = cas.open()  # ./.cas, inside the tree being stored
    store.put(tmp_path, "project")
    paths = {entry.path for entry in store.show("project").entries}
    assert paths == {"model.bin"}


def test_unreadable_path_is_bad_input_even_for_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root reads any file whatever its mode, so deny access where cas asks for it.
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "ok.bin").write_bytes(b"fine")
    secret = tree / "secret.bin"
    secret.write_bytes(b"top secret")
    real_access = os.access
    monkeypatch.setattr(
        "cas.transfer._ingest.os.access",
        lambda p, mode: Path(p).name != "secret.bin" and real_access(p, mode),
    )
    store = cas.open(tmp_path / "store")
    for path in (secret, tree):
        with pytest.raises(SourceError, match=r"cannot read .*secret\.bin"):
            store.put(path, "k")
    assert not list(store.backend.list_objects("refs/"))
