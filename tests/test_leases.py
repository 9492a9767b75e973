"""Leases: markers of dead puts and collections expire in seconds, live ones never do.

In-process interleavings, replayed with the fake clock of the in-memory
backend where the outcome depends on timing (see gc_helpers). What a real
process paused with SIGSTOP or killed with SIGKILL does is in
test_leases_process.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from gc_helpers import (
    GC_BACKENDS,
    World,
    assert_intact,
    count_attempts,
    make_world,
    random_bytes,
    stored_keys,
    write,
)

from cas.errors import BackendError
from cas.gc._collect import Collector
from cas.gc._lease import LEGACY_LEASE, delete_deadline, lease_for_window
from cas.gc._session import PUTS, RUNS, WriteSession, marker_body
from cas.repository import _layout as layout
from cas.store import Store

KiB = 1024


@pytest.fixture(params=GC_BACKENDS)
def world(request: pytest.FixtureRequest) -> World:
    kind: str = request.param
    backend = None if kind == "memory" else request.getfixturevalue(f"{kind}_backend")
    return make_world(kind, backend)


@pytest.fixture
def fake() -> World:
    return make_world("memory", None)


def leave_dead_collection(store: Store, name: str, **fields: object) -> str:
    """The marker a collection killed right after its start leaves behind."""
    key = f"{RUNS}{name}"
    store.backend.put(key, marker_body(**fields))
    return key


def old_garbage(world: World, store: Store, tmp_path: Path, seeds: list[int]) -> list[Path]:
    """Files whose chunks are stored but unreferenced and older than the grace."""
    sources = []
    for seed in seeds:
        source = write(tmp_path / f"old{seed}.bin", random_bytes(120 * KiB, seed=seed))
        store.put(source, f"gone{seed}")
        store.delete(f"gone{seed}@1")
        sources.append(source)
    world.advance(world.grace * 2)
    return sources


# -- markers of dead processes ------------------------------------------------------------


def test_markers_of_dead_processes_expire_after_their_lease(world: World) -> None:
    store = world.store()
    lease = 3.0 if not world.deterministic else 30.0
    store.set_gc_lease(lease)
    running = WriteSession(store.backend, clock=world.clock).start()
    dead_put = f"{PUTS}dead"
    store.backend.put(dead_put, marker_body())
    window = store.gc(dry_run=True).window
    dead_run = leave_dead_collection(
        store, "dead", grace=world.grace, window=window, dry_run=False, lease=lease
    )
    legacy_run = leave_dead_collection(store, "legacy", grace=world.grace, window=window)
    try:
        fresh = store.gc(grace=world.grace)
        assert (fresh.puts_in_flight, fresh.markers_removed) == (2, 0)

        world.advance(lease + 1.5)
        running.lease.renew()  # what its renewal thread does every lease/6
        dry = store.gc(grace=world.grace, dry_run=True)
        assert (dry.puts_in_flight, dry.markers_removed) == (1, 2)
        assert {dead_put, dead_run} <= stored_keys(store.backend, "gc/"), "a dry run removed"
        report = store.gc(grace=world.grace)
        assert (report.puts_in_flight, report.markers_removed) == (1, 2)
        markers = stored_keys(store.backend, "gc/")
        assert running.marker in markers
        assert not {dead_put, dead_run} & markers
        # A marker without a lease is from a cas that removed markers an hour old.
        assert legacy_run in markers
        if world.deterministic:
            world.advance(LEGACY_LEASE)
            running.lease.renew()
            assert store.gc(grace=world.grace).markers_removed == 1
            assert legacy_run not in stored_keys(store.backend, "gc/")
    finally:
        running.close()
    assert not stored_keys(store.backend, PUTS)


def test_a_put_that_lost_its_marker_recreates_it(fake: World, tmp_path: Path) -> None:
    store = fake.store()
    session = WriteSession(store.backend, clock=fake.clock).start()
    try:
        fake.advance(31.0)  # paused past its lease: a collection removes its marker
        assert store.gc(grace=fake.grace).markers_removed == 1
        assert session.marker not in stored_keys(store.backend, PUTS)
        session.reference_time()
        session.before_commit()  # reads the clock through the marker: there it is again
        assert session.marker in stored_keys(store.backend, PUTS)
    finally:
        session.close()


def test_the_lease_fits_the_window() -> None:
    for window in (0.125, 2.0, 30.0):
        lease = lease_for_window(3.0, window)
        # Room for two renewals (every lease/6) before deletes must stop.
        assert delete_deadline(lease, window) >= lease / 3
    assert lease_for_window(30.0, 30.0) == 30.0


def test_lease_setting_is_checked(fake: World) -> None:
    from cas.errors import InvalidInputError

    store = fake.store()
    with pytest.raises(InvalidInputError, match="at least 3"):
        store.set_gc_lease(1.0)
    assert store.set_gc_lease(10).lease == 10
    assert store.gc_settings().grace == fake.grace, "setting the lease changed the grace"
    assert store.set_gc_grace(fake.grace * 2).lease == 10, "setting the grace lost the lease"


# -- a put after a collection died: the stall -------------------------------------------------


def test_put_waits_out_a_live_collection_but_not_a_dead_one(fake: World, tmp_path: Path) -> None:
    """A put that reuses very old chunks waits for running collections, at most their lease.

    A collection killed at its start leaves its marker: a put right then
    waits as for a live one (the window, 30 s); a put 20 s later only the
    10 s left of its lease; once the lease ran out, not at all.
    """
    store = fake.store()
    first, second, third = old_garbage(fake, store, tmp_path, [1, 2, 3])
    window = store.gc(dry_run=True).window
    fields = {"grace": fake.grace, "window": window, "lease": 30.0}

    killed = leave_dead_collection(store, "killed", **fields)
    fake.clock.sleeps.clear()
    store.put(first, "new1")
    assert fake.clock.sleeps == [pytest.approx(window)]  # it may be alive: wait as for one
    store.backend.delete([killed])

    leave_dead_collection(store, "killed-earlier", **fields)
    fake.advance(20.0)
    fake.clock.sleeps.clear()
    store.put(second, "new2")
    assert fake.clock.sleeps == [pytest.approx(10.0)]  # what was left of its lease
    # That wait ran the lease out.
    fake.clock.sleeps.clear()
    store.put(third, "new3")
    assert fake.clock.sleeps == [], "the put waited for a collection whose lease had run out"
    assert store.verify(deep=True).ok


# -- a collection that cannot renew its lease -------------------------------------------------


def test_collection_whose_lease_lapsed_deletes_nothing_a_put_then_reuses(
    fake: World, tmp_path: Path
) -> None:
    """The collection reads an old chunk's time; its renewals have been failing.

    A put then finds the collection's marker past its lease, does not wait,
    reuses the chunk and commits. The collection, still within its deletion
    window but not within its lease, must not delete the chunk.
    """
    store = fake.store()
    store.set_gc_lease(3.0)
    (source,) = old_garbage(fake, store, tmp_path, [4])
    gc = Collector(store.backend, clock=fake.clock, workers=1, grace=fake.grace)

    def refuse(_key: str) -> None:
        raise BackendError("service unavailable", is_transient=True)

    fake.backend.on("touch", lambda k: k == gc.marker, refuse, once=False)
    gc.start()
    lease = gc.report.lease
    assert lease == lease_for_window(3.0, gc.report.window)
    gc.mark()
    fake.advance(20.0)  # renewals failing all along
    committed: dict[str, object] = {}

    def put_meanwhile(_key: str) -> None:
        fake.advance(lease - 20.0 + 1.0)  # the marker is now past its lease
        committed["version"] = store.put(source, "reused")

    fake.backend.on(
        "stat", lambda k: k.startswith(layout.CHUNKS), put_meanwhile, when="after",
        thread_prefix="cas-gc-sweep",
    )  # fmt: skip
    fake.clock.sleeps.clear()
    gc.sweep()
    fake.backend.clear()  # the service is back
    gc.cleanup()
    gc.finish()

    assert "version" in committed
    assert fake.clock.sleeps == [], "the put should have taken the collection for dead"
    assert gc.report.deleted_chunks == 0
    assert gc.report.deferred >= 1
    assert_intact(store, {"reused@1": source.read_bytes()}, tmp_path)


# -- a put paused between its last check and its commit ---------------------------------------


def pause_and_collect(world: World, store: Store) -> dict[str, int]:
    """What happens while a put is paused for two graces: a collection runs."""
    world.advance(world.grace * 2)
    report = Collector(store.backend, clock=world.clock, workers=2, grace=world.grace).run()
    return {"deleted": report.deleted_chunks, "markers": report.markers_removed}


@pytest.mark.parametrize("where", ["before the commit", "during the commit"])
def test_put_paused_at_its_commit_fails_it(
    fake: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A put paused for two graces, right before or while writing its ref, while gc runs.

    Before: its commit checks again, finds its chunks gone, commits nothing.
    During (the pause falls between that check and the ref landing): the
    commit lands late, the put finds out, makes it a tombstone, and starts
    over. Either way the store holds no damaged version.
    """
    store = fake.store()
    data = random_bytes(200 * KiB, seed=5)
    source = write(tmp_path / "a.bin", data)
    attempts = count_attempts(monkeypatch)
    seen: list[dict[str, int]] = []

    def pause(_key: str = "") -> None:
        if not seen:
            seen.append(pause_and_collect(fake, store))

    if where == "before the commit":
        flush = fake.backend.flush

        def paused_flush() -> None:
            pause()
            flush()

        monkeypatch.setattr(fake.backend, "flush", paused_flush)
    else:
        fake.backend.on("put", lambda k: k == layout.version_key("k", 1), pause)
    version = store.put(source, "k")
    assert seen[0]["deleted"] > 0, "the collection should have taken the paused put's chunks"
    assert seen[0]["markers"] == 1, "the paused put's marker should have expired"
    assert len(attempts) == 2, "the paused attempt should have failed its commit"
    if where == "before the commit":
        assert version.number == 1  # it committed nothing: no tombstone was needed
    else:
        assert store.refs.read_version("k", 1).deleted
        assert version.number == 2
    assert_intact(store, {version.ref: data}, tmp_path)


