"""Fixtures of the web view's tests: the demo store of scripts/ui_demo.py, served."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from helpers import load_script

from cas.store import Store
from cas.ui import UiServer


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


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ui") / "store"
    load_script("ui_demo").build(root)
    return root


@pytest.fixture
def serve() -> Iterator[object]:
    """``serve(store, **options)`` starts a server; each is stopped after the test."""
    servers: list[UiServer] = []

    def start(store: Store, **options: object) -> UiServer:
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
