"""Google Cloud Storage, through google-cloud-storage.

``gs://bucket/prefix``. Create-only writes send ``ifGenerationMatch=0`` and
compare-and-swap writes ``ifGenerationMatch=<generation>``; the generation is
the token. Credentials are Application Default Credentials. With
``STORAGE_EMULATOR_HOST`` set (or the ``emulator_host`` option) the backend
talks to that emulator anonymously.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlsplit

import google.auth
import google.auth.exceptions as gauth_exc
import requests
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from ..errors import (
    AlreadyExistsError,
    BackendError,
    CasError,
    ConfigurationError,
    InvalidInputError,
    NotFoundError,
    PreconditionFailedError,
)
from . import OBJECT_STORE_CONCURRENCY
from .base import Backend, ObjectInfo, check_key, check_put_conditions, is_valid_key

_SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]
_TRANSIENT = (
    gexc.TooManyRequests,
    gexc.InternalServerError,
    gexc.BadGateway,
    gexc.ServiceUnavailable,
    gexc.GatewayTimeout,
    gexc.RetryError,
)
_NETWORK = (requests.ConnectionError, requests.Timeout, gauth_exc.TransportError)
_LIST_FIELDS = "items(name,size,updated,generation),nextPageToken"
_TOUCH_MODES = ("patch", "rewrite")


class GCSBackend(Backend):
    """Objects in one bucket under an optional name prefix."""

    list_page_size = 1000  # objects.list answers up to 1,000 names per request
    remote = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        project: str | None = None,
        emulator_host: str | None = None,
        endpoint_url: str | None = None,
        concurrency: int = OBJECT_STORE_CONCURRENCY,
        touch: str | None = None,
        timeout: float = 60.0,
        retry_timeout: float = 60.0,
    ) -> None:
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self._root = f"{self.prefix}/" if self.prefix else ""
        self.uri = f"gs://{bucket}/{self.prefix}" if self.prefix else f"gs://{bucket}"
        self.concurrency = concurrency
        # Every call takes the same per-request timeout and retry policy: the
        # library's own retries throttling, 5xx and connection errors with
        # backoff, for at most retry_timeout seconds (0: no retries).
        retry = DEFAULT_RETRY.with_timeout(retry_timeout) if retry_timeout > 0 else None
        self._call: dict[str, Any] = {"timeout": timeout, "retry": retry}
        emulator = emulator_host or os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator and "://" not in emulator:
            emulator = f"http://{emulator}"
        # A metadata patch refreshes `updated` on GCS itself and costs no data
        # copy. fake-gcs-server (1.54) leaves `updated` alone on a patch, so
        # against an emulator the object is rewritten onto itself instead.
        self.touch_mode = touch or ("rewrite" if emulator else "patch")
        if self.touch_mode not in _TOUCH_MODES:
            raise ConfigurationError(f"touch must be one of {_TOUCH_MODES}, not {touch!r}")
        self.retry_timeout = retry_timeout
        #: Where requests go, for messages: the emulator, another endpoint, or Google's.
        self.endpoint = emulator or endpoint_url or "https://storage.googleapis.com"
        self._client = self._make_client(project, emulator, endpoint_url)
        self._bucket = self._client.bucket(bucket)

    def _make_client(
        self, project: str | None, emulator: str | None, endpoint_url: str | None
    ) -> storage.Client:
        credentials: Any
        if emulator:
            credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
            project = project or "cas-emulator"
            endpoint_url = emulator
        else:
            try:
                credentials, default_project = google.auth.default(scopes=_SCOPES)
            except gauth_exc.DefaultCredentialsError as err:
                raise ConfigurationError(
                    f"no Google Cloud credentials for {self.uri}: run "
                    "`gcloud auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS "
                    "to a service-account key file, or run on GCP with a service account"
                ) from err
            project = project or default_project
        # The default pool keeps 10 connections per host; size it to the number
        # of threads the store runs, or every extra thread reconnects each time.
        session = AuthorizedSession(credentials)  # type: ignore[no-untyped-call]
        adapter = requests.adapters.HTTPAdapter(
            pool_connections=4, pool_maxsize=max(self.concurrency, 10)
        )
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        options = {"api_endpoint": endpoint_url} if endpoint_url else None
        return storage.Client(
            project=project, credentials=credentials, client_options=options, _http=session
        )

    # -- error mapping --------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self._root + check_key(key)

    def _fail(
        self,
        err: Exception,
        key: str | None,
        *,
        if_absent: bool = False,
        if_match: bool = False,
        writing: bool = False,
    ) -> NoReturn:
        if isinstance(err, CasError):
            raise err  # already mapped, e.g. an InvalidKeyError from inside a try
        where = f"{self.uri}/{key}" if key is not None else self.uri
        if isinstance(err, gexc.PreconditionFailed):
            if if_absent:
                raise AlreadyExistsError(f"object {where} already exists") from err
            raise PreconditionFailedError(f"object {where} changed since it was read") from err
        if isinstance(err, gexc.NotFound):
            # A missing bucket and a missing object are both 404; only the
            # message tells them apart, and a write or a listing has no object
            # to be missing.
            if key is None or writing or "bucket does not exist" in str(err.message).lower():
                raise BackendError(
                    f"bucket {self.bucket_name!r} does not exist: "
                    "create it or run `cas init --create-bucket`"
                ) from err
            if if_match:
                raise PreconditionFailedError(f"object {where} is gone") from err
            raise NotFoundError(f"object {where} not found") from err
        if isinstance(err, gexc.Forbidden | gexc.Unauthorized):
            raise BackendError(
                f"access denied to {where}: {err.message}; the account needs "
                "roles/storage.objectUser on the bucket (storage.objects.create, get, list, "
                "update, delete)"
            ) from err
        if isinstance(err, gauth_exc.RefreshError):
            raise BackendError(f"Google credentials could not be refreshed: {err}") from err
        cause = err.cause if isinstance(err, gexc.RetryError) else err
        if isinstance(cause, _NETWORK):
            tried = f"retried for {self.retry_timeout:g} s" if self.retry_timeout > 0 else "once"
            raise BackendError(
                f"cannot reach GCS at {self.endpoint} ({tried}) for {where}: {cause}; check "
                "the endpoint (STORAGE_EMULATOR_HOST, endpoint_url), the network and proxies",
                is_transient=True,
            ) from err
        if isinstance(err, _TRANSIENT):
            raise BackendError(f"GCS busy for {where}: {err}", is_transient=True) from err
        if isinstance(err, gexc.GoogleAPICallError):
            transient = err.code is not None and int(err.code) >= 500
            raise BackendError(f"GCS error for {where}: {err}", is_transient=transient) from err
        raise BackendError(f"GCS error for {where}: {err}") from err

    # -- contract -------------------------------------------------------------------

    def put(
        self,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> None:
        check_put_conditions(if_absent, if_match)
        blob = self._bucket.blob(self._name(key))
        generation: int | None = None
        if if_absent:
            generation = 0
        elif if_match is not None:
            try:
                generation = int(if_match)
            except ValueError:
                raise PreconditionFailedError(f"{if_match!r} is not a GCS generation") from None
        try:
            # Up to 8 MiB the library sends one multipart request; larger
            # objects go as a resumable upload, which is just as atomic.
            blob.upload_from_string(
                data if isinstance(data, bytes) else bytes(data),
                content_type="application/octet-stream",
                if_generation_match=generation,
                **self._call,
            )
        except Exception as err:
            self._fail(err, key, if_absent=if_absent, if_match=if_match is not None, writing=True)

    def get(self, key: str) -> bytes:
        return self.get_versioned(key)[0]

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        blob = self._bucket.blob(self._name(key))
        try:
            data: bytes = blob.download_as_bytes(**self._call)
        except Exception as err:
            self._fail(err, key)
        # The generation comes from the headers of that same download.
        if blob.generation is None:
            raise BackendError(f"GCS sent no generation with {self.uri}/{key}")
        return data, str(blob.generation)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise InvalidInputError(f"get_range: negative start or length for {key!r}")
        if length == 0:
            self.stat(key)  # still NotFoundError for a missing key
            return b""
        blob = self._bucket.blob(self._name(key))
        try:
            data: bytes = blob.download_as_bytes(
                start=start, end=start + length - 1, checksum=None, **self._call
            )
        except gexc.RequestRangeNotSatisfiable:
            return b""  # 416: the range starts at or past the end
        except Exception as err:
            self._fail(err, key)
        return data

    def stat(self, key: str) -> ObjectInfo:
        name = self._name(key)
        try:
            blob = self._bucket.get_blob(name, **self._call)
        except Exception as err:
            self._fail(err, key)
        if blob is None:
            raise NotFoundError(f"object {self.uri}/{key} not found")
        return self._info(key, blob)

    @staticmethod
    def _info(key: str, blob: Any) -> ObjectInfo:
        return ObjectInfo(
            key=key, size=int(blob.size), mtime=blob.updated.timestamp(), token=str(blob.generation)
        )

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        blobs = self._client.list_blobs(
            self._bucket, prefix=self._root + prefix, fields=_LIST_FIELDS, **self._call
        )
        try:
            for blob in blobs:
                key = blob.name[len(self._root) :]
                if not is_valid_key(key):
                    continue  # e.g. a "folder/" placeholder made by a console
                yield self._info(key, blob)
        except Exception as err:
            self._fail(err, None)

    def delete(self, keys: Iterable[str]) -> None:
        names = [self._name(key) for key in keys]
        if len(names) <= 1:
            for name in names:
                self._delete_one(name)
            return
        # JSON-API batches are not served by the emulators this is tested on;
        # parallel single deletes are, and they reuse the pooled connections.
        with ThreadPoolExecutor(min(self.concurrency, len(names))) as pool:
            for _ in pool.map(self._delete_one, names):
                pass

    def _delete_one(self, name: str) -> None:
        try:
            self._bucket.blob(name).delete(**self._call)
        except gexc.NotFound:
            pass
        except Exception as err:
            self._fail(err, name[len(self._root) :])

    def touch(self, key: str) -> None:
        name = self._name(key)
        try:
            if self.touch_mode == "patch":
                blob = self._bucket.blob(name)
                # Any metadata change makes GCS set `updated` to its own now;
                # the value only has to differ from the previous one.
                blob.metadata = {"cas-touched": str(time.time_ns())}
                blob.patch(**self._call)
                return
            self._rewrite_onto_itself(name)
        except Exception as err:
            self._fail(err, key)

    def _rewrite_onto_itself(self, name: str) -> None:
        source = self._bucket.get_blob(name, **self._call)
        if source is None:
            raise NotFoundError(f"object {self.uri}/{name[len(self._root) :]} not found")
        target = self._bucket.blob(name)
        token = None
        # Only over the generation just read: had a writer replaced it since,
        # its `updated` is fresh already and the rewrite must not undo its write.
        with contextlib.suppress(gexc.PreconditionFailed):
            while True:
                token, _, _ = target.rewrite(
                    source,
                    token=token,
                    if_generation_match=source.generation,
                    if_source_generation_match=source.generation,
                    **self._call,
                )
                if token is None:
                    break

    def close(self) -> None:
        self._client.close()

    # -- administration ---------------------------------------------------------------

    def create_bucket(self, location: str | None = None) -> None:
        """Create the bucket (in ``location``, else the service default); fine if it exists."""
        try:
            self._client.create_bucket(self.bucket_name, location=location, **self._call)
        except gexc.Conflict:
            return
        except Exception as err:
            self._fail(err, None)


def from_uri(uri: str, **options: Any) -> GCSBackend:
    """Open ``gs://bucket[/prefix][?project=...]``; options override the query."""
    parts = urlsplit(uri)
    if parts.scheme != "gs" or not parts.netloc:
        raise ConfigurationError(f"not a GCS location: {uri!r}; expected gs://bucket[/prefix]")
    merged: dict[str, Any] = {**dict(parse_qsl(parts.query)), **options}
    if "concurrency" in merged:
        merged["concurrency"] = int(merged["concurrency"])
    for name in ("timeout", "retry_timeout"):
        if name in merged:
            merged[name] = float(merged[name])
    known = {
        "project",
        "emulator_host",
        "endpoint_url",
        "concurrency",
        "touch",
        "timeout",
        "retry_timeout",
    }
    unknown = set(merged) - known
    if unknown:
        raise ConfigurationError(
            f"unknown GCS option(s) {', '.join(sorted(unknown))} for {uri!r}; "
            f"known: {', '.join(sorted(known))}"
        )
    return GCSBackend(parts.netloc, parts.path.strip("/"), **merged)
