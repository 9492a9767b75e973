"""Azure Blob Storage, through azure-storage-blob.

``az://container/prefix``. Create-only writes send ``If-None-Match: *``
(``overwrite=False``) and compare-and-swap writes ``If-Match: <etag>``.
Credentials: a connection string (option ``connection_string`` or
``AZURE_STORAGE_CONNECTION_STRING``), else an account URL (``?account_url=``,
option, or ``AZURE_STORAGE_ACCOUNT_URL``) with a ``credential`` option or
``DefaultAzureCredential`` from azure-identity.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import requests
from azure.core import MatchConditions
from azure.core import exceptions as aexc
from azure.core.pipeline.transport import RequestsTransport
from azure.storage.blob import BlobServiceClient, ExponentialRetry
from urllib3.util.retry import Retry

from ..errors import BackendError, CasError, ConfigurationError
from ._cloud import CloudBackend, Fault, Listed, OptionReader, Request, as_is, is_transient_status
from .base import BytesLike

_Adapter: type[requests.adapters.HTTPAdapter]
try:  # the adapter azure-core itself mounts: larger socket reads for big downloads
    from azure.core.pipeline.transport._bigger_block_size_http_adapters import (
        BiggerBlockSizeHTTPAdapter as _Adapter,
    )
except ImportError:  # pragma: no cover - older or newer azure-core
    _Adapter = requests.adapters.HTTPAdapter

#: Blob batch requests take at most this many sub-requests.
DELETE_BATCH = 256
_THROTTLED = {"ServerBusy", "OperationTimedOut", "InternalError"}


def _quoted(etag: str) -> str:
    # Listings give bare etags, properties give quoted ones; If-Match wants quotes.
    return etag if etag.startswith('"') else f'"{etag}"'


class AzureBackend(CloudBackend):
    """Blobs in one container under an optional name prefix."""

    scheme, service, article, bucket_kind = "az", "Azure", "an", "container"
    delete_group = DELETE_BATCH
    uri_options: ClassVar[Mapping[str, OptionReader]] = {
        "connection_string": as_is,
        "account_url": as_is,
        "credential": as_is,
        "concurrency": int,
        "api_version": as_is,
        "page_size": int,
        "max_attempts": int,
    }
    sdk_errors = (aexc.AzureError,)

    def __init__(
        self,
        container: str,
        prefix: str = "",
        *,
        connection_string: str | None = None,
        credential: Any = None,
        account_url: str | None = None,
        api_version: str | None = None,
        concurrency: int = CloudBackend.default_concurrency,
        page_size: int = 5000,
        max_attempts: int = 4,
    ) -> None:
        super().__init__(container, prefix, concurrency=concurrency)
        self.page_size = page_size
        self.list_page_size = page_size
        self.max_attempts = max(max_attempts, 1)
        options = self._pipeline_options()
        if api_version:
            options["api_version"] = api_version
        self._service = self._service_client(connection_string, account_url, credential, options)
        self._container = self._service.get_container_client(container)

    def _pipeline_options(self) -> dict[str, Any]:
        session = requests.Session()
        # Retries belong to the Azure pipeline, not to urllib3.
        adapter = _Adapter(
            pool_connections=4,
            pool_maxsize=max(self.concurrency, 10),
            max_retries=Retry(total=False, redirect=False, raise_on_status=False),
        )
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return {
            "transport": RequestsTransport(session=session),
            # The SDK retries throttling, 5xx and connection errors with backoff.
            # Its default backoff (15 s, then 15 + 3^n) makes an unreachable
            # service cost a minute and a half before the error; 1 s, 3 s, 5 s
            # still lets a throttled account recover between attempts.
            "retry_policy": ExponentialRetry(
                initial_backoff=1,
                increment_base=2,
                retry_total=self.max_attempts - 1,
                random_jitter_range=1,
            ),
        }

    def _service_client(
        self,
        connection_string: str | None,
        account_url: str | None,
        credential: Any,
        options: dict[str, Any],
    ) -> BlobServiceClient:
        connection_string = connection_string or os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        account_url = account_url or os.environ.get("AZURE_STORAGE_ACCOUNT_URL")
        if not connection_string and not account_url and os.environ.get("AZURE_STORAGE_ACCOUNT"):
            account_url = f"https://{os.environ['AZURE_STORAGE_ACCOUNT']}.blob.core.windows.net"
        try:
            if connection_string:
                return BlobServiceClient.from_connection_string(connection_string, **options)
            if account_url:
                return BlobServiceClient(
                    account_url, credential=credential or _default_credential(), **options
                )
        except ValueError as err:
            raise ConfigurationError(f"bad Azure settings for {self.uri}: {err}") from err
        raise ConfigurationError(
            f"no Azure account for {self.uri}: set AZURE_STORAGE_CONNECTION_STRING, "
            "or AZURE_STORAGE_ACCOUNT_URL (or ?account_url=https://ACCOUNT.blob.core."
            "windows.net) and sign in so that DefaultAzureCredential finds a credential"
        )

    # -- error mapping ----------------------------------------------------------------

    def _classify(self, err: Exception, request: Request) -> Fault | CasError:
        where = self._where(request.key)
        # error_code is a str enum (StorageErrorCode) or a plain str: its value names it.
        raw_code = getattr(err, "error_code", "") or ""
        code = str(getattr(raw_code, "value", raw_code))
        status = int(getattr(err, "status_code", 0) or 0)
        if code == "ContainerNotFound":
            return Fault.NO_BUCKET
        if isinstance(err, aexc.ResourceExistsError) and request.if_absent:
            return Fault.CONFLICT
        if isinstance(err, aexc.ResourceModifiedError) or status == 412:
            return Fault.CONFLICT
        if isinstance(err, aexc.ResourceNotFoundError) or status == 404:
            return Fault.MISSING
        if status == 416:
            return Fault.PAST_END
        if isinstance(err, aexc.ClientAuthenticationError) or status in (401, 403):
            return BackendError(
                f"access denied to {where} ({code or status}): check the account key or SAS "
                "in the connection string; a signed-in identity needs the role 'Storage Blob "
                "Data Contributor' on the container or account, a SAS read, write, delete and list"
            )
        if isinstance(err, aexc.ServiceRequestError | aexc.ServiceResponseError):
            return BackendError(
                f"cannot reach Azure Blob Storage at {self._service.primary_endpoint.rstrip('/')} "
                f"({self.max_attempts} attempts) for {where}: {err}; check the account URL or "
                "connection string, and that the service is up and reachable",
                is_transient=True,
            )
        if isinstance(err, aexc.HttpResponseError):
            transient = is_transient_status(status) or code in _THROTTLED
            return BackendError(
                f"Azure {code or status} for {where}: {err.reason or err}", is_transient=transient
            )
        return BackendError(f"Azure error for {where}: {err}")

    # -- requests ---------------------------------------------------------------------

    def _upload(self, name: str, data: BytesLike, if_absent: bool, if_match: str | None) -> None:
        conditions: dict[str, Any] = {"overwrite": not if_absent}
        if if_match is not None:
            conditions["etag"] = _quoted(if_match)
            conditions["match_condition"] = MatchConditions.IfNotModified
        # Above max_single_put_size the SDK stages blocks and commits them
        # with the same condition: the blob still appears all at once.
        body = data if isinstance(data, bytes) else bytes(data)
        self._container.upload_blob(name, body, max_concurrency=4, **conditions)

    def _download(self, name: str) -> tuple[bytes, str]:
        stream = self._container.download_blob(name, max_concurrency=1)
        data: bytes = stream.readall()
        return data, _quoted(stream.properties.etag)

    def _download_range(self, name: str, start: int, length: int) -> bytes:
        stream = self._container.download_blob(name, offset=start, length=length, max_concurrency=1)
        data: bytes = stream.readall()
        return data

    def _head(self, name: str) -> tuple[int, float, str]:
        props = self._container.get_blob_client(name).get_blob_properties()
        return int(props.size), props.last_modified.timestamp(), _quoted(props.etag)

    def _list_names(self, prefix: str) -> Iterator[Listed]:
        # A hierarchical-namespace account also lists directory entries,
        # which the listing skips as names that are not keys.
        for blob in self._container.list_blobs(
            name_starts_with=prefix, results_per_page=self.page_size
        ):
            token = _quoted(blob.etag) if blob.etag else None
            yield blob.name, int(blob.size), blob.last_modified.timestamp(), token

    def _delete_names(self, names: list[str]) -> None:
        if len(names) == 1:
            self._delete_one(names[0])
            return
        batches = [names[i : i + DELETE_BATCH] for i in range(0, len(names), DELETE_BATCH)]

        def delete(batch: list[str]) -> None:
            self._delete_batch(batch)

        self._in_parallel(delete, batches, 4)

    def _delete_batch(
        self, names: list[str], in_time: Callable[[], bool] | None = None
    ) -> list[str]:
        # retry_total=0 under a deadline: such a delete is never sent twice (delete_in_time).
        options: dict[str, Any] = {} if in_time is None else {"retry_total": 0}
        try:
            responses = list(
                self._container.delete_blobs(*names, raise_on_any_failure=False, **options)
            )
        except aexc.HttpResponseError as err:
            if err.status_code in (400, 403, 501):
                # Some accounts (hierarchical namespace, some SAS scopes) refuse
                # blob batches; deleting one by one always works.
                for index, name in enumerate(names):
                    if in_time is not None and not in_time():
                        return names[index:]
                    self._delete_one(name, **options)
                return []
            raise
        failed = [r for r in responses if r.status_code not in (200, 202, 404)]
        if failed:
            first = failed[0]
            raise BackendError(
                f"Azure could not delete {len(failed)} of {len(names)} blobs in {self.uri}: "
                f"{first.status_code} {first.reason}",
                is_transient=any(is_transient_status(r.status_code) for r in failed),
            )
        return []

    def _delete_once(self, names: list[str], in_time: Callable[[], bool]) -> list[str]:
        if len(names) == 1:
            self._delete_one(names[0], retry_total=0)
            return []
        return self._delete_batch(names, in_time)

    def _delete_one(self, name: str, **options: Any) -> None:
        try:
            self._container.delete_blob(name, **options)
        except aexc.ResourceNotFoundError as err:
            if getattr(err, "error_code", "") == "ContainerNotFound":
                self._fail(err, Request())
        except aexc.AzureError as err:
            self._fail(err, Request(self._key_of(name)))

    def _touch_name(self, name: str) -> None:
        # Setting metadata changes Last-Modified to the service's now without
        # rewriting data; the value only has to be a valid metadata string.
        self._container.get_blob_client(name).set_blob_metadata(
            {"cas_touched": str(time.time_ns())}
        )

    def close(self) -> None:
        self._service.close()

    def _create_bucket(self) -> None:
        with contextlib.suppress(aexc.ResourceExistsError):
            self._container.create_container()


def _default_credential() -> Any:
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError as err:
        raise ConfigurationError(
            "az:// with an account URL signs in through azure-identity, which is not "
            "installed: pip install 'cas-store[azure]', or use a connection string"
        ) from err
    return DefaultAzureCredential()


from_uri = AzureBackend.from_uri
