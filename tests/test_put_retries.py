"""Retries that do not duplicate: put --if-changed, idempotency tokens, and the ML savers.

A put killed after its commit but before its caller heard of it leaves a
version the caller does not know; these are the ways a retry finds it
instead of storing a second one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import KiB, ok, random_bytes, run_cas, run_json, small_store

from cas.errors import BackendError, InvalidInputError
from cas.ml import _retry
from cas.ml.checkpoint import CheckpointManager
from cas.ml.plain_storage import Storage
from cas.repository import _layout as layout
from cas.repository._refs import Refs
from cas.store import Store
from cas.testing.faults import FaultyBackend


@pytest.fixture(autouse=True)
def no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_retry, "RETRY_DELAYS", (0.0, 0.0, 0.0))


def sample(tmp_path: Path, *, seed: int, size: int) -> Path:
    source = tmp_path / "f.bin"
    source.write_bytes(random_bytes(size, seed=seed))
    return source


def numbers(store: Store, key: str) -> list[int]:
    return store.refs.version_numbers(key)


def lose_the_answer(monkeypatch: pytest.MonkeyPatch, times: int = 1) -> list[int]:
    """The next ``times`` commits land, but their caller gets a timeout instead of the answer."""
    original = Refs.create_next
    lost: list[int] = []

    def create_next(self: Refs, *args: object, **kwargs: object) -> object:
        ref = original(self, *args, **kwargs)  # type: ignore[arg-type]
        if len(lost) < times:
            lost.append(ref.number)
            raise BackendError("timed out waiting for the answer", is_transient=True)
        return ref

    monkeypatch.setattr(Refs, "create_next", create_next)
    return lost


# -- if_changed ------------------------------------------------------------------------------


def test_if_changed_commits_only_what_changed(tmp_path: Path) -> None:
    store = small_store(tmp_path / "store")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "w.bin").write_bytes(random_bytes(100 * KiB, seed=1))
    (tree / "run.sh").write_text("#!/bin/sh\n")
    first = store.put(tree, "k", metrics={"loss": 0.5}, tags=["best"])

    same = store.put(tree, "k", metrics={"loss": 0.5}, tags=["best"], if_changed=True)
    assert (same.ref, same.manifest_id, numbers(store, "k")) == (first.ref, first.manifest_id, [1])
    # Anything that makes a different version makes one: a metric, a mode, a byte.
    assert store.put(tree, "k", metrics={"loss": 0.4}, tags=["best"], if_changed=True).number == 2
    os.chmod(tree / "run.sh", 0o755)
    assert store.put(tree, "k", metrics={"loss": 0.4}, tags=["best"], if_changed=True).number == 3
    (tree / "w.bin").write_bytes(random_bytes(100 * KiB, seed=2))
    assert store.put(tree, "k", metrics={"loss": 0.4}, tags=["best"], if_changed=True).number == 4
    # Against the latest version only, and not without the flag.
    assert store.put(tree, "k", metrics={"loss": 0.5}, tags=["best"], if_changed=True).number == 5
    assert store.put(tree, "k", metrics={"loss": 0.5}, tags=["best"]).number == 6
    assert store.put(tree, "new-key", if_changed=True).number == 1
    assert store.verify().ok


def test_if_changed_compares_with_the_latest_live_version(tmp_path: Path) -> None:
    store = small_store(tmp_path / "store")
    source = sample(tmp_path, seed=3, size=50 * KiB)
    store.put(source, "k")
    store.delete("k@1")
    assert store.put(source, "k", if_changed=True).number == 2


def test_cli_if_changed_and_its_restic_name(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ok(run_cas("init", "--chunk-avg", "16K", store=store))
    source = sample(tmp_path, seed=4, size=60 * KiB)
    assert ok(run_cas("put", source, "k", store=store)).stdout.strip() == "k@1"
    for flag in ("--if-changed", "--skip-if-unchanged"):
        assert ok(run_cas("put", source, "k", flag, store=store)).stdout.strip() == "k@1"
    assert run_json("put", source, "k", "--if-changed", store=store)["version"] == 1
    assert (
        ok(run_cas("put", source, "k", "--if-changed", "-m", "x", store=store)).stdout.strip()
        == "k@2"
    )


# -- idempotency tokens --------------------------------------------------------------------------


def test_a_token_makes_a_retry_return_the_first_version(tmp_path: Path) -> None:
    store = small_store(tmp_path / "store")
    source = sample(tmp_path, seed=5, size=60 * KiB)
    first = store.put(source, "k", idempotency_token="save-1")
    first_ref = store.refs.read_live("k", 1)
    assert first_ref is not None
    assert first_ref.token is not None
    # The same save again: the first one's version, whatever the content now.
    source.write_bytes(random_bytes(60 * KiB, seed=6))
    again = store.put(source, "k", idempotency_token="save-1", tags=["late"])
    assert (again.ref, again.manifest_id) == (first.ref, first.manifest_id)
    assert store.resolve("k:late").number == 1, "the retry did not apply its tags"
    assert store.put(source, "k", idempotency_token="save-2").number == 2
    assert store.put(source, "k").number == 3
    # A deleted version is not returned: the retry stores the save anew.
    store.delete("k@1", force=True)
    assert store.put(source, "k", idempotency_token="save-1").number == 4
    assert store.put(source, "k", idempotency_token="save-1").number == 4
    assert numbers(store, "k") == [1, 2, 3, 4]


@pytest.fixture
def lossy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Store, Path, list[int]]:
    """A store whose next commit lands while its caller hears a timeout; a file to put."""
    store = small_store(tmp_path / "store")
    return store, sample(tmp_path, seed=7, size=60 * KiB), lose_the_answer(monkeypatch)


def test_a_retry_after_a_lost_answer_finds_the_commit(
    lossy: tuple[Store, Path, list[int]],
) -> None:
    store, source, lost = lossy
    with pytest.raises(BackendError):
        store.put(source, "k", idempotency_token="t")
    assert lost == [1]
    # The record still says only where to look: the retry finds @1 among the refs.
    record = json.loads(store.backend.get(next(iter(tokens(store, "k")))))
    assert record["version"] is None
    version = store.put(source, "k", idempotency_token="t")
    assert version.number == 1
    assert numbers(store, "k") == [1]
    record = json.loads(store.backend.get(next(iter(tokens(store, "k")))))
    assert record["version"] == 1, "the retry should have noted the version for the next one"


def tokens(store: Store, key: str) -> list[str]:
    prefix = f"{layout.REFS}{key}/{layout.TOKEN_DIR}/"
    return [info.key for info in store.backend.list_objects(prefix)]


def test_token_records_are_not_versions_or_tags(tmp_path: Path) -> None:
    store = small_store(tmp_path / "store")
    source = sample(tmp_path, seed=8, size=30 * KiB)
    store.put(source, "k", idempotency_token="t")
    assert [v.ref for v in store.log("k")] == ["k@1"]
    assert [k.key for k in store.list_keys()] == ["k"]
    assert store.refs.tags("k") == {}
    assert store.gc(grace=0).versions == 1
    assert store.verify(deep=True).ok


@pytest.mark.parametrize("token", ["", "x" * 1025])
def test_bad_tokens_are_refused(tmp_path: Path, token: str) -> None:
    store = small_store(tmp_path / "store")
    source = tmp_path / "f.bin"
    source.write_bytes(b"data")
    with pytest.raises(InvalidInputError, match="idempotency token"):
        store.put(source, "k", idempotency_token=token)
    assert numbers(store, "k") == []


def test_cli_idempotency_token(tmp_path: Path) -> None:
    store = tmp_path / "store"
    source = sample(tmp_path, seed=9, size=30 * KiB)
    argv = ("put", source, "k", "--idempotency-token", "job-7/step-100")
    assert ok(run_cas(*argv, store=store)).stdout.strip() == "k@1"
    assert ok(run_cas(*argv, store=store)).stdout.strip() == "k@1"
    proc = run_cas("put", source, "k", "--idempotency-token", "", store=store)
    assert proc.returncode == 2
    assert "idempotency token" in proc.stderr


# -- the ML savers retry without duplicating ---------------------------------------------------


def test_checkpoint_save_retries_as_the_same_save(tmp_path: Path) -> None:
    store = small_store(tmp_path / "store")
    # The save commits, then setting its tag fails once: the answer never comes.
    flaky = FaultyBackend(
        store.backend, fail_on={"put"}, prefix="refs/runs/r/checkpoint/@t/", times=1
    )
    manager = CheckpointManager(Store(flaky, store.config), "r")
    state = {"w": np.arange(4096, dtype=np.float32)}
    version = manager.save(state, step=1, metrics={"loss": 1.0}, tags=["latest"])
    assert flaky.failures == 1
    assert version.number == 1
    assert numbers(store, "runs/r/checkpoint") == [1]
    assert store.resolve("runs/r/checkpoint:latest").number == 1


def test_checkpoint_save_repeated_after_a_restart_is_not_stored_again(tmp_path: Path) -> None:
    store = small_store(tmp_path / "store")
    state = {"w": np.arange(4096, dtype=np.float32)}
    first = CheckpointManager(store, "r").save(state, step=1, metrics={"loss": 1.0})
    second = CheckpointManager(store, "r").save(state, step=2, metrics={"loss": 0.9})
    # The process died before it learnt that step 2 was saved; it saves step 2 again.
    again = CheckpointManager(store, "r").save(state, step=2, metrics={"loss": 0.9})
    assert again.ref == second.ref
    assert second.parents == (first.ref,)
    # Step 2 trained again to other weights is a new checkpoint beside the first one.
    other = CheckpointManager(store, "r").save({"w": state["w"] + 1}, step=2, metrics={"loss": 0.8})
    assert other.number == 3
    assert other.parents == (first.ref,)
    assert CheckpointManager(store, "r").save(state, step=3).parents == (other.ref,)


def test_checkpoint_save_gives_up_on_permanent_errors(tmp_path: Path) -> None:
    store = small_store(tmp_path / "store")
    broken = FaultyBackend(store.backend, fail_on={"put"}, prefix="chunks/", transient=False)
    manager = CheckpointManager(Store(broken, store.config), "r")
    with pytest.raises(BackendError):
        manager.save({"w": np.zeros(1024, dtype=np.float32)}, step=1)
    attempts = [key for key in broken.keys["put"] if key.startswith("gc/puts/")]
    assert len(attempts) == 1, "a permanent failure was retried"


def test_upload_retries_without_duplicating(lossy: tuple[Store, Path, list[int]]) -> None:
    store, source, lost = lossy
    version = Storage(store).upload(source, "models/m")
    assert lost == [1]
    assert version.number == 1
    assert numbers(store, "models/m") == [1]
    source.write_bytes(random_bytes(80 * KiB, seed=11))  # new chunks, to fail
    flaky = FaultyBackend(store.backend, fail_on={"put"}, prefix="chunks/", times=2)
    assert Storage(Store(flaky, store.config)).upload(source, "models/other").number == 1
    assert flaky.failures == 2
