"""The one walk over what is live: every live version of a store, with its manifest.

Garbage collection marks from it, verify checks from it, stats and prune
count from it; what each one reads of a manifest is its own (a full
:class:`~cas.repository._manifest.Manifest`, or only the names of the chunks
it keeps alive), what a manifest keeps alive is
:meth:`~cas.repository._manifest.Manifest.live_chunks` for all of them.

One listing of ``refs/`` yields every version ref; the refs, and what
``read`` makes of each live one, are read on a pool of threads, a few
dozen at most in flight, and come out in listing order (keys sorted, then
versions ascending).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..errors import IntegrityError
from . import _layout as layout
from ._refs import Refs, VersionRef

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(
    pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], limit: int
) -> Iterator[R]:
    """``pool.map`` that keeps at most ``limit`` calls in flight, results in order."""
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


@dataclass(frozen=True, slots=True)
class _Unreadable:
    label: str
    error: IntegrityError


class LiveVersions(Generic[T]):
    """Iterate over ``(ref, read(ref))`` for every live version ref of the store.

    A ref that cannot be read raises, unless ``on_unreadable(label, error)``
    takes it; ``tick`` is called for every version ref listed, live or not
    (garbage collection keeps its marker fresh with it). After the walk,
    :attr:`tags` holds the number of tag refs the listing met.
    """

    def __init__(
        self,
        refs: Refs,
        read: Callable[[VersionRef], T],
        *,
        workers: int = 1,
        on_unreadable: Callable[[str, IntegrityError], None] | None = None,
        tick: Callable[[], None] | None = None,
    ) -> None:
        self.refs = refs
        self.read = read
        self.workers = max(1, workers)
        self.on_unreadable = on_unreadable
        self.tick = tick
        self.tags = 0

    def __iter__(self) -> Iterator[tuple[VersionRef, T]]:
        with ThreadPoolExecutor(self.workers, thread_name_prefix="cas-live") as pool:
            results = bounded_map(pool, self._read, self._listed(), self.workers * 4)
            for result in results:
                if self.tick is not None:
                    self.tick()
                if isinstance(result, _Unreadable):
                    if self.on_unreadable is None:
                        raise result.error
                    self.on_unreadable(result.label, result.error)
                elif result is not None:
                    yield result

    def _listed(self) -> Iterator[tuple[str, int]]:
        for info in self.refs.backend.list_objects(layout.REFS):
            parsed = layout.parse_ref_key(info.key)
            if parsed is None:
                continue
            if parsed.version is None:
                self.tags += 1
            else:
                yield parsed.key, parsed.version

    def _read(self, listed: tuple[str, int]) -> tuple[VersionRef, T] | _Unreadable | None:
        key, number = listed
        try:
            ref = self.refs.read_live(key, number)
        except IntegrityError as err:
            return _Unreadable(f"{key}@{number}", err)
        if ref is None:
            return None  # deleted, or removed since the listing
        return ref, self.read(ref)
