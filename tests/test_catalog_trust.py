"""A catalog that passes every format check but lies is caught by the query it misleads.

Each test forges a checkpoint from the store's true versions (a row
changed, a version added that has no ref, a live version dropped, a tag
moved, metrics altered), writes it under its own hash and points the head
at it, as a hostile hand with write access to ``catalog/`` could. The
query that reads it must answer what the refs say, report the difference
and rebuild the catalog; on the local store and on the S3 test server.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import ok, run_cas

from cas.backends import Backend
from cas.digest import Digest
from cas.errors import BackendError, CatalogMismatchWarning
from cas.ml.query import Query, find
from cas.repository import _changes
from cas.store import Store, Version, _index
from cas.store import _catalog_table as table
from cas.store import _catalog_trust as trust
from cas.store._config import load_config
from cas.testing.faults import FaultyBackend


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(_index, "_DECODED", {})
    monkeypatch.setenv("CAS_CATALOG_CACHE", str(tmp_path / "catalog-cache"))
    monkeypatch.setattr(_changes, "SETTLE", 0.0)
    monkeypatch.setattr(_changes, "TIME_GRAIN", 0.0)


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> Backend:
    found: Backend = request.getfixturevalue(f"{request.param}_backend")
    return found


def seen(versions: list[Version]) -> list[tuple[str, int, str, tuple[str, ...], dict[str, Any]]]:
    return [(v.key, v.number, v.manifest_id, tuple(v.tags), dict(v.metrics)) for v in versions]


def make_store(backend: Backend, tmp_path: Path) -> Store:
    """Two runs of four checkpoints; ``best`` on each run's lowest loss, ``keep`` on r0@2."""
    store = Store(backend, load_config(backend, create=True))
    source = tmp_path / "src.bin"
    for n in range(8):
        key = f"runs/r{n % 2}"
        source.write_bytes(f"{key}-{n}".encode() * 10)
        store.put(source, key, metrics={"loss": 1.0 / (n + 1), "step": n})
    store.tag("runs/r0@4", "best")
    store.tag("runs/r1@4", "best")
    store.tag("runs/r0@2", "keep")
    store.compact_catalog()
    return store


Forgery = Callable[[list[Version], dict[tuple[str, int], list[str]]], list[Version]]


def forge(store: Store, change: Forgery) -> None:
    """Rewrite the catalog from the true versions, changed by ``change`` (which may also
    change the tags in place), as a new process would then find it."""
    truth = store._catalog().from_refs()
    tags = {(v.key, v.number): list(v.tags) for v in truth if v.tags}
    versions = change([dataclasses.replace(v, tags=()) for v in truth], tags)
    blob = table.encode(versions, tags)
    digest = Digest.of(blob).hex
    store.backend.put(_index.checkpoint_key(digest), blob)
    # Every note in the log named as folded: its change, as the forger tells it, stands.
    folded = frozenset(note.name for note in store.refs.changes.list())
    store.backend.put(_index.HEAD, _index.Head(digest, folded, 99).to_bytes())
    _index._DECODED.clear()


def relabel(version: Version, **changes: Any) -> Version:
    return dataclasses.replace(version, **changes)


def add_fake(versions: list[Version], tags: dict[tuple[str, int], list[str]]) -> list[Version]:
    last = [v for v in versions if v.key == "runs/r1"][-1]
    fake = relabel(last, number=9, metrics={"loss": 0.0, "step": 9})
    return [*versions, fake]


def drop_best(versions: list[Version], tags: dict[tuple[str, int], list[str]]) -> list[Version]:
    tags.pop(("runs/r1", 4))
    return [v for v in versions if (v.key, v.number) != ("runs/r1", 4)]


def move_tag(versions: list[Version], tags: dict[tuple[str, int], list[str]]) -> list[Version]:
    tags.pop(("runs/r1", 4))
    tags[("runs/r1", 1)] = ["best"]
    return versions


def alter_metrics(versions: list[Version], tags: dict[tuple[str, int], list[str]]) -> list[Version]:
    return [
        relabel(v, metrics={"loss": 0.0, "step": v.metrics["step"]})
        if (v.key, v.number) == ("runs/r1", 1)
        else v
        for v in versions
    ]


