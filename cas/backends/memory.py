"""An in-process backend for tests, with an injectable clock.

The clock makes garbage-collection interleavings replayable: a test moves
time forward by hand instead of sleeping through a grace period.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..errors import AlreadyExistsError, InvalidInputError, NotFoundError, PreconditionFailedError
from .base import Backend, BytesLike, ObjectInfo, check_key, check_put_conditions


@dataclass(slots=True)
class _Object:
    """A stored object with the modification time and generation the contract exposes."""

    data: bytes
    mtime: float
    generation: int


class MemoryBackend(Backend):
    """Objects in a dict, guarded by one lock. Not persistent."""

    def __init__(self, *, clock: Callable[[], float] = time.time, name: str = "") -> None:
        self._objects: dict[str, _Object] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._generation = 0
        self.uri = f"memory://{name or hex(id(self))}"

    def _missing(self, key: str) -> NotFoundError:
        return NotFoundError(f"object {key!r} not found in {self.uri}")

    def put(
        self, key: str, data: BytesLike, *, if_absent: bool = False, if_match: str | None = None
    ) -> None:
        check_key(key)
        check_put_conditions(if_absent, if_match)
        with self._lock:
            current = self._objects.get(key)
            if if_absent and current is not None:
                raise AlreadyExistsError(f"object {key!r} already exists")
            if if_match is not None and (current is None or str(current.generation) != if_match):
                raise PreconditionFailedError(f"object {key!r} changed since read")
            self._generation += 1
            self._objects[key] = _Object(bytes(data), self._clock(), self._generation)

    def _get(self, key: str) -> _Object:
        check_key(key)
        with self._lock:
            obj = self._objects.get(key)
        if obj is None:
            raise self._missing(key)
        return obj

    def get(self, key: str) -> bytes:
        return self._get(key).data

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        obj = self._get(key)
        return obj.data, str(obj.generation)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise InvalidInputError(f"get_range: negative start or length for {key!r}")
        return self._get(key).data[start : start + length]

    def stat(self, key: str) -> ObjectInfo:
        obj = self._get(key)
        return ObjectInfo(key, len(obj.data), obj.mtime, str(obj.generation))

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:
            snapshot = sorted((k, v) for k, v in self._objects.items() if k.startswith(prefix))
        for key, obj in snapshot:
            yield ObjectInfo(key, len(obj.data), obj.mtime, str(obj.generation))

    def delete(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._objects.pop(key, None)

    def touch(self, key: str) -> None:
        check_key(key)
        with self._lock:
            obj = self._objects.get(key)
            if obj is None:
                raise self._missing(key)
            obj.mtime = self._clock()
