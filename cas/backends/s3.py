"""Amazon S3 and S3-compatible services, through boto3.

``s3://bucket/prefix``. Create-only writes send ``If-None-Match: *`` and
compare-and-swap writes ``If-Match: <etag>``, so the service itself decides
every race; nothing is checked client-side first. Credentials come from
boto3's standard chain (environment, profile, SSO, instance role). A custom
endpoint (MinIO, Ceph, moto, ...) comes from the ``endpoint_url`` option or
the ``AWS_ENDPOINT_URL`` / ``S3_ENDPOINT_URL`` environment variables.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlsplit

import boto3
import botocore.exceptions as bexc
import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.handlers import add_expect_header

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

MiB = 1024 * 1024
#: S3 DeleteObjects takes at most this many keys per request.
DELETE_BATCH = 1000
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_THROTTLED = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
}
_ACCESS = {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_REGION = {
    "PermanentRedirect",
    "AuthorizationHeaderMalformed",
    "IllegalLocationConstraintException",
}


# Parsing botocore's service model is most of the cost of a new client; a
# shared loader keeps the parsed model. Sessions stay per backend, so each
# resolves credentials and region from the environment of its own time.
_loader: Any = None
_loader_lock = threading.Lock()


def _session(profile: str | None) -> boto3.session.Session:
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
    core = botocore.session.get_session()
    core.register_component("data_loader", _loader)
    return boto3.session.Session(botocore_session=core, profile_name=profile)


def _split(uri: str) -> tuple[str, str, dict[str, str]]:
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigurationError(f"not an S3 location: {uri!r}; expected s3://bucket[/prefix]")
    return parts.netloc, parts.path.strip("/"), dict(parse_qsl(parts.query))


class S3Backend(Backend):
    """Objects in one bucket under an optional key prefix."""

    list_page_size = 1000  # ListObjectsV2 answers up to 1,000 keys per request
    remote = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        profile: str | None = None,
        concurrency: int = OBJECT_STORE_CONCURRENCY,
        addressing_style: str | None = None,
        max_attempts: int = 5,
        multipart_threshold: int = 64 * MiB,
        part_size: int = 16 * MiB,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._root = f"{self.prefix}/" if self.prefix else ""
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.concurrency = concurrency
        self.multipart_threshold = multipart_threshold
        self.max_attempts = max_attempts
        self.part_size = max(part_size, 5 * MiB)  # S3's minimum for all but the last part
        self.endpoint_url = (
            endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
        )
        # Path-style addressing is what self-hosted services (MinIO, moto, Ceph)
        # answer to without wildcard DNS; AWS itself wants virtual-hosted style.
        style = addressing_style or ("path" if self.endpoint_url else "auto")
        config = Config(
            # Botocore retries only throttling, 5xx and connection errors, with
            # backoff; a precondition failure or a 404 is never retried.
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            max_pool_connections=max(concurrency, 10),
            s3={"addressing_style": style},
            connect_timeout=10,
            read_timeout=60,
        )
        try:
            # One client per backend, shared by all threads: botocore clients are
            # thread-safe (sessions are not, and stay private to this call).
            session = _session(profile)
            self.region = region or session.region_name
            if self.region is None and self.endpoint_url:
                self.region = "us-east-1"
            self._client: Any = session.client(
                "s3", region_name=self.region, endpoint_url=self.endpoint_url, config=config
            )
        except (bexc.ProfileNotFound, bexc.InvalidRegionError, ValueError) as err:
            raise ConfigurationError(f"{self.uri}: {err}") from err
        # boto3 sends every body with "Expect: 100-continue": one more round
        # trip before each upload, waiting for the service to accept it. A
        # chunk is small and almost always accepted (the put asked first
        # whether it exists), so it goes at once; a refusal costs only its bytes.
        self._client.meta.events.unregister("before-call.s3", add_expect_header)

    # -- error mapping ---------------------------------------------------------------

    def _key(self, key: str) -> str:
        return self._root + check_key(key)

    def _fail(self, err: Exception, key: str | None, *, if_absent: bool = False,
              if_match: bool = False) -> NoReturn:  # fmt: skip
        if isinstance(err, CasError):
            raise err  # already mapped, e.g. an InvalidKeyError from inside a try
        where = f"{self.uri}/{key}" if key is not None else self.uri
        if isinstance(err, bexc.NoCredentialsError | bexc.PartialCredentialsError):
            raise ConfigurationError(
                f"no AWS credentials for {self.uri}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run on a machine with an instance role"
            ) from err
        if isinstance(err, bexc.EndpointConnectionError | bexc.ConnectionError):
            target = self.endpoint_url or f"S3 in {self.region or 'the default region'}"
            raise BackendError(
                f"cannot reach {target} ({self.max_attempts} attempts) for {where}: {err}; "
                "check the endpoint (endpoint_url, AWS_ENDPOINT_URL), the network and proxies",
                is_transient=True,
            ) from err
        if isinstance(err, bexc.ReadTimeoutError | bexc.ConnectTimeoutError):
            raise BackendError(f"timeout talking to S3 for {where}", is_transient=True) from err
        if not isinstance(err, bexc.ClientError):
            raise BackendError(f"S3 error for {where}: {err}") from err
        response = err.response
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = response.get("Error", {}).get("Message", "") or str(err)
        if code == "NoSuchBucket":
            raise BackendError(
                f"bucket {self.bucket!r} does not exist: "
                "create it or run `cas init --create-bucket`"
            ) from err
        if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
            if if_absent:
                raise AlreadyExistsError(f"object {where} already exists") from err
            raise PreconditionFailedError(f"object {where} changed since it was read") from err
        if code in _NOT_FOUND or status == 404:
            if if_match:
                # S3 answers If-Match on a missing key with 404: the object we
                # read is gone, which for a compare-and-swap is a lost race.
                raise PreconditionFailedError(f"object {where} is gone") from err
            raise NotFoundError(f"object {where} not found") from err
        if code in _ACCESS or status == 403:
            raise BackendError(
                f"access denied to {where} ({code}): check the credentials and that the policy "
                "allows s3:GetObject, s3:PutObject, s3:DeleteObject and s3:ListBucket"
            ) from err
        if code in _REGION or status == 301:
            actual = (
                response.get("ResponseMetadata", {})
                .get("HTTPHeaders", {})
                .get("x-amz-bucket-region")
            )
            hint = f"it is in {actual!r}; " if actual else ""
            raise ConfigurationError(
                f"bucket {self.bucket!r} is not in region {self.region!r}: {hint}"
                "set AWS_REGION or the store option region"
            ) from err
        transient = code in _THROTTLED or status >= 500 or status == 429
        raise BackendError(
            f"S3 {code or status} for {where}: {message}", is_transient=transient
        ) from err

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
        name = self._key(key)
        conditions: dict[str, str] = {}
        if if_absent:
            conditions["IfNoneMatch"] = "*"
        elif if_match is not None:
            conditions["IfMatch"] = if_match
        view = memoryview(data).cast("B")
        try:
            # Compare-and-swap is for small objects and stays a single PutObject
            # (up to 5 GiB): If-Match on CompleteMultipartUpload is newer, and
            # not every S3 implementation checks it there.
            if len(view) >= self.multipart_threshold and if_match is None:
                self._put_multipart(name, view, conditions)
            else:
                # Chunks arrive as bytes already: no copy of each one on its way out.
                body = data if isinstance(data, bytes) else bytes(view)
                self._client.put_object(Bucket=self.bucket, Key=name, Body=body, **conditions)
        except (bexc.BotoCoreError, bexc.ClientError) as err:
            self._fail(err, key, if_absent=if_absent, if_match=if_match is not None)

    def _put_multipart(self, name: str, view: memoryview, conditions: dict[str, str]) -> None:
        # The object appears only when CompleteMultipartUpload succeeds, and the
        # service checks the condition there: still atomic and still create-only.
        part_size = max(self.part_size, math.ceil(len(view) / 10_000))
        upload = self._client.create_multipart_upload(Bucket=self.bucket, Key=name)
        upload_id = upload["UploadId"]
        try:
            parts = []
            for number, start in enumerate(range(0, len(view), part_size), start=1):
                answer = self._client.upload_part(
                    Bucket=self.bucket,
                    Key=name,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=bytes(view[start : start + part_size]),
                )
                parts.append({"ETag": answer["ETag"], "PartNumber": number})
            self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=name,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **conditions,
            )
        except BaseException:
            # If the abort fails too, a lifecycle rule for incomplete uploads reclaims the parts.
            with contextlib.suppress(bexc.BotoCoreError, bexc.ClientError):
                self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=name, UploadId=upload_id
                )
            raise

    def get(self, key: str) -> bytes:
        return self.get_versioned(key)[0]

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        name = self._key(key)
        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=name)
            # The ETag comes from the same response as the bytes, so they match.
            return answer["Body"].read(), str(answer["ETag"])
        except (bexc.BotoCoreError, bexc.ClientError) as err:
            self._fail(err, key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise InvalidInputError(f"get_range: negative start or length for {key!r}")
        name = self._key(key)
        if length == 0:
            self.stat(key)  # still NotFoundError for a missing key
            return b""
        try:
            answer = self._client.get_object(
                Bucket=self.bucket, Key=name, Range=f"bytes={start}-{start + length - 1}"
            )
            data: bytes = answer["Body"].read()
            return data
        except bexc.ClientError as err:
            if err.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # 416: the range starts at or past the end
            self._fail(err, key)
        except bexc.BotoCoreError as err:
            self._fail(err, key)

    def stat(self, key: str) -> ObjectInfo:
        name = self._key(key)
        try:
            answer = self._client.head_object(Bucket=self.bucket, Key=name)
        except (bexc.BotoCoreError, bexc.ClientError) as err:
            self._fail(err, key)
        return ObjectInfo(
            key=key,
            size=int(answer["ContentLength"]),
            mtime=answer["LastModified"].timestamp(),
            token=str(answer["ETag"]),
        )

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self._root + prefix)
        try:
            for page in pages:
                for item in page.get("Contents", ()):
                    key = item["Key"][len(self._root) :]
                    if not is_valid_key(key):
                        continue  # e.g. a "folder/" marker made by a console
                    yield ObjectInfo(
                        key=key,
                        size=int(item["Size"]),
                        mtime=item["LastModified"].timestamp(),
                        token=str(item["ETag"]) if "ETag" in item else None,
                    )
        except (bexc.BotoCoreError, bexc.ClientError) as err:
            self._fail(err, None)

    def delete(self, keys: Iterable[str]) -> None:
        batch: list[str] = []
        for key in keys:
            batch.append(self._key(key))
            if len(batch) == DELETE_BATCH:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, names: list[str]) -> None:
        try:
            answer = self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": n} for n in names], "Quiet": True},
            )
        except (bexc.BotoCoreError, bexc.ClientError) as err:
            self._fail(err, None)
        errors = [e for e in answer.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
        if errors:
            first = errors[0]
            transient = any(e.get("Code") in _THROTTLED for e in errors)
            raise BackendError(
                f"S3 could not delete {len(errors)} of {len(names)} objects in {self.uri}, "
                f"e.g. {first.get('Key')!r}: {first.get('Code')} {first.get('Message', '')}",
                is_transient=transient,
            )

    def touch(self, key: str) -> None:
        # S3 has no "set mtime": copying an object onto itself (REPLACE is
        # required for a self-copy) gives it a new LastModified, server-side,
        # without moving data through the client. Meant for immutable objects:
        # a concurrent put of *different* bytes could be overwritten by the copy.
        name = self._key(key)
        try:
            self._client.copy_object(
                Bucket=self.bucket,
                Key=name,
                CopySource={"Bucket": self.bucket, "Key": name},
                MetadataDirective="REPLACE",
            )
        except (bexc.BotoCoreError, bexc.ClientError) as err:
            self._fail(err, key)

    def close(self) -> None:
        self._client.close()

    # -- administration --------------------------------------------------------------

    def create_bucket(self) -> None:
        """Create the bucket (in ``region``); fine if it exists and is ours."""
        args: dict[str, Any] = {"Bucket": self.bucket}
        if self.region and self.region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**args)
        except bexc.ClientError as err:
            code = err.response.get("Error", {}).get("Code")
            if code == "BucketAlreadyOwnedByYou":
                return
            if code == "BucketAlreadyExists":
                raise ConfigurationError(
                    f"bucket name {self.bucket!r} is taken by another account: choose another"
                ) from err
            self._fail(err, None)
        except bexc.BotoCoreError as err:
            self._fail(err, None)


def from_uri(uri: str, **options: Any) -> S3Backend:
    """Open ``s3://bucket[/prefix][?region=...&endpoint_url=...]``; options override the query."""
    bucket, prefix, query = _split(uri)
    merged: dict[str, Any] = {**query, **options}
    for name in ("concurrency", "max_attempts", "multipart_threshold", "part_size"):
        if name in merged:
            merged[name] = int(merged[name])
    known = {
        "region",
        "endpoint_url",
        "profile",
        "concurrency",
        "addressing_style",
        "max_attempts",
        "multipart_threshold",
        "part_size",
    }
    unknown = set(merged) - known
    if unknown:
        raise ConfigurationError(
            f"unknown S3 option(s) {', '.join(sorted(unknown))} for {uri!r}; "
            f"known: {', '.join(sorted(known))}"
        )
    return S3Backend(bucket, prefix, **merged)