def test_slow_commit_that_lost_nothing_stands(
    fake: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that landed late but whose objects all survived is kept."""
    store = fake.store()
    data = random_bytes(100 * KiB, seed=7)
    attempts = count_attempts(monkeypatch)
    fake.backend.on(
        "put", lambda k: k == layout.version_key("k", 1), lambda _k: fake.advance(fake.grace)
    )
    version = store.put(write(tmp_path / "a.bin", data), "k")
    assert (version.number, len(attempts)) == (1, 1)
    assert store.verify(deep=True).ok


def test_renewal_thread_keeps_a_marker_fresh(tmp_path: Path) -> None:
    """On the real clock, a marker is renewed every lease/6 without its owner doing anything."""
    from cas.backends import LocalBackend
    from cas.gc._lease import Lease

    backend = LocalBackend(tmp_path / "store")
    # Renewals every 0.5 s; a loaded machine may delay one, not three in a row.
    lease = Lease(backend, f"{PUTS}x", marker_body, length=3.0)
    lease.acquire()
    try:
        first = backend.stat(f"{PUTS}x").mtime
        done = threading.Event()
        done.wait(2.0)
        assert backend.stat(f"{PUTS}x").mtime > first
        assert lease.age() < 1.5
    finally:
        lease.release()
    assert not backend.exists(f"{PUTS}x")
