"""What a store holds, in the terms a user acts on (``cas stats``).

A live version names its chunks; a chunk stored as a delta also needs its
bases. Once the version a base came from is deleted, the base is kept only
for the deltas of live versions: those bytes belong to no live version's
content, yet no collection frees them until gc's repack has stored those
deltas again (:mod:`cas.gc._repack`); the store fills in what that frees.

What counts of a manifest is kept in a :class:`Summaries` by manifest id.
A manifest is named by the hash of its bytes and never changes, so a
summary cannot go stale; what can change (which versions are live, which
chunks and manifests are stored, and their sizes) is read again on every
call: which versions are live (from the catalog of versions when it can
answer, else from every ref), and one listing each of ``chunks/`` and
``manifests/``.
A summarised manifest that the listing no longer shows, or shows at another
size than before, is read again, and fails as an unsummarised one would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..backends import Backend
from ..chunks._store import ChunkStore
from ..digest import Digest
from ..repository import _layout as layout
from ..repository._live import LiveVersions, bounded_map
from ..repository._manifest import Manifest
from ..repository._refs import Refs, VersionRef
from ._values import Stats

#: Chunk digests the kept summaries may hold between them (a few hundred MB
#: at most); past it, further manifests are read on every call, as before.
SUMMARY_BUDGET = 4_000_000


@dataclass(frozen=True, slots=True)
class ManifestSummary:
    """What ``cas stats`` counts of one manifest, by raw chunk digest."""

    size: int  # logical bytes of the version
    named: tuple[tuple[bytes, int], ...]  # the chunks its files name, with their raw length
    needed: frozenset[bytes]  # what it keeps alive: those and their delta bases
    bases: frozenset[bytes]  # every delta base its chunks list
    deltas: frozenset[bytes]  # needed chunks that are deltas: all of a chain but its root

    @classmethod
    def of(cls, manifest: Manifest) -> ManifestSummary:
        named: dict[bytes, int] = {}
        bases: set[bytes] = set()
        deltas: set[bytes] = set()
        for entry in manifest.entries:
            for chunk in entry.chunks:
                named[chunk.digest.raw] = chunk.length
                if chunk.bases:
                    bases.update(base.raw for base in chunk.bases)
                    deltas.update(d.raw for d in (chunk.digest, *chunk.bases[:-1]))
        needed = frozenset(digest.raw for _, digest, _ in manifest.live_chunks())
        return cls(manifest.size, tuple(named.items()), needed, frozenset(bases), frozenset(deltas))


class Summaries:
    """Manifest summaries by manifest id, with the stored size each was last listed at."""

    def __init__(self, budget: int = SUMMARY_BUDGET) -> None:
        self.budget = budget  # digests left to keep
        self._lock = threading.Lock()
        self._known: dict[Digest, tuple[ManifestSummary, int | None]] = {}

    def get(
        self, manifest_id: Digest, load: Callable[[Digest], Manifest]
    ) -> tuple[ManifestSummary, bool]:
        """The summary of ``manifest_id``, and whether it was known (not read now)."""
        with self._lock:
            known = self._known.get(manifest_id)
        if known is not None:
            return known[0], True
        summary = ManifestSummary.of(load(manifest_id))
        held = len(summary.named) + len(summary.needed) + len(summary.bases) + len(summary.deltas)
        with self._lock:
            if held <= self.budget and manifest_id not in self._known:
                self.budget -= held
                self._known[manifest_id] = (summary, None)
        return summary, False

    def known(self, manifest_ids: Iterable[Digest]) -> dict[Digest, ManifestSummary]:
        """The summaries already kept of ``manifest_ids`` (no manifest is read)."""
        with self._lock:
            found = {m: self._known.get(m) for m in manifest_ids}
        return {m: entry[0] for m, entry in found.items() if entry is not None}

    def check_listed(
        self,
        reused: Iterable[Digest],
        listed: dict[str, int],
        load: Callable[[Digest], Manifest],
    ) -> None:
        """Read again a ``reused`` summary's manifest gone from ``listed``, or listed at
        another size than before; ``load`` raises for it, as the walk would have.
        Every summary listed keeps its size for the next call."""
        for manifest_id in reused:
            size = listed.get(layout.manifest_key(manifest_id))
            with self._lock:
                known = self._known.pop(manifest_id, None)
            if known is None:
                continue
            if size is None or known[1] not in (None, size):
                load(manifest_id)  # raises: missing, or not the bytes it was
            with self._lock:
                self._known[manifest_id] = (known[0], size)

    def remember_sizes(self, manifest_ids: Iterable[Digest], listed: dict[str, int]) -> None:
        """Keep the listed size of summaries read in this walk, to check them next time."""
        with self._lock:
            for manifest_id in manifest_ids:
                known = self._known.get(manifest_id)
                size = listed.get(layout.manifest_key(manifest_id))
                if known is not None and known[1] is None and size is not None:
                    self._known[manifest_id] = (known[0], size)


#: A live version, as stats counts it: its key, and the manifest it names.
Live = tuple[str, Digest]


def live_from_refs(refs: Refs, *, workers: int = 1) -> list[Live]:
    """Every live version, read from its ref: one small read per version."""
    return [(ref.key, ref.manifest_id) for ref, _ in LiveVersions(refs, _nothing, workers=workers)]


def _nothing(ref: VersionRef) -> None:
    return None


def measure(
    live: Iterable[Live],
    load_manifest: Callable[[Digest], Manifest],
    chunks: ChunkStore,
    backend: Backend,
    *,
    workers: int = 1,
    summaries: Summaries | None = None,
) -> Stats:
    """Sizes and counts of a store whose live versions are ``live``, walked as
    garbage collection walks it (:func:`live_from_refs`, or the catalog's)."""
    known = summaries if summaries is not None else Summaries()
    versions = list(live)
    manifest_ids = list(dict.fromkeys(manifest_id for _, manifest_id in versions))
    by_manifest = known.known(manifest_ids)
    reused = set(by_manifest)  # summaries not read from their manifest in this walk
    unread = [m for m in manifest_ids if m not in by_manifest]

    def summarise(manifest_id: Digest) -> ManifestSummary:
        return known.get(manifest_id, load_manifest)[0]

    if workers <= 1 or len(unread) <= 1:
        by_manifest.update((m, summarise(m)) for m in unread)
    else:  # manifests are read on a pool, as the refs are: one small read each
        with ThreadPoolExecutor(workers, thread_name_prefix="cas-stats") as pool:
            read = list(bounded_map(pool, summarise, unread, workers * 4))
        by_manifest.update(zip(unread, read, strict=True))
    named: dict[bytes, int] = {}  # raw length of the chunks live versions name, by raw digest
    needed: set[bytes] = set()  # and what they keep alive: those and their delta bases
    bases: set[bytes] = set()
    deltas: set[bytes] = set()  # needed chunks that are deltas: all of a chain but its root
    for summary in by_manifest.values():  # one per manifest: shared ones add no chunk twice
        named.update(summary.named)
        needed |= summary.needed
        bases |= summary.bases
        deltas |= summary.deltas
    stored_sizes = {digest.raw: info.size for digest, info in chunks.list_chunks()}
    listed = {info.key: info.size for info in backend.list_objects(layout.MANIFESTS)}
    known.check_listed(reused, listed, load_manifest)
    known.remember_sizes(by_manifest.keys() - reused, listed)
    live_keys = {layout.manifest_key(m) for m in by_manifest}
    base_only = needed - named.keys()
    return Stats(
        keys=len({key for key, _ in versions}),
        versions=len(versions),
        logical_bytes=sum(by_manifest[m].size for _, m in versions),
        unique_bytes=sum(named.values()),
        stored_bytes=sum(stored_sizes.values()) + sum(listed.values()),
        chunks=len(stored_sizes),
        referenced_chunks=len(needed),
        live_bytes=sum(stored_sizes.get(raw, 0) for raw in needed)
        + sum(size for key, size in listed.items() if key in live_keys),
        delta_base_bytes=sum(stored_sizes.get(raw, 0) for raw in base_only),
        delta_chunks=len(deltas),
        delta_bytes=sum(stored_sizes.get(raw, 0) for raw in deltas),
        base_chunks=len(bases),
    )
