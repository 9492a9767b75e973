"""``get --update``: bringing a folder or file that holds an older version to a newer one.

Unchanged files stay, changed ones are rebuilt from their old chunks that
still match plus fetched ones, each file is swapped in only once verified;
an update that fails or is killed leaves each file old or new.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    CAS,
    SMALL_PARAMS,
    KiB,
    cas_env,
    digests,
    ok,
    random_bytes,
    run_cas,
    run_json,
    snapshot,
    temp_leftovers,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cas.errors import BackendError, DestinationExistsError, InvalidInputError
from cas.store import Store
from cas.testing.faults import FaultyBackend


def _write_v1(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "big.bin").write_bytes(random_bytes(600 * KiB, 1))
    (root / "same.bin").write_bytes(random_bytes(200 * KiB, 2))
    (root / "sub" / "notes.txt").write_bytes(b"notes\n" * 1000)
    (root / "gone.txt").write_bytes(b"only in v1")
    (root / "link").symlink_to("same.bin")
    return root


def _write_v2(v1: Path, root: Path) -> Path:
    """v1 with a few KiB changed in the middle of big.bin, one file new, one gone."""
    _write_v1(root)
    data = bytearray((root / "big.bin").read_bytes())
    data[300 * KiB : 300 * KiB + 4 * KiB] = random_bytes(4 * KiB, 9)
    (root / "big.bin").write_bytes(bytes(data))
    (root / "gone.txt").unlink()
    (root / "sub" / "new.txt").write_bytes(b"new in v2")
    os.chmod(root / "same.bin", 0o600)
    (root / "link").unlink()
    (root / "link").symlink_to("big.bin")
    return root


@pytest.fixture
def versions(tmp_path: Path) -> tuple[Store, Path, Path]:
    store = Store.init(tmp_path / "store", chunker=SMALL_PARAMS)
    v1 = _write_v1(tmp_path / "v1")
    v2 = _write_v2(v1, tmp_path / "v2")
    store.put(v1, "runs/a")
    store.put(v2, "runs/a")
    return store, v1, v2


def test_update_reuses_what_dest_holds(versions: tuple[Store, Path, Path], tmp_path: Path) -> None:
    store, v1, v2 = versions
    dest = tmp_path / "dest"
    store.get("runs/a@1", dest)
    same_inode = (dest / "same.bin").stat().st_ino

    restored = store.restore("runs/a@2", dest, update=True)

    assert digests(dest) == {**digests(v2), "gone.txt": digests(v1)["gone.txt"]}
    assert restored.files_kept == 2  # same.bin (its mode set), sub/notes.txt
    assert restored.files_written == 2  # big.bin, sub/new.txt
    assert restored.files_extra == 1
    assert restored.files_removed == 0
    assert (dest / "same.bin").stat().st_ino == same_inode  # left alone, not rewritten
    assert (dest / "same.bin").stat().st_mode & 0o777 == 0o600
    assert os.readlink(dest / "link") == "big.bin"
    # Only the changed region (a chunk or two either side) came from the store.
    assert restored.reused_bytes >= 600 * KiB + 200 * KiB - 64 * KiB
    assert restored.fetched_bytes < 80 * KiB
    assert temp_leftovers(dest) == []


def test_update_with_delete_makes_dest_exactly_the_version(
    versions: tuple[Store, Path, Path], tmp_path: Path
) -> None:
    store, _, v2 = versions
    dest = tmp_path / "dest"
    store.get("runs/a@1", dest)
    (dest / "sub" / "stray").mkdir()
    (dest / "sub" / "stray" / "file").write_bytes(b"x")
    restored = store.restore("runs/a@2", dest, update=True, delete=True)
    assert snapshot(dest) == snapshot(v2)
    assert restored.files_removed == 2  # gone.txt, sub/stray/file (and its emptied folder)


def test_update_of_an_up_to_date_folder_fetches_nothing(
    versions: tuple[Store, Path, Path], tmp_path: Path
) -> None:
    store, _, v2 = versions
    dest = tmp_path / "dest"
    store.get("runs/a@2", dest)
    restored = store.restore("runs/a@2", dest, update=True, delete=True)
    assert restored.fetched_bytes == 0
    assert restored.files_written == 0
    assert snapshot(dest) == snapshot(v2)


def test_update_of_a_single_file_and_into_a_missing_dest(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store", chunker=SMALL_PARAMS)
    old = random_bytes(512 * KiB, 3)
    new = old[: 100 * KiB] + b"changed" + old[100 * KiB :]
    (tmp_path / "w.bin").write_bytes(old)
    store.put(tmp_path / "w.bin", "w")
    (tmp_path / "w.bin").write_bytes(new)
    store.put(tmp_path / "w.bin", "w")
    fresh = store.restore("w@1", tmp_path / "out" / "w.bin", update=True)
    assert fresh.files_written == 1  # nothing there: a plain get
    assert fresh.reused_bytes == 0
    assert (tmp_path / "out" / "w.bin").read_bytes() == old
    updated = store.restore("w@2", tmp_path / "out" / "w.bin", update=True)
    assert (tmp_path / "out" / "w.bin").read_bytes() == new
    assert updated.files_written == 1
    assert updated.reused_bytes >= len(old) - 64 * KiB
    assert updated.fetched_bytes < 64 * KiB
    with pytest.raises(DestinationExistsError, match="is a folder"):
        store.restore("w@2", tmp_path / "out", update=True)


def test_delete_needs_update_and_update_excludes_force(
    versions: tuple[Store, Path, Path], tmp_path: Path
) -> None:
    store, _, _ = versions
    with pytest.raises(InvalidInputError, match="delete"):
        store.restore("runs/a", tmp_path / "x", delete=True)
    with pytest.raises(InvalidInputError, match="choose one"):
        store.restore("runs/a", tmp_path / "x", force=True, update=True)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("when", ["opened", "rebuilding"])
def test_dest_changed_while_the_update_reads_it_gives_no_wrong_byte(
    versions: tuple[Store, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Someone overwrites big.bin in place once the update has opened it, or once it
    has found the first changed chunk and begins the new file (the chunks before
    were read and hashed already): every reused chunk is rehashed as it is
    used, so the stale ones are fetched."""
    from cas.transfer import _update

    store, _, v2 = versions
    dest = tmp_path / "dest"
    store.get("runs/a@1", dest)

    def scribble(path: Path) -> None:
        if path.name == "big.bin":
            with open(path, "r+b") as stream:  # in place: the update's open file sees it
                stream.write(random_bytes(path.stat().st_size, 77))

    if when == "opened":
        real_plan = _update.Updater._plan

        def plan_then_scribble(self: Any, entry: Any, target: Path) -> Any:
            plan = real_plan(self, entry, target)
            scribble(target)
            return plan

        monkeypatch.setattr(_update.Updater, "_plan", plan_then_scribble)
    else:
        real_begin = _update._Rebuilt._begin

        def scribble_then_begin(self: Any, index: int) -> None:
            if self.plan.target.name == "big.bin":
                assert index > 0  # the chunks before the change were found where they were
                scribble(self.plan.target)
            real_begin(self, index)

        monkeypatch.setattr(_update._Rebuilt, "_begin", scribble_then_begin)
    restored = store.restore("runs/a@2", dest, update=True, delete=True)
    assert snapshot(dest) == snapshot(v2)
    # The scribbled file, or all of it before the change, came from the store.
    assert restored.fetched_bytes > (500 if when == "opened" else 250) * KiB
    assert restored.reused_bytes + restored.missing_bytes == v2_size(v2)


