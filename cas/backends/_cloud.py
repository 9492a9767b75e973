"""What the object-store backends share, written once.

An object store keeps a bucket (or container) of named objects. Every cloud
backend maps a key to the name ``PREFIX/key``, guards the contract's
arguments, skips foreign names in listings, takes its options from the URI
and maps a service's refusals to the contract's errors in the same way.
:class:`CloudBackend` does all of that; a backend (s3.py, gcs.py, azure.py)
adds only what is its SDK's: the requests, and what each of its errors means
(:meth:`CloudBackend._classify`).
"""

from __future__ import annotations

import enum
import threading
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn, TypeVar
from urllib.parse import parse_qsl, urlsplit

from ..errors import (
    AlreadyExistsError,
    BackendError,
    CasError,
    ConfigurationError,
    InvalidInputError,
    NotFoundError,
    PreconditionFailedError,
)
from .base import Backend, BytesLike, ObjectInfo, check_key, check_put_conditions, is_valid_key

C = TypeVar("C", bound="CloudBackend")
T = TypeVar("T")

#: How a URI option is read from the query's text.
OptionReader = Callable[[Any], Any]
#: One object of a listing: (name in the bucket, size, modification time, token or None).
Listed = tuple[str, int, float, str | None]

#: Parallel requests an S3, GCS or Azure backend makes unless its
#: ``concurrency`` option says otherwise: each request mostly waits on the network.
OBJECT_STORE_CONCURRENCY = 16


class Fault(enum.Enum):
    """What a refusal of the service means for the contract, whatever SDK reported it."""

    #: A condition of the request failed: the object exists, or changed (412, 409).
    CONFLICT = "conflict"
    #: No such object (404).
    MISSING = "missing"
    #: No such bucket or container.
    NO_BUCKET = "no bucket"
    #: A range starting at or past the end of the object (416).
    PAST_END = "past end"


@dataclass(frozen=True, slots=True)
class Request:
    """What a failed request was, as far as the meaning of its error depends on it."""

    #: The key it named; None for the bucket as a whole (a listing, a batch).
    key: str | None = None
    if_absent: bool = False
    if_match: bool = False
    #: A write, which has no object to be missing: a 404 means the bucket.
    writing: bool = False


def is_transient_status(status: int) -> bool:
    """Whether an HTTP status says "try again later": throttling or a server fault."""
    return status >= 500 or status == 429


def as_is(value: Any) -> Any:
    """A URI option taken as given."""
    return value


