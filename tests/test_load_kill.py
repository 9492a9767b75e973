"""Writers, collections and readers under load, SIGKILLed at random moments.

Writer processes put files made of shared blocks (so chunks are reused
across writers, versions and deleted versions), delete some of their older
versions, and name every save with an idempotency token: a writer killed
mid-save runs that save again when it is restarted, which must never add a
second version. A collection process runs back to back with a short grace;
a reader restores versions and checks them. Every second or so one writer or
the collection is killed with SIGKILL and started again.

Afterwards: every live version restores byte for byte (its recipe is in its
metadata), no save committed twice, every save a writer saw through is
there, verify --deep passes, and after one collection (once the killed
processes' leases have run out) no marker, temporary file or partial upload
is left. On a local store and on the S3 test server.

Run as a script, this file is a child process: ``python test_load_kill.py
ROLE URI SLOT WORKDIR``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from gc_helpers import REAL_GRACE
from test_gc_stress import BLOCKS, content

from cas.chunks._chunking import ChunkerParams
from cas.errors import CasError, RefNotFoundError
from cas.store import Store

KiB = 1024
SECONDS = float(os.environ.get("CAS_LOAD_SECONDS", "30"))
WRITERS = 3
PARAMS = ChunkerParams.from_average(32 * KiB)
LEASE = 3.0
#: S3: chunks from this size on go as multipart uploads, which a kill can leave behind.
MULTIPART_THRESHOLD = 16 * KiB
#: Seconds between two kills, drawn uniformly. A writer is killed only once
#: it has seen a save through since its start, a collection once it has
#: finished one, so that a slow machine (or server) still makes progress.
KILL_EVERY = {"local": (0.3, 1.5), "s3": (0.5, 2.0)}


def recipe_of(metadata: dict[str, Any]) -> dict[str, Any]:
    return {name: metadata[name] for name in ("parts", "tail_size", "tail_seed")}


# -- the children ------------------------------------------------------------------------------


class Journal:
    """A writer's record of what it began and saw through, kept across its restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        self._out = path.open("a")

    def write(self, **event: Any) -> None:
        self._out.write(json.dumps(event) + "\n")
        self._out.flush()

    def unfinished(self) -> dict[str, Any] | None:
        """The save this writer began and was killed in, if any."""
        done = {e["save"] for e in self.lines if e["event"] == "done"}
        begun = [e for e in self.lines if e["event"] == "begin" and e["save"] not in done]
        return begun[-1] if begun else None


def writer(uri: str, slot: int, workdir: Path) -> None:
    store = Store.open(uri, create=False)
    journal = Journal(workdir / f"writer{slot}.journal")
    rng = random.Random(f"{slot}-{len(journal.lines)}")
    count = len(journal.lines)
    pending = journal.unfinished()
    deleted: list[dict[str, Any]] = []
    removed = {e["ref"] for e in journal.lines if e["event"] == "rm"}
    mine = [e["ref"] for e in journal.lines if e["event"] == "done" and e["ref"] not in removed]
    while True:
        count += 1
        if pending is None:
            if deleted and rng.random() < 0.3:
                recipe = rng.choice(deleted)  # a deleted version's content: old chunks again
            else:
                recipe = {
                    "parts": rng.sample(range(BLOCKS), rng.randrange(1, 5)),
                    "tail_size": rng.randrange(1, 48 * KiB),
                    "tail_seed": slot * 1_000_000 + count,
                }
            pending = {"save": f"w{slot}-{count}", "key": f"w{slot}/k{rng.randrange(2)}", **recipe}
            journal.write(event="begin", **pending)
        path = workdir / f"w{slot}.bin"
        path.write_bytes(content(**recipe_of(pending)))
        try:
            version = store.put(
                path, pending["key"], metadata=pending, idempotency_token=pending["save"]
            )
        except CasError as err:
            journal.write(event="failed", save=pending["save"], error=str(err)[:200])
            continue  # the same save again, with the same token
        journal.write(event="done", save=pending["save"], ref=version.ref)
        mine.append(version.ref)
        pending = None
        if len(mine) > 3 and rng.random() < 0.4:
            victim = mine.pop(rng.randrange(len(mine) - 2))
            journal.write(event="rm", ref=victim)
            try:
                version = store.delete(victim, force=True)
                deleted.append(recipe_of(dict(version.metadata)))
            except RefNotFoundError:
                pass  # deleted already, by this writer before it was killed


