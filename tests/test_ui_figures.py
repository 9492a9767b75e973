"""``cas ui``'s figures that need manifests, read off the request path (cas/ui/_figures.py).

A page answers from the catalog at once, shows "computing…" where a figure
needs manifests not read yet, and shows it, right, once the server has read
them. The :class:`Gate` holds every manifest read, so "not read yet" is a
state of the test, not of the machine's speed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ui_fixtures import Gate, base_url, copy_of, manifest_file, request, wait_until_ready

from cas.backends import LocalBackend
from cas.store import Store
from cas.store._config import load_config
from cas.testing.faults import FaultyBackend
from cas.ui import UiServer

COMPUTING = 'class="computing"'


@pytest.fixture
def gated() -> Iterator[Callable[[Path], tuple[Gate, Store]]]:
    """``gated(root)``: a gate on the store at ``root``, opened after the test at the latest
    (a reader held by it would keep the test run from ending)."""
    gates: list[Gate] = []

    def make(root: Path) -> tuple[Gate, Store]:
        gates.append(Gate(LocalBackend(root)))
        return gates[-1], Store(gates[-1], load_config(gates[-1], create=False))

    yield make
    for gate in gates:
        gate.opened.set()


def without_nonces(text: str) -> str:
    return re.sub(r'nonce="[^"]+"', "", text)


def row_of(page: str, key: str) -> str:
    row = re.search(rf'<tr><td><a href="/key/{key}">.*?</tr>', page, re.S)
    assert row is not None, key
    return row.group(0)


def test_pages_answer_before_the_manifests_are_read(
    demo_store: Path, serve: Any, gated: Any
) -> None:
    _, store = gated(demo_store)
    base = base_url(serve(store, figures_wait=0))
    keys = request(base, "/")
    assert keys.status == 200
    row = row_of(keys.text, "runs/demo/ckpt")
    assert row.count(COMPUTING) == 2  # stored and own
    assert 'href="/version/runs/demo/ckpt@4"' in row  # what the catalog says is there
    assert 'id="computing-note"' in keys.text
    assert "pending=true" in keys.text  # its script asks often, and reloads once read
    key = request(base, "/key/runs/demo/ckpt").text
    assert key.count(COMPUTING) == 4  # what each version added
    assert 'id="computing-note"' in key
    page = request(base, "/store").text
    versions = len(store.catalog())
    assert f"<tr><th>versions</th><td>{versions}</td></tr>" in page
    assert re.search(rf"<th>stored bytes</th><td><span {COMPUTING}>", page)
    assert re.search(rf"<th>would reclaim</th><td><span {COMPUTING}>", page)
    assert 'class="bar"' not in page  # no chart of stored bytes by key yet
    assert request(base, "/changes").text.splitlines()[1] == "computing"


def test_figures_are_right_once_read(demo_store: Path, serve: Any, gated: Any) -> None:
    gate, store = gated(demo_store)
    base = base_url(serve(store, figures_wait=0))
    paths = ("/", "/?prefix=models/", "/key/runs/demo/ckpt", "/store")
    for path in paths:
        assert COMPUTING in request(base, path).text
    gate.opened.set()
    wait_until_ready(base)
    # A server that waits for every figure before it answers, as before they were read apart.
    reference = base_url(serve(Store.open(str(demo_store), create=False), figures_wait=None))
    for path in paths:
        page = request(base, path).text
        assert COMPUTING not in page
        assert "pending=false" in page
        assert without_nonces(page) == without_nonces(request(reference, path).text), path
    stats = store.stats()
    page = request(base, "/store").text
    assert f"<tr><th>dedup ratio</th><td>{stats.dedup_ratio:.2f}x</td></tr>" in page
    assert "MiB" in row_of(request(base, "/").text, "runs/demo/ckpt")


def test_a_page_waits_a_moment_for_its_figures(demo_store: Path, serve: Any) -> None:
    """Within ``figures_wait`` a page shows its figures, and nothing is "computing"."""
    base = base_url(serve(Store.open(str(demo_store), create=False), figures_wait=60))
    for path in ("/", "/key/runs/demo/ckpt", "/store"):
        assert COMPUTING not in request(base, path).text
    assert request(base, "/changes").text.splitlines()[1] == "ready"


def test_prepare_reads_every_manifest_before_a_page_asks(demo_store: Path, gated: Any) -> None:
    gate, store = gated(demo_store)
    server = UiServer(store, figures_wait=0)
    try:
        server.prepare()
        assert server.view.figures.busy  # reading, held by the gate
        gate.opened.set()
        server.start()
        wait_until_ready(base_url(server))
        gate.reset_counts()
        assert COMPUTING not in request(base_url(server), "/").text
        assert not [key for key in gate.keys["get"] if key.startswith("manifests/")]
    finally:
        server.shutdown()
        server.server_close()


def test_a_store_failing_while_figures_are_read_gives_an_error_page(
    demo_store: Path, serve: Any
) -> None:
    backend = FaultyBackend(LocalBackend(demo_store), fail_on={"get"}, prefix="manifests/")
    store = Store(backend, load_config(backend, create=False))
    base = base_url(serve(store, figures_wait=0))
    assert COMPUTING in request(base, "/").text
    wait_until_ready(base)  # the thread stopped at the failure
    failed = request(base, "/")
    assert failed.status == 502
    assert "injected fault" in failed.text
    backend.disarm()
    request(base, "/")  # asks again
    wait_until_ready(base)
    page = request(base, "/")
    assert page.status == 200
    assert COMPUTING not in page.text
    assert "MiB" in row_of(page.text, "runs/demo/ckpt")


def test_a_damaged_manifest_counts_as_nothing_and_is_read_again(
    demo_store: Path, tmp_path: Path, serve: Any
) -> None:
    root, store = copy_of(demo_store, tmp_path)
    manifest = manifest_file(root, store.log("datasets/corpus")[0].manifest_id)
    good = manifest.read_bytes()
    manifest.write_bytes(b"{}")
    base = base_url(serve(store, figures_wait=0))
    request(base, "/")
    wait_until_ready(base)
    page = request(base, "/").text
    assert COMPUTING not in page  # the damaged manifest does not hold the page back
    manifest.write_bytes(good)  # repaired
    request(base, "/")  # reads it again
    wait_until_ready(base)
    repaired = request(base, "/").text
    assert row_of(repaired, "datasets/corpus") != row_of(page, "datasets/corpus")


def test_chunks_of_a_new_version_are_listed_again(
    demo_store: Path, tmp_path: Path, serve: Any
) -> None:
    _, store = copy_of(demo_store, tmp_path)
    base = base_url(serve(store, figures_wait=0))
    request(base, "/")
    wait_until_ready(base)  # every manifest read, and the chunks listed
    (tmp_path / "new").write_bytes(bytes(range(256)) * 4000)
    store.put(tmp_path / "new", "fresh/key")  # chunks the last listing did not have
    request(base, "/")
    wait_until_ready(base)
    page = request(base, "/").text
    reference = base_url(serve(Store.open(store.uri, create=False), figures_wait=None))
    assert row_of(page, "fresh/key") == row_of(request(reference, "/").text, "fresh/key")
    assert "0 B" not in row_of(page, "fresh/key")