def v2_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def test_a_symlinked_folder_in_dest_is_replaced_not_written_through(
    versions: tuple[Store, Path, Path], tmp_path: Path
) -> None:
    store, _, v2 = versions
    dest = tmp_path / "dest"
    store.get("runs/a@1", dest)
    outside = tmp_path / "outside"
    outside.mkdir()
    for path in (dest / "sub").iterdir():
        path.unlink()
    (dest / "sub").rmdir()
    (dest / "sub").symlink_to(outside)
    store.restore("runs/a@2", dest, update=True, delete=True)
    assert list(outside.iterdir()) == []
    assert snapshot(dest) == snapshot(v2)


def test_a_failed_update_leaves_every_file_old_or_new(
    versions: tuple[Store, Path, Path], tmp_path: Path
) -> None:
    store, v1, v2 = versions
    dest = tmp_path / "dest"
    store.get("runs/a@1", dest)
    (dest / "sub" / "notes.txt").write_bytes(b"local edit")  # forces a rewrite
    faulty = FaultyBackend(store.backend, fail_on={"get"}, prefix="chunks/", after=1)
    broken = Store(faulty, store.config, workers=1)
    with pytest.raises(BackendError):
        broken.restore("runs/a@2", dest, update=True, delete=True)
    old, new, now = digests(v1), digests(v2), digests(dest)
    for path, digest in now.items():
        assert digest in {old.get(path), new.get(path), _edited(path)}, path
    assert _no_temps(dest)


def _edited(path: str) -> str | None:
    from cas.digest import Digest

    return Digest.of(b"local edit").hex if path == "sub/notes.txt" else None


def _no_temps(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.startswith(".cas-tmp")]


@pytest.mark.slow
def test_updates_killed_at_random_leave_each_file_old_or_new(tmp_path: Path) -> None:
    """SIGKILL a CLI update at random moments: each file is always whole, of one
    version or the other, and the next update finishes the job."""
    store = tmp_path / "store"
    Store.init(store, chunker=SMALL_PARAMS)
    old_tree, new_tree = tmp_path / "old", tmp_path / "new"
    old_tree.mkdir()
    new_tree.mkdir()
    for i in range(40):
        data = random_bytes(256 * KiB, i)
        (old_tree / f"f{i}.bin").write_bytes(data)
        (new_tree / f"f{i}.bin").write_bytes(data[:1000] + b"v2" + data[1000:])
    ok(run_cas("put", old_tree, "k", store=store))
    ok(run_cas("put", new_tree, "k", store=store))
    old, new = digests(old_tree), digests(new_tree)
    rng = random.Random(5)
    killed = 0
    for attempt in range(4):
        dest = tmp_path / f"dest{attempt}"
        ok(run_cas("get", "k@1", dest, store=store))
        argv = [*CAS, "--store", str(store), "get", "k@2", str(dest), "--update", "--jobs", "1"]
        proc = subprocess.Popen(argv, env=cas_env(), stderr=subprocess.DEVNULL)
        _wait_for_first_write(dest, proc)
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        killed += proc.wait() == -signal.SIGKILL
        for path, digest in digests(dest).items():
            if not path.startswith(".cas-tmp"):
                assert digest in (old[path], new[path]), path
        result = run_json("get", "k@2", dest, "--update", "--delete", store=store)
        assert digests(dest) == new
        assert result["files_kept"] + result["files_written"] == 40
    assert killed > 0  # at least one kill landed while the update ran


