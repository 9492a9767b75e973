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
import functools
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

import boto3
import botocore.exceptions as bexc
import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.handlers import add_expect_header

from ..errors import BackendError, CasError, ConfigurationError
from ._cloud import CloudBackend, Fault, Listed, OptionReader, Request, as_is, is_transient_status
from .base import BytesLike, Leftover, is_valid_key

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
#: A response body that broke off after its headers: read again (see S3Backend._get_object).
_BROKEN_BODY = (bexc.IncompleteReadError, bexc.ResponseStreamingError, bexc.ReadTimeoutError)


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


class S3Backend(CloudBackend):
    """Objects in one bucket under an optional key prefix."""

    scheme, service, article = "s3", "S3", "an"
    delete_group = DELETE_BATCH
    uri_options: ClassVar[Mapping[str, OptionReader]] = {
        "region": as_is,
        "endpoint_url": as_is,
        "profile": as_is,
        "concurrency": int,
        "addressing_style": as_is,
        "max_attempts": int,
        "multipart_threshold": int,
        "part_size": int,
    }
    sdk_errors = (bexc.BotoCoreError, bexc.ClientError)

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        multipart_threshold: int = 64 * MiB,
        part_size: int = 16 * MiB,
        concurrency: int = CloudBackend.default_concurrency,
        max_attempts: int = 5,
        region: str | None = None,
        endpoint_url: str | None = None,
        profile: str | None = None,
        addressing_style: str | None = None,
    ) -> None:
        super().__init__(bucket, prefix, concurrency=concurrency)
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
        # Deletes under a deadline are never sent twice (delete_in_time), so
        # they go through a client that does not retry, made on first use so
        # that other commands do not pay for it.
        self._client_options = (profile, config.merge(Config(retries={"total_max_attempts": 1})))
        self._single_try: Any = None
        self._single_try_lock = threading.Lock()

    # -- error mapping ---------------------------------------------------------------

    def _classify(self, err: Exception, request: Request) -> Fault | CasError:
        where = self._where(request.key)
        if isinstance(err, bexc.NoCredentialsError | bexc.PartialCredentialsError):
            return ConfigurationError(
                f"no AWS credentials for {self.uri}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run on a machine with an instance role"
            )
        if isinstance(err, bexc.EndpointConnectionError | bexc.ConnectionError):
            target = self.endpoint_url or f"S3 in {self.region or 'the default region'}"
            return BackendError(
                f"cannot reach {target} ({self.max_attempts} attempts) for {where}: {err}; "
                "check the endpoint (endpoint_url, AWS_ENDPOINT_URL), the network and proxies",
                is_transient=True,
            )
        if isinstance(err, bexc.ConnectionClosedError):
            # Botocore retries a dropped connection too: what reaches us is its last.
            return BackendError(
                f"S3 closed the connection for {where} before answering: {err}",
                is_transient=True,
            )
        if isinstance(err, bexc.ReadTimeoutError | bexc.ConnectTimeoutError):
            return BackendError(f"timeout talking to S3 for {where}", is_transient=True)
        if isinstance(err, _BROKEN_BODY):
            return BackendError(
                f"S3 answer for {where} broke off ({self.max_attempts} attempts): {err}",
                is_transient=True,
            )
        if not isinstance(err, bexc.ClientError):
            return BackendError(f"S3 error for {where}: {err}")
        return self._classify_answer(err, where)

    def _classify_answer(self, err: bexc.ClientError, where: str) -> Fault | CasError:
        response = err.response
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code == "NoSuchBucket":
            return Fault.NO_BUCKET
        if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return Fault.CONFLICT
        if code in _NOT_FOUND or status == 404:
            return Fault.MISSING
        if code == "InvalidRange" or status == 416:
            return Fault.PAST_END
        if code in _ACCESS or status == 403:
            return BackendError(
                f"access denied to {where} ({code}): check the credentials and that the policy "
                "allows s3:GetObject, s3:PutObject, s3:DeleteObject and s3:ListBucket"
            )
        if code in _REGION or status == 301:
            headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            actual = headers.get("x-amz-bucket-region")
            hint = f"it is in {actual!r}; " if actual else ""
            return ConfigurationError(
                f"bucket {self.bucket!r} is not in region {self.region!r}: {hint}"
                "set AWS_REGION or the store option region"
            )
        message = response.get("Error", {}).get("Message", "") or str(err)
        transient = code in _THROTTLED or is_transient_status(status)
        return BackendError(f"S3 {code or status} for {where}: {message}", is_transient=transient)

    # -- requests --------------------------------------------------------------------

    def _upload(self, name: str, data: BytesLike, if_absent: bool, if_match: str | None) -> None:
        conditions: dict[str, str] = {}
        if if_absent:
            conditions["IfNoneMatch"] = "*"
        elif if_match is not None:
            conditions["IfMatch"] = if_match
        view = memoryview(data).cast("B")
        # Compare-and-swap is for small objects and stays a single PutObject
        # (up to 5 GiB): If-Match on CompleteMultipartUpload is newer, and
        # not every S3 implementation checks it there.
        if len(view) >= self.multipart_threshold and if_match is None:
            self._put_multipart(name, view, conditions)
        else:
            # Chunks arrive as bytes already: no copy of each one on its way out.
            body = data if isinstance(data, bytes) else bytes(view)
            self._client.put_object(Bucket=self.bucket, Key=name, Body=body, **conditions)

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

    def _download(self, name: str) -> tuple[bytes, str]:
        return self._get_object(name)

    def _download_range(self, name: str, start: int, length: int) -> bytes:
        return self._get_object(name, Range=f"bytes={start}-{start + length - 1}")[0]

    def _get_object(self, name: str, **options: str) -> tuple[bytes, str]:
        """The bytes and ETag of one GetObject, asked again if the answer breaks off.

        Botocore retries a request until its headers arrive; the body is read
        after that, outside its retries (boto3's own download manager retries
        these errors the same way). A GET is safe to repeat.
        """
        attempt = 1
        while True:
            answer = self._client.get_object(Bucket=self.bucket, Key=name, **options)
            try:
                # The ETag comes from the same response as the bytes, so they match.
                return answer["Body"].read(), str(answer["ETag"])
            except _BROKEN_BODY:
                if attempt >= self.max_attempts:
                    raise
            # Botocore's backoff for a fault that is not throttling: full
            # jitter, from 50 ms, doubling, at most 20 s.
            time.sleep(random.random() * min(0.05 * 2 ** (attempt - 1), 20.0))
            attempt += 1

    def _head(self, name: str) -> tuple[int, float, str]:
        answer = self._client.head_object(Bucket=self.bucket, Key=name)
        return int(answer["ContentLength"]), answer["LastModified"].timestamp(), str(answer["ETag"])

    def _list_names(self, prefix: str) -> Iterator[Listed]:
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                token = str(item["ETag"]) if "ETag" in item else None
                yield item["Key"], int(item["Size"]), item["LastModified"].timestamp(), token

    def _delete_names(self, names: list[str]) -> None:
        for start in range(0, len(names), DELETE_BATCH):
            self._delete_batch(names[start : start + DELETE_BATCH])

    def _delete_once(self, names: list[str], in_time: Callable[[], bool]) -> list[str]:
        with self._single_try_lock:
            if self._single_try is None:
                profile, config = self._client_options
                self._single_try = _session(profile).client(
                    "s3", region_name=self.region, endpoint_url=self.endpoint_url, config=config
                )
        self._delete_batch(names, self._single_try)
        return []

    def _delete_batch(self, names: list[str], client: Any = None) -> None:
        answer = (client or self._client).delete_objects(
            Bucket=self.bucket,
            Delete={"Objects": [{"Key": n} for n in names], "Quiet": True},
        )
        errors = [e for e in answer.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
        if errors:
            first = errors[0]
            transient = any(e.get("Code") in _THROTTLED for e in errors)
            raise BackendError(
                f"S3 could not delete {len(errors)} of {len(names)} objects in {self.uri}, "
                f"e.g. {first.get('Key')!r}: {first.get('Code')} {first.get('Message', '')}",
                is_transient=transient,
            )

    def _touch_name(self, name: str) -> None:
        # S3 has no "set mtime": copying an object onto itself (REPLACE is
        # required for a self-copy) gives it a new LastModified, server-side,
        # without moving data through the client. Meant for immutable objects:
        # a concurrent put of *different* bytes could be overwritten by the copy.
        self._client.copy_object(
            Bucket=self.bucket,
            Key=name,
            CopySource={"Bucket": self.bucket, "Key": name},
            MetadataDirective="REPLACE",
        )

    def list_leftovers(self) -> Iterator[Leftover]:
        """Multipart uploads neither completed nor aborted, named ``key#upload-id``.

        Their parts are billed but belong to no object. The time given is
        that of the last part uploaded (of the start, before any part).
        """
        paginator = self._client.get_paginator("list_multipart_uploads")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._root):
                for upload in page.get("Uploads", ()):
                    key = self._key_of(upload["Key"])
                    if not is_valid_key(key):
                        continue
                    started = upload["Initiated"].timestamp()
                    size, last = self._parts(upload["Key"], upload["UploadId"])
                    name = f"{key}#{upload['UploadId']}"
                    yield Leftover(name, size, max(started, last))
        except self.sdk_errors as err:
            self._fail(err, Request())

    def _parts(self, name: str, upload_id: str) -> tuple[int, float]:
        """Bytes uploaded so far, and the time of the last part (0 without parts)."""
        paginator = self._client.get_paginator("list_parts")
        size, last = 0, 0.0
        try:
            for page in paginator.paginate(Bucket=self.bucket, Key=name, UploadId=upload_id):
                for part in page.get("Parts", ()):
                    size += int(part["Size"])
                    last = max(last, part["LastModified"].timestamp())
        except bexc.ClientError as err:
            if err.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise  # completed or aborted meanwhile: nothing left of it
        return size, last

    def remove_leftovers(self, leftovers: Iterable[Leftover]) -> None:
        for leftover in leftovers:
            key, _, upload_id = leftover.name.rpartition("#")
            abort = functools.partial(self._abort, self._name(key), upload_id)
            self._requesting(Request(key), abort)

    def _abort(self, name: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
        except bexc.ClientError as err:
            if err.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise  # gone already: what was asked

    def close(self) -> None:
        self._client.close()

    def _create_bucket(self) -> None:
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
            raise


from_uri = S3Backend.from_uri
