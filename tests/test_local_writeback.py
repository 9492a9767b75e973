"""The local backend syncs create-only writes early, on a thread; flush() waits for it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from cas.backends import local
from cas.backends.local import LocalBackend
from cas.errors import BackendError


class SyncRecorder:
    def __init__(self, delay: float = 0.0, fail_on_thread: str | None = None) -> None:
        self.calls: list[tuple[str, float, float]] = []
        self.delay = delay
        self.fail_on_thread = fail_on_thread
        self._lock = threading.Lock()

    def __call__(self, root: Path) -> None:
        name = threading.current_thread().name
        start = time.monotonic()
        time.sleep(self.delay)
        with self._lock:
            self.calls.append((name, start, time.monotonic()))
        if name == self.fail_on_thread:
            raise OSError(5, "Input/output error", str(root))


@pytest.fixture
def small_writeback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "WRITEBACK_EVERY", 1000)


@pytest.mark.usefixtures("small_writeback")
def test_writes_past_the_threshold_sync_on_a_thread_and_flush_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sync far longer than a small put takes, even on a loaded machine.
    recorder = SyncRecorder(delay=1.0)
    monkeypatch.setattr(local, "_sync_filesystem", recorder)
    backend = LocalBackend(tmp_path)
    backend.put("chunks/a", b"x" * 600, if_absent=True)
    assert recorder.calls == []  # under the threshold: nothing yet
    started = time.monotonic()
    backend.put("chunks/b", b"y" * 600, if_absent=True)
    assert time.monotonic() - started < 0.8  # the put did not wait for the sync
    backend.flush()
    (early, early_start, early_end), (last, last_start, _) = recorder.calls
    assert early == "cas-writeback"
    assert early_start < started + 0.8
    assert last == threading.current_thread().name
    assert last_start >= early_end  # flush() waited for the early sync, then synced the rest
    backend.flush()
    assert len(recorder.calls) == 2  # nothing new to sync


@pytest.mark.usefixtures("small_writeback")
def test_a_failed_early_sync_is_left_to_flush_which_reports_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = SyncRecorder(fail_on_thread="cas-writeback")
    monkeypatch.setattr(local, "_sync_filesystem", recorder)
    backend = LocalBackend(tmp_path)
    backend.put("chunks/a", b"x" * 2000, if_absent=True)
    backend.flush()  # the early failure is not this flush's: its own sync worked
    assert [name for name, _, _ in recorder.calls][-1] == threading.current_thread().name

    failing = SyncRecorder(fail_on_thread=threading.current_thread().name)
    monkeypatch.setattr(local, "_sync_filesystem", failing)
    backend.put("chunks/b", b"y" * 10, if_absent=True)
    with pytest.raises(BackendError, match="Input/output error"):
        backend.flush()
