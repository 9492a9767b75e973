"""Repacking: gc frees the deleted versions that kept versions needed only as delta bases.

Kept versions whose chunks are deltas of deleted versions' chunks are stored
again (against a kept version's chunk, or whole) and pointed at new
manifests; their content, metadata and lineage never change; a crash at any
moment damages nothing; concurrent deletes, repacks and puts lose nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from gc_helpers import live_objects, needed_chunks, stored_keys
from helpers import ok, run_cas, run_json
from test_tensors import PARAMS, entry_chunks, save, step, stored_bytes, weights

from cas.backends import open_backend
from cas.chunks import _codec as codec
from cas.errors import BackendError
from cas.gc._repack import Repacker
from cas.gc._repack_plan import plan
from cas.repository import _layout as layout
from cas.store import Store
from cas.store._config import load_config
from cas.tensors._writer import Chains
from cas.testing.faults import FaultyBackend


def series(store: Store, tmp_path: Path, versions: int, key: str = "run") -> list[Path]:
    """A fine-tuning run put without parents (each version a delta of the one before)."""
    arrays = weights(21)
    paths = []
    for number in range(1, versions + 1):
        path = save(tmp_path / f"{key}-{number}.safetensors", arrays)
        store.put(path, key, metrics={"loss": (number * 7) % 10})
        paths.append(path)
        arrays = step(arrays, seed=200 + number)
    return paths


def alone(tmp_path: Path, paths: list[Path]) -> int:
    """What the files take, each in a store of its own."""
    total = 0
    for index, path in enumerate(paths):
        store = Store.init(tmp_path / f"alone-{index}", chunker=PARAMS)
        store.put(path, "x")
        total += stored_bytes(store)
    return total


def restores(store: Store, tmp_path: Path, refs: dict[str, Path]) -> None:
    for ref, path in refs.items():
        dest = tmp_path / "out" / ref.replace("@", "-")
        store.get(ref, dest)
        assert dest.read_bytes() == path.read_bytes(), ref
        dest.unlink()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.init(tmp_path / "store", chunker=PARAMS)


def test_keeping_the_latest_of_10_then_gc_frees_the_others(store: Store, tmp_path: Path) -> None:
    paths = series(store, tmp_path, versions=10)
    for number in range(1, 10):
        store.delete(f"run@{number}")
    without = store.gc(grace=0, repack=False)
    assert without.repack is None
    before = stored_bytes(store)
    report = store.gc(grace=0)
    assert report.repack is not None
    assert report.repack.versions == 1
    assert report.repack.chunks > 0
    assert report.deleted_chunks > 0
    assert stored_bytes(store) < before
    assert stored_bytes(store) <= 1.02 * alone(tmp_path, [paths[9]])
    # Nothing but what run@10 names is left: no delta base of a deleted version.
    chunks, manifests = live_objects(store)
    assert stored_keys(store.backend, layout.CHUNKS) == chunks
    assert stored_keys(store.backend, layout.MANIFESTS) == manifests
    assert store.verify(deep=True).ok
    restores(store, tmp_path, {"run@10": paths[9]})
    again = store.gc(grace=0)
    assert again.repack is not None
    assert again.repack.chunks == 0
    assert again.deleted == 0


def test_keeping_3_of_10_then_gc_stores_at_most_what_3_alone_take(
    store: Store, tmp_path: Path
) -> None:
    paths = series(store, tmp_path, versions=10)
    kept = {3: paths[2], 6: paths[5], 10: paths[9]}
    for number in range(1, 11):
        if number not in kept:
            store.delete(f"run@{number}")
    store.gc(grace=0, repack=False)
    before = stored_bytes(store)
    report = store.gc(grace=0)
    assert report.repack is not None
    # A group of chunks is stored again only when that frees more than it costs.
    assert stored_bytes(store) <= before
    assert stored_bytes(store) <= 1.1 * alone(tmp_path, list(kept.values()))
    assert stored_keys(store.backend, layout.CHUNKS) == needed_chunks(store)
    assert store.verify(deep=True).ok
    restores(store, tmp_path, {f"run@{n}": p for n, p in kept.items()})


def test_a_repack_that_costs_more_than_it_frees_is_left_undone(tmp_path: Path) -> None:
    # Chains of 2 reads: run@2 and run@3 are both deltas of run@1. Without run@1 both
    # would be stored whole, about twice what run@1 takes: mostly not worth it.
    store = Store.init(tmp_path / "store", chunker=PARAMS, max_delta_reads=2)
    paths = series(store, tmp_path, versions=3)
    store.delete("run@1")
    store.gc(grace=0, repack=False)
    before = stored_bytes(store)
    report = store.gc(grace=0)
    assert report.repack is not None
    assert report.repack.base_only_chunks > 0
    assert stored_bytes(store) <= before
    assert store.stats().delta_base_bytes > 0.5 * report.repack.frees_bytes
    assert stored_keys(store.backend, layout.CHUNKS) == needed_chunks(store)
    assert store.verify(deep=True).ok
    restores(store, tmp_path, {"run@2": paths[1], "run@3": paths[2]})


def test_a_repacked_version_keeps_its_content_record_and_lineage(
    store: Store, tmp_path: Path
) -> None:
    paths = series(store, tmp_path, versions=4)
    store.put(paths[3], "child", parents=["run@4"])
    before = {n: store.show(f"run@{n}").version for n in (2, 4)}
    refs_before = {n: store.resolve(f"run@{n}") for n in (2, 4)}
    for number in (1, 3):
        store.delete(f"run@{number}")
    first_bases = {c.digest: c.bases[:1] for c in entry_chunks(store, "run@4")}
    store.gc(grace=0)
    for number in (2, 4):
        after = store.show(f"run@{number}").version
        old = before[number]
        assert after.manifest_id != old.manifest_id
        assert (after.created, after.parents, after.metrics, after.size) == (
            old.created,
            old.parents,
            old.metrics,
            old.size,
        )
        ref = store.resolve(f"run@{number}")
        assert ref.created == refs_before[number].created
        raw = json.loads(store.backend.get(layout.version_key("run", number)))
        assert raw["repacked"]
        assert raw["summary"] == refs_before[number].summary
    # run@4 was a delta of run@3, which is gone: a chunk stored again is now a delta
    # of run@2's (a kept version in its chain) or whole.
    named = {c.digest for c in entry_chunks(store, "run@2")}
    moved = [c for c in entry_chunks(store, "run@4") if c.bases[:1] != first_bases[c.digest]]
    assert moved
    assert all(not c.bases or c.bases[0] in named for c in moved)
    assert store.show("child").version.parents == ("run@4",)
    restores(store, tmp_path, {"run@2": paths[1], "run@4": paths[3], "child": paths[3]})


def test_a_delta_of_a_kept_version_stays_a_delta(store: Store, tmp_path: Path) -> None:
    series(store, tmp_path, versions=5)
    for number in (1, 2, 3):
        store.delete(f"run@{number}")
    five = {c.digest: c.bases for c in entry_chunks(store, "run@5")}
    four = {c.digest for c in entry_chunks(store, "run@4")}
    store.gc(grace=0)
    for chunk in entry_chunks(store, "run@5"):
        if five[chunk.digest] and five[chunk.digest][0] in four:
            # Coded against run@4, which stays: the chunk is not stored again.
            assert chunk.bases[0] == five[chunk.digest][0]
    assert store.show("run@5").storage.delta_base == "run@4"


def test_a_dry_run_writes_nothing_and_estimates_the_repack(store: Store, tmp_path: Path) -> None:
    series(store, tmp_path, versions=6)
    for number in (1, 2, 4, 5):
        store.delete(f"run@{number}")
    root = tmp_path / "store"
    snapshot = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    estimate = store.gc(grace=0, dry_run=True).repack
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == snapshot
    assert estimate is not None
    assert estimate.dry_run
    done = store.gc(grace=0).repack
    assert done is not None
    assert (estimate.chunks, estimate.versions, estimate.whole) == (
        done.chunks,
        done.versions,
        done.whole,
    )
    assert estimate.frees_bytes == done.frees_bytes
    assert abs(estimate.cost_bytes - done.cost_bytes) <= 0.2 * done.bytes_after


def test_without_repack_the_bases_stay(store: Store, tmp_path: Path) -> None:
    series(store, tmp_path, versions=3)
    for number in (1, 2):
        store.delete(f"run@{number}")
    report = store.gc(grace=0, repack=False)
    assert report.repack is None
    # Most chunks of run@1 and run@2 are bases of run@3's: they stay.
    stats = store.stats()
    assert stats.delta_base_bytes > stats.version_bytes / 2


def test_a_version_deleted_during_a_repack_is_left_alone(store: Store, tmp_path: Path) -> None:
    paths = series(store, tmp_path, versions=5)
    for number in (1, 3):
        store.delete(f"run@{number}")
    found = plan(store.refs)
    assert {ref.number for ref, _ in found.versions} >= {2, 4}
    store.delete("run@4")  # after the plan, before the swap
    report = Repacker(store.backend, store._tensor_codec()).run(found)
    assert report.versions == len(found.versions) - 1
    assert store.refs.read_version("run", 4).deleted
    assert store.verify(deep=True).ok
    store.gc(grace=0)
    assert store.verify(deep=True).ok
    restores(store, tmp_path, {"run@2": paths[1], "run@5": paths[4]})


def test_two_repacks_of_one_plan_agree(store: Store, tmp_path: Path) -> None:
    paths = series(store, tmp_path, versions=6)
    for number in (1, 2, 4):
        store.delete(f"run@{number}")
    first, second = plan(store.refs), plan(store.refs)
    codec_ = store._tensor_codec()
    Repacker(store.backend, codec_).run(first)
    manifests = {n: store.resolve(f"run@{n}").manifest_id for n in (3, 5, 6)}
    # The second finds the chunks stored again already, and the same manifests named.
    late = Repacker(store.backend, codec_).run(second)
    assert late.bytes_after == late.bytes_before
    assert {n: store.resolve(f"run@{n}").manifest_id for n in (3, 5, 6)} == manifests
    assert store.verify(deep=True).ok
    store.gc(grace=0)
    assert store.verify(deep=True).ok
    restores(store, tmp_path, {f"run@{n}": paths[n - 1] for n in (3, 5, 6)})


def test_a_chain_recorded_before_a_repack_is_repacked_later(tmp_path: Path) -> None:
    """A put that learned chains from a manifest a repack was replacing records more bases
    than its chunks need, in another order than any chunk has them: safe, and a later
    repack reads the chains from the chunks, not from that record."""
    store = Store.init(tmp_path / "store", chunker=PARAMS, max_delta_reads=8)
    series(store, tmp_path, versions=4)
    for number in (1, 2, 3):  # the roots too: their chains are worth storing again
        store.delete(f"run@{number}")
    found = plan(store.refs)
    after = save(tmp_path / "v5.safetensors", step(weights(21), seed=77))
    store.put(after, "run")  # run@5, a delta of run@4 as it was before the repack
    Repacker(store.backend, store._tensor_codec()).run(found)
    # run@5 lists bases its chunks no longer need, but every one they need.
    stored = Chains(store.chunks)
    recorded = entry_chunks(store, "run@5")
    assert all(set(stored.of(c.digest)) <= set(c.bases) for c in recorded)
    assert any(set(stored.of(c.digest)) < set(c.bases) for c in recorded)
    assert store.verify(deep=True).ok
    store.delete("run@4")
    store.gc(grace=0)
    assert store.verify(deep=True).ok
    assert stored_keys(store.backend, layout.CHUNKS) == needed_chunks(store)
    restores(store, tmp_path, {"run@5": after})


def test_a_put_after_a_repack_reuses_its_chunks(store: Store, tmp_path: Path) -> None:
    paths = series(store, tmp_path, versions=4)
    for number in (1, 2):
        store.delete(f"run@{number}")
    store.gc(grace=0)
    # The same file again, and the next step: deltas of the repacked version.
    store.put(paths[3], "copy")
    store.put(save(tmp_path / "next.safetensors", step(weights(21), seed=9)), "run")
    store.delete("run@3")
    store.gc(grace=0)
    assert store.verify(deep=True).ok
    restores(store, tmp_path, {"run@4": paths[3], "copy": paths[3]})


def test_an_xor_store_repacks_with_xor(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store", chunker=PARAMS, delta_method="xor")
    paths = series(store, tmp_path, versions=5)
    for number in (1, 2, 4):
        store.delete(f"run@{number}")
    store.gc(grace=0)
    for digest, _ in store.chunks.list_chunks():
        assert store.backend.get(layout.chunk_key(digest))[3] != codec.Codec.DIFFERENCE
    restores(store, tmp_path, {"run@3": paths[2], "run@5": paths[4]})


def test_prune_dry_run_reports_the_repack(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    with Store.init(store_dir, chunker=PARAMS) as store:
        series(store, tmp_path, versions=6)
    args = ("prune", "run", "--keep-best", "2", "--metric", "loss", "--min")
    data = run_json(*args, "--dry-run", store=store_dir)
    repack = data["repack"]
    assert repack["dry_run"]
    assert repack["chunks"] > 0
    assert repack["frees_bytes"] > 0
    text = ok(run_cas(*args, "--dry-run", store=store_dir)).stdout
    assert "repack:        the next gc stores" in text
    ok(run_cas(*args, store=store_dir))
    gc = run_json("gc", "--grace", "0", store=store_dir)
    assert gc["repack"]["chunks"] == repack["chunks"]
    assert gc["repack"]["frees_bytes"] == repack["frees_bytes"]
    ok(run_cas("verify", "--deep", store=store_dir))
    with Store.open(store_dir) as store:
        assert stored_keys(store.backend, layout.CHUNKS) == needed_chunks(store)


def test_gc_cli_no_repack(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    with Store.init(store_dir, chunker=PARAMS) as store:
        series(store, tmp_path, versions=3)
        store.delete("run@1")
        store.delete("run@2")
    dry = ok(run_cas("gc", "--grace", "0", "--dry-run", store=store_dir)).stdout
    assert "repack:        would store" in dry
    kept = run_json("gc", "--grace", "0", "--no-repack", store=store_dir)
    assert kept["repack"] is None
    assert run_json("stats", store=store_dir)["delta_base_bytes"] > 0
    done = ok(run_cas("gc", "--grace", "0", store=store_dir)).stdout
    assert "repack:        stored" in done


# -- a crash at any moment --------------------------------------------------------------


def test_a_repack_stopped_at_any_write_damages_nothing(tmp_path: Path) -> None:
    """Fail the n-th write of a gc (put, touch or delete), for every n: each time every
    kept version still restores, verify --deep passes, and a later gc finishes the work."""
    template = tmp_path / "template"
    store = Store.init(template, chunker=PARAMS)
    paths = series(store, tmp_path, versions=6)
    for number in (1, 2, 4):
        store.delete(f"run@{number}")
    kept = {f"run@{n}": paths[n - 1] for n in (3, 5, 6)}
    store.close()
    clean = shutil.copytree(template, tmp_path / "clean")
    with Store.open(clean) as reference:
        reference.gc(grace=0)
        final = stored_bytes(reference)
    writes = {"put", "touch", "delete"}
    failed_at: set[str] = set()
    step_at = 0
    while True:
        work = tmp_path / f"crash-{step_at}"
        shutil.copytree(template, work)
        inner = open_backend(str(work))
        faulty = FaultyBackend(inner, fail_on=writes, after=step_at, transient=False)
        # One worker: the writes come in one order, and the n-th is the same every time.
        crashing = Store(faulty, load_config(inner, create=False), workers=1)
        try:
            crashing.gc(grace=0)
        except BackendError as err:
            failed_at.add(str(err).split(" on ")[0].split()[-1].split("/")[0])
        if not faulty.failures:
            break  # no write left to fail: every moment was tried
        with Store.open(work) as after:
            report = after.verify(deep=True)
            assert report.ok, (step_at, report.damaged)
            restores(after, tmp_path, kept)
            after.gc(grace=0)
            assert after.verify(deep=True).ok
            # What the stopped gc stored again is paid for: the next one frees at
            # least what an uninterrupted one does.
            assert stored_bytes(after) <= final, step_at
        shutil.rmtree(work)
        step_at += 1
    # The repack's writes (chunks stored again, new manifests, swapped refs) and the
    # collection's were all among those failed.
    assert {"chunks", "manifests", "refs", "gc"} <= failed_at, failed_at
