"""``cas rm`` and ``cas gc`` from the command line, on every backend a subprocess can reach."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gc_helpers import GC_BACKENDS, PARAMS, random_bytes, write
from helpers import ok, run_cas, run_json

from cas.errors import MissingObjectError
from cas.store import Store

KiB = 1024


@pytest.fixture(params=[k for k in GC_BACKENDS if k != "memory"])
def uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store location a `cas` subprocess can open (memory:// lives in one process only)."""
    kind: str = request.param
    location = (
        str(tmp_path / "store")
        if kind == "local"
        else request.getfixturevalue(f"{kind}_backend").uri
    )
    Store.init(location, chunker=PARAMS).close()
    return location


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    return [write(tmp_path / f"f{i}.bin", random_bytes(120 * KiB, seed=i)) for i in range(3)]


def test_rm_deletes_one_version(uri: str, files: list[Path], tmp_path: Path) -> None:
    for f in files[:2]:
        ok(run_cas("put", f, "k", store=uri))
    assert ok(run_cas("rm", "k@1", store=uri)).stdout.startswith("deleted k@1")
    proc = run_cas("get", "k@1", tmp_path / "x", store=uri)
    assert proc.returncode == 2
    assert "deleted" in proc.stderr
    assert [v["ref"] for v in run_json("log", "k", store=uri)] == ["k@2"]
    assert run_cas("rm", "k@1", store=uri).returncode == 2, "deleting twice must fail"
    # A deleted number is never handed out again.
    assert run_json("put", files[2], "k", store=uri)["ref"] == "k@3"


def test_rm_of_a_tagged_version_needs_force_and_drops_its_tags(uri: str, files: list[Path]) -> None:
    ok(run_cas("put", files[0], "k", "--tag", "best", store=uri))
    ok(run_cas("put", files[1], "k", store=uri))
    proc = run_cas("rm", "k:best", store=uri)
    assert proc.returncode == 2
    assert "--force" in proc.stderr
    assert run_json("show", "k@1", store=uri)["tags"] == ["best"]
    assert run_json("rm", "k:best", "--force", store=uri) == ["k@1"]
    assert run_cas("show", "k:best", store=uri).returncode == 2
    assert [v["ref"] for v in run_json("log", "k", store=uri)] == ["k@2"]


def test_rm_all(uri: str, files: list[Path]) -> None:
    ok(run_cas("put", files[0], "k", store=uri))
    ok(run_cas("put", files[1], "k", "--tag", "prod", store=uri))
    ok(run_cas("put", files[2], "other", store=uri))
    proc = run_cas("rm", "k", "--all", store=uri)
    assert proc.returncode == 2
    assert "k@2" in proc.stderr
    assert run_cas("rm", "k@1", "--all", store=uri).returncode == 2
    assert sorted(run_json("rm", "k", "--all", "--force", store=uri)) == ["k@1", "k@2"]
    assert run_cas("log", "k", store=uri).returncode == 2
    assert [k["key"] for k in run_json("ls", store=uri)] == ["other"]


def test_gc_report_dry_run_and_grace(uri: str, files: list[Path]) -> None:
    ok(run_cas("put", files[0], "k", store=uri))
    ok(run_cas("put", files[1], "k", store=uri))
    ok(run_cas("rm", "k@1", store=uri))

    # Default grace: hours. The deleted version is kept by it, and the report says so.
    report = run_json("gc", "--dry-run", store=uri)
    assert report["grace"] == 6 * 3600
    assert report["dry_run"] is True
    assert report["deleted"] == 0
    assert report["kept_by_grace"] > 0
    assert report["bytes_kept_by_grace"] > 120 * KiB
    for field in ("scanned", "reachable", "bytes_reclaimed", "seconds", "versions"):
        assert field in report

    text = ok(run_cas("gc", store=uri)).stdout
    assert "kept by grace:" in text
    assert "took:" in text

    proc = run_cas("gc", "--grace", "0", "--dry-run", "--json", store=uri)
    dry = ok(proc)
    assert "unsafe with concurrent writers" in proc.stderr
    proc = ok(run_cas("gc", "--grace", "0", "--json", store=uri))
    assert "unsafe with concurrent writers" in proc.stderr
    would, did = json.loads(dry.stdout), json.loads(proc.stdout)
    for field in ("scanned", "reachable", "deleted", "bytes_reclaimed"):
        assert would[field] == did[field], field
    assert did["bytes_reclaimed"] > 120 * KiB
    stats = run_json("stats", store=uri)
    assert stats["stored_bytes"] == stats["live_bytes"]
    assert run_json("verify", "--deep", store=uri)["ok"] is True


def test_gc_set_grace_and_bad_input(uri: str, tmp_path: Path) -> None:
    assert run_json("gc", "--set-grace", "90m", store=uri)["grace"] == 5400
    assert run_json("gc", "--dry-run", store=uri)["grace"] == 5400
    proc = run_cas("gc", "--dry-run", "--json", "--grace", "10m", store=uri)
    assert "unsafe with concurrent writers" in proc.stderr
    for bad in (["--grace", "soon"], ["--set-grace", "0"], ["--set-grace", "-1h"]):
        proc = run_cas("gc", *bad, store=uri)
        assert proc.returncode == 2, (bad, proc.stderr)
    proc = run_cas("gc", store=tmp_path / "nothing-here")
    assert proc.returncode == 2
    assert "not a cas store" in proc.stderr


def test_a_lost_manifest_stops_gc_with_advice_in_the_callers_terms(
    tmp_path: Path, files: list[Path]
) -> None:
    store = Store.init(tmp_path / "store", chunker=PARAMS)
    store.put(files[0], "k")
    for info in list(store.backend.list_objects("manifests/")):
        store.backend.delete([info.key])
    with pytest.raises(MissingObjectError) as err:
        store.gc(grace=0)
    assert "Verify the store (Store.verify); if k@1 cannot be repaired, deleting k@1" in str(
        err.value
    )
    proc = run_cas("gc", "--grace", "0", store=tmp_path / "store")
    assert proc.returncode == 3
    assert "Run `cas verify`; if k@1 cannot be repaired, `cas rm k@1` lets gc run again" in (
        proc.stderr
    )
