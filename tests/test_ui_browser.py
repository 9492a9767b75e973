"""The web view and the report in a real browser: Debian's Chromium, headless, via Playwright.

scripts/test.sh installs the ``chromium`` package; Playwright drives that
binary and never downloads a browser of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import load_script
from ui_fixtures import Gate, base_url

from cas.backends import LocalBackend
from cas.store import Store
from cas.store._config import load_config
from cas.testing.faults import FaultyBackend
from cas.ui import render_report

screenshots = load_script("ui_screenshots")
demo = load_script("ui_demo")
sync_api = pytest.importorskip("playwright.sync_api")
if not Path(screenshots.CHROMIUM).exists():
    pytest.skip(
        f"{screenshots.CHROMIUM} is not installed (scripts/test.sh installs it)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = screenshots.launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page that records every dialog (alert, confirm) a script opens."""
    context = browser.new_context()
    tab = context.new_page()
    tab.dialogs = []
    tab.on("dialog", lambda dialog: (tab.dialogs.append(dialog.message), dialog.dismiss()))
    yield tab
    context.close()


def test_click_through_keys_key_version_and_lineage(demo_base: str, page: Any) -> None:
    page.goto(demo_base + "/")
    assert page.locator("#keys tbody tr").count() == 5
    page.get_by_role("link", name="runs/demo/ckpt", exact=True).click()
    page.wait_for_url("**/key/runs/demo/ckpt")
    assert page.locator("#versions tbody tr").count() == 4
    points = page.locator("svg.plot circle.pt")
    assert points.count() == 4  # one point per version
    assert page.locator("svg.plot circle.best").get_attribute("data-ref") == "runs/demo/ckpt@3"
    assert page.locator("tr.best").get_attribute("data-ref") == "runs/demo/ckpt@3"
    page.get_by_role("link", name="@3", exact=True).click()
    page.wait_for_url("**/version/runs/demo/ckpt@3")
    assert "layer1" in page.locator("#tensors").inner_text()
    page.locator('svg.lineage g.node[data-ref="runs/demo/ckpt@2"]').click()
    page.wait_for_url("**/version/runs/demo/ckpt@2")
    assert page.locator("h1").inner_text() == "Version runs/demo/ckpt@2"
    page.locator('svg.lineage g.node[data-ref="models/demo-lora@1"]').click()
    page.wait_for_url("**/version/models/demo-lora@1")
    assert page.dialogs == []


def test_metric_choice_and_diff_choice(demo_base: str, page: Any) -> None:
    page.goto(demo_base + "/key/runs/demo/ckpt")
    page.select_option("#metric", "acc")
    page.get_by_role("button", name="show").click()
    page.wait_for_url("**metric=acc**")
    assert page.locator("svg.plot").get_attribute("data-metric") == "acc"
    assert page.locator("svg.plot circle.best").get_attribute("data-ref") == "runs/demo/ckpt@3"
    page.goto(demo_base + "/version/runs/demo/ckpt@3")
    diff = page.locator("#diff")
    assert diff.locator(".changed-tensor").all_inner_texts() == ["~ layer1"]
    page.fill("input[name=against]", "runs/demo/ckpt@1")
    page.get_by_role("button", name="diff").click()
    page.wait_for_url("**against=runs%2Fdemo%2Fckpt%401")
    assert "runs/demo/ckpt@1 → runs/demo/ckpt@3" in diff.inner_text()


def test_hostile_metadata_runs_no_script(
    demo_store: Path, demo_base: str, page: Any, tmp_path: Path
) -> None:
    page.goto(demo_base + "/version/hostile/notes@1")
    page.wait_for_timeout(300)
    text = page.locator("#facts").inner_text()
    assert demo.HOSTILE_MESSAGE in text
    assert "<script>alert('metadata')</script>" in text
    assert "javascript:alert('link')" in text
    assert demo.HOSTILE_FILE in page.locator("#files").inner_text()
    assert page.locator("img, svg[onload], a[href^='javascript']").count() == 0
    assert page.dialogs == []
    report = tmp_path / "report.html"
    report.write_text(render_report(Store.open(str(demo_store), create=False), "hostile/notes"))
    page.goto(report.as_uri())
    assert "<script>alert('metadata')</script>" in page.locator("main").inner_text()
    assert page.dialogs == []


