"""Failures users hit with cloud stores: each one exits non-zero with a message naming the fix.

No credentials, wrong region, a missing bucket or container (and
``cas init --create-bucket``), access denied, an unreachable service, and a
service that goes away in the middle of a put. Every check runs the ``cas``
command against a real server on 127.0.0.1: moto (with IAM checks switched
on where access is denied), fake-gcs-server and Azurite. Two answers no
emulator gives, S3's redirect of a bucket in another region and GCS's 403,
come from a small HTTP server that replies what the services document; a
third, an S3 answer that breaks off after its headers, checks the backend's
own retry of a body read.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import servers
from backend_fixtures import CLOUD_KINDS, unique_name
from helpers import KiB, MiB, ok, random_bytes, rerun_after_failed_put, run_cas

from cas.backends import Backend, open_backend
from cas.chunks._chunking import ChunkerParams
from cas.errors import BackendError, RefNotFoundError
from cas.repository import _layout as layout
from cas.store import Store
from cas.testing.faults import FaultyBackend

SCHEME = {"s3": "s3", "gcs": "gs", "azure": "az"}
SERVER_FIXTURE = {"s3": "moto_server", "gcs": "fake_gcs_server", "azure": "azurite_server"}
EXIT_USAGE, EXIT_BACKEND = 2, 4


def failed(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """Assert a clean failure: the exit code, no traceback, and every needle in stderr."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("cas: error: "), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)
    return proc.stderr


class CannedServer:
    """An HTTP server on 127.0.0.1 that answers every request with one fixed reply."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        reply = (status, headers, body)

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                code, extra, payload = reply
                self.send_response(code)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> CannedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- no credentials ------------------------------------------------------------------------


def test_s3_without_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{servers.free_port()}")
    proc = run_cas("ls", store="s3://models/cas")
    failed(proc, EXIT_USAGE, "no AWS credentials for s3://models/cas", "AWS_ACCESS_KEY_ID")


def test_gcs_without_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud login here
    # Not on GCP: the metadata server, asked last, is a closed local port.
    dead = f"127.0.0.1:{servers.free_port()}"
    monkeypatch.setenv("GCE_METADATA_HOST", dead)
    monkeypatch.setenv("GCE_METADATA_IP", dead)
    proc = run_cas("ls", store="gs://models/cas")
    failed(
        proc,
        EXIT_USAGE,
        "no Google Cloud credentials for gs://models/cas",
        "gcloud auth application-default login",
        "GOOGLE_APPLICATION_CREDENTIALS",
    )


def test_azure_without_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT", raising=False)
    proc = run_cas("ls", store="az://models/cas")
    failed(
        proc, EXIT_USAGE, "no Azure account for az://models/cas", "AZURE_STORAGE_CONNECTION_STRING"
    )


# -- wrong region --------------------------------------------------------------------------

REDIRECT = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>PermanentRedirect</Code><Message>The bucket you are attempting to access must be
addressed using the specified endpoint. Please send all future requests to this endpoint.
</Message><Endpoint>models.s3.eu-west-1.amazonaws.com</Endpoint><Bucket>models</Bucket>
<RequestId>1</RequestId><HostId>1</HostId></Error>"""


def test_s3_bucket_in_another_region(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a regional S3 endpoint answers for a bucket that lives elsewhere.
    headers = {"Content-Type": "application/xml", "x-amz-bucket-region": "eu-west-1"}
    with CannedServer(301, headers, REDIRECT) as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.delenv("AWS_REGION", raising=False)
        proc = run_cas("ls", store="s3://models/cas")
    failed(
        proc,
        EXIT_USAGE,
        "bucket 'models' is not in region 'us-east-1'",
        "it is in 'eu-west-1'",
        "AWS_REGION",
    )


# -- missing bucket, and --create-bucket ------------------------------------------------------


@pytest.fixture(params=CLOUD_KINDS)
def cloud(request: pytest.FixtureRequest) -> str:
    """A cloud kind whose server is up and reachable through the environment."""
    request.getfixturevalue(SERVER_FIXTURE[request.param])
    kind: str = request.param
    return kind


def test_missing_bucket_names_the_fix_and_create_bucket_creates_it(
    cloud: str, tmp_path: Path
) -> None:
    uri = f"{SCHEME[cloud]}://{unique_name(cloud)}/team/cas"
    what = "container" if cloud == "azure" else "bucket"
    src = tmp_path / "w.bin"
    src.write_bytes(random_bytes(200 * KiB, 1))
    for argv in (["put", str(src), "k"], ["init"]):
        failed(
            run_cas(*argv, store=uri),
            EXIT_BACKEND,
            f"{what} '{uri.split('/')[2]}' does not exist",
            "cas init --create-bucket",
        )
    ok(run_cas("init", "--create-bucket", "--chunk-avg", "64K", store=uri))
    ok(run_cas("put", src, "k", store=uri))
    ok(run_cas("get", "k", tmp_path / "out.bin", store=uri))
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
    # The bucket exists now: --create-bucket is harmless, and the store is refused as such.
    failed(run_cas("init", "--create-bucket", store=uri), EXIT_USAGE, "already a cas store")
    backend = open_backend(uri)
    backend.delete([info.key for info in backend.list_objects()])
    backend.close()


# -- access denied -----------------------------------------------------------------------------


@pytest.fixture
def moto_with_iam(monkeypatch: pytest.MonkeyPatch) -> Iterator[servers.Server]:
    """A moto server that checks credentials and IAM policies after its first 3 requests."""
    with monkeypatch.context() as env:
        env.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "3")
        try:
            server = servers.start_moto()
        except servers.ServerUnavailable as err:
            pytest.fail(f"moto_server: {err}")
    try:
        yield server
    finally:
        server.stop()


