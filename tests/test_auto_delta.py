"""Deltas without asking: a new version of a key is stored against the key's latest version.

A delta base is a storage choice, never lineage; a named parent still wins;
``delta=False`` (``--no-delta``) and the store setting turn it off; ``cas
show`` and ``cas stats`` say how many chunks are deltas and of what.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import ok, run_cas, run_json
from test_tensors import PARAMS, entry_chunks, save, step, stored_bytes, weights

from cas.chunks import _codec as codec
from cas.errors import InvalidInputError
from cas.ml.checkpoint import CheckpointManager
from cas.repository import _layout as layout
from cas.store import Store
from cas.units import counted


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.init(tmp_path / "store", chunker=PARAMS)


def series(
    store: Store,
    tmp_path: Path,
    versions: int,
    key: str = "run",
    dtype: str = "BF16",
    **put: object,
) -> list[Path]:
    """A fine-tuning run put without parents: every weight moves a little each version."""
    arrays = weights(11)
    paths = []
    for number in range(1, versions + 1):
        path = save(tmp_path / f"{key.replace('/', '_')}-{number}.safetensors", arrays, dtype)
        store.put(path, key, **put)  # type: ignore[arg-type]
        paths.append(path)
        arrays = step(arrays, seed=100 + number)
    return paths


def manifest_of(store: Store, ref: str) -> dict[str, object]:
    version = store.resolve(ref)
    assert version.manifest_id is not None
    return store.load_manifest(version.manifest_id).to_dict()


def codecs(store: Store, ref: str) -> set[int]:
    return {store.backend.get(layout.chunk_key(c.digest))[3] for c in entry_chunks(store, ref)}


def test_a_new_version_is_a_delta_of_the_latest_without_a_parent(
    store: Store, tmp_path: Path
) -> None:
    paths = series(store, tmp_path, versions=3)
    first = {c.digest for c in entry_chunks(store, "run@1")}
    for number in (2, 3):
        chunks = entry_chunks(store, f"run@{number}")
        deltas = [c for c in chunks if c.bases]
        # All but the header and the tiniest; from version 3 on, a chunk may
        # also start its chains again, stored whole (a root renewed).
        assert len(deltas) >= len(chunks) - number
        manifest = manifest_of(store, f"run@{number}")
        # A storage choice, not lineage: no parent is recorded.
        assert manifest["parents"] == []
        assert manifest["delta_base"] == {"key": "run", "version": number - 1}
        assert store.show(f"run@{number}").version.parents == ()
    assert all(c.bases[-1] in first for c in entry_chunks(store, "run@3") if c.bases)
    # A default store codes them as integer differences (scaled where that pays).
    assert codecs(store, "run@3") & {codec.Codec.DIFFERENCE, codec.Codec.SCALED}
    assert codec.Codec.DELTA not in codecs(store, "run@3")
    for number, path in enumerate(paths, 1):
        store.get(f"run@{number}", tmp_path / f"out{number}")
        assert (tmp_path / f"out{number}").read_bytes() == path.read_bytes()
    assert store.verify(deep=True).ok


def test_deltas_store_a_fine_tuning_step_in_a_fraction_of_its_size(
    store: Store, tmp_path: Path
) -> None:
    arrays = weights(12)
    added = []
    for number in range(1, 5):
        path = save(tmp_path / f"v{number}.safetensors", arrays)
        before = stored_bytes(store)
        store.put(path, "run")
        added.append((stored_bytes(store) - before) / path.stat().st_size)
        arrays = step(arrays, seed=number)
    assert added[0] > 0.6
    assert all(ratio < 0.3 for ratio in added[1:]), added


def test_a_named_parent_wins_over_the_latest_version(store: Store, tmp_path: Path) -> None:
    base = weights(13)
    store.put(save(tmp_path / "base.safetensors", base), "base")
    # The key's latest version is unrelated to what is put next.
    store.put(save(tmp_path / "other.safetensors", weights(14)), "run")
    store.put(save(tmp_path / "tuned.safetensors", step(base, seed=1)), "run", parents=["base@1"])
    manifest = manifest_of(store, "run@2")
    assert manifest["delta_base"] == {"key": "base", "version": 1}
    base_chunks = {c.digest for c in entry_chunks(store, "base@1")}
    deltas = [c for c in entry_chunks(store, "run@2") if c.bases]
    assert deltas
    assert all(c.bases[0] in base_chunks for c in deltas)


def test_no_delta_stores_every_chunk_whole(store: Store, tmp_path: Path) -> None:
    series(store, tmp_path, versions=2, delta=False)
    assert not any(c.bases for c in entry_chunks(store, "run@2"))
    assert "delta_base" not in manifest_of(store, "run@2")
    # Also against a named parent.
    store.put(tmp_path / "run-2.safetensors", "other", parents=["run@1"], delta=False)
    assert not any(c.bases for c in entry_chunks(store, "other"))
    with pytest.raises(InvalidInputError, match="delta must be"):
        store.put(tmp_path / "run-2.safetensors", "other", delta="no")  # type: ignore[arg-type]


def test_the_store_setting_leaves_deltas_to_named_parents(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store", chunker=PARAMS, auto_delta=False)
    assert json.loads(store.config.to_bytes())["delta"]["auto"] is False
    assert Store.open(tmp_path / "store").config.auto_delta is False
    paths = series(store, tmp_path, versions=2)
    assert not any(c.bases for c in entry_chunks(store, "run@2"))
    store.put(paths[1], "tuned", parents=["run@1"])  # dedups: run@2's chunks, whole
    tuned = save(tmp_path / "tuned.safetensors", step(weights(11), seed=7))
    store.put(tuned, "tuned", parents=["run@1"])
    assert manifest_of(store, "tuned@2")["delta_base"] == {"key": "run", "version": 1}
    # A put can still ask for a delta of the latest version.
    store.put(save(tmp_path / "x.safetensors", step(weights(11), seed=9)), "run", delta=True)
    assert manifest_of(store, "run@3")["delta_base"] == {"key": "run", "version": 2}


def test_a_delta_that_saves_too_little_is_not_kept(store: Store, tmp_path: Path) -> None:
    # Unrelated weights under the same key: a delta would cost a read and save nothing.
    store.put(save(tmp_path / "a.safetensors", weights(15)), "run")
    store.put(save(tmp_path / "b.safetensors", weights(16)), "run")
    assert not any(c.bases for c in entry_chunks(store, "run@2"))
    assert "delta_base" not in manifest_of(store, "run@2")


@pytest.mark.parametrize("dtype", ["F32", "F16"])
def test_other_float_types_are_deltas_too(store: Store, tmp_path: Path, dtype: str) -> None:
    paths = series(store, tmp_path, versions=3, dtype=dtype)
    assert any(c.bases for c in entry_chunks(store, "run@3"))
    store.get("run@3", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == paths[-1].read_bytes()


def test_chains_of_automatic_deltas_stay_within_max_reads(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store", chunker=PARAMS, max_delta_reads=3)
    paths = series(store, tmp_path, versions=9)
    for number in range(1, 10):
        assert all(len(c.bases) + 1 <= 3 for c in entry_chunks(store, f"run@{number}"))
    assert store.show("run@9").storage.max_reads <= 3
    store.get("run@9", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == paths[-1].read_bytes()


def test_a_renamed_single_file_is_still_a_delta(store: Store, tmp_path: Path) -> None:
    arrays = weights(17)
    store.put(save(tmp_path / "step-1000.safetensors", arrays), "run")
    store.put(save(tmp_path / "step-2000.safetensors", step(arrays, seed=3)), "run")
    assert any(c.bases for c in entry_chunks(store, "run@2"))


def test_an_xor_store_never_writes_difference_deltas(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store", chunker=PARAMS, delta_method="xor")
    assert store.config.format == 1
    series(store, tmp_path, versions=3)
    assert codec.Codec.DELTA in codecs(store, "run@3")
    for digest, _ in store.chunks.list_chunks():
        assert store.backend.get(layout.chunk_key(digest))[3] != codec.Codec.DIFFERENCE


def test_show_and_stats_say_how_many_chunks_are_deltas(store: Store, tmp_path: Path) -> None:
    series(store, tmp_path, versions=3)
    storage = store.show("run@3").storage
    chunks = entry_chunks(store, "run@3")
    assert storage.chunks == len({c.digest for c in chunks})
    assert storage.delta_chunks == len({c.digest for c in chunks if c.bases})
    assert storage.delta_base == "run@2"
    assert storage.max_reads == 1 + max(len(c.bases) for c in chunks)
    assert store.show("run@1").storage.delta_chunks == 0
    stats = store.stats()
    all_chunks = [c for n in (1, 2, 3) for c in entry_chunks(store, f"run@{n}")]
    deltas = {c.digest.raw for c in all_chunks if c.bases}
    assert stats.delta_chunks == len(deltas)
    assert stats.base_chunks == len({b.raw for c in all_chunks for b in c.bases})
    assert 0 < stats.delta_bytes < stats.stored_bytes
    assert stats.delta_bytes == sum(
        info.size for digest, info in store.chunks.list_chunks() if digest.raw in deltas
    )


def test_cli_put_no_delta_and_show(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    Store.init(store_dir, chunker=PARAMS).close()
    arrays = weights(18)
    for number in (1, 2, 3):
        path = save(tmp_path / f"v{number}.safetensors", arrays)
        flags = ["--no-delta"] if number == 3 else []
        ok(run_cas("put", path, "run", *flags, store=store_dir))
        arrays = step(arrays, seed=number)
    shown = ok(run_cas("show", "run@2", store=store_dir)).stdout
    assert "chunks are deltas of run@1 (rebuilt from at most 2 chunk reads)" in shown
    data = run_json("show", "run@2", store=store_dir)
    assert data["parents"] == []
    assert data["storage"]["delta_base"] == "run@1"
    assert data["storage"]["delta_chunks"] > 0
    assert run_json("show", "run@3", store=store_dir)["storage"]["delta_chunks"] == 0
    assert "storage:" not in ok(run_cas("show", "run@3", store=store_dir)).stdout
    stats = ok(run_cas("stats", store=store_dir)).stdout
    counts = run_json("stats", store=store_dir)
    assert counts["delta_chunks"] > 0
    deltas = next(line for line in stats.splitlines() if line.startswith("deltas:"))
    assert f" {counted(counts['delta_chunks'], 'chunk')}," in deltas
    assert deltas.endswith(f"coded against {counted(counts['base_chunks'], 'chunk')}")


def test_cli_init_no_auto_delta(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    ok(run_cas("init", "--no-auto-delta", store=store_dir))
    config = json.loads((store_dir / "config").read_bytes())
    assert config["delta"] == {"auto": False, "method": "scaled"}
    arrays = weights(19)
    for number in (1, 2):
        path = save(tmp_path / f"v{number}.safetensors", arrays)
        ok(run_cas("put", path, "run", store=store_dir))
        arrays = step(arrays, seed=number)
    with Store.open(store_dir) as store:
        assert store.show("run@2").storage.delta_chunks == 0


def test_a_config_with_a_bad_delta_setting_is_refused(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store")
    config = json.loads(store.config.to_bytes())
    (tmp_path / "store" / "config").write_text(json.dumps({**config, "delta": {"auto": "yes"}}))
    result = run_cas("ls", store=tmp_path / "store")
    assert result.returncode != 0
    assert "delta.auto" in result.stderr
    (tmp_path / "store" / "config").write_text(
        json.dumps({**config, "format": 2, "delta": {"method": "difference"}})
    )
    result = run_cas("ls", store=tmp_path / "store")
    assert "needs store format 3" in result.stderr
    (tmp_path / "store" / "config").write_text(
        json.dumps({**config, "format": 3, "delta": {"method": "scaled"}})
    )
    result = run_cas("ls", store=tmp_path / "store")
    assert "delta method 'scaled' needs store format 4" in result.stderr
    with pytest.raises(InvalidInputError, match="delta method 'rle'"):
        Store.init(tmp_path / "other", delta_method="rle")
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("delta", [None, False])
def test_checkpoint_manager_deltas(store: Store, delta: bool | None) -> None:
    manager = CheckpointManager(store, "tiny", framework="numpy", delta=delta)
    arrays = weights(20)
    for number in (1, 2, 3):
        saved = arrays
        manager.save(saved, step=number * 100, metrics={"loss": 1.0 / number})
        arrays = step(arrays, seed=number)
    storage = store.show(manager.key).storage
    if delta is None:
        assert storage.delta_chunks > 0
        assert storage.delta_base == f"{manager.key}@2"
    else:
        assert storage.delta_chunks == 0
    latest = manager.load_latest()
    assert latest is not None
    assert latest.state.keys() == saved.keys()
    for name, array in latest.state.items():
        np.testing.assert_array_equal(array, saved[name])


@pytest.mark.parametrize("delta", [None, False])
def test_the_integrations_chain_passes_delta_on(
    store: Store, tmp_path: Path, delta: bool | None
) -> None:
    from cas.integrations._common import Chain

    chain = Chain(store, "run", delta=delta)
    arrays = weights(22)
    for number in (1, 2):
        chain.put(save(tmp_path / f"v{number}.safetensors", arrays))
        arrays = step(arrays, seed=number)
    deltas = store.show("run@2").storage.delta_chunks
    assert (deltas > 0) == (delta is None)
    assert store.show("run@2").version.parents == ("run@1",)


def test_a_restore_hints_the_bases_of_a_delta_chunk_with_it(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    series(store, tmp_path, versions=3)
    hinted: list[bytes] = []
    monkeypatch.setattr(store.chunks, "prefetch", lambda ds: hinted.extend(d.raw for d in ds))
    store.get("run@3", tmp_path / "out")
    chunks = entry_chunks(store, "run@3")
    assert any(c.bases for c in chunks)
    assert hinted == [d.raw for c in chunks for d in (c.digest, *c.bases)]