def collector(uri: str, grace: float, workdir: Path) -> None:
    store = Store.open(uri, create=False)
    with (workdir / "gc.log").open("a") as log:
        while True:
            report = store.gc(grace=grace)
            removed = (report.deleted, report.markers_removed, report.leftovers_removed)
            log.write(json.dumps(removed) + "\n")
            log.flush()
            time.sleep(0.1)


def reader(uri: str, slot: int, workdir: Path) -> None:
    """Restore versions again and again; report any that restores wrong or not at all."""
    store = Store.open(uri, create=False)
    rng = random.Random(slot)
    log = (workdir / "reader.log").open("a")
    dest = workdir / "read"
    while True:
        keys = store.list_keys()
        if not keys:
            time.sleep(0.1)
            continue
        try:
            ref = store.resolve(rng.choice(keys).key)
            version = store.get(f"{ref.key}@{ref.number}", dest, force=True)
            ok = dest.read_bytes() == content(**recipe_of(dict(version.metadata)))
            entry: dict[str, Any] = {"ref": version.ref, "ok": ok}
        except RefNotFoundError:
            continue  # deleted meanwhile
        except CasError as err:
            # Only a version deleted while it was read may lose its chunks to gc.
            if store.refs.read_version(ref.key, ref.number).deleted:
                continue
            entry = {"ref": f"{ref.key}@{ref.number}", "ok": False, "error": str(err)}
        log.write(json.dumps(entry) + "\n")
        log.flush()


# -- the test ------------------------------------------------------------------------------------


class Load:
    """The child processes, restarted after each kill."""

    def __init__(self, uri: str, workdir: Path, grace: float, pace: tuple[float, float]) -> None:
        self.uri, self.workdir, self.grace, self.pace = uri, workdir, grace, pace
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.kills = 0
        self._done_at_start: dict[str, int] = {}

    def _done(self, role: str) -> int:
        """Saves (a writer's) or collections seen through so far."""
        if role.startswith("writer"):
            journal = self.workdir / f"writer{role.partition(':')[2]}.journal"
            return journal.read_text().count('"done"') if journal.exists() else 0
        log = self.workdir / "gc.log"
        return log.read_text().count("\n") if log.exists() else 0

    def may_kill(self, role: str) -> bool:
        return self._done(role) > self._done_at_start[role]

    def start(self, role: str) -> None:
        kind, _, slot = role.partition(":")
        self._done_at_start[role] = self._done(role)
        argument = str(self.grace) if kind == "gc" else slot
        self.procs[role] = subprocess.Popen(
            [sys.executable, __file__, kind, self.uri, argument, str(self.workdir)],
            cwd=Path(__file__).parent,
            stderr=(self.workdir / f"{kind}{slot}.err").open("ab"),
        )

    def kill(self, role: str) -> None:
        proc = self.procs[role]
        if proc.poll() is not None:
            pytest.fail(f"{role} ended by itself; see {self.workdir}/*.err")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        self.kills += 1

    def run(self, seconds: float) -> None:
        roles = [f"writer:{i}" for i in range(WRITERS)] + ["gc:", "reader:0"]
        for role in roles:
            self.start(role)
        rng = random.Random(23)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                time.sleep(rng.uniform(*self.pace))
                victim = rng.choice(roles[:-1])  # writers and the collection
                if self.may_kill(victim):
                    self.kill(victim)
                    self.start(victim)
        finally:
            for role in self.procs:
                if self.procs[role].poll() is None:
                    self.kill(role)


