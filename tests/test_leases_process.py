"""Real processes stopped with SIGSTOP past their lease, or killed with SIGKILL.

A put paused past its lease and the grace, while a collection takes its
chunks, must fail its commit (and start over), never commit a damaged
version. A collection paused past its lease must delete nothing when it
wakes. After a collection is killed, puts that reuse old chunks wait for it
at most until its lease runs out, then not at all.

Run as a script, this file is the child process: ``python
test_leases_process.py MODE ...`` (see ``child``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from gc_helpers import RealClock, assert_intact, random_bytes, write

from cas.gc._collect import Collector
from cas.gc._session import WriteSession
from cas.repository import _layout as layout
from cas.store import Store

KiB = 1024
GRACE = 1.0
LEASE = 3.0


def stop_myself() -> None:
    """Stop the whole process here, this thread first (the parent continues it)."""
    signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
    time.sleep(0.01)  # a system call: the stop takes hold before this thread goes on


def child_put(store: Store, source: str, key: str, where: str) -> dict[str, Any]:
    """A put that stops itself right before its commit ("flush") or inside it ("ref")."""
    attempts: list[int] = []
    start = WriteSession.start

    def counted(self: WriteSession) -> WriteSession:
        attempts.append(1)
        return start(self)

    WriteSession.start = counted  # type: ignore[method-assign]
    backend: Any = store.backend
    flush, put = backend.flush, backend.put
    paused: list[int] = []

    def pause_once() -> None:
        if not paused:
            paused.append(1)
            stop_myself()

    def pausing_flush() -> None:
        if where == "flush":
            pause_once()
        flush()

    def pausing_put(name: str, data: bytes, **kwargs: Any) -> None:
        if where == "ref" and "/@v/" in name:
            pause_once()
        put(name, data, **kwargs)

    backend.flush, backend.put = pausing_flush, pausing_put
    version = store.put(source, key)
    return {"attempts": len(attempts), "ref": version.ref}


def child_gc(store: Store, mode: str) -> dict[str, Any]:
    """A collection that stops itself at its first read of a chunk, or is killed at its start."""
    collector = Collector(store.backend, grace=GRACE)
    if mode == "killed":
        collector.start()
        os.kill(os.getpid(), signal.SIGKILL)
    stat = store.backend.stat
    paused: list[int] = []

    def pausing_stat(key: str) -> Any:
        info = stat(key)
        if key.startswith(layout.CHUNKS) and not paused:
            paused.append(1)
            stop_myself()
        return info

    store.backend.stat = pausing_stat  # type: ignore[method-assign]
    return collector.run().to_dict()


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        cwd=Path(__file__).parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_stopped(proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    """Until the child has stopped itself (state T in /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the child ended instead of stopping: {proc.communicate()}")
        with open(f"/proc/{proc.pid}/stat") as stat:
            if stat.read().rpartition(")")[2].split()[0] == "T":
                return
        time.sleep(0.01)
    proc.kill()
    pytest.fail("the child did not stop")


def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def short_store(path: Path, grace: float = GRACE) -> Store:
    from gc_helpers import PARAMS

    store = Store.init(path, chunker=PARAMS)
    store.set_gc_grace(grace)
    store.set_gc_lease(LEASE)
    return store


@pytest.mark.parametrize("where", ["flush", "ref"])
def test_put_stopped_past_its_lease_fails_its_commit(tmp_path: Path, where: str) -> None:
    store = short_store(tmp_path / "store")
    data = random_bytes(300 * KiB, seed=1)
    source = write(tmp_path / "a.bin", data)
    proc = spawn("put", str(tmp_path / "store"), str(source), "k", where)
    wait_stopped(proc)
    time.sleep(LEASE + 1.5)  # past its lease, and its chunks past the grace
    report = store.gc(grace=GRACE)
    assert report.deleted_chunks > 0, "the collection should have taken the stopped put's chunks"
    assert report.markers_removed == 1, "the stopped put's marker should have expired"
    assert report.puts_in_flight == 0
    result = finish(proc)
    assert result["attempts"] == 2, "the stopped attempt should have failed its commit"
    if where == "ref":
        # Its commit landed after the chunks were gone: taken back as a tombstone.
        assert store.refs.read_version("k", 1).deleted
        assert result["ref"] == "k@2"
    else:
        assert result["ref"] == "k@1"
    assert_intact(store, {result["ref"]: data}, tmp_path)


def test_collection_stopped_past_its_lease_deletes_nothing(tmp_path: Path) -> None:
    store = short_store(tmp_path / "store")
    data = random_bytes(300 * KiB, seed=2)
    source = write(tmp_path / "a.bin", data)
    store.put(source, "gone")
    store.delete("gone@1")
    time.sleep(GRACE * 2)
    proc = spawn("gc", str(tmp_path / "store"), "paused")
    wait_stopped(proc)  # it has read the time of an old, unreferenced chunk
    time.sleep(LEASE + 1.5)
    clock = RealClock()
    store.clock = clock
    store.put(source, "back")  # reuses those chunks, touching them
    assert clock.sleeps == [], "the put should have taken the stopped collection for dead"
    report = finish(proc)
    assert report["deleted_chunks"] == 0
    assert_intact(store, {"back@1": data}, tmp_path)


def test_puts_stall_after_a_killed_collection_only_while_its_lease_runs(tmp_path: Path) -> None:
    """The stall of the issue: a put reusing chunks older than the grace after gc was killed.

    With a grace of 16 s the window is 2 s: the put right after the kill
    waits for the collection, which may still be alive; once its 3 s lease
    has run out, a put does not wait at all.
    """
    store = short_store(tmp_path / "store", grace=16.0)
    sources = []
    for seed in (3, 4):
        source = write(tmp_path / f"{seed}.bin", random_bytes(200 * KiB, seed=seed))
        store.put(source, f"gone{seed}")
        store.delete(f"gone{seed}@1")
        sources.append(source)
    day_ago = time.time() - 86400
    for path in (tmp_path / "store" / "chunks").rglob("*"):
        os.utime(path, (day_ago, day_ago))  # a day old: "very old" reused chunks
    proc = spawn("gc", str(tmp_path / "store"), "killed")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    [run] = store.backend.list_objects("gc/runs/")

    clock = RealClock()
    store.clock = clock
    store.put(sources[0], "new3")
    window = store.gc(dry_run=True).window
    assert len(clock.sleeps) == 1
    assert 0 < clock.sleeps[0] <= window
    deadline = time.monotonic() + 30
    while store.gc(dry_run=True).markers_removed == 0:  # its lease runs out
        assert time.monotonic() < deadline, "the killed collection's marker never expired"
        time.sleep(0.2)
    clock.sleeps.clear()
    started = time.monotonic()
    store.put(sources[1], "new4")
    took = time.monotonic() - started
    assert clock.sleeps == [], f"a put waited for a dead collection ({took:.1f} s)"
    assert store.gc(grace=16.0).markers_removed == 1
    assert not store.backend.exists(run.key)


if __name__ == "__main__":
    mode, store_path, *rest = sys.argv[1:]
    opened = Store.open(store_path, create=False)
    outcome = child_put(opened, *rest) if mode == "put" else child_gc(opened, *rest)
    print(json.dumps(outcome))
