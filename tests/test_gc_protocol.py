"""The dangerous interleavings of puts and garbage collection, replayed step by step.

Each test arranges one race between a writer and a collection through hooks
in the backend, and checks the invariant that matters: every committed,
undeleted version restores byte for byte, and verify passes. On the
in-memory backend the clock is fake, so the race goes exactly one way and
the test also checks which safe path it took; on the other backends the
clock is real and only the invariant is checked (see gc_helpers).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from gc_helpers import (
    GC_BACKENDS,
    FakeClock,
    HookedBackend,
    World,
    assert_intact,
    chunk_keys,
    count_attempts,
    live_objects,
    make_world,
    random_bytes,
    stored_keys,
    write,
)

from cas.backends import MemoryBackend
from cas.errors import BackendError, ConcurrentCollectionError
from cas.gc._collect import Collector, GcReport, _Tally
from cas.gc._session import PUTS, deletion_window
from cas.repository import _layout as layout
from cas.store import Store

KiB = 1024
WAIT = 30.0  # seconds a test waits for another thread before failing


@pytest.fixture(params=GC_BACKENDS)
def world(request: pytest.FixtureRequest) -> World:
    kind: str = request.param
    backend = None if kind == "memory" else request.getfixturevalue(f"{kind}_backend")
    return make_world(kind, backend)


def collector(world: World, store: Store) -> Collector:
    return Collector(store.backend, clock=world.clock, workers=2, grace=world.grace)


# -- the basics: grace, dry run, the report -----------------------------------------------


def test_gc_reclaims_only_old_unreachable_objects(world: World, tmp_path: Path) -> None:
    store = world.store()
    a = random_bytes(300 * KiB, seed=1)
    b = random_bytes(200 * KiB, seed=2)
    store.put(write(tmp_path / "a.bin", a), "k")
    store.put(write(tmp_path / "b.bin", b), "k")
    gone = set(chunk_keys(store, "k@1"))
    gone_manifest = layout.manifest_key(store.resolve("k@1").manifest_id)
    store.delete("k@1")
    size_of = {i.key: i.size for i in store.backend.list_objects()}

    # Within the grace period nothing goes, and the report says why.
    report = store.gc(grace=world.grace)
    assert report.deleted == 0
    assert report.kept_by_grace == len(gone) + 1
    assert report.bytes_kept_by_grace == sum(size_of[k] for k in [*gone, gone_manifest])

    world.advance(world.grace * 1.5)
    before = stored_keys(store.backend, "")
    dry = store.gc(grace=world.grace, dry_run=True)
    assert stored_keys(store.backend, "") == before, "a dry run deleted something"
    real = store.gc(grace=world.grace)
    for report in (dry, real):
        assert report.versions == 1
        assert report.scanned_manifests == 2
        assert report.scanned_chunks == len(gone) + len(chunk_keys(store, "k@2"))
        assert report.reachable == len(chunk_keys(store, "k@2")) + 1
        assert report.deleted_chunks == len(gone)
        assert report.deleted_manifests == 1
        assert report.bytes_reclaimed == sum(size_of[k] for k in [*gone, gone_manifest])
        assert report.kept_by_grace == 0
        assert report.unsafe is None
    assert not gone & stored_keys(store.backend, layout.CHUNKS)
    assert_intact(store, {"k@2": b}, tmp_path)
    assert store.gc(grace=world.grace).deleted == 0
    # Only the refs remain of the deleted version: tombstones are never collected.
    assert store.backend.exists(layout.version_key("k", 1))


def test_grace_zero_collects_everything_unreferenced_and_says_it_is_unsafe(
    world: World, tmp_path: Path
) -> None:
    store = world.store()
    store.put(write(tmp_path / "a.bin", random_bytes(100 * KiB, seed=3)), "k")
    keep = random_bytes(100 * KiB, seed=4)
    store.put(write(tmp_path / "b.bin", keep), "k")
    store.delete("k@1")
    world.tick()
    report = store.gc(grace=0)
    assert report.unsafe is not None
    assert "nothing writes" in report.unsafe
    chunks, manifests = live_objects(store)
    assert stored_keys(store.backend, layout.CHUNKS) == chunks
    assert stored_keys(store.backend, layout.MANIFESTS) == manifests
    assert_intact(store, {"k@2": keep}, tmp_path)


def test_gc_stops_before_deleting_when_a_live_manifest_is_missing(
    world: World, tmp_path: Path
) -> None:
    from cas.errors import MissingObjectError

    store = world.store()
    store.put(write(tmp_path / "a.bin", random_bytes(100 * KiB, seed=5)), "k")
    store.put(write(tmp_path / "b.bin", random_bytes(100 * KiB, seed=6)), "other")
    store.delete("other@1")
    manifest_id = store.resolve("k@1").manifest_id
    store.backend.delete([layout.manifest_key(manifest_id)])
    before = stored_keys(store.backend, layout.CHUNKS)
    with pytest.raises(MissingObjectError, match="k@1"):
        store.gc(grace=0)
    assert stored_keys(store.backend, layout.CHUNKS) == before
    assert not stored_keys(store.backend, "gc/runs/"), "the marker of a failed run stayed"


# -- the races --------------------------------------------------------------------------------


def test_put_reusing_an_old_unreferenced_chunk_while_gc_deletes_it(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GC reads chunk c's old time; a put touches c and reuses it; GC deletes c.

    The touch cannot stop a delete that was already decided. The put sees
    that it touched a chunk older than the grace while a collection ran, waits
    out the collection's deletion window, reads c again, finds it gone, and
    starts over instead of committing; its second attempt uploads c again.
    """
    store = world.store()
    data = random_bytes(300 * KiB, seed=7)
    source = write(tmp_path / "a.bin", data)
    store.put(source, "old")
    reused = chunk_keys(store, "old@1")
    store.delete("old@1")
    world.advance(world.grace * 2)

    attempts = count_attempts(monkeypatch)
    writer_waiting = threading.Event()
    batch_done = threading.Event()
    outcome: dict[str, object] = {}

    def writer() -> None:
        try:
            outcome["version"] = store.put(source, "new")
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=writer, name="writer")

    def start_writer_and_wait(_key: str) -> None:
        # GC has just read c's (old) time. Let the whole put happen up to its
        # final check before GC goes on to delete.
        thread.start()
        assert writer_waiting.wait(WAIT)

    def hold_writer(_seconds: float) -> None:
        writer_waiting.set()
        batch_done.wait(WAIT)

    class Observed(Collector):
        def _delete_batch(self, keys: list[str]) -> _Tally:
            try:
                return super()._delete_batch(keys)
            finally:
                if set(keys) & set(reused):
                    batch_done.set()

    # Hook GC's first read of one of the old chunks: that one GC sees old.
    world.backend.on(
        "stat",
        lambda k: k in reused,
        start_writer_and_wait,
        when="after",
        thread_prefix="cas-gc-sweep",
    )
    world.clock.on_sleep = hold_writer
    gc = Observed(store.backend, clock=world.clock, workers=1, grace=world.grace)
    report = gc.run()
    thread.join(WAIT)
    world.clock.on_sleep = None
    assert "error" not in outcome, outcome.get("error")

    if world.deterministic:
        assert report.deleted_chunks == 1, "GC should have deleted the chunk it saw old"
        assert len(attempts) == 2, "the put should have noticed and started over"
        assert world.clock.sleeps[0] == pytest.approx(report.window)
    assert_intact(store, {"new@1": data}, tmp_path)


