"""Azure Blob Storage, through azure-storage-blob.

``az://container/prefix``. Create-only writes send ``If-None-Match: *``
(``overwrite=False``) and compare-and-swap writes ``If-Match: <etag>``.
Credentials: a connection string (option ``connection_string`` or
``AZURE_STORAGE_CONNECTION_STRING``), else an account URL (``?account_url=``,
option, or ``AZURE_STORAGE_ACCOUNT_URL``) with a ``credential`` option or
``DefaultAzureCredential`` from azure-identity.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlsplit

import requests
from azure.core import MatchConditions
from azure.core import exceptions as aexc
from azure.core.pipeline.transport import RequestsTransport
from azure.storage.blob import BlobServiceClient, ExponentialRetry
from urllib3.util.retry import Retry

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


class AzureBackend(Backend):
    """Blobs in one container under an optional name prefix."""

    remote = True

    def __init__(
        self,
        container: str,
        prefix: str = "",
        *,
        connection_string: str | None = None,
        account_url: str | None = None,
        credential: Any = None,
        concurrency: int = OBJECT_STORE_CONCURRENCY,
        api_version: str | None = None,
        page_size: int = 5000,
        max_attempts: int = 4,
    ) -> None:
        self.container_name = container
        self.prefix = prefix.strip("/")
        self._root = f"{self.prefix}/" if self.prefix else ""
        self.uri = f"az://{container}/{self.prefix}" if self.prefix else f"az://{container}"
        self.concurrency = concurrency
        self.page_size = page_size
        self.list_page_size = page_size
        session = requests.Session()
        # Retries belong to the Azure pipeline (and to cas's retry wrapper), not to urllib3.
        adapter = _Adapter(
            pool_connections=4,
            pool_maxsize=max(concurrency, 10),
            max_retries=Retry(total=False, redirect=False, raise_on_status=False),
        )
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self.max_attempts = max(max_attempts, 1)
        kwargs: dict[str, Any] = {
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
        if api_version:
            kwargs["api_version"] = api_version
        connection_string = connection_string or os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        account_url = account_url or os.environ.get("AZURE_STORAGE_ACCOUNT_URL")
        if not connection_string and not account_url and os.environ.get("AZURE_STORAGE_ACCOUNT"):
            account_url = f"https://{os.environ['AZURE_STORAGE_ACCOUNT']}.blob.core.windows.net"
        try:
            if connection_string:
                service = BlobServiceClient.from_connection_string(connection_string, **kwargs)
            elif account_url:
                service = BlobServiceClient(
                    account_url, credential=credential or _default_credential(), **kwargs
                )
            else:
                raise ConfigurationError(
                    f"no Azure account for {self.uri}: set AZURE_STORAGE_CONNECTION_STRING, "
                    "or AZURE_STORAGE_ACCOUNT_URL (or ?account_url=https://ACCOUNT.blob.core."
                    "windows.net) and sign in so that DefaultAzureCredential finds a credential"
                )
        except ValueError as err:
            raise ConfigurationError(f"bad Azure settings for {self.uri}: {err}") from err
        self._service = service
        self._container = service.get_container_client(container)

    # -- error mapping ----------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self._root + check_key(key)

    def _fail(
        self, err: Exception, key: str | None, *, if_absent: bool = False, if_match: bool = False
    ) -> NoReturn:
        if isinstance(err, CasError):
            raise err  # already mapped, e.g. an InvalidKeyError from inside a try
        where = f"{self.uri}/{key}" if key is not None else self.uri
        # error_code is a str enum (StorageErrorCode) or a plain str: its value names it.
        raw_code = getattr(err, "error_code", "") or ""
        code = str(getattr(raw_code, "value", raw_code))
        status = int(getattr(err, "status_code", 0) or 0)
        if code == "ContainerNotFound":
            raise BackendError(
                f"container {self.container_name!r} does not exist: "
                "create it or run `cas init --create-bucket`"
            ) from err
        if isinstance(err, aexc.ResourceExistsError) and if_absent:
            raise AlreadyExistsError(f"object {where} already exists") from err
        if isinstance(err, aexc.ResourceModifiedError) or status == 412:
            if if_absent:
                raise AlreadyExistsError(f"object {where} already exists") from err
            if if_match:
                raise PreconditionFailedError(f"object {where} changed since it was read") from err
            # A read of a large blob goes in ranges tied to the first one's
            # etag: a writer replaced it in between, and reading again helps.
            raise BackendError(f"object {where} changed while read", is_transient=True) from err
        if isinstance(err, aexc.ResourceNotFoundError) or status == 404:
            if if_match:
                raise PreconditionFailedError(f"object {where} is gone") from err
            raise NotFoundError(f"object {where} not found") from err
        if isinstance(err, aexc.ClientAuthenticationError) or status in (401, 403):
            raise BackendError(
                f"access denied to {where} ({code or status}): check the account key or SAS "
                "in the connection string; a signed-in identity needs the role 'Storage Blob "
                "Data Contributor' on the container or account, a SAS read, write, delete and list"
            ) from err
        if isinstance(err, aexc.ServiceRequestError | aexc.ServiceResponseError):
            raise BackendError(
                f"cannot reach Azure Blob Storage at {self._service.primary_endpoint.rstrip('/')} "
                f"({self.max_attempts} attempts) for {where}: {err}; check the account URL or "
                "connection string, and that the service is up and reachable",
                is_transient=True,
            ) from err
        if isinstance(err, aexc.HttpResponseError):
            transient = status >= 500 or status == 429 or code in _THROTTLED
            raise BackendError(
                f"Azure {code or status} for {where}: {err.reason or err}", is_transient=transient
            ) from err
        if isinstance(err, aexc.AzureError):
            raise BackendError(f"Azure error for {where}: {err}") from err
        raise err

    # -- contract ---------------------------------------------------------------------

    def put(
        self,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> None:
        check_put_conditions(if_absent, if_match)
        name = self._name(key)
        conditions: dict[str, Any] = {"overwrite": not if_absent}
        if if_match is not None:
            conditions["etag"] = _quoted(if_match)
            conditions["match_condition"] = MatchConditions.IfNotModified
        try:
            # Above max_single_put_size the SDK stages blocks and commits them
            # with the same condition: the blob still appears all at once.
            body = data if isinstance(data, bytes) else bytes(data)
            self._container.upload_blob(name, body, max_concurrency=4, **conditions)
        except aexc.AzureError as err:
            self._fail(err, key, if_absent=if_absent, if_match=if_match is not None)

    def get(self, key: str) -> bytes:
        return self.get_versioned(key)[0]

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        try:
            stream = self._container.download_blob(self._name(key), max_concurrency=1)
            data: bytes = stream.readall()
        except aexc.AzureError as err:
            self._fail(err, key)
        return data, _quoted(stream.properties.etag)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise InvalidInputError(f"get_range: negative start or length for {key!r}")
        if length == 0:
            self.stat(key)  # still NotFoundError for a missing key
            return b""
        try:
            stream = self._container.download_blob(
                self._name(key), offset=start, length=length, max_concurrency=1
            )
            data: bytes = stream.readall()
        except aexc.HttpResponseError as err:
            if err.status_code == 416:
                return b""  # the range starts at or past the end
            self._fail(err, key)
        except aexc.AzureError as err:
            self._fail(err, key)
        return data

    def stat(self, key: str) -> ObjectInfo:
        try:
            props = self._container.get_blob_client(self._name(key)).get_blob_properties()
        except aexc.AzureError as err:
            self._fail(err, key)
        return ObjectInfo(
            key=key,
            size=int(props.size),
            mtime=props.last_modified.timestamp(),
            token=_quoted(props.etag),
        )

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        blobs = self._container.list_blobs(
            name_starts_with=self._root + prefix, results_per_page=self.page_size
        )
        try:
            for blob in blobs:
                key = blob.name[len(self._root) :]
                if not is_valid_key(key):
                    continue  # e.g. a directory entry of a hierarchical-namespace account
                yield ObjectInfo(
                    key=key,
                    size=int(blob.size),
                    mtime=blob.last_modified.timestamp(),
                    token=_quoted(blob.etag) if blob.etag else None,
                )
        except aexc.AzureError as err:
            self._fail(err, None)

    def delete(self, keys: Iterable[str]) -> None:
        names = [self._name(key) for key in keys]
        batches = [names[i : i + DELETE_BATCH] for i in range(0, len(names), DELETE_BATCH)]
        if len(names) == 1:
            self._delete_one(names[0])
            return
        with ThreadPoolExecutor(max(1, min(4, len(batches)))) as pool:
            for _ in pool.map(self._delete_batch, batches):
                pass

    def _delete_batch(self, names: list[str]) -> None:
        try:
            responses = list(self._container.delete_blobs(*names, raise_on_any_failure=False))
        except aexc.HttpResponseError as err:
            if err.status_code in (400, 403, 501):
                # Some accounts (hierarchical namespace, some SAS scopes) refuse
                # blob batches; deleting one by one always works.
                for name in names:
                    self._delete_one(name)
                return
            self._fail(err, None)
        except aexc.AzureError as err:
            self._fail(err, None)
        failed = [r for r in responses if r.status_code not in (200, 202, 404)]
        if failed:
            first = failed[0]
            raise BackendError(
                f"Azure could not delete {len(failed)} of {len(names)} blobs in {self.uri}: "
                f"{first.status_code} {first.reason}",
                is_transient=any(r.status_code >= 500 or r.status_code == 429 for r in failed),
            )

    def _delete_one(self, name: str) -> None:
        try:
            self._container.delete_blob(name)
        except aexc.ResourceNotFoundError as err:
            if getattr(err, "error_code", "") == "ContainerNotFound":
                self._fail(err, None)
        except aexc.AzureError as err:
            self._fail(err, name[len(self._root) :])

    def touch(self, key: str) -> None:
        # Setting metadata changes Last-Modified to the service's now without
        # rewriting data; the value only has to be a valid metadata string.
        try:
            self._container.get_blob_client(self._name(key)).set_blob_metadata(
                {"cas_touched": str(time.time_ns())}
            )
        except aexc.AzureError as err:
            self._fail(err, key)

    def close(self) -> None:
        self._service.close()

    # -- administration ---------------------------------------------------------------

    def create_bucket(self) -> None:
        """Create the container; fine if it exists."""
        try:
            self._container.create_container()
        except aexc.ResourceExistsError:
            return
        except aexc.AzureError as err:
            self._fail(err, None)


def _default_credential() -> Any:
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError as err:
        raise ConfigurationError(
            "az:// with an account URL signs in through azure-identity, which is not "
            "installed: pip install 'cas-store[azure]', or use a connection string"
        ) from err
    return DefaultAzureCredential()


def from_uri(uri: str, **options: Any) -> AzureBackend:
    """Open ``az://container[/prefix][?account_url=...]``; options override the query."""
    parts = urlsplit(uri)
    if parts.scheme != "az" or not parts.netloc:
        raise ConfigurationError(
            f"not an Azure location: {uri!r}; expected az://container[/prefix]"
        )
    merged: dict[str, Any] = {**dict(parse_qsl(parts.query)), **options}
    for name in ("concurrency", "page_size", "max_attempts"):
        if name in merged:
            merged[name] = int(merged[name])
    known = {
        "connection_string",
        "account_url",
        "credential",
        "concurrency",
        "api_version",
        "page_size",
        "max_attempts",
    }
    unknown = set(merged) - known
    if unknown:
        raise ConfigurationError(
            f"unknown Azure option(s) {', '.join(sorted(unknown))} for {uri!r}; "
            f"known: {', '.join(sorted(known))}"
        )
    return AzureBackend(parts.netloc, parts.path.strip("/"), **merged)
