"""The catalog of versions kept in the store: answers equal to the refs', whatever happens.

Every test compares what the catalog answers with what the refs alone say
(``Catalog.from_refs``), the truth: after puts, deletes and tag moves, before
and after compaction, when compactions race or crash, and when the catalog's
objects are damaged or forged.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import ok, run_cas

from cas.backends import Backend
from cas.digest import Digest
from cas.errors import BackendError
from cas.repository import _changes
from cas.repository import _layout as layout
from cas.repository._metadata import Summary
from cas.repository._refs import VersionRef
from cas.store import CatalogUnavailable, Store, Version, _index
from cas.store import _catalog_table as table
from cas.store import _catalog_trust as trust
from cas.store._config import load_config
from cas.testing.faults import FaultyBackend


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test as a new process with its own cache; notes settle at once unless a test says."""
    monkeypatch.setattr(_index, "_DECODED", {})
    monkeypatch.setenv("CAS_CATALOG_CACHE", str(tmp_path / "catalog-cache"))
    monkeypatch.setattr(_changes, "SETTLE", 0.0)
    monkeypatch.setattr(_changes, "TIME_GRAIN", 0.0)  # local file times are finer


def seen(versions: list[Version]) -> list[tuple[str, int, str, tuple[str, ...], dict[str, Any]]]:
    return [(v.key, v.number, v.manifest_id, tuple(v.tags), dict(v.metrics)) for v in versions]


def assert_truthful(store: Store) -> None:
    """Every query the catalog answers equals the refs' answer."""
    catalog = store._catalog()
    truth = catalog.from_refs()
    assert seen(store.catalog()) == seen(truth)
    keys = sorted({v.key for v in truth})
    assert [k.key for k in store.list_keys()] == keys
    for key in keys:
        assert seen(store.log(key)) == [s for s in seen(truth) if s[0] == key]


def put(store: Store, tmp_path: Path, key: str, n: int, **options: Any) -> Version:
    source = tmp_path / "src.bin"
    source.write_bytes(f"{key}-{n}".encode() * 10)
    return store.put(source, key, metrics={"loss": 1.0 / (n + 1)}, **options)


def populate(store: Store, tmp_path: Path) -> None:
    for n in range(6):
        put(store, tmp_path, f"runs/r{n % 2}", n, tags=["best"] if n == 3 else [])
    store.delete("runs/r0@2")
    store.tag("runs/r1@1", "keep")
    store.tag("runs/r1@2", "best")  # moved from runs/r1@... (best was on r1@2 already: n=3)
    store.untag("runs/r1", "keep")


def test_queries_agree_with_the_refs_before_and_after_compaction(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    populate(store, tmp_path)
    assert_truthful(store)
    time.sleep(0.05)
    assert store.compact_catalog().pending == 0
    assert_truthful(store)
    store.delete("runs/r1@3")
    put(store, tmp_path, "runs/r2", 9, tags=["best"])
    assert_truthful(store)  # two notes since the checkpoint
    assert store.catalog_status().pending >= 2


def test_notes_younger_than_the_settle_time_stay_in_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_changes, "SETTLE", 3600.0)
    store = Store.open(tmp_path / "store")
    populate(store, tmp_path)
    status = store.compact_catalog()
    assert status.pending == len(store.refs.changes.list()) > 0  # nothing folded
    assert_truthful(store)


def test_a_query_reads_a_constant_number_of_objects(tmp_path: Path) -> None:
    faulty = FaultyBackend(Store.open(tmp_path / "store").backend)
    store = Store(faulty, load_config(faulty, create=False))
    for n in range(30):
        put(store, tmp_path, f"k{n % 5}", n)
    time.sleep(0.05)  # file times are coarse: the last note must be older than "now"
    store.compact_catalog()  # every row read from its ref: believed by this process
    faulty.reset_counts()
    assert len(store.catalog()) == 30
    # head, the log's listing, head again, and a key's listings (the spot check)
    assert faulty.calls == {"get": 2, "list": 3}, faulty.keys
    _index._DECODED.clear()  # as a new process: the checkpoint's rows are spot-checked
    faulty.reset_counts()
    assert len(store.catalog()) == 30
    # and the checkpoint, and up to SPOT_REQUESTS to check rows against their refs
    assert 5 + 1 < sum(faulty.calls.values()) <= 4 + trust.SPOT_REQUESTS
    for _ in range(4):  # rows found right are not read again by this process
        store.catalog()
    faulty.reset_counts()
    assert len(store.catalog()) == 30
    assert faulty.calls == {"get": 2, "list": 3}, faulty.keys
    put(store, tmp_path, "k0", 99)
    faulty.reset_counts()
    store.catalog()
    assert faulty.keys["get"].count(layout.version_key("k0", 7)) >= 1  # the version since