def test_gc_does_not_delete_when_its_window_has_passed(world: World, tmp_path: Path) -> None:
    """A collection that stalls between reading a time and deleting leaves the object."""
    store = world.store()
    store.put(write(tmp_path / "a.bin", random_bytes(100 * KiB, seed=8)), "k")
    victims = set(chunk_keys(store, "k@1"))
    store.delete("k@1")
    world.advance(world.grace * 2)
    gc = collector(world, store)
    world.backend.on(
        "stat",
        lambda k: k in victims,
        lambda _k: world.advance(gc.report.window),
        when="after",
        once=False,
        thread_prefix="cas-gc-sweep",
    )
    report = gc.run()
    assert report.deleted_chunks == 0
    assert report.deferred == len(victims)
    assert victims <= stored_keys(store.backend, layout.CHUNKS)
    world.backend.clear()
    assert collector(world, store).run().deleted_chunks == len(victims)


class SlowDeletes(MemoryBackend):
    """A service on which deleting a chunk takes ``seconds``, key after key; ``meanwhile``
    runs once, right after the first chunk is deleted."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock.time)
        self.fake = clock
        self.seconds = 0.0
        self.meanwhile: Callable[[], None] | None = None

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            super().delete([key])
            if not key.startswith(layout.CHUNKS):
                continue
            self.fake.advance(self.seconds)
            action, self.meanwhile = self.meanwhile, None
            if action is not None:
                action()


def _garbage_on(
    backend: MemoryBackend, clock: FakeClock, tmp_path: Path
) -> tuple[World, Store, list[str]]:
    """A store on ``backend`` holding one deleted version's chunks, all in one
    batch of a collection and older than twice the grace."""
    world = World("memory", HookedBackend(backend), clock, grace=600.0, deterministic=True)
    store = world.store()
    store.put(write(tmp_path / "a.bin", random_bytes(300 * KiB, seed=21)), "k")
    victims = sorted(chunk_keys(store, "k@1"))
    assert 2 < len(victims) <= 32, "the test needs the chunks in one batch"
    store.delete("k@1")
    world.advance(world.grace * 2)
    return world, store, victims


def test_gc_sends_no_delete_after_its_window_even_within_one_batch(tmp_path: Path) -> None:
    """A batch decided in time, whose deletes go out one after another on a slow service.

    A put touches one of the batch's chunks while the first delete is on its
    way: it reads the chunk again only a window after its touch, so no delete
    of that chunk may go out later than half a window after the read that
    decided it. The collection stops sending, reads the rest again, and keeps
    the touched chunk; it deletes the others, now or at its next run.
    """
    clock = FakeClock()
    backend = SlowDeletes(clock)
    world, store, victims = _garbage_on(backend, clock, tmp_path)

    reused = victims[-1]
    backend.seconds = deletion_window(world.grace) / 2 + 1
    backend.meanwhile = lambda: backend.touch(reused)
    report = collector(world, store).run()

    assert reused in stored_keys(backend, layout.CHUNKS), "a delete went out after its window"
    # What could not be read and deleted in time on so slow a service waits for the next run.
    assert report.deleted_chunks > 0
    assert report.deleted_chunks + report.deferred == len(victims) - 1
    backend.seconds = 0.0
    again = collector(world, store).run()
    assert again.deleted_chunks == report.deferred
    assert stored_keys(backend, layout.CHUNKS) == {reused}


class LandsThenFails(MemoryBackend):
    """A service whose first delete of a chunk lands but answers with a transient
    error; ``meanwhile`` runs between the landing and the answer."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock.time)
        self.meanwhile: Callable[[str], None] | None = None

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            super().delete([key])
            if self.meanwhile is not None and key.startswith(layout.CHUNKS):
                action, self.meanwhile = self.meanwhile, None
                action(key)
                raise BackendError("connection reset before the answer", is_transient=True)


