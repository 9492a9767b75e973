"""``cas ui`` over HTTP (no browser): content, escaping, refused paths, tokens, failures.

tests/test_ui_browser.py drives the same pages in Chromium.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import CAS, cas_env, load_script, ok, run_cas
from ui_fixtures import base_url, copy_of, manifest_file, request

from cas.backends import LocalBackend
from cas.errors import InvalidInputError
from cas.store import Store
from cas.store._config import load_config
from cas.testing.faults import FaultyBackend
from cas.ui import UiServer, render_report

demo = load_script("ui_demo")


def test_keys_page_lists_every_key_with_its_latest_and_cost(demo_base: str) -> None:
    base = demo_base
    page = request(base, "/")
    assert page.status == 200
    keys = ("datasets/corpus", "runs/demo/ckpt", "models/demo-lora", "models/demo-bf16")
    for key in (*keys, "hostile/notes"):
        assert f'href="/key/{key}"' in page.text
    assert 'href="/version/runs/demo/ckpt@4"' in page.text  # the latest
    assert ">best<" in page.text  # the key's tag
    row = re.search(r'<a href="/key/runs/demo/ckpt">.*?</tr>', page.text, re.S)
    assert row is not None
    assert "MiB" in row.group(0)


def test_keys_page_lists_the_keys_under_a_prefix(demo_base: str) -> None:
    page = request(demo_base, "/?prefix=models/").text
    assert re.findall(r'<a href="/key/([^"]+)">', page) == ["models/demo-bf16", "models/demo-lora"]
    assert "No key starts with zzz." in request(demo_base, "/?prefix=zzz").text


def test_key_page_has_every_version_a_point_each_and_the_best_marked(demo_base: str) -> None:
    base = demo_base
    page = request(base, "/key/runs/demo/ckpt").text
    assert len(re.findall(r'<tr class="best"|<tr data-ref=', page)) == 4
    points = re.findall(r'<circle[^>]*class="(pt(?: best)?)"[^>]*data-ref="([^"]+)"', page)
    assert sorted(ref for _, ref in points) == [f"runs/demo/ckpt@{n}" for n in range(1, 5)]
    assert [ref for cls, ref in points if cls == "pt best"] == ["runs/demo/ckpt@3"]  # loss 0.43
    by_acc = request(base, "/key/runs/demo/ckpt?metric=acc").text
    assert 'data-metric="acc"' in by_acc
    assert re.search(r'class="pt best"[^>]*data-ref="runs/demo/ckpt@3"', by_acc)  # acc 0.82 max
    worst = request(base, "/key/runs/demo/ckpt?metric=loss&best=max").text
    assert re.search(r'class="pt best"[^>]*data-ref="runs/demo/ckpt@1"', worst)
    for column in ("acc", "loss", "job", "algorithm", "base model", "added"):
        assert f"<th>{column}</th>" in page
    assert "demo-run-1" in page
    assert "adamw" in page


def test_version_page_shows_files_tensors_lineage_and_the_diff(demo_base: str) -> None:
    base = demo_base
    page = request(base, "/version/runs/demo/ckpt@3").text
    assert "model.safetensors" in page
    assert "state.json" in page
    for tensor in ("embed", "layer0", "layer1", "head"):
        assert f"<td>{tensor}</td>" in page
    assert "[384, 768]" in page
    assert "F32" in page
    nodes = set(re.findall(r'<g class="node[^"]*" data-ref="([^"]+)"', page))
    assert nodes == {
        "datasets/corpus@1",
        "runs/demo/ckpt@1",
        "runs/demo/ckpt@2",
        "runs/demo/ckpt@3",
        "runs/demo/ckpt@4",
        "models/demo-lora@1",
    }
    assert '<a href="/version/runs/demo/ckpt@2"><g class="node"' in page
    diff = page[page.index('id="diff"') :]
    assert "runs/demo/ckpt@2" in diff
    assert "~ layer1" in diff
    other = request(base, "/version/runs/demo/ckpt@3?against=runs/demo/ckpt@1").text
    assert 'href="/version/runs/demo/ckpt@1"' in other[other.index('id="diff"') :]
    bad = request(base, "/version/runs/demo/ckpt@3?against=runs/demo/ckpt@99").text
    assert "cannot compare with runs/demo/ckpt@99" in bad


def test_tensors_are_shown_raw_grouped_or_delta(demo_base: str) -> None:
    page = request(demo_base, "/version/models/demo-bf16@2").text
    rows = dict(
        re.findall(r"<tr><td>([\w.]+)</td><td>(?:BF16|F32)</td>.*?<td>(\w+)</td></tr>", page)
    )
    assert rows["w"] == "delta"  # a fine-tuning step, stored as its difference from @1
    assert {rows[f"head.{i}"] for i in range(8)} == {"grouped"}
    first = request(demo_base, "/version/models/demo-bf16@1").text
    assert re.search(r"<tr><td>w</td><td>BF16</td><td>\[30000\]</td>.*?<td>raw</td></tr>", first)


def test_store_page_shows_stats_bytes_by_key_and_gc_state(demo_store: Path, serve: Any) -> None:
    store = Store.open(str(demo_store), create=False)
    base = base_url(serve(store))
    page = request(base, "/store").text
    stats = store.stats()
    assert f"<td>{stats.versions}</td>" in page
    assert f"{stats.dedup_ratio:.2f}x" in page
    assert f"{stats.compression_ratio:.2f}x" in page
    assert 'class="bar"' in page
    assert ">runs/demo/ckpt</text>" in page
    assert "grace period" in page
    assert "6h" in page
    assert "would reclaim" in page


def test_hostile_metadata_label_message_and_file_name_are_text(demo_base: str) -> None:
    base = demo_base
    page = request(base, "/version/hostile/notes@1").text
    for value in demo.HOSTILE.values():  # metadata is shown as JSON
        assert html.escape(json.dumps(value)[1:-1], quote=True) in page
    for text in [demo.HOSTILE_MESSAGE, demo.HOSTILE_FILE, "<b>x</b>"]:
        assert html.escape(text, quote=True) in page
    assert "<script>alert" not in page
    assert "<img src=x" not in page
    assert "<svg onload" not in page
    assert 'href="javascript:' not in page
    assert len(re.findall(r"<script", page)) == 1  # the page's own poll, nonce and all


def test_every_response_forbids_other_scripts(demo_base: str) -> None:
    base = demo_base
    page = request(base, "/version/hostile/notes@1")
    policy = page.headers["content-security-policy"]
    nonce = re.search(r"'nonce-([^']+)'", policy)
    assert nonce is not None
    assert f'<script nonce="{nonce.group(1)}">' in page.text
    assert "default-src 'none'" in policy
    assert "form-action 'self'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    "path",
    [
        "/../config",
        "/%2e%2e/config",
        "/key/../../config",
        "/key/..%2F..%2Fconfig",
        "/key/%2e%2e/%2e%2e/etc/passwd",
        "/version/../../../etc/passwd",
        "/version/..%2F..%2Fetc%2Fpasswd@1",
        "/key//etc/passwd",
        "/key/runs/demo/ckpt/../../../config",
        "/static/../../config",
        "/config",
        "/refs/runs/demo/ckpt/1",
        "//etc/passwd",
        "/key/C:%5Cwindows",
        "/version/runs%00/x@1",
    ],
)
def test_no_path_reaches_the_file_system(demo_store: Path, demo_base: str, path: str) -> None:
    base = demo_base
    page = request(base, path)
    assert page.status in (400, 404)
    config = (demo_store / "config").read_text()
    assert config not in page.text
    assert "root:" not in page.text
    assert "Traceback" not in page.text


def test_store_page_reads_the_catalog_once(demo_store: Path, serve: Any) -> None:
    backend = FaultyBackend(LocalBackend(demo_store))
    store = Store(backend, load_config(backend, create=False))
    base = base_url(serve(store))
    assert request(base, "/store").status == 200  # reads and keeps every manifest once
    backend.reset_counts()
    store.catalog()
    query = [key for key in backend.keys["get"] if key.startswith("refs/")]
    backend.reset_counts()
    assert request(base, "/store").status == 200
    gets = backend.keys["get"]
    assert gets.count("catalog/head") == 2, gets  # one query: the head, and again after the log
    # The refs of the changes since the last compaction, as one query reads them: once.
    assert sorted(key for key in gets if key.startswith("refs/")) == sorted(query)


def test_requests_never_change_the_store(demo_store: Path, serve: Any) -> None:
    store = Store.open(str(demo_store), create=False)
    before = sorted(p.relative_to(demo_store) for p in demo_store.rglob("*"))
    base = base_url(serve(store))
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert request(base, "/version/runs/demo/ckpt@1", method=method).status == 405
    for path in ("/", "/store", "/key/runs/demo/ckpt", "/version/runs/demo/ckpt@2", "/changes"):
        assert request(base, path).status == 200
    assert sorted(p.relative_to(demo_store) for p in demo_store.rglob("*")) == before


def test_a_foreign_host_name_is_refused(demo_base: str) -> None:
    """A page elsewhere cannot reach the server through a name that resolves to 127.0.0.1."""
    base = demo_base
    assert request(base, "/", headers={"Host": "attacker.example:80"}).status == 403
    assert request(base, "/", headers={"Host": "localhost:1"}).status == 200


def test_a_store_failing_mid_request_gives_an_error_page(demo_store: Path, serve: Any) -> None:
    backend = FaultyBackend(LocalBackend(demo_store), fail_on={"get"}, prefix="manifests/")
    store = Store(backend, load_config(backend, create=False))
    base = base_url(serve(store))
    page = request(base, "/version/runs/demo/ckpt@3")
    assert page.status == 502
    assert "The store failed" in page.text
    assert "injected fault" in page.text
    assert "Traceback" not in page.text
    assert 'File "' not in page.text
    backend.disarm()
    assert request(base, "/version/runs/demo/ckpt@3").status == 200


def test_unknown_keys_and_versions_are_not_found(demo_base: str) -> None:
    base = demo_base
    assert request(base, "/key/no/such/key").status == 404
    assert request(base, "/version/runs/demo/ckpt@9").status == 404
    assert request(base, "/version/runs/demo/ckpt@x").status == 400


def test_another_host_needs_the_token(demo_store: Path, serve: Any) -> None:
    store = Store.open(str(demo_store), create=False)
    with pytest.raises(InvalidInputError, match="access token"):
        UiServer(store, "0.0.0.0")
    server = serve(store, host="0.0.0.0", token="s3cret-token")
    assert "token=s3cret-token" in server.url
    base = base_url(server)
    assert request(base, "/").status == 401
    assert request(base, "/changes").status == 401
    assert request(base, "/?token=wrong").status == 401
    port = server.server_address[1]
    assert request(base, "/", headers={"Cookie": f"cas_ui_token_{port}=wrong"}).status == 401
    assert request(base, "/", headers={"Cookie": "cas_ui_token_1=s3cret-token"}).status == 401
    handed = request(base, "/key/runs/demo/ckpt?token=s3cret-token")
    assert handed.status == 303
    assert handed.headers["location"] == "/key/runs/demo/ckpt"
    assert "HttpOnly" in handed.headers["set-cookie"]
    cookie = handed.headers["set-cookie"].split(";")[0]
    assert request(base, "/key/runs/demo/ckpt", headers={"Cookie": cookie}).status == 200


def test_changes_follow_new_versions(tmp_path: Path, serve: Any) -> None:
    store = Store.init(str(tmp_path / "store"))
    (tmp_path / "a").write_text("a")
    store.put(tmp_path / "a", "k")
    base = base_url(serve(store, poll_seconds=0))  # each answer fresh
    first = request(base, "/changes").text
    assert request(base, "/changes").text == first
    store.put(tmp_path / "a", "k")
    second = request(base, "/changes").text
    store.tag("k@1", "t")
    assert len({first, second, request(base, "/changes").text}) == 3


def test_an_empty_store_has_pages(tmp_path: Path, serve: Any) -> None:
    base = base_url(serve(Store.init(str(tmp_path / "store"))))
    assert "holds no versions" in request(base, "/").text
    assert request(base, "/store").status == 200


def test_the_report_is_one_file_that_fetches_and_runs_nothing(demo_store: Path) -> None:
    store = Store.open(str(demo_store), create=False)
    report = render_report(store, "runs/demo/ckpt")
    assert "<script" not in report
    assert re.search(r"""(src|href)=["']?(https?:|//)""", report) is None
    assert "Content-Security-Policy" in report
    assert "default-src 'none'" in html.unescape(report)
    assert report.count('<svg width="760"') == 2  # acc and loss, each across the versions
    assert "runs/demo/ckpt@4" in report
    assert "~ layer1" in report
    hostile = render_report(store, "hostile/notes@1")
    assert "<script" not in hostile
    assert "<img src=x" not in hostile
    assert html.escape(demo.HOSTILE["note"]) in hostile