def test_s3_access_denied(moto_with_iam: servers.Server, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    endpoint = moto_with_iam.endpoint
    admin = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", **admin)
    iam.create_user(UserName="reader")  # the three requests moto lets through unchecked
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **admin)
    s3.create_bucket(Bucket="models")

    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    uri = "s3://models/cas?max_attempts=1"
    # A valid identity without a policy that allows the bucket:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    failed(
        run_cas("ls", store=uri),
        EXIT_BACKEND,
        "access denied to s3://models/cas/config (AccessDenied)",
        "s3:GetObject",
        "s3:ListBucket",
    )
    # A key the service does not know:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN000000000")
    failed(run_cas("ls", store=uri), EXIT_BACKEND, "access denied", "InvalidAccessKeyId")


def test_azure_access_denied(
    azurite_server: servers.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"az://{unique_name('az')}/cas"
    ok(run_cas("init", "--create-bucket", store=uri))
    good = azurite_server.env["AZURE_STORAGE_CONNECTION_STRING"]
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", good.replace(servers.AZURITE_KEY, "A" * 86 + "==")
    )
    failed(
        run_cas("ls", store=uri),
        EXIT_BACKEND,
        f"access denied to {uri}/config (AuthorizationFailure)",
        "account key or SAS",
        "Storage Blob Data Contributor",
    )


def test_gcs_access_denied(monkeypatch: pytest.MonkeyPatch) -> None:
    body = {
        "error": {
            "code": 403,
            "message": "reader@p.iam.gserviceaccount.com does not have storage.objects.get "
            "access to the Google Cloud Storage object.",
            "errors": [{"domain": "global", "reason": "forbidden", "message": "denied"}],
        }
    }
    reply = json.dumps(body).encode()
    with CannedServer(403, {"Content-Type": "application/json"}, reply) as server:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.endpoint)
        proc = run_cas("ls", store="gs://models/cas?retry_timeout=0")
    failed(
        proc,
        EXIT_BACKEND,
        "access denied to gs://models/cas/config",
        "storage.objects.get",
        "roles/storage.objectUser",
    )