def journal_events(workdir: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(workdir.glob("writer*.journal"))
        for line in path.read_text().splitlines()
    ]


def check_versions(store: Store, workdir: Path) -> tuple[int, int]:
    """Every live version restores to its recipe; no save committed twice; none lost."""
    events = journal_events(workdir)
    removed = {e["ref"] for e in events if e["event"] == "rm"}
    seen: dict[str, str] = {}
    for summary in store.list_keys():
        for version in store.log(summary.key):
            save = version.metadata["save"]
            assert save not in seen, f"save {save} committed twice: {seen[save]}, {version.ref}"
            seen[save] = version.ref
            dest = workdir / "check"
            store.get(version.ref, dest, force=True)
            expected = content(**recipe_of(dict(version.metadata)))
            assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(expected).digest()
    done = {e["save"]: e["ref"] for e in events if e["event"] == "done"}
    for save, ref in done.items():
        if ref not in removed:
            assert seen.get(save) == ref, f"save {save} ({ref}) was seen through but is gone"
    return len(seen), len(done)


def what_is_left(store: Store) -> dict[str, list[str]]:
    """Markers of processes and leftovers of writes: none may remain after a collection."""
    return {
        "markers": [i.key for i in store.backend.list_objects("gc/puts/")]
        + [i.key for i in store.backend.list_objects("gc/runs/")],
        "leftovers": [x.name for x in store.backend.list_leftovers()],
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_kills_under_load_lose_nothing_and_leave_nothing(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if kind == "local":
        uri = str(tmp_path / "store")
    else:
        backend = request.getfixturevalue("s3_backend")
        uri = f"{backend.uri}?multipart_threshold={MULTIPART_THRESHOLD}"
    grace = REAL_GRACE[kind]
    store = Store.init(uri, chunker=PARAMS)
    store.set_gc_grace(grace)
    store.set_gc_lease(LEASE)
    workdir = tmp_path / "work"
    workdir.mkdir()

    load = Load(uri, workdir, grace, KILL_EVERY[kind])
    load.run(SECONDS)

    reads = [json.loads(x) for x in (workdir / "reader.log").read_text().splitlines()]
    collected = [json.loads(x) for x in (workdir / "gc.log").read_text().splitlines()]
    during = [sum(column) for column in zip(*collected, strict=True)] or [0, 0, 0]
    assert [r for r in reads if not r.get("ok")] == [], "a reader got wrong or missing data"
    live, done = check_versions(store, workdir)
    events = journal_events(workdir)
    redone = len({e["save"] for e in events if e["event"] == "begin"}) - done
    report = store.verify(deep=True)
    assert report.ok, report.damaged

    left = what_is_left(store)
    time.sleep(LEASE + 2.5)  # the killed processes' leases run out
    final = store.gc(grace=0)
    assert what_is_left(store) == {"markers": [], "leftovers": []}
    assert final.markers_removed == len(left["markers"])
    assert final.leftovers_removed == len(left["leftovers"])
    assert store.verify(deep=True).ok
    print(
        f"\n{kind}: {load.kills} kills in {SECONDS:g} s, {done} saves seen through, "
        f"{live} live versions, {len(reads)} reads, {redone} saves cut short; "
        f"{len(collected)} collections under load removed {during[0]} objects, "
        f"{during[1]} markers, {during[2]} leftovers; the last one "
        f"{final.markers_removed} markers and {final.leftovers_removed} leftovers"
    )
    assert load.kills >= SECONDS / sum(KILL_EVERY[kind]) / 2
    assert done >= WRITERS * 3
    assert len(reads) > 0
    assert len(collected) > 0


if __name__ == "__main__" and len(sys.argv) == 5:
    role, uri_arg, argument, workdir_arg = sys.argv[1:]
    if role == "writer":
        writer(uri_arg, int(argument), Path(workdir_arg))
    elif role == "gc":
        collector(uri_arg, float(argument), Path(workdir_arg))
    else:
        reader(uri_arg, int(argument), Path(workdir_arg))