def test_the_checkpoint_is_parquet_that_duckdb_and_pandas_read(tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    pandas = pytest.importorskip("pandas")
    store = Store.open(tmp_path / "store")
    populate(store, tmp_path)
    status = store.compact_catalog()
    path = tmp_path / "store" / "catalog" / "checkpoints" / f"{status.checkpoint}.parquet"
    rows = duckdb.sql(
        f"SELECT key, version, metrics['loss'] AS loss, tags FROM '{path}' "
        "WHERE list_contains(tags, 'best') ORDER BY key"
    ).fetchall()
    truth = [(v.key, v.number, v.metrics["loss"], list(v.tags)) for v in store.catalog()]
    assert rows == sorted(t for t in truth if "best" in t[3])
    frame = pandas.read_parquet(path)
    assert len(frame) == len(truth)
    assert set(frame["type"]) == {"other"}
    assert frame["size"].sum() == sum(v.size for v in store.catalog())


def test_two_compactions_at_once_leave_one_good_catalog(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    populate(store, tmp_path)
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(store._catalog().index().compact()))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert True in results
    assert_truthful(store)
    assert store.catalog_status(check=True).problem is None


@pytest.mark.parametrize("op", ["put", "get_versioned", "delete", "list", "stat"])
@pytest.mark.parametrize("after", [0, 1, 2])
def test_a_compaction_that_fails_at_any_request_loses_nothing(
    tmp_path: Path, op: str, after: int
) -> None:
    plain = Store.open(tmp_path / "store")
    populate(plain, tmp_path)
    plain.compact_catalog()
    plain.delete("runs/r1@1")
    put(plain, tmp_path, "runs/r3", 1, tags=["best"])
    faulty = FaultyBackend(plain.backend, fail_on={op}, prefix="catalog/", after=after, times=1)
    crashing = Store(faulty, plain.config)
    with contextlib.suppress(BackendError):  # the crash: queries must still tell the truth
        crashing.compact_catalog()
    _index._DECODED.clear()
    assert_truthful(plain)
    time.sleep(0.05)  # file times are coarse: every note must be older than "now"
    plain.compact_catalog()
    assert_truthful(plain)
    assert plain.catalog_status().pending == 0


def test_a_damaged_checkpoint_is_rebuilt_not_believed(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    populate(store, tmp_path)
    status = store.compact_catalog()
    path = tmp_path / "store" / "catalog" / "checkpoints" / f"{status.checkpoint}.parquet"
    path.write_bytes(b"PAR1 not a parquet file")
    _index._DECODED.clear()
    assert_truthful(store)
    # Rebuilt: the same versions make the same file, written again under its name.
    assert Digest.of(path.read_bytes()).hex == status.checkpoint
    assert store.catalog_status().generation > status.generation


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"{",
        b"[]",
        b'{"format":1}',
        b'{"format":1,"checkpoint":"zz","folded":[],"generation":1}',
    ],
)
def test_a_malformed_head_is_replaced(tmp_path: Path, head: bytes) -> None:
    store = Store.open(tmp_path / "store")
    populate(store, tmp_path)
    store.compact_catalog()
    store.backend.put(_index.HEAD, head)
    assert_truthful(store)


