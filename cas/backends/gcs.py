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
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import google.auth
import google.auth.exceptions as gauth_exc
import requests
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from ..errors import BackendError, CasError, ConfigurationError, PreconditionFailedError
from ._cloud import CloudBackend, Fault, Listed, OptionReader, Request, as_is, is_transient_status
from .base import BytesLike

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


class GCSBackend(CloudBackend):
    """Objects in one bucket under an optional name prefix."""

    scheme, service = "gs", "GCS"
    uri_options: ClassVar[Mapping[str, OptionReader]] = {
        "project": as_is,
        "emulator_host": as_is,
        "endpoint_url": as_is,
        "concurrency": int,
        "touch": as_is,
        "timeout": float,
        "retry_timeout": float,
    }
    # Errors reach the caller from the library, from requests and from google-auth.
    sdk_errors = (Exception,)

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        project: str | None = None,
        emulator_host: str | None = None,
        endpoint_url: str | None = None,
        concurrency: int = CloudBackend.default_concurrency,
        touch: str | None = None,
        timeout: float = 60.0,
        retry_timeout: float = 60.0,
    ) -> None:
        super().__init__(bucket, prefix, concurrency=concurrency)
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

    def _classify(self, err: Exception, request: Request) -> Fault | CasError:
        where = self._where(request.key)
        if isinstance(err, gexc.PreconditionFailed):
            return Fault.CONFLICT
        if isinstance(err, gexc.RequestRangeNotSatisfiable):
            return Fault.PAST_END
        if isinstance(err, gexc.NotFound):
            # A missing bucket and a missing object are both 404; only the
            # message tells them apart, and a write or a listing has no object
            # to be missing.
            bucket_gone = "bucket does not exist" in str(err.message).lower()
            if request.key is None or request.writing or bucket_gone:
                return Fault.NO_BUCKET
            return Fault.MISSING
        if isinstance(err, gexc.Forbidden | gexc.Unauthorized):
            return BackendError(
                f"access denied to {where}: {err.message}; the account needs "
                "roles/storage.objectUser on the bucket (storage.objects.create, get, list, "
                "update, delete)"
            )
        if isinstance(err, gauth_exc.RefreshError):
            return BackendError(f"Google credentials could not be refreshed: {err}")
        cause = err.cause if isinstance(err, gexc.RetryError) else err
        if isinstance(cause, _NETWORK):
            tried = f"retried for {self.retry_timeout:g} s" if self.retry_timeout > 0 else "once"
            return BackendError(
                f"cannot reach GCS at {self.endpoint} ({tried}) for {where}: {cause}; check "
                "the endpoint (STORAGE_EMULATOR_HOST, endpoint_url), the network and proxies",
                is_transient=True,
            )
        if isinstance(err, _TRANSIENT):
            return BackendError(f"GCS busy for {where}: {err}", is_transient=True)
        transient = isinstance(err, gexc.GoogleAPICallError) and is_transient_status(
            int(err.code or 0)
        )
        return BackendError(f"GCS error for {where}: {err}", is_transient=transient)

    # -- requests --------------------------------------------------------------------

    def _upload(self, name: str, data: BytesLike, if_absent: bool, if_match: str | None) -> None:
        generation: int | None = None
        if if_absent:
            generation = 0
        elif if_match is not None:
            try:
                generation = int(if_match)
            except ValueError:
                raise PreconditionFailedError(f"{if_match!r} is not a GCS generation") from None
        # Up to 8 MiB the library sends one multipart request; larger
        # objects go as a resumable upload, which is just as atomic.
        self._bucket.blob(name).upload_from_string(
            data if isinstance(data, bytes) else bytes(data),
            content_type="application/octet-stream",
            if_generation_match=generation,
            **self._call,
        )

    def _download(self, name: str) -> tuple[bytes, str]:
        blob = self._bucket.blob(name)
        data: bytes = blob.download_as_bytes(**self._call)
        # The generation comes from the headers of that same download.
        if blob.generation is None:
            raise BackendError(f"GCS sent no generation with {self._where(self._key_of(name))}")
        return data, str(blob.generation)

    def _download_range(self, name: str, start: int, length: int) -> bytes:
        data: bytes = self._bucket.blob(name).download_as_bytes(
            start=start, end=start + length - 1, checksum=None, **self._call
        )
        return data

    def _head(self, name: str) -> tuple[int, float, str]:
        blob = self._bucket.get_blob(name, **self._call)
        if blob is None:
            raise self._missing(name)
        return int(blob.size), blob.updated.timestamp(), str(blob.generation)

    def _list_names(self, prefix: str) -> Iterator[Listed]:
        blobs = self._client.list_blobs(
            self._bucket, prefix=prefix, fields=_LIST_FIELDS, **self._call
        )
        for blob in blobs:
            yield blob.name, int(blob.size), blob.updated.timestamp(), str(blob.generation)

    def _delete_names(self, names: list[str]) -> None:
        # JSON-API batches are not served by the emulators this is tested on;
        # parallel single deletes are, and they reuse the pooled connections.
        self._in_parallel(self._delete_one, names, self.concurrency)

    def _delete_one(self, name: str) -> None:
        try:
            self._bucket.blob(name).delete(**self._call)
        except gexc.NotFound:
            pass
        except Exception as err:
            self._fail(err, Request(self._key_of(name)))

    def _delete_once(self, names: list[str], in_time: Callable[[], bool]) -> list[str]:
        for name in names:  # one: delete_group is 1
            with contextlib.suppress(gexc.NotFound):
                self._bucket.blob(name).delete(timeout=self._call["timeout"], retry=None)
        return []

    def _touch_name(self, name: str) -> None:
        if self.touch_mode == "rewrite":
            self._rewrite_onto_itself(name)
            return
        blob = self._bucket.blob(name)
        # Any metadata change makes GCS set `updated` to its own now;
        # the value only has to differ from the previous one.
        blob.metadata = {"cas-touched": str(time.time_ns())}
        blob.patch(**self._call)

    def _rewrite_onto_itself(self, name: str) -> None:
        source = self._bucket.get_blob(name, **self._call)
        if source is None:
            raise self._missing(name)
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
        self._requesting(Request(), lambda: self._create_bucket(location))

    def _create_bucket(self, location: str | None = None) -> None:
        with contextlib.suppress(gexc.Conflict):
            self._client.create_bucket(self.bucket, location=location, **self._call)


from_uri = GCSBackend.from_uri
