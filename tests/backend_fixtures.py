"""Backend fixtures: a fresh, empty Backend per test on every kind of storage.

``memory_backend``, ``local_backend``, ``s3_backend``, ``gcs_backend`` and
``azure_backend`` each yield an empty backend; ``any_backend`` is the same,
parametrised over all five, and ``any_backend_uri`` yields a store URI that
``open_backend`` (and a ``cas`` subprocess) can open by itself.

Cloud backends talk to real servers on 127.0.0.1 (see ``servers.py``),
started once per session on first use and stopped at its end. Every test gets
its own bucket or container, created through the backend's ``create_bucket``
and removed afterwards. A server that cannot start skips its tests, except
when ``CI`` is set: there a skipped backend would hide a regression, so the
tests fail instead.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import servers

from cas.backends import Backend, LocalBackend, MemoryBackend

if TYPE_CHECKING:  # the cloud SDKs load only when a test asks for that backend
    from cas.backends.azure import AzureBackend
    from cas.backends.gcs import GCSBackend
    from cas.backends.s3 import S3Backend

IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
BACKEND_KINDS = ["memory", "local", "s3", "gcs", "azure"]
CLOUD_KINDS = ["s3", "gcs", "azure"]
#: Key prefix inside each bucket, so the prefix mapping is exercised too.
PREFIX = "store"

_counter = itertools.count()


def unique_name(kind: str) -> str:
    """A bucket or container name valid on S3, GCS and Azure (lowercase, digits, '-')."""
    return f"cas-{kind}-{next(_counter)}-{uuid.uuid4().hex[:8]}"


def unavailable(what: str, reason: object) -> None:
    message = f"{what} unavailable: {reason}"
    if IN_CI:
        pytest.fail(f"{message} (CI is set, so backend tests may not be skipped)", pytrace=False)
    pytest.skip(message)


def _server(starter: Callable[[], servers.Server], what: str) -> Iterator[servers.Server]:
    try:
        server = starter()
    except servers.ServerUnavailable as err:
        unavailable(what, err)
        raise AssertionError("unreachable") from err
    # The environment lets code that opens stores by URI (open_backend, the
    # cas CLI in a subprocess) reach the same server.
    with pytest.MonkeyPatch.context() as env:
        for name, value in server.env.items():
            env.setenv(name, value)
        try:
            yield server
        finally:
            server.stop()


def _import_sdk(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        unavailable(what, f"{err}; pip install -e '.[test,all]'")
        raise AssertionError("unreachable") from err


# -- servers: one of each per session, started on first use -----------------------------


@pytest.fixture(scope="session")
def moto_server() -> Iterator[servers.Server]:
    _import_sdk("boto3", "S3 backend")
    yield from _server(servers.start_moto, "S3 test server (moto_server)")


@pytest.fixture(scope="session")
def fake_gcs_server() -> Iterator[servers.Server]:
    _import_sdk("google.cloud.storage", "GCS backend")
    yield from _server(servers.start_fake_gcs, "GCS test server (fake-gcs-server)")


@pytest.fixture(scope="session")
def azurite_server() -> Iterator[servers.Server]:
    _import_sdk("azure.storage.blob", "Azure backend")
    yield from _server(servers.start_azurite, "Azure test server (Azurite)")


# -- one fresh backend per test -------------------------------------------------------------


def _empty(backend: Backend) -> None:
    backend.delete([info.key for info in backend.list_objects()])


@pytest.fixture
def memory_backend() -> Iterator[Backend]:
    with MemoryBackend() as backend:
        yield backend


@pytest.fixture
def local_backend(tmp_path: Path) -> Iterator[Backend]:
    with LocalBackend(tmp_path / "store") as backend:
        yield backend


@pytest.fixture
def s3_backend(moto_server: servers.Server) -> Iterator[S3Backend]:
    from cas.backends.s3 import S3Backend

    backend = S3Backend(
        unique_name("s3"), PREFIX, endpoint_url=moto_server.endpoint, region="us-east-1"
    )
    backend.create_bucket()
    try:
        yield backend
    finally:
        _empty(backend)
        backend._client.delete_bucket(Bucket=backend.bucket)
        backend.close()


@pytest.fixture
def gcs_backend(fake_gcs_server: servers.Server) -> Iterator[GCSBackend]:
    from cas.backends.gcs import GCSBackend

    backend = GCSBackend(unique_name("gcs"), PREFIX, emulator_host=fake_gcs_server.endpoint)
    backend.create_bucket()
    try:
        yield backend
    finally:
        _empty(backend)
        backend._bucket.delete()
        backend.close()


@pytest.fixture
def azure_backend(azurite_server: servers.Server) -> Iterator[AzureBackend]:
    from cas.backends.azure import AzureBackend

    backend = AzureBackend(
        unique_name("az"),
        PREFIX,
        connection_string=azurite_server.env["AZURE_STORAGE_CONNECTION_STRING"],
        # Smaller than Azure's 5000, so that listing 1100 keys crosses pages.
        page_size=1000,
    )
    backend.create_bucket()
    try:
        yield backend
    finally:
        backend._container.delete_container()
        backend.close()


@pytest.fixture(params=BACKEND_KINDS)
def any_backend(request: pytest.FixtureRequest) -> Backend:
    """A fresh, empty backend of each kind in turn."""
    backend: Backend = request.getfixturevalue(f"{request.param}_backend")
    return backend


@pytest.fixture(params=BACKEND_KINDS)
def any_backend_uri(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URI of a fresh, empty store location of each kind; the environment reaches it."""
    kind: str = request.param
    if kind == "memory":
        yield f"memory://{unique_name('mem')}"
        return
    if kind == "local":
        yield str(tmp_path / "store")
        return
    backend: Backend = request.getfixturevalue(f"{kind}_backend")
    yield backend.uri  # s3://, gs:// or az://bucket/prefix