# -- unreachable -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CLOUD_KINDS)
def test_unreachable_service_is_retried_then_reported(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{servers.free_port()}"
    if kind == "s3":
        monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        uri, needles = "s3://models/cas?max_attempts=3", [f"cannot reach {dead} (3 attempts)"]
    elif kind == "gcs":
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", dead)
        uri, needles = "gs://models/cas?retry_timeout=2", [f"cannot reach GCS at {dead}", "2 s"]
    else:
        endpoint = f"{dead}/{servers.AZURITE_ACCOUNT}"
        conn = servers.azurite_connection_string(endpoint)
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", conn)
        uri = "az://models/cas?max_attempts=2"
        needles = [f"cannot reach Azure Blob Storage at {endpoint} (2 attempts)"]
    started = time.monotonic()
    proc = run_cas("ls", store=uri)
    failed(proc, EXIT_BACKEND, *needles, "check the endpoint" if kind != "azure" else "check")
    assert time.monotonic() - started < 60


class HangsUp:
    """A TCP port that reads each request's first line and hangs up without an answer:
    to an SDK a dropped connection, which it retries. Counts the requests that
    may delete (any but GET and HEAD)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.deletes = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as request:
                # Counted before the hang-up that the client answers.
                if request.readline().split(b" ", 1)[0] not in (b"GET", b"HEAD"):
                    self.deletes += 1

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("kind", CLOUD_KINDS)
def test_a_delete_in_time_is_sent_once_and_never_retried(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Garbage collection's deletes are never retried, by the SDK or the backend.

    A delete that failed may have landed; sent again, it could remove an
    object a writer uploaded anew meanwhile. Each backend is opened with its
    default retries; the service drops every request: one request per group
    of keys goes out, and every key comes back for the caller to read again.
    (GCS's client may also read the bucket's metadata in the background: a GET.)
    """
    server = HangsUp()
    if kind == "s3":
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        uri = "s3://models/cas"
    elif kind == "gcs":
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.endpoint)
        uri = "gs://models/cas"
    else:
        endpoint = f"{server.endpoint}/{servers.AZURITE_ACCOUNT}"
        connection = servers.azurite_connection_string(endpoint)
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection)
        uri = "az://models/cas"
    backend = open_backend(uri)
    keys = ["chunks/aa/one", "chunks/bb/two", "chunks/cc/three"]
    try:
        unsent = backend.delete_in_time(keys, lambda: True)
    finally:
        backend.close()
        server.close()
    assert sorted(unsent) == sorted(keys)
    requests = -(-len(keys) // getattr(backend, "delete_group", 1))
    assert server.deletes == requests, "a failed delete was sent again"


# -- a service that goes away in the middle of a put --------------------------------------------


class StopsTheServer(FaultyBackend):
    """Stops the server for real after ``after`` chunk uploads."""

    def __init__(self, inner: Backend, server: servers.Server, after: int) -> None:
        super().__init__(inner)
        self.server = server
        self.stop_after = after
        self.uploaded = 0

    def put(self, key: str, data: bytes | bytearray | memoryview, **kwargs: Any) -> None:
        super().put(key, data, **kwargs)
        if key.startswith(layout.CHUNKS):
            with self._lock:
                self.uploaded += 1
                stop = self.uploaded == self.stop_after
            if stop:
                self.server.stop()


def test_server_stopped_mid_put_then_restarted(tmp_path: Path) -> None:
    """Azurite keeps its data on disk, so it can come back with the store as it was."""
    data_dir = tmp_path / "azurite-data"
    try:
        first = servers.start_azurite(location=data_dir)
    except servers.ServerUnavailable as err:
        pytest.fail(f"Azurite: {err}")
    container = unique_name("az")

    def open_store(server: servers.Server) -> Store:
        conn = server.env["AZURE_STORAGE_CONNECTION_STRING"]
        return Store.open(f"az://{container}/cas", create=False, connection_string=conn,
                          max_attempts=2)  # fmt: skip

    try:
        conn = first.env["AZURE_STORAGE_CONNECTION_STRING"]
        Store.init(f"az://{container}/cas", chunker=ChunkerParams.from_average(64 * KiB),
                   create_bucket=True, connection_string=conn)  # fmt: skip
        store = open_store(first)
        kept = tmp_path / "kept.bin"
        kept.write_bytes(random_bytes(200 * KiB, 2))
        store.put(kept, "kept")
        data = random_bytes(2 * MiB, 3)
        (tmp_path / "w.bin").write_bytes(data)
        stopping = StopsTheServer(store.backend, first, after=6)
        with pytest.raises(BackendError, match="cannot reach Azure Blob Storage") as info:
            Store(stopping, store.config, workers=2).put(tmp_path / "w.bin", "ckpt")
        assert info.value.is_transient
    finally:
        first.stop()

    second = servers.start_azurite(location=data_dir)
    try:
        store = open_store(second)
        with pytest.raises(RefNotFoundError):
            store.log("ckpt")
        assert store.verify(deep=True).ok
        needed, present = rerun_after_failed_put(store, tmp_path / "w.bin", "ckpt")
        assert len(needed & present) >= 6, "the chunks stored before the outage were reused"
        store.get("ckpt", tmp_path / "out.bin")
        assert (tmp_path / "out.bin").read_bytes() == data
    finally:
        second.stop()


# -- an answer that breaks off after its headers ------------------------------------------------


class BreaksOff:
    """An S3-like server whose GET answers send all headers but only part of the body.

    The first ``breaks`` answers stop halfway and close the connection; later
    ones are whole. ``gets`` counts the GETs it served.
    """

    def __init__(self, body: bytes, breaks: int) -> None:
        self.gets = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.gets += 1
                whole = server.gets > breaks
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"0123456789abcdef"')
                self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
                self.end_headers()
                self.wfile.write(body if whole else body[: len(body) // 2])

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def s3_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.mark.usefixtures("s3_keys")
@pytest.mark.parametrize("read", ["get", "get_range"])
def test_s3_answer_that_breaks_off_is_read_again(read: str) -> None:
    """Botocore retries a request only until its headers arrive; the backend retries the body."""
    from cas.backends.s3 import S3Backend

    body = random_bytes(256 * KiB, 7)
    server = BreaksOff(body, breaks=1)
    try:
        with S3Backend("models", "cas", endpoint_url=server.endpoint, max_attempts=3) as backend:
            if read == "get":
                assert backend.get_versioned("k") == (body, '"0123456789abcdef"')
            else:  # the canned server ignores the range and answers the whole object
                assert backend.get_range("k", 0, len(body)) == body
        assert server.gets == 2
    finally:
        server.close()


@pytest.mark.usefixtures("s3_keys")
def test_s3_answer_that_keeps_breaking_off_is_a_transient_error() -> None:
    from cas.backends.s3 import S3Backend

    server = BreaksOff(random_bytes(256 * KiB, 8), breaks=10)
    try:
        with (
            S3Backend("models", "cas", endpoint_url=server.endpoint, max_attempts=2) as backend,
            pytest.raises(BackendError, match=r"cas/k broke off \(2 attempts\)") as info,
        ):
            backend.get("k")
        assert info.value.is_transient
        assert server.gets == 2
    finally:
        server.close()