def test_gc_does_not_send_a_failed_delete_again(tmp_path: Path) -> None:
    """A delete that failed may have landed. A put that found the chunk gone
    uploads it anew; a delete sent again on the old read would remove that
    upload. The collection reads the chunk again instead, sees it young, and
    keeps it."""
    clock = FakeClock()
    backend = LandsThenFails(clock)
    world, store, victims = _garbage_on(backend, clock, tmp_path)
    stored = {key: backend.get(key) for key in victims}

    reuploaded: list[str] = []

    def put_again(key: str) -> None:
        world.tick()
        backend.put(key, stored[key], if_absent=True)
        reuploaded.append(key)

    backend.meanwhile = put_again
    report = collector(world, store).run()
    assert len(reuploaded) == 1
    assert stored_keys(backend, layout.CHUNKS) == set(reuploaded), "the new upload was deleted"
    assert report.deleted_chunks == len(victims) - 1


def test_put_that_commits_after_gc_marked(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GC marks, then a put commits new chunks and reuses old unreferenced ones, then GC sweeps."""
    store = world.store()
    kept = random_bytes(200 * KiB, seed=9)
    store.put(write(tmp_path / "kept.bin", kept), "kept")
    old = random_bytes(200 * KiB, seed=10)
    store.put(write(tmp_path / "old.bin", old), "gone")
    store.delete("gone@1")
    world.advance(world.grace * 2)

    gc = collector(world, store)
    gc.start()
    gc.mark()
    attempts = count_attempts(monkeypatch)
    new = random_bytes(150 * KiB, seed=11)
    write(tmp_path / "dir" / "new.bin", new)
    write(tmp_path / "dir" / "old.bin", old)
    store.put(tmp_path / "dir", "late")
    gc.sweep()
    gc.cleanup()
    gc.finish()

    assert gc.report.versions == 1  # "late" was not there when GC marked
    if world.deterministic:
        assert len(attempts) == 1
        # It touched chunks older than the grace while GC ran: it waited the window out.
        assert world.clock.sleeps == [pytest.approx(gc.report.window)]
        assert gc.report.deleted_chunks == 0
    assert_intact(store, {"kept@1": kept}, tmp_path)
    store.get("late@1", tmp_path / "late")
    assert (tmp_path / "late" / "new.bin").read_bytes() == new
    assert (tmp_path / "late" / "old.bin").read_bytes() == old
    assert store.verify(deep=True).ok


def test_put_slower_than_the_grace_period_refreshes_as_it_goes(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put that runs for twice the grace, with collections every 0.3 grace, loses nothing."""
    store = world.store(workers=1)
    old = random_bytes(150 * KiB, seed=12)
    store.put(write(tmp_path / "old.bin", old), "gone")
    garbage = set(chunk_keys(store, "gone@1"))
    store.delete("gone@1")
    world.advance(world.grace * 2)

    files = {f"part{i}.bin": random_bytes(40 * KiB, seed=20 + i) for i in range(6)}
    files["zz-old.bin"] = old
    for name, data in files.items():
        write(tmp_path / "slow" / name, data)
    reports: list[GcReport] = []

    def slow_down(_key: str) -> None:
        if len(reports) < 7:  # 2.1 grace in all
            world.advance(world.grace * 0.3)
            reports.append(collector(world, store).run())

    world.backend.on(
        "put",
        lambda k: k.startswith(layout.CHUNKS),
        slow_down,
        when="after",
        once=False,
        thread_prefix="cas-put",
    )
    attempts = count_attempts(monkeypatch)
    store.put(tmp_path / "slow", "slow")
    world.backend.clear()

    assert len(reports) == 7
    if world.deterministic:
        # Renewing every grace/4 kept its chunks out of reach: one attempt was
        # enough. The collections took only the old garbage, before the put
        # reached the file that needs it again (and then stored it anew).
        assert len(attempts) == 1
        assert sum(r.deleted_chunks for r in reports) == len(garbage)
    restored = tmp_path / "restored"
    store.get("slow@1", restored)
    for name, data in files.items():
        assert (restored / name).read_bytes() == data
    assert store.verify(deep=True).ok


def test_put_stalled_longer_than_the_grace_starts_over(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put stalls for 1.5 grace after its first chunk; GC takes that chunk; the put redoes it."""
    store = world.store(workers=1)
    files = {f"part{i}.bin": random_bytes(40 * KiB, seed=40 + i) for i in range(3)}
    for name, data in files.items():
        write(tmp_path / "src" / name, data)
    reports: list[GcReport] = []

    def stall(_key: str) -> None:
        world.advance(world.grace * 1.5)
        reports.append(collector(world, store).run())

    world.backend.on(
        "put", lambda k: k.startswith(layout.CHUNKS), stall, when="after", thread_prefix="cas-put"
    )
    attempts = count_attempts(monkeypatch)
    store.put(tmp_path / "src", "stalled")

    if world.deterministic:
        assert reports[0].deleted_chunks == 1, "GC should have taken the stalled put's chunk"
        assert len(attempts) == 2
    restored = tmp_path / "restored"
    store.get("stalled@1", restored)
    for name, data in files.items():
        assert (restored / name).read_bytes() == data
    assert store.verify(deep=True).ok


def test_put_gives_up_cleanly_when_every_attempt_loses(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If collections keep taking its chunks, a put fails with a clear error and commits nothing."""
    if not world.deterministic:
        pytest.skip("needs the fake clock to stall every attempt the same way")
    store = world.store(workers=1)
    write(tmp_path / "src" / "a.bin", random_bytes(40 * KiB, seed=50))
    write(tmp_path / "src" / "b.bin", random_bytes(40 * KiB, seed=51))

    def stall(_key: str) -> None:
        world.advance(world.grace * 1.5)
        collector(world, store).run()

    world.backend.on(
        "put",
        lambda k: k.startswith(layout.CHUNKS),
        stall,
        when="after",
        once=False,
        thread_prefix="cas-put",
    )
    with pytest.raises(ConcurrentCollectionError, match="nothing was committed"):
        store.put(tmp_path / "src", "doomed")
    assert not stored_keys(store.backend, layout.REFS + "doomed/")
    assert not stored_keys(store.backend, PUTS), "a failed put left its marker"


# -- settings ----------------------------------------------------------------------------------


def test_lowering_the_grace_keeps_the_old_one_as_a_floor_while_puts_may_use_it(
    world: World,
) -> None:
    from cas.gc._session import WriteSession

    store = world.store()
    assert store.gc(grace=world.grace, dry_run=True).unsafe is None
    assert store.gc(grace=world.grace / 2, dry_run=True).unsafe is not None
    # A put in flight read the old grace: until it must have read the new
    # one (half the old grace), the old one is the floor.
    running = WriteSession(store.backend, clock=world.clock).start()
    store.set_gc_grace(world.grace / 2)
    assert store.gc(grace=world.grace / 2, dry_run=True).unsafe is not None
    world.advance(world.grace * 0.6)
    assert store.gc(grace=world.grace / 2, dry_run=True).unsafe is None
    assert store.gc(dry_run=True).grace == world.grace / 2
    running.close()
    # With no put in flight, a change takes effect at once.
    store.set_gc_grace(world.grace / 4)
    assert store.gc(grace=world.grace / 4, dry_run=True).unsafe is None