class CloudBackend(Backend):
    """Objects in one bucket under an optional name prefix."""

    remote = True
    list_page_size = 1000  # a listing request answers up to 1,000 names on S3 and GCS
    default_concurrency: ClassVar[int] = OBJECT_STORE_CONCURRENCY
    #: Keys one delete request may name: the service's batch limit, 1 where
    #: every key is a request of its own.
    delete_group: ClassVar[int] = 1

    #: URI scheme (``s3``), name of the service in messages (``S3``), the
    #: article before it, and what the service calls a bucket.
    scheme: ClassVar[str]
    service: ClassVar[str]
    article: ClassVar[str] = "a"
    bucket_kind: ClassVar[str] = "bucket"
    #: Options a URI's query may set, with how each is converted from text.
    uri_options: ClassVar[Mapping[str, OptionReader]]
    #: The exceptions the SDK raises; anything else is not the service's answer.
    sdk_errors: ClassVar[tuple[type[Exception], ...]]

    def __init__(self, bucket: str, prefix: str, *, concurrency: int) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._root = f"{self.prefix}/" if self.prefix else ""
        location = f"{self.scheme}://{bucket}"
        self.uri = f"{location}/{self.prefix}" if self.prefix else location
        self.concurrency = concurrency

    @classmethod
    def from_uri(cls: type[C], uri: str, **options: Any) -> C:
        """Open ``SCHEME://BUCKET[/PREFIX][?OPTION=VALUE&...]``; ``options`` override the query."""
        parts = urlsplit(uri)
        if parts.scheme != cls.scheme or not parts.netloc:
            raise ConfigurationError(
                f"not {cls.article} {cls.service} location: {uri!r}; "
                f"expected {cls.scheme}://{cls.bucket_kind}[/prefix]"
            )
        merged: dict[str, Any] = {**dict(parse_qsl(parts.query)), **options}
        known = cls.uri_options
        unknown = set(merged) - set(known)
        if unknown:
            raise ConfigurationError(
                f"unknown {cls.service} option(s) {', '.join(sorted(unknown))} for {uri!r}; "
                f"known: {', '.join(sorted(known))}"
            )
        converted: dict[str, Any] = {}
        for name, value in merged.items():
            try:
                converted[name] = known[name](value)
            except (TypeError, ValueError) as err:
                raise ConfigurationError(
                    f"bad {cls.service} option {name}={value!r} for {uri!r}: {err}"
                ) from None
        return cls(parts.netloc, parts.path.strip("/"), **converted)

    # -- keys and names --------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self._root + check_key(key)

    def _key_of(self, name: str) -> str:
        return name[len(self._root) :]

    def _where(self, key: str | None) -> str:
        return f"{self.uri}/{key}" if key is not None else self.uri

    def _missing(self, name: str) -> NotFoundError:
        return NotFoundError(f"object {self._where(self._key_of(name))} not found")

    # -- what the SDK does -----------------------------------------------------------

    @abstractmethod
    def _upload(self, name: str, data: BytesLike, if_absent: bool, if_match: str | None) -> None:
        """Write the object, create-only or compare-and-swap if asked."""

    @abstractmethod
    def _download(self, name: str) -> tuple[bytes, str]:
        """The object and its token, from one response."""

    @abstractmethod
    def _download_range(self, name: str, start: int, length: int) -> bytes:
        """``length`` (> 0) bytes from ``start``; past the end, a :attr:`Fault.PAST_END` error."""

    @abstractmethod
    def _head(self, name: str) -> tuple[int, float, str]:
        """(size, modification time, token) of the object."""

    @abstractmethod
    def _list_names(self, prefix: str) -> Iterator[Listed]:
        """Every object whose name starts with ``prefix``, sorted by name."""

    @abstractmethod
    def _delete_names(self, names: list[str]) -> None:
        """Delete the objects (missing ones are fine)."""

    @abstractmethod
    def _delete_once(self, names: list[str], in_time: Callable[[], bool]) -> list[str]:
        """Delete the objects with one request the SDK does not retry; return the names
        left unsent (a fallback that needs more requests asks ``in_time()`` before each)."""

    @abstractmethod
    def _touch_name(self, name: str) -> None:
        """Give the object the service's current time as its modification time."""

    @abstractmethod
    def _create_bucket(self) -> None:
        """Create the bucket; return quietly if it exists and is ours."""

    @abstractmethod
    def _classify(self, err: Exception, request: Request) -> Fault | CasError:
        """What an SDK error means: a :class:`Fault` the contract names, or the error to raise."""

    # -- errors ----------------------------------------------------------------------

    def _fail(self, err: Exception, request: Request) -> NoReturn:
        if isinstance(err, CasError):
            raise err  # already mapped, e.g. an InvalidKeyError from inside a try
        meaning = self._classify(err, request)
        if isinstance(meaning, Fault):
            raise self._contract_error(meaning, request) from err
        raise meaning from err

    def _contract_error(self, fault: Fault, request: Request) -> CasError:
        where = self._where(request.key)
        if fault is Fault.NO_BUCKET:
            return BackendError.naming(
                "{kind} {bucket!r} does not exist: create it or {create_bucket}",
                kind=self.bucket_kind,
                bucket=self.bucket,
                create_bucket="make the store with Store.init(..., create_bucket=True)",
            )
        if fault is Fault.CONFLICT:
            if request.if_absent:
                return AlreadyExistsError(f"object {where} already exists")
            if request.if_match:
                return PreconditionFailedError(f"object {where} changed since it was read")
            # A read of a large object goes in ranges tied to the first one's
            # version: a writer replaced it in between, and reading again helps.
            return BackendError(f"object {where} changed while read", is_transient=True)
        if fault is Fault.MISSING:
            if request.if_match:
                # The object read for a compare-and-swap is gone: a lost race.
                return PreconditionFailedError(f"object {where} is gone")
            return NotFoundError(f"object {where} not found")
        return BackendError(f"{self.service} refused a range past the end of {where}")

    # -- the contract ----------------------------------------------------------------

    def put(
        self, key: str, data: BytesLike, *, if_absent: bool = False, if_match: str | None = None
    ) -> None:
        check_put_conditions(if_absent, if_match)
        name = self._name(key)
        try:
            self._upload(name, data, if_absent, if_match)
        except self.sdk_errors as err:
            request = Request(key, if_absent, if_match is not None, writing=True)
            self._fail(err, request)

    def get(self, key: str) -> bytes:
        return self.get_versioned(key)[0]

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        name = self._name(key)
        return self._requesting(Request(key), lambda: self._download(name))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise InvalidInputError(f"get_range: negative start or length for {key!r}")
        name = self._name(key)
        if length == 0:
            self.stat(key)  # still NotFoundError for a missing key
            return b""
        try:
            return self._download_range(name, start, length)
        except self.sdk_errors as err:
            if (
                not isinstance(err, CasError)
                and self._classify(err, Request(key)) is Fault.PAST_END
            ):
                return b""  # 416: the range starts at or past the end
            self._fail(err, Request(key))

    def stat(self, key: str) -> ObjectInfo:
        name = self._name(key)
        size, mtime, token = self._requesting(Request(key), lambda: self._head(name))
        return ObjectInfo(key=key, size=size, mtime=mtime, token=token)

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        try:
            for name, size, mtime, token in self._list_names(self._root + prefix):
                key = self._key_of(name)
                if not is_valid_key(key):
                    continue  # e.g. a "folder/" marker made by a console
                yield ObjectInfo(key=key, size=size, mtime=mtime, token=token)
        except self.sdk_errors as err:
            self._fail(err, Request())

    def delete(self, keys: Iterable[str]) -> None:
        names = [self._name(key) for key in keys]
        if names:
            self._requesting(Request(), lambda: self._delete_names(names))

    def delete_in_time(self, keys: Sequence[str], in_time: Callable[[], bool]) -> list[str]:
        names = [self._name(key) for key in keys]
        size = self.delete_group
        groups = [names[i : i + size] for i in range(0, len(names), size)]
        unsent: list[str] = []
        lock = threading.Lock()

        def send(group: list[str]) -> None:
            left = self._send_in_time(group, in_time)
            with lock:
                unsent.extend(left)

        self._in_parallel(send, groups, self.concurrency)
        return [self._key_of(name) for name in unsent]

    def _send_in_time(self, names: list[str], in_time: Callable[[], bool]) -> list[str]:
        """One delete request, sent only in time and never again: a request that
        failed may still have landed, and a second one could remove an object
        uploaded anew since. What failed for a transient reason is returned,
        for the caller to read again and decide afresh."""
        if not in_time():
            return names
        try:
            return self._requesting(Request(), lambda: self._delete_once(names, in_time))
        except BackendError as err:
            if not err.is_transient:
                raise
        return names

    def touch(self, key: str) -> None:
        name = self._name(key)
        self._requesting(Request(key), lambda: self._touch_name(name))

    def create_bucket(self) -> None:
        """Create the bucket or container; fine if it exists and is ours."""
        self._requesting(Request(), self._create_bucket)

    @staticmethod
    def _in_parallel(action: Callable[[T], None], items: Sequence[T], workers: int) -> None:
        """``action`` on every item, ``workers`` at a time (one item needs no pool)."""
        if len(items) == 1:
            action(items[0])
            return
        with ThreadPoolExecutor(max(1, min(workers, len(items)))) as pool:
            for _ in pool.map(action, items):
                pass

    def _requesting(self, request: Request, action: Callable[[], T]) -> T:
        """``action()``, its SDK errors mapped to the contract's."""
        try:
            return action()
        except self.sdk_errors as err:
            self._fail(err, request)