def test_error_page_when_the_store_fails(demo_store: Path, serve: Any, page: Any) -> None:
    backend = FaultyBackend(LocalBackend(demo_store), fail_on={"get"}, prefix="manifests/")
    base = base_url(serve(Store(backend, load_config(backend, create=False))))
    response = page.goto(base + "/version/runs/demo/ckpt@2")
    assert response.status == 502
    assert page.locator("h1").inner_text() == "The store failed"
    assert "injected fault" in page.locator("main").inner_text()


def test_token_is_needed_on_another_host(demo_store: Path, serve: Any, page: Any) -> None:
    server = serve(Store.open(str(demo_store), create=False), host="0.0.0.0", token="t0ken")
    base = base_url(server)
    assert page.goto(base + "/").status == 401
    page.goto(base + "/?token=t0ken")
    assert page.url == base + "/"
    assert page.locator("#keys tbody tr").count() == 5
    page.goto(base + "/store")  # the cookie carries on
    assert page.locator("#stats").count() == 1


def test_page_reloads_when_a_version_lands(tmp_path: Path, serve: Any, page: Any) -> None:
    store = Store.init(str(tmp_path / "store"))
    (tmp_path / "a").write_text("a")
    store.put(tmp_path / "a", "k", metrics={"loss": 1.0})
    base = base_url(serve(store, poll_seconds=0.2))
    page.goto(base + "/key/k")
    assert page.locator("svg.plot circle.pt").count() == 1
    page.wait_for_timeout(500)  # the page has its first fingerprint
    threading.Thread(target=lambda: store.put(tmp_path / "a", "k", metrics={"loss": 0.5})).start()
    # The page's CSP forbids evaluating strings, so wait_for_function cannot poll: expect can.
    sync_api.expect(page.locator("svg.plot circle.pt")).to_have_count(2, timeout=15_000)
    assert page.locator("#versions tbody tr").count() == 2


def test_figures_fill_in_without_a_reload_once_read(
    demo_store: Path, serve: Any, browser: Any
) -> None:
    gate = Gate(LocalBackend(demo_store))
    store = Store(gate, load_config(gate, create=False))
    try:
        base = base_url(serve(store, figures_wait=0, poll_seconds=60))
        context = browser.new_context()
        keys, store_tab = context.new_page(), context.new_page()
        keys.goto(base + "/")
        store_tab.goto(base + "/store")
        row = keys.locator("#keys tbody tr", has=keys.get_by_role("link", name="runs/demo/ckpt"))
        assert row.locator("td").nth(1).inner_text() == "4"  # the catalog's, at once
        assert row.locator(".computing").all_inner_texts() == ["computing…"] * 2
        assert keys.locator("#computing-note").count() == 1
        assert store_tab.locator("#stats .computing").count() > 0
        gate.opened.set()  # the server reads the manifests; nobody reloads the pages
        sync_api.expect(keys.locator(".computing")).to_have_count(0, timeout=30_000)
        sync_api.expect(store_tab.locator(".computing")).to_have_count(0, timeout=30_000)
        assert keys.locator("#computing-note").count() == 0
        assert "MiB" in row.locator("td").nth(6).inner_text()  # stored
        stats = Store.open(str(demo_store), create=False).stats()
        assert f"{stats.dedup_ratio:.2f}x" in store_tab.locator("#stats").inner_text()
        assert store_tab.locator("svg rect.bar").count() == 5  # stored bytes by key
        context.close()
    finally:
        gate.opened.set()


def test_report_works_from_a_file_with_the_network_off(
    demo_store: Path, tmp_path: Path, browser: Any
) -> None:
    report = tmp_path / "report.html"
    report.write_text(render_report(Store.open(str(demo_store), create=False), "runs/demo/ckpt"))
    context = browser.new_context(offline=True)
    requested: list[str] = []
    context.on("request", lambda request: requested.append(request.url))
    tab = context.new_page()
    tab.goto(report.as_uri())
    assert tab.locator("svg.plot").count() == 2  # acc and loss
    assert tab.locator('svg.plot[data-metric="loss"] circle.pt').count() == 4
    assert "layer1" in tab.locator(".tensors").first.inner_text()
    assert tab.locator("svg.lineage g.node").count() == 4  # @4 and three generations up
    tab.locator('svg.lineage g.node[data-ref="runs/demo/ckpt@4"]').click()  # an anchor
    assert requested == [report.as_uri()]
    context.close()