def change_manifest(
    versions: list[Version], tags: dict[tuple[str, int], list[str]]
) -> list[Version]:
    other = Digest.of(b"another manifest").hex
    return [relabel(v, manifest_id=other) if v.key == "runs/r1" else v for v in versions]


def alter_every_row(
    versions: list[Version], tags: dict[tuple[str, int], list[str]]
) -> list[Version]:
    return [relabel(v, message="forged") for v in versions]


QUERIES: dict[str, Callable[[Store], list[Version]]] = {
    "log": lambda store: store.log("runs/r1"),
    "best": lambda store: find(store, Query(sort="loss", limit=1)),
    "tag": lambda store: find(store, Query(tags=("best",))),
    "best of one key": lambda store: find(store, Query(prefix="runs/r1", sort="loss", limit=1)),
}


@pytest.mark.parametrize(
    ("forgery", "query"),
    [
        (add_fake, "best"),
        (add_fake, "log"),
        (drop_best, "log"),
        (drop_best, "best of one key"),
        (move_tag, "tag"),
        (move_tag, "log"),
        (alter_metrics, "best"),
        (alter_metrics, "best of one key"),
        (change_manifest, "log"),
    ],
)
def test_a_forged_catalog_is_caught_by_the_query_it_would_mislead(
    backend: Backend, tmp_path: Path, forgery: Forgery, query: str
) -> None:
    store = make_store(backend, tmp_path)
    ask = QUERIES[query]
    expected = seen(ask(store))
    forge(store, forgery)
    before = store.catalog_status()
    with pytest.warns(CatalogMismatchWarning, match="disagrees with the refs"):
        assert seen(ask(store)) == expected
    after = store.catalog_status(check=True)
    assert after.problem is None  # rebuilt from the refs
    assert after.checkpoint != before.checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error", CatalogMismatchWarning)
        assert seen(ask(store)) == expected


def test_a_forgery_of_every_row_is_caught_by_a_query_of_everything(
    backend: Backend, tmp_path: Path
) -> None:
    store = make_store(backend, tmp_path)
    expected = seen(store.catalog())
    forge(store, alter_every_row)
    with pytest.warns(CatalogMismatchWarning):
        answer = store.catalog()
    assert seen(answer) == expected
    assert {v.message for v in answer} == {""}


def test_a_large_answer_is_checked_by_a_sample_within_the_budget(tmp_path: Path) -> None:
    faulty = FaultyBackend(Store.open(tmp_path / "store").backend)
    store = make_store(faulty, tmp_path)
    source = tmp_path / "src.bin"
    for n in range(40):
        source.write_bytes(f"more-{n}".encode())
        store.put(source, f"runs/many/{n}")
    store.compact_catalog()
    expected = seen(store.catalog())
    forge(store, lambda versions, tags: versions)  # the truth, as a new process reads it
    faulty.reset_counts()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CatalogMismatchWarning)
        assert seen(store.catalog()) == expected
    # head, checkpoint, the log's listing, head again; then the spot checks
    assert sum(faulty.calls.values()) <= 4 + trust.SPOT_REQUESTS
    forge(store, alter_every_row)
    with pytest.warns(CatalogMismatchWarning):
        assert seen(store.catalog()) == expected


def test_a_change_committed_during_the_query_is_not_taken_for_a_forgery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(Store.open(tmp_path / "store").backend, tmp_path)
    _index._DECODED.clear()
    generation = store.catalog_status().generation
    check = trust.spot_check
    done: list[bool] = []

    def with_a_delete_first(*args: Any) -> list[trust.Claim]:
        if not done:  # the catalog was read: another process now deletes a version
            done.append(True)
            store.delete("runs/r1@3")
        return check(*args)

    monkeypatch.setattr(trust, "spot_check", with_a_delete_first)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CatalogMismatchWarning)
        answer = store.log("runs/r1")
    assert done
    assert [v.number for v in answer] in ([4, 3, 2, 1], [4, 2, 1])
    assert store.catalog_status().generation == generation  # nothing rebuilt