def forge(store: Store, rows: list[dict[str, Any]], tags: dict[tuple[str, int], list[str]]) -> None:
    """Write a checkpoint of ``rows`` and point the head at it, as a hostile hand could."""
    versions = []
    for row in rows:
        ref = VersionRef(row["key"], row["number"], Digest.of(b"x"), "2026-01-01T00:00:00Z")
        versions.append(Version.of(ref, Summary("file", 1, 1, metrics=row.get("metrics", {})), ()))
    blob = table.encode(versions, tags)
    forge_blob(store, blob)


def forge_blob(store: Store, blob: bytes) -> None:
    digest = Digest.of(blob).hex
    store.backend.put(_index.checkpoint_key(digest), blob)
    store.backend.put(_index.HEAD, _index.Head(digest, frozenset(), 99).to_bytes())
    _index._DECODED.clear()


def read_whole(blob: bytes) -> None:
    raws, _ = table.decode(blob, name="forged")
    table.parse_all(raws)


def parquet_with(column: str, value: Any) -> bytes:
    """A catalog file of one row whose ``column`` holds ``value``."""
    return parquet_of([good_row(1, **{column: value})])


def good_row(number: int, **changes: Any) -> dict[str, Any]:
    row = {
        "key": "runs/x",
        "version": number,
        "manifest": Digest.of(b"x").hex,
        "created": "2026-01-01T00:00:00Z",
        "summary": json.dumps(Summary("file", 1, 1).to_dict()),
        "tags": [],
    }
    row.update(changes)
    return row


def parquet_of(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema_meta = {b"cas.catalog": json.dumps({"format": 1, "rows": len(rows)}).encode()}
    frame = pa.Table.from_pylist(rows).replace_schema_metadata(schema_meta)
    sink = io.BytesIO()
    pq.write_table(frame, sink)
    return sink.getvalue()


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("key", "../../etc"),
        ("key", "runs//x"),
        ("version", 0),
        ("manifest", "not-a-digest"),
        ("summary", '{"kind": "file"}'),
        (
            "summary",
            '{"kind":"file","size":1,"files":1,"parents":[],"tags":[],'
            '"metrics":{"loss":"NaN"},"metadata":{},"message":"","artifact":{}}',
        ),
        ("summary", "[" * 100_000),
        ("tags", ["a/b"]),
        ("created", 5),
    ],
)
def test_hostile_rows_make_the_catalog_rebuilt(tmp_path: Path, column: str, value: Any) -> None:
    store = Store.open(tmp_path / "store")
    populate(store, tmp_path)
    store.compact_catalog()
    forge_blob(store, parquet_with(column, value))
    with pytest.raises(table.CatalogDamaged):  # refused when read, summaries on first use
        read_whole(parquet_with(column, value))
    assert_truthful(store)


@pytest.mark.parametrize("collecting", [True, False])
@pytest.mark.parametrize(
    "summary", ['{"kind": "file"}', json.dumps(Summary("file", 1, 1).to_dict())]
)
def test_reading_a_catalog_leaves_the_garbage_collector_as_it_was(
    collecting: bool, summary: str
) -> None:
    # Rows are decoded with the collector off; a damaged file must not leave it off.
    blob = parquet_with("summary", summary)
    (gc.enable if collecting else gc.disable)()
    try:
        with contextlib.suppress(table.CatalogDamaged):
            read_whole(blob)
        assert gc.isenabled() is collecting
    finally:
        gc.enable()


