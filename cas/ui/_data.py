"""What the pages show, read through the public API and nothing else.

Versions come from the store's catalog (refs and their summaries, as
``log`` and ``find`` read them), so the pages get faster with the catalog.
What a version costs needs its manifest and the stored size of its chunks:
a server reads those on a thread of its own (:mod:`cas.ui._figures`), and
a figure not read yet is None, which a page shows as "computing…".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._figures import Figures

if TYPE_CHECKING:
    from ..store import Store, Version


@dataclass(frozen=True)
class KeyCost:
    """What one key's live versions need, in stored bytes."""

    key: str
    stored: int  # the distinct chunks its versions need (delta bases included)
    shared: int  # the part other keys need too


@dataclass(frozen=True)
class KeyRow:
    key: str
    versions: int
    latest: Version
    tags: tuple[str, ...]  # every tag of the key, on whichever version
    cost: KeyCost | None  # None while the manifests it needs are being read


class StoreView:
    """Reads for the pages, with the caches that are safe to keep (see the module doc).

    ``wait``: how long a page waits for the manifests its figures need before
    it shows "computing…" instead; None waits until they are read (a report).
    """

    def __init__(self, store: Store, *, wait: float | None = None) -> None:
        self.store = store
        self.figures = Figures(store, wait)
        self._lock = threading.Lock()
        self._fingerprint: tuple[float, str] = (0.0, "")

    # -- what the pages need ----------------------------------------------------------

    def key_rows(self, prefix: str = "", versions: Sequence[Version] | None = None) -> list[KeyRow]:
        """Every key with live versions: its latest, its tags and what it costs
        (None for every key until the manifests of all of them are read).

        ``versions``: ``store.catalog(prefix)`` when the caller has just read it.
        """
        by_key: dict[str, list[Version]] = {}
        listed = self.store.catalog(prefix) if versions is None else versions
        for version in listed:  # by key, newest first
            by_key.setdefault(version.key, []).append(version)
        costs = self._costs(by_key)
        return [
            KeyRow(
                key,
                len(versions),
                versions[0],
                tuple(sorted(t for v in versions for t in v.tags)),
                None if costs is None else costs[key],
            )
            for key, versions in by_key.items()
        ]

    def _costs(self, by_key: dict[str, list[Version]]) -> dict[str, KeyCost] | None:
        read = self.figures.read({v.manifest_id for vs in by_key.values() for v in vs})
        if read is None:
            return None
        found, sizes = read
        per_key = {
            key: frozenset().union(*(found[v.manifest_id] for v in versions))
            for key, versions in by_key.items()
        }
        users: dict[bytes, int] = {}
        for chunks in per_key.values():
            for digest in chunks:
                users[digest] = users.get(digest, 0) + 1
        return {
            key: KeyCost(
                key,
                stored=sum(sizes.get(d, 0) for d in chunks),
                shared=sum(sizes.get(d, 0) for d in chunks if users[d] > 1),
            )
            for key, chunks in per_key.items()
        }

    def added_bytes(self, versions: Sequence[Version]) -> dict[str, int] | None:
        """Stored bytes each version added: of chunks no earlier version in ``versions``
        needs; None while their manifests are being read."""
        read = self.figures.read({v.manifest_id for v in versions})
        if read is None:
            return None
        found, sizes = read
        seen: set[bytes] = set()
        added = {}
        for version in sorted(versions, key=lambda v: v.number):
            fresh = found[version.manifest_id] - seen
            added[version.ref] = sum(sizes.get(d, 0) for d in fresh)
            seen |= fresh
        return added

    def fingerprint(self, max_age: float = 0.0) -> str:
        """Changes whenever a version is added, deleted or tagged: what pages poll.

        It reads the whole catalog, so an answer younger than ``max_age``
        seconds is given again: many open pages then cost one read.
        """
        import hashlib

        with self._lock:
            taken, value = self._fingerprint
            if value and time.monotonic() - taken < max_age:
                return value
        digest = hashlib.blake2b(digest_size=16)
        for version in self.store.catalog():
            digest.update(f"{version.ref}\0{','.join(version.tags)}\n".encode())
        with self._lock:
            self._fingerprint = (time.monotonic(), digest.hexdigest())
        return self._fingerprint[1]