def test_cas_report_writes_the_file(demo_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    proc = ok(run_cas("report", "runs/demo/ckpt:best", "-o", out, store=demo_store))
    assert f"wrote {out}" in proc.stdout
    assert "runs/demo/ckpt@3" in out.read_text()
    missing = run_cas("report", "runs/demo/ckpt@9", "-o", tmp_path / "x.html", store=demo_store)
    assert missing.returncode == 2
    assert not (tmp_path / "x.html").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def _start_ui(store: Path, *args: str) -> tuple[subprocess.Popen[str], str, list[str]]:
    proc = subprocess.Popen(
        [*CAS, "--store", str(store), "ui", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cas_env(),
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline().strip() for _ in range(2)]
    url = next(line for line in lines if line.startswith("http://"))
    if args and "--host" in args:
        lines.append(proc.stdout.readline().strip())
    return proc, url, lines


def test_cas_ui_prints_its_address_and_serves(demo_store: Path) -> None:
    proc, url, _ = _start_ui(demo_store)
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url)
        assert "runs/demo/ckpt" in request(url, "/").text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cas_ui_on_another_host_prints_a_token(demo_store: Path) -> None:
    proc, url, lines = _start_ui(demo_store, "--host", "0.0.0.0")
    try:
        token = re.search(r"token=([\w-]+)", url)
        assert token is not None
        assert any(token.group(1) in line for line in lines[1:])
        base = url.replace("0.0.0.0", "127.0.0.1")
        assert request(base, "/").status == 401
        assert request(base, f"/?token={token.group(1)}").status == 303
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_lineage_as_mermaid_and_dot(demo_store: Path, tmp_path: Path) -> None:
    mermaid = ok(run_cas("lineage", "runs/demo/ckpt@3", "--mermaid", store=demo_store)).stdout
    assert mermaid.startswith("flowchart LR\n")
    assert '["runs/demo/ckpt@3<br/>checkpoint<br/>acc=0.82 loss=0.43"]' in mermaid
    assert len(re.findall(r"^  n\d+ --> n\d+$", mermaid, re.M)) == 5
    assert re.search(r"^  class n\d+ root;$", mermaid, re.M)
    ok(run_cas("lineage", "runs/demo/ckpt@3", "--mermaid", tmp_path / "g.mmd", store=demo_store))
    assert (tmp_path / "g.mmd").read_text() == mermaid
    dot = ok(run_cas("lineage", "runs/demo/ckpt@3", "--dot", store=demo_store)).stdout
    assert dot.startswith("digraph lineage {")
    both = run_cas("lineage", "runs/demo/ckpt@3", "--dot", "--mermaid", store=demo_store)
    assert both.returncode == 2
    assert "not allowed with" in both.stderr


def test_every_page_on_every_backend(any_backend: Any, tmp_path: Path, serve: Any) -> None:
    store = Store(any_backend, load_config(any_backend, create=True))
    (tmp_path / "w.bin").write_bytes(bytes(range(256)) * 512)
    store.put(tmp_path / "w.bin", "runs/r", metrics={"loss": 0.5})
    (tmp_path / "w.bin").write_bytes(bytes(range(256)) * 511 + b"x" * 256)
    store.put(tmp_path / "w.bin", "runs/r", parents=["runs/r@1"], metrics={"loss": 0.4})
    store.tag("runs/r@2", "best")
    base = base_url(serve(store))
    assert 'href="/version/runs/r@2"' in request(base, "/").text
    key = request(base, "/key/runs/r").text
    assert len(re.findall(r"<circle", key)) == 2
    version = request(base, "/version/runs/r@2").text
    assert 'data-ref="runs/r@1"' in version
    assert "w.bin" in version[version.index('id="diff"') :]
    assert request(base, "/store").status == 200


def test_cas_ui_open_starts_the_browser(demo_store: Path, tmp_path: Path) -> None:
    opened = tmp_path / "opened"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\necho "$1" > {opened}\n')
    browser.chmod(0o755)
    proc = subprocess.Popen(
        [*CAS, "--store", str(demo_store), "ui", "--open"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cas_env({"BROWSER": str(browser)}),
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        url = proc.stdout.readline().strip()
        deadline = time.monotonic() + 30
        while not opened.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert opened.read_text().strip() == url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cas_ui_refuses_a_port_in_use(demo_store: Path, serve: Any) -> None:
    taken = serve(Store.open(str(demo_store), create=False))
    proc = run_cas("ui", "--port", str(taken.server_address[1]), store=demo_store)
    assert proc.returncode == 2
    assert "cannot listen on 127.0.0.1" in proc.stderr


def test_store_page_shows_the_last_collection(tmp_path: Path, serve: Any) -> None:
    store = Store.init(str(tmp_path / "store"))
    for text in ("one", "two"):
        (tmp_path / "f").write_text(text * 1000)
        store.put(tmp_path / "f", "k")
    store.delete("k@2")
    base = base_url(serve(store))
    assert "none recorded" in request(base, "/store").text
    store.gc(dry_run=True, grace=0)
    assert store.last_gc() is None  # a dry run is not a collection
    store.gc(grace=0)
    run = store.last_gc()
    assert run is not None
    assert run.deleted_chunks == 1
    assert run.deleted_manifests == 1
    assert abs(run.finished - time.time()) < 600
    page = request(base, "/store").text
    assert "deleted 1 chunks and 1 manifests" in page


def test_a_damaged_version_spoils_only_its_own_page(
    demo_store: Path, tmp_path: Path, serve: Any
) -> None:
    root, store = copy_of(demo_store, tmp_path)
    damaged = store.log("runs/demo/ckpt")[-1]  # @1
    manifest_file(root, damaged.manifest_id).write_bytes(b"{}")
    base = base_url(serve(store))
    assert request(base, "/").status == 200
    assert request(base, "/key/runs/demo/ckpt").status == 200
    page = request(base, "/version/runs/demo/ckpt@1")
    assert page.status == 502
    assert damaged.manifest_id in page.text
    assert "Traceback" not in page.text
