"""Tensor deltas over time: what stats, prune and gc say and free when versions in
a delta chain are deleted, and how chains re-base (helpers from test_tensors)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ok, run_cas, run_json
from test_tensors import (
    PARAMS,
    entry_chunks,
    fine_tune,
    save,
    step,
    store,
    weights,
)

from cas.chunks import _codec as codec
from cas.ml.prune import Policy, prune
from cas.repository import _layout as layout
from cas.store import Store

__all__ = ["store"]  # the fixture, shared with test_tensors


def test_stats_count_delta_bases_as_live(store: Store, tmp_path: Path) -> None:
    fine_tune(store, tmp_path, versions=3)
    store.delete("ft@1")
    needed = {
        digest.raw
        for number in (2, 3)
        for chunk in entry_chunks(store, f"ft@{number}")
        for digest in (chunk.digest, *chunk.bases)
    }
    live_manifests = {store.resolve(f"ft@{number}").manifest_id.hex for number in (2, 3)}
    stats = store.stats()
    assert stats.referenced_chunks == len(needed)
    assert stats.live_bytes == sum(
        info.size for digest, info in store.chunks.list_chunks() if digest.raw in needed
    ) + sum(
        info.size
        for info in store.backend.list_objects("manifests/")
        if info.key.rpartition("/")[2] in live_manifests
    )


def test_stats_after_deleting_a_delta_parent_say_what_its_bases_hold(
    store: Store, tmp_path: Path
) -> None:
    fine_tune(store, tmp_path, versions=2)
    before = store.stats()
    assert (before.delta_base_bytes, before.repack_frees_bytes) == (0, 0)
    store.delete("ft@1")
    store.gc(grace=0, repack=False)
    stats = store.stats()
    # ft@2's own chunks: nothing is counted twice, the dedup ratio is not below 1.
    assert stats.unique_bytes == stats.logical_bytes == (tmp_path / "v2.safetensors").stat().st_size
    assert stats.dedup_ratio == 1.0
    own = {c.digest.raw for c in entry_chunks(store, "ft@2")}
    sizes = {digest.raw: info.size for digest, info in store.chunks.list_chunks()}
    assert stats.delta_base_bytes == sum(size for raw, size in sizes.items() if raw not in own)
    assert stats.version_bytes + stats.delta_base_bytes == stats.live_bytes
    assert stats.live_bytes == stats.stored_bytes  # collected: nothing else is left
    # Whole, ft@2 would cost about what ft@1 did: repacking frees about its deltas.
    deltas = sum(sizes[c.digest.raw] for c in entry_chunks(store, "ft@2") if c.bases)
    assert 0.5 * deltas < stats.repack_frees_bytes < 1.5 * deltas
    text = ok(run_cas("stats", store=tmp_path / "store")).stdout
    assert "delta bases:" in text
    assert "`cas gc` repacks" in text
    assert "dedup ratio:       1.00x" in text
    # A gc that repacks frees them.
    store.gc(grace=0)
    assert store.stats().delta_base_bytes == 0


def test_prune_dry_run_reports_what_gc_then_frees(tmp_path: Path) -> None:
    # A fine-tuned copy of bf16 weights: every weight changed a little, so each
    # chunk of w@2 is a delta against w@1's. Deleting w@1 frees its manifest only,
    # until gc's repack stores w@2's chunks whole: then w@1's chunks go too.
    store_dir = tmp_path / "store"
    Store.init(store_dir, chunker=PARAMS).close()
    arrays = weights(3)
    first = save(tmp_path / "w1.safetensors", arrays)
    second = save(tmp_path / "w2.safetensors", step(arrays, seed=1))
    ok(run_cas("put", first, "w", store=store_dir))
    ok(run_cas("put", second, "w", "--parent", "w@1", store=store_dir))
    with Store.open(store_dir) as store:
        bases = {b for c in entry_chunks(store, "w@2") for b in c.bases}
        assert len(bases) > 1
        assert bases <= {c.digest for c in entry_chunks(store, "w@1")}
    dry = run_json("prune", "w", "--keep-last", "1", "--dry-run", store=store_dir)
    ok(run_cas("prune", "w", "--keep-last", "1", store=store_dir))
    assert dry["reclaimable_chunks"] == 0
    assert dry["reclaimable_bytes"] == 0
    repack = dry["repack"]
    assert repack["chunks"] > 0
    collected = run_json("gc", "--grace", "0", store=store_dir)
    assert (collected["repack"]["chunks"], collected["repack"]["frees_bytes"]) == (
        repack["chunks"],
        repack["frees_bytes"],
    )
    # w@1's manifest, and w@2's from before the repack.
    assert collected["deleted_manifests"] == 2
    assert collected["deleted_chunks"] >= len(bases)
    assert collected["bytes_reclaimed"] > dry["reclaimable_stored_bytes"] + repack["frees_bytes"]
    ok(run_cas("verify", "--deep", store=store_dir))


@pytest.mark.parametrize("kept", [{3}, {1, 3}, {1, 2}, {2}])
def test_prune_of_a_delta_chain_reclaims_what_it_reports(
    store: Store, tmp_path: Path, kept: set[int]
) -> None:
    fine_tune(store, tmp_path, versions=3)
    for number in kept:
        store.tag(f"ft@{number}", f"keep{number}")
    policy = Policy(keep_tagged=True)
    dry = prune(store, "ft", policy, dry_run=True)
    done = prune(store, "ft", policy)
    assert sorted(v.number for v in done.kept) == sorted(kept)
    assert (done.reclaimable_bytes, done.reclaimable_chunks) == (
        dry.reclaimable_bytes,
        dry.reclaimable_chunks,
    )
    collected = store.gc(grace=0, repack=False)  # what prune counts: no chunk stored again
    assert collected.deleted_chunks == dry.reclaimable_chunks
    assert collected.bytes_reclaimed == dry.reclaimable_stored_bytes
    assert collected.deleted_manifests == 3 - len(kept)
    assert store.verify(deep=True).ok


def test_cli_rm_parent_gc_grace_0_child_restores(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    Store.init(store_dir, chunker=PARAMS).close()
    arrays = weights(9)
    for number in (1, 2):
        path = save(tmp_path / f"v{number}.safetensors", arrays)
        parent = ["--parent", "ft@1"] if number == 2 else []
        ok(run_cas("put", path, "ft", *parent, store=store_dir))
        arrays = step(arrays, seed=number)
    with Store.open(store_dir) as store:
        assert any(c.bases for c in entry_chunks(store, "ft@2"))
    ok(run_cas("rm", "ft@1", store=store_dir))
    ok(run_cas("gc", "--grace", "0", store=store_dir))
    ok(run_cas("get", "ft@2", tmp_path / "out", store=store_dir))
    assert (tmp_path / "out").read_bytes() == (tmp_path / "v2.safetensors").read_bytes()
    ok(run_cas("verify", "--deep", store=store_dir))


def test_chunks_re_base_on_staggered_versions(tmp_path: Path) -> None:
    # If every chunk reached the chain limit in the same version, that version
    # would store every chunk against a distant root at once.
    store = Store.init(tmp_path / "store", chunker=PARAMS, max_delta_reads=4)
    fine_tune(store, tmp_path, versions=10)
    rebased_per_version = []
    previous = {c.digest: c for c in entry_chunks(store, "ft@1")}
    for number in range(2, 11):
        chunks = entry_chunks(store, f"ft@{number}")
        deltas = [c for c in chunks if c.bases]
        # Re-based: the base is not a chunk of the parent version.
        rebased = [c for c in deltas if c.bases[0] not in previous]
        rebased_per_version.append((len(rebased), len(deltas)))
        previous = {c.digest: c for c in chunks}
    assert any(count for count, _ in rebased_per_version)
    assert all(count < total for count, total in rebased_per_version), rebased_per_version


def test_a_lost_delta_chunk_comes_back_whole_when_put_again(store: Store, tmp_path: Path) -> None:
    # ft@2 names the chunk with its old chain; the copy put back must decode
    # under that record alone, so it has no base at all.
    paths = fine_tune(store, tmp_path, versions=2)
    lost = next(c for c in entry_chunks(store, "ft@2") if c.bases)
    (tmp_path / "store" / layout.chunk_key(lost.digest)).unlink()
    assert not store.verify().ok
    store.put(paths[1], "ft", parents=["ft@2"])
    blob = store.backend.get(layout.chunk_key(lost.digest))
    assert codec.delta_base(blob) is None
    store.delete("ft@3")
    store.gc(grace=0)
    assert store.verify(deep=True).ok
    store.get("ft@2", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == paths[1].read_bytes()
