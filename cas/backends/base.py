"""The backend contract: opaque bytes under plain keys.

A backend knows nothing of chunks, manifests or refs. Everything above it
(dedup, integrity, garbage collection) relies only on the guarantees written
here, and :mod:`cas.testing.conformance` checks them on every implementation.

Keys are ``/``-separated, relative, non-empty segments, none of them ``.`` or
``..`` and none starting with ``.cas-tmp``. Implementations map a key to an
object name (after their own prefix) in any way that keeps the order of
:meth:`Backend.list`.

Every implementation MUST give:

* **Atomic whole-object writes.** A reader sees the old object, the new one,
  or nothing, never a part.
* **Read-after-write consistency** for put, get, stat, list and delete.
* **Durability.** A plain or compare-and-swap put is durable when it returns;
  a create-only put is durable at the latest when :meth:`Backend.flush`
  returns.
* **Create-only writes.** ``put(key, data, if_absent=True)`` raises
  :class:`~cas.errors.AlreadyExistsError` when the key exists, and then leaves
  the existing object untouched. Two concurrent create-only writes of one key:
  exactly one succeeds.
* **Compare-and-swap** for small mutable objects. ``get_versioned`` returns
  the data and an opaque token; ``put(key, data, if_match=token)`` succeeds
  only if the object still has that token, else raises
  :class:`~cas.errors.PreconditionFailedError`.
* **Server-side modification times.** ``stat``, ``list`` and ``touch`` report
  the time of the storage service, never of the client; garbage collection
  compares those times with each other and with nothing else.
* **Not-found mapping.** A missing key raises
  :class:`~cas.errors.NotFoundError` (also a :class:`FileNotFoundError`).
* **Retries inside the backend.** A backend retries transient faults
  (throttling, timeouts, 5xx, dropped connections) itself, a bounded number
  of times with backoff and jitter; the cloud SDKs do it for every request.
  What still fails raises :class:`~cas.errors.BackendError` with
  ``is_transient=True`` (the operation may succeed later); a permanent fault
  raises it with ``is_transient=False``. Nothing above a backend retries a
  request again: docs/backends.md ("Retries") says why. A full device
  raises :class:`~cas.errors.NoSpaceLeftError`, which is permanent.
* **Conditional writes may report their own success as a conflict.** When
  the answer to a create-only or compare-and-swap write is lost and the
  request is retried, the retry finds the object written and raises
  :class:`~cas.errors.AlreadyExistsError` or
  :class:`~cas.errors.PreconditionFailedError`. Callers read the object back
  (or rely on it being named by its content) before taking a conflict for a
  lost race.

Two optional parts have defaults that do nothing, for services that need
nothing of the kind:

* **Leftovers.** :meth:`Backend.list_leftovers` names what writers that
  died mid-write left behind outside the listed objects (a local folder's
  temporary files, S3's unfinished multipart uploads), with the service's
  time of their last write; :meth:`Backend.remove_leftovers` removes them.
  Neither ever touches a listed object. Garbage collection removes the ones
  older than its grace.
* **A space reserve.** Where a device can fill up (a local folder),
  :meth:`Backend.ensure_reserve` sets a little space aside, and writes made
  inside :meth:`Backend.drawing_on_reserve` may use it when the device is
  full, so that deleting versions and collecting garbage, which free
  space, still work on a full device.
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendError, InvalidInputError, InvalidKeyError

TEMP_PREFIX = ".cas-tmp"
#: What a put stores: any buffer of bytes, written without a copy where the service allows.
BytesLike = bytes | bytearray | memoryview
_SEGMENT = re.compile(r"[^/\x00]+")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a backend knows of one object without reading it."""

    key: str
    size: int
    #: Server-side modification time, seconds since the epoch.
    mtime: float
    #: Opaque version token for compare-and-swap; ``None`` when a listing
    #: does not carry it.
    token: str | None = None