def test_a_forged_but_well_formed_catalog_is_found_by_verify(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    populate(store, tmp_path)
    store.compact_catalog()
    forge(store, [{"key": "runs/fake", "number": 7, "metrics": {"loss": 0.0}}], {})
    report = store.verify()
    assert not report.ok
    assert report.catalog_problem is not None
    assert "runs/fake@7" in report.catalog_problem
    assert_truthful(store)  # verify rebuilt it
    assert store.verify().ok


def test_without_pyarrow_queries_read_the_refs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store.open(tmp_path / "store")
    populate(store, tmp_path)

    def missing() -> None:
        raise CatalogUnavailable("the catalog needs pyarrow")

    monkeypatch.setattr(table, "_pyarrow", missing)
    assert_truthful(store)
    assert not (tmp_path / "store" / "catalog" / "head").exists()
    with pytest.raises(CatalogUnavailable, match="pyarrow"):
        store.compact_catalog()
    assert store.verify().ok


def test_on_a_store_that_cannot_be_written_queries_read_the_refs(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    populate(store, tmp_path)
    readonly = FaultyBackend(store.backend, fail_on={"put"}, transient=False)
    reader = Store(readonly, store.config)
    assert seen(reader.catalog()) == seen(store._catalog().from_refs())


def test_gc_rebuilds_the_catalog(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    populate(store, tmp_path)
    store.compact_catalog()
    forge(store, [{"key": "runs/fake", "number": 1}], {})
    time.sleep(0.05)
    store.gc(grace=0)
    assert_truthful(store)
    assert store.catalog_status().pending == 0


def test_on_every_backend(any_backend: Backend, tmp_path: Path) -> None:
    store = Store(any_backend, load_config(any_backend, create=True))
    populate(store, tmp_path)
    assert_truthful(store)
    store.compact_catalog()
    store.delete("runs/r1@1")
    assert_truthful(store)
    _index._DECODED.clear()  # the checkpoint read again, from the machine's cache if remote
    assert_truthful(store)
    status = store.catalog_status(check=True)
    assert status.problem is None


def test_the_catalog_command(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    populate(store, tmp_path)
    root = tmp_path / "store"
    assert "no catalog yet" in ok(run_cas("catalog", store=root)).stdout
    rebuilt = json.loads(ok(run_cas("catalog", "rebuild", "--json", store=root)).stdout)
    assert rebuilt["versions"] == len(store.catalog())
    assert rebuilt["problem"] is None
    forge(store, [{"key": "runs/fake", "number": 3}], {})
    checked = run_cas("catalog", "check", store=root)
    assert checked.returncode == 3
    assert "DAMAGED: the catalog lists runs/fake@3" in checked.stdout
    verified = run_cas("verify", store=root)
    assert verified.returncode == 0, verified.stdout  # check rebuilt it
    forge(store, [{"key": "runs/fake", "number": 3}], {})
    verified = run_cas("verify", store=root)
    assert verified.returncode == 3
    assert "DAMAGED catalog: the catalog lists runs/fake@3" in verified.stdout


def test_the_catalog_command_without_pyarrow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cas.cli import main

    Store.open(tmp_path / "store")

    def missing() -> None:
        raise CatalogUnavailable("the catalog needs pyarrow (pip install 'cas-store[catalog]')")

    monkeypatch.setattr(table, "_pyarrow", missing)
    assert main(["--store", str(tmp_path / "store"), "catalog", "rebuild"]) == 1
    assert "cas-store[catalog]" in capsys.readouterr().err


def test_a_bad_summary_after_good_ones_names_the_file() -> None:
    good = json.dumps(Summary("file", 1, 1, metrics={"loss": 1}, metadata={"a": 1}).to_dict())
    bad = good.replace('"loss": 1', '"loss": true')
    rows = [good_row(n, summary=good if n < 3 else bad) for n in (1, 2, 3)]
    with pytest.raises(table.CatalogDamaged, match=r"^catalog: runs/x@3: bad summary"):
        read_whole(parquet_of(rows))


@pytest.mark.parametrize(
    ("rows", "wrong"),
    [
        ([good_row(1), good_row(2), good_row(1)], r"row 2 .*version 1"),
        ([good_row(1, tags=["best"]), good_row(2, tags=["best"])], r"row 1 .*on two versions"),
        ([good_row(1), good_row(2, key="runs/../x")], r"row 1 "),
        ([good_row(1), good_row(2, manifest="A" * 64)], r"row 1 .*manifest"),
        ([good_row(1), good_row(2, tags=["ok", "no/slash"])], r"row 1 "),
    ],
)
def test_rows_are_checked_whole_whatever_the_file_holds(
    rows: list[dict[str, Any]], wrong: str
) -> None:
    with pytest.raises(table.CatalogDamaged, match=wrong):
        table.decode(parquet_of(rows), name="forged")
    raws, _ = table.decode(parquet_of(rows[:1]), name="forged")  # the first alone is fine
    assert [(r.key, r.number) for r in raws] == [("runs/x", 1)]
