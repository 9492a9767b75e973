"""log, find and lineage: answers from refs, filters, ordering, graphs, and speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import load_script, small_store

from cas.cli import main
from cas.errors import InvalidInputError, RefNotFoundError
from cas.ml.lineage import lineage
from cas.ml.query import Condition, Query, catalog, find
from cas.repository._metadata import ArtifactInfo
from cas.store import Store, Version


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """datasets/corpus@1 -> runs/a/ckpt@1..4 (a chain) -> models/a@1 (from @3); runs/b/ckpt@1."""
    tmp = tmp_path_factory.mktemp("query")
    s = small_store(tmp / "store")
    f = tmp / "f"

    def put(key: str, **kw: Any) -> str:
        f.write_text(f"{key} {len(s.refs.version_numbers(key))}")
        return s.put(f, key, **kw).ref

    corpus = put("datasets/corpus", info=ArtifactInfo(type="dataset"), metadata={"rows": 1000})
    parent = corpus
    for step, loss in enumerate([0.9, 0.5, 0.2, 0.35], start=1):
        parent = put(
            "runs/a/ckpt",
            parents=[parent],
            metrics={"loss": loss, "step": step * 100},
            metadata={"optim": {"name": "adamw", "lr": 0.001}, "seed": 7},
            info=ArtifactInfo(type="checkpoint", job="run-a", labels={"team": "nlp"}),
        )
    s.tag("runs/a/ckpt@3", "best")
    put(
        "models/a",
        parents=["runs/a/ckpt@3", corpus],
        info=ArtifactInfo(type="model", base_model="bert", fine_tuning="lora"),
        metrics={"accuracy": 0.91},
    )
    put("runs/b/ckpt", metrics={"loss": 0.1}, info=ArtifactInfo(type="checkpoint", job="run-b"))
    return s


def refs(versions: list[Version]) -> list[str]:
    return [v.ref for v in versions]


def test_log_lists_versions_newest_first_with_metrics_and_tags(store: Store) -> None:
    log = store.log("runs/a/ckpt")
    assert refs(log) == [f"runs/a/ckpt@{n}" for n in (4, 3, 2, 1)]
    assert log[1].tags == ("best",)
    assert log[1].metrics == {"loss": 0.2, "step": 300}


def test_cli_log_shows_type_tags_and_metrics(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--store", store.backend.uri, "log", "runs/a/ckpt"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("runs/a/ckpt@4")
    assert "[checkpoint]" in lines[1]
    assert "tags: best" in lines[1]
    assert "loss=0.2 step=300" in lines[1]


def test_cli_show_prints_the_typed_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "w.bin").write_bytes(b"weights")
    uri = str(tmp_path / "store")
    args = ["--type", "model", "--job", "j-7", "--base-model", "bert", "--label", "team=nlp"]
    assert main(["--store", uri, "put", str(tmp_path / "w.bin"), "m", *args]) == 0
    capsys.readouterr()
    assert main(["--store", uri, "show", "m"]) == 0
    lines = capsys.readouterr().out.splitlines()
    artifact = next(line for line in lines if line.startswith("artifact:"))
    assert artifact.split()[1] == "type=model"
    assert {"job=j-7", "base_model=bert"} <= set(artifact.split())
    assert "labels:   team=nlp" in lines


def test_catalog_has_every_live_version_with_current_tags(store: Store) -> None:
    everything = catalog(store)
    assert len(everything) == 7
    assert {v.ref: v.tags for v in everything}["runs/a/ckpt@3"] == ("best",)
    assert refs(catalog(store, "runs/")) == [
        "runs/a/ckpt@4",
        "runs/a/ckpt@3",
        "runs/a/ckpt@2",
        "runs/a/ckpt@1",
        "runs/b/ckpt@1",
    ]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (Query(type="dataset"), ["datasets/corpus@1"]),
        (Query(type="model"), ["models/a@1"]),
        (Query(tags=("best",)), ["runs/a/ckpt@3"]),
        (Query(prefix="runs/b"), ["runs/b/ckpt@1"]),
        (Query(where=(Condition.parse("loss<0.3"),)), ["runs/b/ckpt@1", "runs/a/ckpt@3"]),
        (
            Query(where=(Condition.parse("loss >= 0.2"), Condition.parse("step!=400"))),
            ["runs/a/ckpt@3", "runs/a/ckpt@2", "runs/a/ckpt@1"],
        ),
        (Query(meta=(("job", "run-a"),), sort="loss", limit=2), ["runs/a/ckpt@3", "runs/a/ckpt@4"]),
        (Query(meta=(("team", "nlp"), ("optim.name", "adamw"))), None),
        (Query(meta=(("seed", "7"),), where=(Condition.parse("step=200"),)), ["runs/a/ckpt@2"]),
        (Query(meta=(("rows", "1000"),)), ["datasets/corpus@1"]),
        (Query(meta=(("fine_tuning", "lora"),)), ["models/a@1"]),
        (Query(meta=(("job", "nobody"),)), []),
        (Query(sort="loss", descending=True, limit=1), ["runs/a/ckpt@1"]),
        (Query(prefix="runs/a", latest_only=True), ["runs/a/ckpt@4"]),
    ],
)
def test_find(store: Store, query: Query, expected: list[str] | None) -> None:
    got = refs(find(store, query))
    if expected is None:
        assert sorted(got) == [f"runs/a/ckpt@{n}" for n in (1, 2, 3, 4)]
    else:
        assert got == expected


def test_find_without_sort_is_newest_first_and_sort_puts_unranked_last(store: Store) -> None:
    newest = find(store, Query())
    assert [v.created for v in newest] == sorted((v.created for v in newest), reverse=True)
    by_loss = refs(find(store, Query(sort="loss")))
    assert by_loss[:5] == [
        "runs/b/ckpt@1",
        "runs/a/ckpt@3",
        "runs/a/ckpt@4",
        "runs/a/ckpt@2",
        "runs/a/ckpt@1",
    ]
    assert sorted(by_loss[5:]) == ["datasets/corpus@1", "models/a@1"]


@pytest.mark.parametrize("text", ["loss", "loss<", "<0.3", "loss<abc", "loss=>1", "loss<0.3 x"])
def test_bad_where_names_the_expression(text: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        Condition.parse(text)
    assert repr(text) in str(err.value)


def test_bad_query_arguments() -> None:
    with pytest.raises(InvalidInputError, match="unknown artifact type 'weights'"):
        Query(type="weights")
    with pytest.raises(InvalidInputError, match=r"^limit must be at least 1"):
        Query(limit=0)


def test_cli_find_json_and_errors(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    uri = store.backend.uri
    argv = ["--store", uri, "find", "runs/", "--type", "checkpoint", "--where", "loss<0.4"]
    assert main([*argv, "--sort", "loss", "--limit", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [v["ref"] for v in out] == ["runs/b/ckpt@1", "runs/a/ckpt@3"]
    assert out[1]["artifact"]["labels"] == {"team": "nlp"}
    assert main(["--store", uri, "find", "--where", "loss<<1"]) == 2
    assert "--where 'loss<<1'" in capsys.readouterr().err
    assert main(["--store", uri, "find", "--limit", "0"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err
    assert main(["--store", uri, "find", "--meta", "novalue"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err
    assert main(["--store", uri, "find", "--tag", "12"]) == 2
    assert "invalid tag" in capsys.readouterr().err


# -- lineage ----------------------------------------------------------------------


def test_lineage_of_a_checkpoint(store: Store) -> None:
    graph = lineage(store, "runs/a/ckpt:best")
    assert graph.root == "runs/a/ckpt@3"
    assert graph.ancestors == ["runs/a/ckpt@2", "runs/a/ckpt@1", "datasets/corpus@1"]
    assert graph.descendants == ["models/a@1", "runs/a/ckpt@4"]
    assert ("runs/a/ckpt@3", "models/a@1") in graph.edges
    assert ("datasets/corpus@1", "runs/a/ckpt@1") in graph.edges
    # The dataset->model edge lies outside the path through the root: not part of this graph.
    assert ("datasets/corpus@1", "models/a@1") not in graph.edges


def test_lineage_depth_and_model_ancestry(store: Store) -> None:
    model = lineage(store, "models/a")
    assert set(model.ancestors) == {
        "runs/a/ckpt@3",
        "runs/a/ckpt@2",
        "runs/a/ckpt@1",
        "datasets/corpus@1",
    }
    assert model.descendants == []
    shallow = lineage(store, "models/a", depth=1)
    assert sorted(shallow.ancestors) == ["datasets/corpus@1", "runs/a/ckpt@3"]


def test_lineage_text_dot_and_json(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    uri = store.backend.uri
    assert main(["--store", uri, "lineage", "models/a"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("models/a@1  model  accuracy=0.91")
    assert "├── datasets/corpus@1  dataset" in text
    assert "└── runs/a/ckpt@3  checkpoint" in text
    # The corpus is reached twice (directly and through the chain): shown once in full.
    assert "datasets/corpus@1  (see above)" in text
    assert "descendants: none" in text

    assert main(["--store", uri, "lineage", "runs/a/ckpt@3", "--dot"]) == 0
    dot = capsys.readouterr().out
    assert dot.startswith("digraph lineage {")
    assert '"runs/a/ckpt@3" -> "models/a@1";' in dot
    assert "style=bold" in dot

    assert main(["--store", uri, "lineage", "runs/a/ckpt@3", "--json"]) == 0
    graph = json.loads(capsys.readouterr().out)
    assert graph["root"] == "runs/a/ckpt@3"
    assert {"parent": "runs/a/ckpt@2", "child": "runs/a/ckpt@3"} in graph["edges"]
    assert {n["ref"] for n in graph["nodes"]} >= {"models/a@1", "datasets/corpus@1"}

    assert main(["--store", uri, "lineage", "runs/nope"]) == 2
    assert "has no versions" in capsys.readouterr().err


def test_lineage_shows_deleted_parents(tmp_path: Path) -> None:
    s = small_store(tmp_path / "store")
    (tmp_path / "f").write_text("a")
    s.put(tmp_path / "f", "d")
    (tmp_path / "f").write_text("b")
    s.put(tmp_path / "f", "m", parents=["d@1"])
    s.delete("d@1")
    graph = lineage(s, "m")
    assert graph.ancestors == ["d@1"]
    assert graph.nodes["d@1"].deleted
    assert "d@1  (deleted)" in graph.to_text()
    assert "style=dashed" in graph.to_dot()
    with pytest.raises(RefNotFoundError):
        lineage(s, "d@1")


# -- speed ---------------------------------------------------------------------------


def test_queries_on_thousands_of_versions_read_the_catalog_not_every_ref(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What scripts/bench_queries.py measures, counted in requests rather than seconds
    (a shared machine's load moves seconds, not requests): once the catalog is
    compacted, no query reads a manifest, and none makes more requests than the
    benchmark's target, whatever the number of versions."""
    monkeypatch.setenv("CAS_CATALOG_CACHE", str(tmp_path / "catalog-cache"))
    bench = load_script("bench_queries")
    built = bench.build_store(tmp_path / "store", versions=2000, keys=20)
    # Queries must not need manifests: remove them all.
    for path in (tmp_path / "store" / "manifests").rglob("*"):
        if path.is_file():
            path.unlink()
    counter = bench.Counting(built.backend)
    store = Store(counter, built.config)
    store.compact_catalog()
    for row in bench.measure(store, 2000, 20, counter):
        assert row.requests <= bench.TARGET_REQUESTS, f"{row.label}: {row.requests} requests"
        if row.label.startswith("find (all)"):
            assert len(row.result) == 2000
    before = counter.requests
    best = find(store, Query(tags=("best",), sort="loss", limit=3))
    assert len(best) == 3
    assert all("best" in v.tags for v in best)
    assert counter.requests - before <= bench.TARGET_REQUESTS


def test_every_criterion_of_a_query_makes_it_checked() -> None:
    # find skips the per-version check of a query without criteria: a new criterion
    # that ``selective`` forgot would match everything.
    arranging = {"prefix", "sort", "descending", "limit", "latest_only"}
    criteria: dict[str, Any] = {
        "type": "dataset",
        "tags": ("best",),
        "meta": (("job", "a"),),
        "where": (Condition.parse("loss<1"),),
    }
    assert set(Query.__dataclass_fields__) == arranging | set(criteria)
    for name, value in criteria.items():
        assert Query(**{name: value}).selective, name
    assert not Query(
        prefix="runs/", sort="loss", descending=True, limit=3, latest_only=True
    ).selective