@dataclass(frozen=True, slots=True)
class Leftover:
    """What a writer that died mid-write left behind: a temporary file, a partial upload."""

    #: What the backend needs to remove it (a relative path, ``key#upload-id``...).
    name: str
    #: Bytes it holds, as far as the service says.
    size: int
    #: Server-side time of its last write (or of its start, where that is all
    #: the service keeps), seconds since the epoch.
    mtime: float


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid backend key, else raise InvalidKeyError."""
    if not key or key.startswith("/") or key.endswith("/"):
        raise InvalidKeyError(f"invalid object key {key!r}: empty, or leading/trailing '/'")
    for segment in key.split("/"):
        if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise InvalidKeyError(f"invalid object key {key!r}: bad segment {segment!r}")
        if segment.startswith(TEMP_PREFIX):
            raise InvalidKeyError(f"invalid object key {key!r}: {TEMP_PREFIX!r} is reserved")
    return key


def check_put_conditions(if_absent: bool, if_match: str | None) -> None:
    """Refuse a put that asks to be both create-only and compare-and-swap."""
    if if_absent and if_match is not None:
        raise InvalidInputError("put: if_absent and if_match exclude each other")


def is_valid_key(key: str) -> bool:
    """Whether ``key`` is a valid backend key; listings use it to skip foreign objects."""
    try:
        check_key(key)
    except InvalidKeyError:
        return False
    return True


class Backend(ABC):
    """Byte storage under keys. See the module docstring for the contract."""

    #: Human-readable location, e.g. ``file:///data/store`` or ``s3://b/p``.
    uri: str = ""

    #: How many requests in parallel make sense; upper layers size their
    #: thread pools from it.
    concurrency: int = 8

    #: Objects one listing request returns at most. 0 where a listing costs
    #: about as much per object as a stat (a local folder, memory), so that a
    #: put never lists to save requests there (see :mod:`cas.chunks._listing`).
    list_page_size: int = 0

    #: True where every object read or written is a network request, with its
    #: latency and, on a cloud, its fee: upper layers then prefer fewer,
    #: larger objects (a new store's default chunk size, see
    #: :func:`cas.store._config.default_chunker`).
    remote: bool = False

    @property
    def local_root(self) -> Path | None:
        """The folder of this machine whose files are the objects; None for a service.

        The store uses it to keep its own folder out of what it stores and of
        what a restore may replace, and to see whether the folder is empty.
        """
        return None

    @abstractmethod
    def put(
        self, key: str, data: BytesLike, *, if_absent: bool = False, if_match: str | None = None
    ) -> None:
        """Store ``data`` under ``key`` atomically.

        ``if_absent`` makes the write create-only; ``if_match`` makes it a
        compare-and-swap against a token from :meth:`get_versioned` or
        :meth:`stat`. They MUST NOT both be given.
        """

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Return the whole object. NotFoundError if missing."""

    @abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """Return the object and its compare-and-swap token, read together."""

    @abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Return ``length`` bytes from ``start``; fewer only at the end of the object.

        ``start`` past the end returns ``b""``. NotFoundError if missing.
        """

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size, server-side modification time and token. NotFoundError if missing."""

    @abstractmethod
    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield every object whose key starts with ``prefix``, sorted by key.

        ``prefix`` is a plain string prefix, not necessarily a whole segment.
        Implementations page through the service transparently.
        """

    @abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Delete the given keys, in batches where the service allows. Missing keys are ignored."""

    def delete_in_time(self, keys: Sequence[str], in_time: Callable[[], bool]) -> list[str]:
        """Delete ``keys``, sending each request only while ``in_time()``, and only once.

        Returns the keys of the requests that were not sent, or failed for a
        transient reason: they may or may not be gone. A garbage collection
        decides each delete from a read of the object's time, and a writer
        that touched the object waits only a bounded time for such deletes
        to land (docs/gc.md): a delete sent later, by a slow batch, could
        remove an object the writer has just made safe, and a retry of one
        that landed could remove the object a writer uploaded anew since.
        So nothing is retried here; the caller reads the returned keys again.
        This default sends one key at a time through :meth:`delete`, right
        for backends whose delete of one key is one request, never retried.
        """
        for index, key in enumerate(keys):
            if not in_time():
                return list(keys[index:])
            try:
                self.delete([key])
            except BackendError as err:
                if not err.is_transient:
                    raise
                return list(keys[index:])
        return []

    @abstractmethod
    def touch(self, key: str) -> None:
        """Set the modification time of ``key`` to the service's now. NotFoundError if missing."""

    def flush(self) -> None:  # noqa: B027 - most services are durable on return
        """Make every create-only put that has returned durable.

        A backend may defer part of the durability work of create-only writes
        (a local folder defers the directory fsync) so that many of them run
        in parallel; callers flush before a write that must not become
        durable without them, such as a version ref that names them.
        Services that acknowledge only durable writes need nothing here.
        """

    def prefetch(self, keys: Sequence[str]) -> None:  # noqa: B027 - a hint most services ignore
        """Hint that ``keys`` will be read soon, so that reading can start early.

        A local folder asks the kernel to bring the files into its page cache
        while the caller is busy with earlier ones; a service that serves
        parallel requests anyway ignores it. Never fails: a missing or
        unreadable object is reported by the read that follows.
        """

    def create_bucket(self) -> None:  # noqa: B027 - nothing to create for most backends
        """Create the bucket or container the store lives in; fine if it exists.

        Cloud backends override this; a folder is created by its first write.
        """

    def list_leftovers(self) -> Iterator[Leftover]:
        """Yield what unfinished writes left behind; nothing where a service leaves nothing."""
        return iter(())

    def remove_leftovers(self, leftovers: Iterable[Leftover]) -> None:  # noqa: B027
        """Remove leftovers named by :meth:`list_leftovers`; gone ones are ignored."""

    def ensure_reserve(self) -> None:  # noqa: B027 - only a device that can fill up has one
        """Set aside the space that cleanups may use once the device is full; never fails."""

    def drawing_on_reserve(self) -> contextlib.AbstractContextManager[None]:
        """Let writes inside use the reserve if the device is full (for deletes and gc)."""
        return contextlib.nullcontext()

    def exists(self, key: str) -> bool:
        from ..errors import NotFoundError

        try:
            self.stat(key)
        except NotFoundError:
            return False
        return True

    def close(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """Release connections. The backend must not be used afterwards."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"
