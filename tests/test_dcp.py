"""torch.distributed.checkpoint into a cas store: real multi-process jobs on CPU with gloo.

Every rank is a process of a real process group (see dcp_ranks.py), models
are FSDP2-sharded (DTensor parameters and optimizer state), and what is
loaded is compared with what was saved bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dcp_ranks  # noqa: E402
from dcp_ranks import RankPool, check, differences  # noqa: E402
from helpers import run_cas  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402
from torch.distributed.checkpoint.filesystem import FileSystemReader  # noqa: E402
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # noqa: E402
from torch.distributed.checkpoint.state_dict_loader import (  # noqa: E402
    _load_state_dict_from_keys,
    load,
)
from torch.distributed.checkpoint.state_dict_saver import save  # noqa: E402

from cas.chunks import _codec as codec  # noqa: E402
from cas.chunks import _floatcodec as floatcodec  # noqa: E402
from cas.chunks._chunking import ChunkerParams  # noqa: E402
from cas.errors import (  # noqa: E402
    ConfigurationError,
    CorruptObjectError,
    InvalidInputError,
    InvalidKeyError,
    RefNotFoundError,
)
from cas.integrations.dcp import CasReader, CasWriter  # noqa: E402
from cas.ml.diff import diff  # noqa: E402
from cas.repository import _layout as layout  # noqa: E402
from cas.store import INDEX_PATH, Store  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is (disabled, )?unavailable or uninitialized:UserWarning"
)
KiB = 1024
#: Small chunks, so that the tiny models' tensors get chunks (and codecs) of their own.
PARAMS = ChunkerParams.from_average(16 * KiB)
KEY = "runs/fsdp"


@pytest.fixture(scope="module")
def ranks() -> Iterator[RankPool]:
    pool = RankPool(4)
    yield pool
    pool.close()


def new_store(location: str) -> Store:
    return Store.init(location, chunker=PARAMS)


def chunk_objects(store: Store) -> set[str]:
    return {info.key for info in store.backend.list_objects(layout.CHUNKS)}


@pytest.fixture(scope="module")
def saved(ranks: RankPool, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A model and its optimizer, FSDP-trained and saved on 4 ranks (read-only for tests)."""
    root = tmp_path_factory.mktemp("saved")
    location, expected = str(root / "store"), root / "expected.pt"
    new_store(location)
    refs = check(ranks.run(4, dcp_ranks.save_trained, location, KEY, str(expected)))
    assert refs == [f"{KEY}@1"] * 4  # every rank learns the version from dcp.save
    return location, expected


