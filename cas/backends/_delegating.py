"""A backend that forwards every call to another one, for wrappers to build on.

A wrapper (fault injection, test hooks, counting) overrides :meth:`_call`,
the one place every request passes through, instead of repeating each
method of the contract.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TypeVar

from .base import Backend, BytesLike, Leftover, ObjectInfo

T = TypeVar("T")


class DelegatingBackend(Backend):
    """Forwards to ``inner``, whose settings (uri, concurrency, ...) it takes on."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.concurrency = inner.concurrency
        self.list_page_size = inner.list_page_size
        self.remote = inner.remote

    @property
    def local_root(self) -> Path | None:
        return self.inner.local_root

    def _call(self, op: str, keys: Sequence[str], request: Callable[[], T]) -> T:
        """Run one request of the contract.

        ``op`` is the operation (``put``, ``get``, ``get_versioned``,
        ``get_range``, ``stat``, ``list``, ``delete``, ``touch``), ``keys``
        the keys it names (a listing: its prefix). A listing's request
        returns the inner iterator without reading it.
        """
        return request()

    def put(
        self, key: str, data: BytesLike, *, if_absent: bool = False, if_match: str | None = None
    ) -> None:
        self._call(
            "put", [key], lambda: self.inner.put(key, data, if_absent=if_absent, if_match=if_match)
        )

    def get(self, key: str) -> bytes:
        return self._call("get", [key], lambda: self.inner.get(key))

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        return self._call("get_versioned", [key], lambda: self.inner.get_versioned(key))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self._call("get_range", [key], lambda: self.inner.get_range(key, start, length))

    def stat(self, key: str) -> ObjectInfo:
        return self._call("stat", [key], lambda: self.inner.stat(key))

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self._call("list", [prefix], lambda: self.inner.list_objects(prefix))

    def delete(self, keys: Iterable[str]) -> None:
        names = list(keys)
        self._call("delete", names, lambda: self.inner.delete(names))

    def delete_in_time(self, keys: Sequence[str], in_time: Callable[[], bool]) -> list[str]:
        names = list(keys)
        return self._call("delete", names, lambda: self.inner.delete_in_time(names, in_time))

    def touch(self, key: str) -> None:
        self._call("touch", [key], lambda: self.inner.touch(key))

    def flush(self) -> None:
        self.inner.flush()

    def prefetch(self, keys: Sequence[str]) -> None:
        self.inner.prefetch(keys)

    def create_bucket(self) -> None:
        self.inner.create_bucket()

    def list_leftovers(self) -> Iterator[Leftover]:
        return self.inner.list_leftovers()

    def remove_leftovers(self, leftovers: Iterable[Leftover]) -> None:
        self.inner.remove_leftovers(leftovers)

    def ensure_reserve(self) -> None:
        self.inner.ensure_reserve()

    def drawing_on_reserve(self) -> AbstractContextManager[None]:
        return self.inner.drawing_on_reserve()

    def close(self) -> None:
        self.inner.close()
