"""Fixtures of the web view's tests: the demo store of scripts/ui_demo.py, served."""

from __future__ import annotations

import http.client
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
from helpers import load_script

from cas.backends import Backend
from cas.errors import BackendError
from cas.store import Store
from cas.testing.faults import FaultyBackend
from cas.ui import UiServer

T = TypeVar("T")


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    text: str


def request(
    base: str, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> Response:
    """One request with nothing rewritten: the path goes out exactly as given."""
    netloc = urlsplit(base).netloc
    connection = http.client.HTTPConnection(netloc, timeout=30)
    try:
        connection.putrequest(
            method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True
        )
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        reply = connection.getresponse()
        body = reply.read().decode("utf-8", "replace")
        return Response(reply.status, {k.lower(): v for k, v in reply.getheaders()}, body)
    finally:
        connection.close()


class Gate(FaultyBackend):
    """Holds every read of a manifest until :attr:`opened` is set: a store whose
    manifests take as long to read as a test needs."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.opened = threading.Event()

    def _call(self, op: str, keys: Sequence[str], request: Callable[[], T]) -> T:
        held = op == "get" and any(key.startswith("manifests/") for key in keys)
        if held and not self.opened.wait(120):
            raise BackendError("the gate was never opened")
        return super()._call(op, keys, request)


def copy_of(demo_store: Path, tmp_path: Path) -> tuple[Path, Store]:
    """A copy of the demo store, for a test that damages it."""
    root = tmp_path / "store"
    shutil.copytree(demo_store, root)
    return root, Store.open(str(root), create=False)


def manifest_file(root: Path, manifest_id: str) -> Path:
    (path,) = root.glob(f"manifests/**/{manifest_id}*")
    return path


def wait_until_ready(base: str) -> None:
    """Until the server says it has read every manifest asked for (``/changes``)."""
    deadline = time.monotonic() + 120
    while request(base, "/changes").text.splitlines()[1] != "ready":
        assert time.monotonic() < deadline, "the figures were never read"
        time.sleep(0.05)


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ui") / "store"
    load_script("ui_demo").build(root)
    return root


@pytest.fixture
def serve() -> Iterator[object]:
    """``serve(store, **options)`` starts a server; each is stopped after the test.

    Its pages wait for every figure (``figures_wait=None``) unless a test says
    otherwise, so what they show does not depend on the machine's speed.
    """
    servers: list[UiServer] = []

    def start(store: Store, **options: object) -> UiServer:
        options.setdefault("figures_wait", None)
        server = UiServer(store, **options)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def base_url(server: UiServer) -> str:
    host, port = str(server.server_address[0]), server.server_address[1]
    return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"


@pytest.fixture
def demo_base(demo_store: Path, serve: Any) -> str:
    """The address of a server of the demo store."""
    return base_url(serve(Store.open(str(demo_store), create=False)))