def whole(expected: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(expected, weights_only=True)
    return state


# -- saving on 4, loading on 2 and on 1 -----------------------------------------------------


@pytest.mark.parametrize("world", [2, 1])
def test_saved_on_four_ranks_loads_bit_for_bit_on_fewer(
    ranks: RankPool, saved: tuple[str, Path], world: int
) -> None:
    location, expected = saved
    outcomes = ranks.run(world, dcp_ranks.load_trained, location, f"{KEY}@1", str(expected))
    assert check(outcomes) == [[]] * world


def test_saved_on_four_ranks_loads_whole_and_in_part_in_one_process(
    saved: tuple[str, Path],
) -> None:
    location, expected = saved
    state = whole(expected)
    loaded = _load_state_dict_from_keys(storage_reader=CasReader(location, KEY))
    assert differences(state["model"], loaded["model"]) == []
    assert differences(state["optim"]["state"], loaded["optim"]["state"]) == []
    width = dcp_ranks.WIDTH
    part = {"model": {"2.weight": torch.zeros(width, width)}}
    load(part, storage_reader=CasReader(location, f"{KEY}:fsdp"), no_dist=True)
    assert torch.equal(part["model"]["2.weight"], state["model"]["2.weight"])


def test_restored_folder_loads_with_dcp_own_reader_and_tools(
    saved: tuple[str, Path], tmp_path: Path
) -> None:
    location, expected = saved
    state = whole(expected)
    result = run_cas("get", KEY, tmp_path / "ckpt", store=location)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == sorted([".metadata", INDEX_PATH] + [f"__{r}_0.distcp" for r in range(4)])
    model = {name: torch.zeros_like(t) for name, t in state["model"].items()}
    load({"model": model}, storage_reader=FileSystemReader(tmp_path / "ckpt"), no_dist=True)
    assert differences(state["model"], model) == []
    dcp_to_torch_save(tmp_path / "ckpt", tmp_path / "whole.pt")
    converted = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert differences(state["model"], converted["model"]) == []


def test_one_tensor_reads_by_its_name_from_its_shards(saved: tuple[str, Path]) -> None:
    location, expected = saved
    state = whole(expected)
    store = Store.open(location)
    for name in ("model.0.weight", "model.2.bias", "optim.state.4.weight.exp_avg"):
        path = name.split(".")
        tensor = state[path[0]] if path[0] == "model" else state["optim"]["state"]
        if path[0] == "model":
            tensor = tensor[".".join(path[1:])]
        else:
            tensor = tensor[".".join(path[2:4])][path[4]]
        np.testing.assert_array_equal(store.read_tensor(KEY, None, name), tensor.numpy())
    index = store.open_version(KEY).tensors
    assert index is not None
    assert len(index.tensor("model.0.weight").shards) == 4


def test_the_checkpoint_is_an_ordinary_version(saved: tuple[str, Path]) -> None:
    location, _ = saved
    log = run_cas("log", KEY, "--json", store=location)
    assert log.returncode == 0, log.stderr
    (version,) = json.loads(log.stdout)
    assert version["ref"] == f"{KEY}@1"
    assert version["metrics"] == {"loss": 0.5}
    assert version["tags"] == ["fsdp"]
    found = run_cas("find", "--where", "loss<1", store=location)
    assert f"{KEY}@1" in found.stdout
    show = run_cas("show", f"{KEY}:fsdp", store=location)
    assert "__3_0.distcp" in show.stdout
    verify = run_cas("verify", "--deep", store=location)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_one_process_without_a_process_group_saves_and_loads(tmp_path: Path) -> None:
    store = new_store(str(tmp_path / "store"))
    state = {"model": dcp_ranks.make_model(3).state_dict(), "extra": {"step": 7, "note": "warm"}}
    writer = CasWriter(store, "runs/solo", tags=["first"])
    metadata = save(state, storage_writer=writer, no_dist=True)
    assert writer.version is not None
    assert metadata.storage_meta is not None
    assert writer.version.ref == metadata.storage_meta.checkpoint_id == "runs/solo@1"
    target = {"model": dcp_ranks.make_model(4).state_dict(), "extra": {"step": 0, "note": ""}}
    load(target, storage_reader=CasReader(store, "runs/solo:first"), no_dist=True)
    assert differences(state, target) == []
    with pytest.raises(InvalidInputError, match="use_collectives=True"):
        save(state, storage_writer=CasWriter(store, "runs/solo"), use_collectives=False)
    assert [v.ref for v in store.log("runs/solo")] == ["runs/solo@1"]


def test_a_chunk_decoded_straight_into_a_tensor_is_still_verified(tmp_path: Path) -> None:
    store = new_store(str(tmp_path / "store"))
    state = {"model": dcp_ranks.make_model(3).state_dict()}
    save(state, storage_writer=CasWriter(store, "runs/solo"), no_dist=True)
    files = store.open_version("runs/solo")
    grouped = [
        (chunk, blob)
        for chunk in files.files["__0_0.distcp"].chunks
        if (blob := store.backend.get(layout.chunk_key(chunk.digest)))[3] == codec.Codec.GROUPED
    ]
    chunk, blob = grouped[0]
    # Well formed, the right length, other elements: only the hash can tell.
    other = np.frombuffer(codec.decode(blob), dtype=np.uint8).copy()
    other[:4] ^= 0xFF
    key = layout.chunk_key(chunk.digest)
    store.backend.delete([key])
    store.backend.put(key, codec.encode_grouped(other, 4, floatcodec.Layout.FP32))
    target = {"model": dcp_ranks.make_model(4).state_dict()}
    with pytest.raises(CheckpointException) as caught:
        load(target, storage_reader=CasReader(store, "runs/solo"), no_dist=True)
    (failure, _), *_ = caught.value.failures.values()
    assert isinstance(failure, CorruptObjectError)
    assert "does not match its hash" in str(failure)


def test_ranks_that_resolved_different_versions_do_not_load() -> None:
    from torch.distributed.checkpoint.planner import LoadPlan

    reader = CasReader("unused", "runs/a")
    plans = [LoadPlan([], storage_data="runs/a@1"), LoadPlan([], storage_data="runs/a@2")]
    with pytest.raises(InvalidInputError, match=r"different versions \(runs/a@1, runs/a@2\)"):
        reader.prepare_global_plan(plans)
    assert reader.prepare_global_plan(plans[:1]) == plans[:1]


# -- a second save: only what changed ----------------------------------------------------


def test_a_save_where_some_layers_moved_stores_only_their_chunks(
    ranks: RankPool, tmp_path: Path
) -> None:
    location = str(tmp_path / "store")
    store = new_store(location)
    (first,) = set(check(ranks.run(2, dcp_ranks.save_layers, location, "runs/ft", (), ())))
    before = chunk_objects(store)
    second = set(check(ranks.run(2, dcp_ranks.save_layers, location, "runs/ft", (4,), (first,))))
    assert second == {"runs/ft@2"}
    added = chunk_objects(store) - before
    report = diff(store, first, "runs/ft@2")
    changed = {
        name.split("@")[0] for c in report.changes if c.tensors for name in c.tensors.changed
    }
    assert changed == {"model.4.weight", "model.4.bias"}
    layer = (dcp_ranks.WIDTH + 1) * dcp_ranks.WIDTH * 4
    size = store.show("runs/ft@2").version.size
    # The layer, and the small chunks around it: framing bytes and .metadata.
    assert layer <= report.new_bytes <= layer + 24 * KiB < size / 3
    stored = sum(store.backend.stat(key).size for key in added)
    assert stored < layer  # the moved layer went in as deltas of the first save
    text = run_cas("diff", first, "runs/ft@2", store=location)
    assert "tensors changed" in text.stdout
    # Retention and collection keep what the second version's deltas need.
    pruned = run_cas("prune", "runs/ft", "--keep-last", "1", store=location)
    assert pruned.returncode == 0, pruned.stderr
    assert run_cas("gc", "--grace", "0", store=location).returncode == 0
    assert store.verify(deep=True).ok
    restored = tmp_path / "restored"
    store.get("runs/ft", restored)
    assert (restored / "__0_0.distcp").stat().st_size > 0
    lineage = run_cas("lineage", "runs/ft@2", store=location)
    assert "runs/ft@1" in lineage.stdout


def test_a_save_without_parents_is_a_delta_of_the_latest_version(
    ranks: RankPool, tmp_path: Path
) -> None:
    location = str(tmp_path / "store")
    store = new_store(location)
    key = "runs/step"

    def save_step(steps: int, **options: Any) -> tuple[str, float]:
        """Save the model after ``steps`` steps: its ref, and stored bytes added / its size."""
        before = chunk_objects(store)
        args = (location, key, steps, options.get("parents", ()), options.get("delta"))
        (ref,) = set(check(ranks.run(2, dcp_ranks.save_stepped, *args)))
        added = sum(store.backend.stat(k).size for k in chunk_objects(store) - before)
        return ref, added / store.show(ref).version.size

    save_step(0)
    whole_ref, whole_ratio = save_step(1, delta=False)
    assert not any(c.bases for e in store.show(whole_ref).entries for c in e.chunks)
    assert whole_ratio > 0.5
    assert store.show(whole_ref).storage.delta_base is None
    # A named parent wins over the latest version.
    parent_ref, _ = save_step(2, parents=(f"{key}@1",))
    assert store.show(parent_ref).storage.delta_base == f"{key}@1"
    delta_ref, delta_ratio = save_step(3)
    assert delta_ratio <= 0.30, delta_ratio
    storage = store.show(delta_ref).storage
    assert storage.delta_base == parent_ref  # the latest version, as a delta base only
    assert store.show(delta_ref).version.parents == ()
    assert storage.delta_chunks > 0
    assert storage.max_reads <= store.config.max_delta_reads
    shown = run_cas("show", delta_ref, store=location)
    assert f"chunks are deltas of {parent_ref}" in shown.stdout, shown.stdout
    # Keeping the newest only: gc stores again what it needs of the deleted versions.
    assert run_cas("prune", key, "--keep-last", "1", store=location).returncode == 0
    before = sum(store.backend.stat(k).size for k in chunk_objects(store))
    assert run_cas("gc", "--grace", "0", store=location).returncode == 0
    assert sum(store.backend.stat(k).size for k in chunk_objects(store)) < before / 2
    assert store.verify(deep=True).ok
    expected = dcp_ranks.stepped_model(3).state_dict()
    loaded = _load_state_dict_from_keys(storage_reader=CasReader(location, delta_ref))
    assert differences(expected, loaded["model"]) == []


# -- async save ---------------------------------------------------------------------------


def test_async_save_keeps_the_state_it_was_given_and_reports_errors(
    ranks: RankPool, tmp_path: Path
) -> None:
    location = str(tmp_path / "store")
    new_store(location)
    (tmp_path / "expected.pt.not-a-store").mkdir()
    (tmp_path / "expected.pt.not-a-store" / "stranger.txt").write_text("not a store")
    expected = tmp_path / "expected.pt"
    results = check(ranks.run(2, dcp_ranks.save_async, location, "runs/async", str(expected)))
    for result in results:
        assert "not a cas store" in result["error"]
    loaded = _load_state_dict_from_keys(storage_reader=CasReader(location, "runs/async"))
    assert differences(whole(expected)["model"], loaded["model"]) == []
    assert [v.ref for v in Store.open(location).log("runs/async")] == ["runs/async@1"]


# -- faults --------------------------------------------------------------------------------


def test_a_rank_killed_mid_upload_leaves_no_version_and_the_next_save_fills_in(
    ranks: RankPool, tmp_path: Path
) -> None:
    location = str(tmp_path / "store")
    store = new_store(location)
    outcomes = ranks.run(2, dcp_ranks.save_and_die, location, "runs/killed", 3)
    assert outcomes[1].exitcode == -9  # SIGKILL
    assert outcomes[0].error is not None  # rank 0's save failed with it
    with pytest.raises(RefNotFoundError):
        store.log("runs/killed")
    assert store.verify(deep=True).ok
    left = chunk_objects(store)
    assert left  # both ranks had uploaded chunks
    (ref,) = set(check(ranks.run(2, dcp_ranks.save_model, location, "runs/killed")))
    assert ref == "runs/killed@1"
    needed = {layout.chunk_key(c.digest) for e in store.show(ref).entries for c in e.chunks}
    added = chunk_objects(store) - left
    assert added == needed - left  # only what was missing went in
    assert needed & left  # and what the killed attempt uploaded was reused
    assert store.verify(deep=True).ok


def test_a_rank_failing_mid_upload_fails_the_save_everywhere_and_commits_nothing(
    ranks: RankPool, tmp_path: Path
) -> None:
    location = str(tmp_path / "store")
    store = new_store(location)
    outcomes = ranks.run(2, dcp_ranks.save_and_die, location, "runs/full", 3, "raise")
    for outcome in outcomes:
        assert outcome.error is not None
        assert "CheckpointException" in outcome.error
        assert "No space left on device (injected)" in outcome.error
    with pytest.raises(RefNotFoundError):
        store.log("runs/full")
    assert chunk_objects(store)  # rank 0 finished its upload, rank 1 got part way
    assert store.verify(deep=True).ok
    assert store.gc(grace=0).deleted_chunks > 0
    assert not chunk_objects(store)


def test_a_bad_key_or_location_fails_on_every_rank_before_any_upload(
    ranks: RankPool, tmp_path: Path
) -> None:
    location = str(tmp_path / "store")
    store = new_store(location)
    for bad_location, key, error in [
        (location, "runs/bad key", "InvalidKeyError: invalid key 'runs/bad key'"),
        ("ftp://host/x", "runs/a", "ConfigurationError: unknown store scheme 'ftp'"),
    ]:
        outcomes = ranks.run(2, dcp_ranks.make_writer, bad_location, key)
        assert all(o.error is not None and o.error.startswith(error) for o in outcomes)
    assert not chunk_objects(store)
    with pytest.raises(InvalidKeyError):
        CasWriter(location, "runs/../x")
    with pytest.raises(ConfigurationError, match="names no bucket"):
        CasWriter("s3://", "runs/a")


# -- the cloud stores -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
def test_save_and_load_on_each_cloud_store(
    ranks: RankPool, request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    backend = request.getfixturevalue(f"{kind}_backend")
    server = request.getfixturevalue(
        {"s3": "moto_server", "gcs": "fake_gcs_server", "azure": "azurite_server"}[kind]
    )
    new_store(backend.uri)
    expected = str(tmp_path / "expected.pt")
    refs = check(ranks.run(2, dcp_ranks.save_plain, backend.uri, KEY, expected, env=server.env))
    assert refs == [f"{KEY}@1"] * 2
    assert Store.open(backend.uri).verify(deep=True).ok


def test_a_store_unreachable_from_one_rank_fails_the_save_everywhere(
    ranks: RankPool, s3_backend: Any, moto_server: Any
) -> None:
    location = f"{s3_backend.uri}?max_attempts=1"
    new_store(s3_backend.uri)
    closed = f"http://127.0.0.1:{dcp_ranks.free_port()}"
    outcomes = ranks.run(
        2,
        dcp_ranks.save_model,
        location,
        KEY,
        env=moto_server.env,
        rank_env={1: {"AWS_ENDPOINT_URL": closed}},
    )
    assert all(o.error is not None and "CheckpointException" in o.error for o in outcomes)
    assert "127.0.0.1" in (outcomes[0].error or "")  # rank 1's reason reaches rank 0 too
    store = Store.open(s3_backend.uri)
    with pytest.raises(RefNotFoundError):
        store.log(KEY)
    assert not chunk_objects(store)  # it failed before anything was uploaded
