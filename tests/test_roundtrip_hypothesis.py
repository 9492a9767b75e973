"""Property: put then get of any tree gives back the same tree.

Random trees with nested and empty directories, empty files, files around the
chunk-size boundaries, assorted modes, symlinks within the tree and unicode
names; a small-chunk store keeps every example fast.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import SMALL_PARAMS, random_bytes, snapshot, temp_leftovers, text_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cas.store import Store

P = SMALL_PARAMS
BOUNDARY_SIZES = [
    0,
    1,
    P.min_size - 1,
    P.min_size,
    P.min_size + 1,
    P.avg_size,
    P.max_size - 1,
    P.max_size,
    P.max_size + 1,
    2 * P.max_size,
    2 * P.max_size + 7,
]
FILE_MODES = [0o644, 0o600, 0o640, 0o755, 0o700, 0o444, 0o400, 0o775]
DIR_MODES = [0o755, 0o700, 0o750, 0o775, 0o555]

names = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="/\x00\\"),
    min_size=1,
    max_size=10,
).filter(lambda s: s not in (".", "..") and len(s.encode()) <= 100)

sizes = st.one_of(st.sampled_from(BOUNDARY_SIZES), st.integers(0, 3 * P.max_size))
files = st.tuples(
    st.just("file"),
    sizes,
    st.sampled_from(["random", "text", "zeros"]),
    st.integers(0, 2**31),
    st.sampled_from(FILE_MODES),
)


def dirs_of(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.tuples(
        st.just("dir"),
        st.dictionaries(names, children, max_size=4),
        st.sampled_from(DIR_MODES),
    )


nodes = st.recursive(files, dirs_of, max_leaves=12)
trees = st.dictionaries(names, nodes, min_size=0, max_size=5)


def content(kind: str, size: int, seed: int) -> bytes:
    if kind == "random":
        return random_bytes(size, seed)
    if kind == "text":
        return text_bytes(size, seed)
    return bytes(size)


def materialise(root: Path, tree: dict[str, Any]) -> tuple[list[Path], list[Path]]:
    """Write ``tree`` below ``root``; return its directories and files (modes set last)."""
    dirs: list[tuple[Path, int]] = []
    all_files: list[Path] = []

    def write(base: Path, children: dict[str, Any]) -> None:
        for name, node in children.items():
            path = base / name
            if node[0] == "file":
                _, size, kind, seed, mode = node
                path.write_bytes(content(kind, size, seed))
                os.chmod(path, mode)
                all_files.append(path)
            else:
                _, grandchildren, mode = node
                path.mkdir()
                write(path, grandchildren)
                dirs.append((path, mode))

    write(root, tree)
    return [d for d, _ in dirs], all_files


def set_dir_modes(root: Path, tree: dict[str, Any]) -> None:
    """Directory modes last, deepest first, so read-only ones could still be filled."""
    pending: list[tuple[Path, int]] = []

    def walk(base: Path, children: dict[str, Any]) -> None:
        for name, node in children.items():
            if node[0] == "dir":
                walk(base / name, node[1])
                pending.append((base / name, node[2]))

    walk(root, tree)
    for path, mode in pending:
        os.chmod(path, mode)


def make_writable(path: Path) -> None:
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                os.chmod(full, 0o755)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, Path]]:
    base = tmp_path_factory.mktemp("roundtrip")
    store = Store.init(base / "store", chunker=SMALL_PARAMS)
    yield store, base
    make_writable(base)


counter = itertools.count()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(tree=trees, data=st.data())
def test_directory_round_trip(
    workspace: tuple[Store, Path], tree: dict[str, Any], data: st.DataObject
) -> None:
    store, base = workspace
    work = Path(tempfile.mkdtemp(dir=base))
    try:
        src = work / "src"
        src.mkdir()
        dirs, all_files = materialise(src, tree)
        # Symlinks within the tree: to files, to directories, to the root, dangling.
        targets = [*all_files, *dirs, src, src / "no-such-file"]
        homes = [src, *dirs]
        links = data.draw(
            st.lists(
                st.tuples(st.integers(0, len(homes) - 1), st.integers(0, len(targets) - 1)),
                max_size=4,
            ),
            label="links",
        )
        for i, (home, target) in enumerate(links):
            link = homes[home] / f"link-{i}"
            link.symlink_to(os.path.relpath(targets[target], homes[home]))
        set_dir_modes(src, tree)

        number = next(counter)
        version = store.put(src, f"trees/t{number % 3}")
        dest = work / "dest"
        store.get(version.ref, dest)
        assert snapshot(dest) == snapshot(src)
        assert version.files == len(all_files)
        assert version.size == sum(f.stat().st_size for f in all_files)
        assert temp_leftovers(work) == []
    finally:
        make_writable(work)
        shutil.rmtree(work)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=names,
    size=sizes,
    kind=st.sampled_from(["random", "text", "zeros"]),
    seed=st.integers(0, 2**31),
    mode=st.sampled_from(FILE_MODES),
)
def test_single_file_round_trip(
    workspace: tuple[Store, Path], name: str, size: int, kind: str, seed: int, mode: int
) -> None:
    store, base = workspace
    work = Path(tempfile.mkdtemp(dir=base))
    try:
        src = work / name
        src.write_bytes(content(kind, size, seed))
        os.chmod(src, mode)
        version = store.put(src, "files/f")
        assert (version.kind, version.files, version.size) == ("file", 1, size)
        dest = work / "restored"
        store.get(version.ref, dest)
        assert snapshot(dest) == snapshot(src)
        assert temp_leftovers(work) == []
    finally:
        shutil.rmtree(work)
