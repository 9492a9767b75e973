"""Background saves: in order per key, within a memory budget, failures never silent."""

from __future__ import annotations

import functools
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import ROOT, cas_env

from cas.backends import Backend
from cas.errors import BackendError, BackgroundSaveError, InvalidInputError
from cas.ml._background import BackgroundUploader
from cas.ml.checkpoint import CheckpointManager, load_arrays
from cas.store import Store
from cas.testing.faults import FaultyBackend

MiB = 1 << 20


class SlowBackend(FaultyBackend):
    """Takes ``delay`` seconds over every chunk upload: a store far slower than training."""

    def __init__(self, inner: Backend, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay

    def put(
        self,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> None:
        if key.startswith("chunks/"):
            time.sleep(self.delay)
        super().put(key, data, if_absent=if_absent, if_match=if_match)


def failing_store(path: Path) -> Store:
    """A store whose chunk uploads all fail, as when the service is down."""
    base = Store.init(path)
    return Store(FaultyBackend(base.backend, fail_on={"put"}, prefix="chunks/"), base.config)


def state(seed: int, size: int = 64 * 1024) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(size).astype(np.float32), "b": np.arange(8.0)}


def test_background_saves_store_the_state_of_their_call_in_order(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store")
    manager = CheckpointManager(store, "bg")
    weights = state(0)
    expected = []
    futures = []
    for step in range(1, 5):
        futures.append(manager.save(weights, step, {"loss": 1.0 / step}, background=True))
        expected.append(weights["w"].copy())
        weights["w"] += 1.0  # training goes on changing the tensors in place
    manager.wait()
    refs = [f.result().ref for f in futures]
    assert refs == [f"runs/bg/checkpoint@{n}" for n in range(1, 5)]
    for number, ref in enumerate(refs, start=1):
        version = store.show(ref).version
        assert version.parents == ((f"runs/bg/checkpoint@{number - 1}",) if number > 1 else ())
        assert version.metrics["step"] == number
        np.testing.assert_array_equal(load_arrays(store, ref)["w"], expected[number - 1])


def test_failed_background_save_raises_at_next_save_and_at_wait(tmp_path: Path) -> None:
    store = failing_store(tmp_path / "store")
    manager = CheckpointManager(store, "down")
    first = manager.save(state(1), 1, background=True)
    with pytest.raises(BackgroundSaveError):
        first.result(timeout=60)
    with pytest.raises(BackgroundSaveError, match=r"runs/down/checkpoint step 1") as raised:
        manager.save(state(2), 2, background=True)
    assert isinstance(raised.value.__cause__, BackendError)
    # The failure was told once; the next one is told by wait().
    manager.save(state(3), 3, background=True)
    with pytest.raises(BackgroundSaveError, match="step 3"):
        manager.wait()
    manager.wait()  # nothing left to tell
    assert manager.versions() == []  # nothing half-committed


def test_foreground_save_raises_a_background_failure_first(tmp_path: Path) -> None:
    store = failing_store(tmp_path / "store")
    manager = CheckpointManager(store, "mixed")
    manager.save(state(1), 1, background=True)
    manager.uploader.wait_below(manager.key, 1)
    with pytest.raises(BackgroundSaveError):
        manager.save(state(2), 2)


EXIT_SCRIPT = """
import sys
import numpy as np
from cas.ml.checkpoint import CheckpointManager
from cas.store import Store
from cas.testing.faults import FaultyBackend

base = Store.init(sys.argv[1])
store = Store(FaultyBackend(base.backend, fail_on={"put"}, prefix="chunks/"), base.config)
CheckpointManager(store, "exit-run").save({"w": np.ones(1000)}, 7, background=True)
print("training done")
"""


def test_failed_background_save_is_raised_at_exit(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        env=cas_env({"PYTHONPATH": str(ROOT)}),
        timeout=120,
    )
    assert proc.stdout.strip() == "training done"
    assert "BackgroundSaveError" in proc.stderr
    assert "background save of runs/exit-run/checkpoint step 7 failed" in proc.stderr


def test_slow_store_training_goes_on_within_the_memory_budget(tmp_path: Path) -> None:
    delay = 0.2  # per chunk: one upload takes at least this long
    base = Store.init(tmp_path / "store")
    store = Store(SlowBackend(base.backend, delay), base.config)
    snapshot = 4 * 256 * 1024 + 64  # bytes of one state(): 256 Ki float32 and 8 float64
    budget = 2 * snapshot + snapshot // 2
    manager = CheckpointManager(store, "slow", memory_budget=budget)
    weights = state(0, size=256 * 1024)
    steps_while_uploading = 0
    blocked = []
    for step in range(1, 7):
        started = time.perf_counter()
        manager.save(weights, step, background=True)
        blocked.append(time.perf_counter() - started)
        for _ in range(5):  # a few training steps between saves
            weights["w"] *= 0.999
            steps_while_uploading += manager.uploader.pending(manager.key) > 0
    manager.wait()
    assert len(manager.versions()) == 6
    # Training ran while uploads were in flight, and the first two saves (within
    # the budget) returned before a single upload of this store could end.
    assert steps_while_uploading >= 10
    assert max(blocked[:2]) < delay
    # Never more than two snapshots held at once: the third save waited instead.
    assert manager.uploader.peak_held_bytes == 2 * snapshot <= budget
    assert sum(blocked[2:]) > delay / 2


def test_snapshot_larger_than_the_budget_is_refused(tmp_path: Path) -> None:
    manager = CheckpointManager(Store.init(tmp_path / "store"), "big", memory_budget=MiB)
    with pytest.raises(InvalidInputError, match=r"more than the budget of 1\.0 MiB"):
        manager.save(state(0, size=MiB), 1, background=True)
    assert manager.uploader.held_bytes == 0


def test_one_upload_per_key_at_a_time_and_keys_in_parallel() -> None:
    uploader = BackgroundUploader(memory_budget=MiB)
    running: dict[str, int] = {"a": 0, "b": 0}
    overlap = {"a": 0, "b": 0, "across": 0}
    order: list[str] = []
    lock = threading.Lock()

    def job(key: str, n: int) -> int:
        with lock:
            running[key] += 1
            overlap[key] = max(overlap[key], running[key])
            overlap["across"] = max(overlap["across"], running["a"] + running["b"])
        time.sleep(0.02)
        with lock:
            running[key] -= 1
            order.append(f"{key}{n}")
        return n

    futures = [
        uploader.submit(key, f"{key}{n}", functools.partial(job, key, n))
        for n in range(4)
        for key in "ab"
    ]
    uploader.wait()
    assert [f.result() for f in futures] == [n for n in range(4) for _ in "ab"]
    assert overlap["a"] == overlap["b"] == 1
    assert overlap["across"] == 2
    assert [o for o in order if o[0] == "a"] == ["a0", "a1", "a2", "a3"]