def _wait_for_first_write(dest: Path, proc: subprocess.Popen[bytes]) -> None:
    """Until the update has started writing into ``dest`` (or ended)."""
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if any(p.name.startswith(".cas-tmp") for p in dest.iterdir()):
            return
        time.sleep(0.002)


def test_cli_update_reports_bytes_fetched_and_reused(
    versions: tuple[Store, Path, Path], tmp_path: Path
) -> None:
    store, _, v2 = versions
    dest = tmp_path / "dest"
    ok(run_cas("get", "runs/a@1", dest, store=store.uri))
    out = run_json("get", "runs/a@2", dest, "--update", "--delete", store=store.uri)
    assert out["reused_bytes"] > 0
    assert 0 < out["fetched_bytes"] < 80 * KiB
    assert out["files_removed"] == 1
    assert snapshot(dest) == snapshot(v2)
    text = ok(run_cas("get", "runs/a@2", dest, "--update", store=store.uri)).stdout
    assert "4 files unchanged, 0 rewritten" in text
    refused = run_cas("get", "runs/a@2", tmp_path / "other", "--delete", store=store.uri)
    assert refused.returncode == 2
    assert "--delete" in refused.stderr
    assert "--update" in refused.stderr


_NAMES = st.sampled_from(["a", "b", "c", "d/e", "d/f", "g/h/i"])
_CONTENT = st.binary(min_size=0, max_size=3000)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(old=st.dictionaries(_NAMES, _CONTENT), new=st.dictionaries(_NAMES, _CONTENT, min_size=1))
def test_update_with_delete_always_gives_exactly_the_new_tree(
    tmp_path_factory: pytest.TempPathFactory, old: dict[str, bytes], new: dict[str, bytes]
) -> None:
    base = tmp_path_factory.mktemp("prop")
    store = Store.init(base / "store", chunker=SMALL_PARAMS)
    for name, files in (("old", old), ("new", new)):
        root = base / name
        root.mkdir()
        for path, data in files.items():
            if any(p != path and p.startswith(path + "/") for p in files):
                continue  # a file cannot also be a folder
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(data)
        store.put(root, name)
    dest = base / "dest"
    store.get("old", dest)
    store.restore("new", dest, update=True, delete=True)
    assert snapshot(dest) == snapshot(base / "new")


def test_a_changed_tensor_is_rebuilt_on_its_old_copy_fetching_only_its_delta(
    tmp_path: Path,
) -> None:
    """v2 changes one tensor of a checkpoint a little, stored as deltas of v1's
    chunks: the update fetches those deltas and nothing else, their bases taken
    from the old file (rehashed there), not from the store."""
    import numpy as np
    from safetensors.numpy import save_file

    from cas.repository import _layout as layout

    store = Store.init(tmp_path / "store", chunker=SMALL_PARAMS)
    rng = np.random.default_rng(0)
    weights = {f"t{i}": rng.standard_normal((256, 256)).astype(np.float32) for i in range(4)}
    save_file(weights, str(tmp_path / "m.safetensors"))
    store.put(tmp_path / "m.safetensors", "runs/m")
    weights["t2"] = weights["t2"] + np.float32(1e-3)
    save_file(weights, str(tmp_path / "m.safetensors"))
    store.put(tmp_path / "m.safetensors", "runs/m")
    old = {c.digest for c in store.manifest("runs/m@1").entries[0].chunks}
    changed = [c for c in store.manifest("runs/m@2").entries[0].chunks if c.digest not in old]
    if not any(c.bases for c in changed):
        pytest.skip("this store did not keep the changed tensor as deltas")
    dest = tmp_path / "dest.safetensors"
    store.get("runs/m@1", dest)
    counted = FaultyBackend(store.backend)
    restored = Store(counted, store.config).restore("runs/m@2", dest, update=True)
    assert dest.read_bytes() == (tmp_path / "m.safetensors").read_bytes()
    fetched = [k for k in counted.keys["get"] if k.startswith("chunks/")]
    assert sorted(fetched) == sorted({layout.chunk_key(c.digest) for c in changed})
    stored = sum(store.backend.stat(key).size for key in fetched)
    assert restored.fetched_bytes == stored
    assert restored.reused_bytes == dest.stat().st_size - sum(c.length for c in changed)
