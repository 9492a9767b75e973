"""What the pages show, read through the public API and nothing else.

Versions come from the store's catalog (refs and their summaries, as
``log`` and ``find`` read them), so the pages get faster with the catalog.
What a version costs needs its manifest and the stored size of its chunks:
manifests are named by their hash and never change, so they are kept once
read; chunk sizes come from one listing, read again only when a manifest
names a chunk the last listing did not have.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..digest import Digest
from ..errors import IntegrityError

if TYPE_CHECKING:
    from ..store import Store, Version

#: Manifests kept in memory at most (each is a few kilobytes for a checkpoint).
MANIFEST_CACHE = 50_000


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
    cost: KeyCost


class StoreView:
    """Reads for the pages, with the caches that are safe to keep (see the module doc)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._needs: dict[str, frozenset[str]] = {}  # manifest id -> chunk digests it needs
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._fingerprint: tuple[float, str] = (0.0, "")

    # -- cached reads ---------------------------------------------------------------

    def needs(self, versions: Sequence[Version]) -> list[frozenset[str]]:
        """For each version, the chunks it keeps alive (its own and their delta bases).

        A version whose manifest is missing or damaged counts as needing
        nothing (``cas verify`` names it); it is read again next time, as a
        repair may have healed it.
        """
        missing = sorted({v.manifest_id for v in versions} - self._needs.keys())
        read: dict[str, frozenset[str]] = {}
        if missing:
            with ThreadPoolExecutor(max(1, self.store.workers), "cas-ui") as pool:
                found = dict(zip(missing, pool.map(self._read_needs, missing), strict=True))
            read = {k: v for k, v in found.items() if v is not None}
            with self._lock:
                if len(self._needs) + len(read) > MANIFEST_CACHE:
                    self._needs.clear()
                self._needs.update(read)
        return [
            self._needs.get(v.manifest_id, read.get(v.manifest_id, frozenset())) for v in versions
        ]

    def _read_needs(self, manifest_id: str) -> frozenset[str] | None:
        try:
            manifest = self.store.load_manifest(Digest.parse(manifest_id))
        except IntegrityError:
            return None
        return frozenset(digest.hex for _, digest, _ in manifest.live_chunks())

    def sizes(self, wanted: Iterable[frozenset[str]]) -> dict[str, int]:
        """Stored size by chunk digest, listed again if a wanted chunk is not known yet."""
        known = self._sizes
        if any(not chunks <= known.keys() for chunks in wanted):
            known = self.store.chunk_sizes()
            with self._lock:
                self._sizes = known
        return known

    # -- what the pages need ----------------------------------------------------------

    def key_rows(self, prefix: str = "", versions: Sequence[Version] | None = None) -> list[KeyRow]:
        """Every key with live versions: its latest, its tags and what it costs.

        ``versions``: ``store.catalog(prefix)`` when the caller has just read it.
        """
        by_key: dict[str, list[Version]] = {}
        listed = self.store.catalog(prefix) if versions is None else versions
        for version in listed:  # by key, newest first
            by_key.setdefault(version.key, []).append(version)
        everything = [v for versions in by_key.values() for v in versions]
        needs = dict(zip((v.ref for v in everything), self.needs(everything), strict=True))
        per_key = {
            key: frozenset().union(*(needs[v.ref] for v in versions))
            for key, versions in by_key.items()
        }
        users: dict[str, int] = {}
        for chunks in per_key.values():
            for digest in chunks:
                users[digest] = users.get(digest, 0) + 1
        sizes = self.sizes(per_key.values())
        rows = []
        for key, versions in by_key.items():
            chunks = per_key[key]
            cost = KeyCost(
                key,
                stored=sum(sizes.get(d, 0) for d in chunks),
                shared=sum(sizes.get(d, 0) for d in chunks if users[d] > 1),
            )
            tags = tuple(sorted(t for v in versions for t in v.tags))
            rows.append(KeyRow(key, len(versions), versions[0], tags, cost))
        return rows

    def added_bytes(self, versions: Sequence[Version]) -> dict[str, int]:
        """Stored bytes each version added: of chunks no earlier version in ``versions`` needs."""
        ordered = sorted(versions, key=lambda v: v.number)
        needs = self.needs(ordered)
        sizes = self.sizes(needs)
        seen: set[str] = set()
        added = {}
        for version, chunks in zip(ordered, needs, strict=True):
            fresh = chunks - seen
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