def test_on_a_store_that_cannot_be_written_the_refs_answer(tmp_path: Path) -> None:
    store = make_store(Store.open(tmp_path / "store").backend, tmp_path)
    expected = seen(store.log("runs/r1"))
    forge(store, add_fake)
    readonly = FaultyBackend(store.backend, fail_on={"put"}, transient=False)
    reader = Store(readonly, store.config)
    with pytest.warns(CatalogMismatchWarning):
        assert seen(reader.log("runs/r1")) == expected
    with pytest.warns(CatalogMismatchWarning):  # every time: it cannot be rebuilt
        best = find(reader, Query(sort="loss", limit=1))
    assert [(v.key, v.number) for v in best] == [("runs/r1", 8 // 2)]


def test_a_key_listed_beyond_one_page_is_compared_as_far_as_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(Store.open(tmp_path / "store").backend, tmp_path)
    monkeypatch.setattr(trust, "_LISTING_PAGE", 2)  # runs/r1 has 4 versions: two pages
    expected = seen(store.log("runs/r1"))
    forge(store, lambda versions, tags: versions)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CatalogMismatchWarning)
        assert seen(store.log("runs/r1")) == expected  # versions 3 and 4: not listed, not wrong

    def drop_first(versions: list[Version], tags: Any) -> list[Version]:
        return [v for v in versions if (v.key, v.number) != ("runs/r1", 1)]

    forge(store, drop_first)
    with pytest.warns(CatalogMismatchWarning, match="runs/r1@1"):
        assert seen(store.log("runs/r1")) == expected


def test_the_cli_reports_a_forged_catalog_and_answers_from_the_refs(tmp_path: Path) -> None:
    store = make_store(Store.open(tmp_path / "store").backend, tmp_path)
    forge(store, add_fake)
    done = ok(run_cas("log", "runs/r1", "--json", store=tmp_path / "store"))
    assert "cas: warning: the catalog of versions disagrees with the refs" in done.stderr
    assert "runs/r1@9" in done.stderr
    assert [v["version"] for v in json.loads(done.stdout)] == [4, 3, 2, 1]
    again = ok(run_cas("log", "runs/r1", store=tmp_path / "store"))  # rebuilt: no warning
    assert "warning" not in again.stderr


def test_a_ref_that_cannot_be_read_for_now_fails_the_query_not_the_catalog(
    tmp_path: Path,
) -> None:
    store = make_store(Store.open(tmp_path / "store").backend, tmp_path)
    forge(store, lambda versions, tags: versions)  # the truth, as a new process reads it
    generation = store.catalog_status().generation
    flaky = FaultyBackend(store.backend, fail_on={"get"}, prefix="refs/", transient=True)
    reader = Store(flaky, store.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CatalogMismatchWarning)
        with pytest.raises(BackendError, match="injected fault"):
            reader.log("runs/r1")
    assert store.catalog_status().generation == generation  # not taken for a forgery


def test_stats_check_the_catalog_they_count_from(tmp_path: Path) -> None:
    store = make_store(Store.open(tmp_path / "store").backend, tmp_path)
    expected = store.stats()
    forge(store, add_fake)  # one more version, of a manifest that exists: it would count
    with pytest.warns(CatalogMismatchWarning):
        assert store.stats() == expected
    assert expected.versions == 8


def leave_out_everything(versions: list[Version], tags: dict[Any, list[str]]) -> list[Version]:
    tags.clear()
    return []


@pytest.mark.parametrize("ask", [lambda s: s.catalog(), lambda s: find(s, Query(tags=("nope",)))])
def test_an_empty_answer_is_checked_too(
    tmp_path: Path, ask: Callable[[Store], list[Version]]
) -> None:
    store = make_store(Store.open(tmp_path / "store").backend, tmp_path)
    expected = seen(ask(store))
    forge(store, leave_out_everything)
    with pytest.warns(CatalogMismatchWarning):
        assert seen(ask(store)) == expected
