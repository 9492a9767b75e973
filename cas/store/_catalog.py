"""Versions as users see them, read from refs: one version, a key's log, a whole catalog.

Each version ref carries its summary (see :mod:`cas.repository._metadata`),
so listing versions reads small ref objects and never a manifest, except for
refs written without one (before summaries existed, or too large), whose
manifest is read instead. Nothing is cached between calls, so an answer is
never stale; on the local backend 10,000 versions take well under a second
(``scripts/bench_queries.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from ..digest import Digest
from ..errors import RefNotFoundError
from ..repository import _layout as layout
from ..repository._manifest import Manifest
from ..repository._metadata import Summary
from ..repository._refs import Refs, VersionRef
from ._values import KeySummary, Version

# Reading refs is one small GET each: a pool hides the latency of object
# stores; on a local disk it costs little. Batches, not one task per ref: a
# future per small read costs more than the read.
_BATCH = 256

_Job = tuple[str, int, Mapping[int, list[str]]]


class Catalog:
    """The versions of a store's refs, described by their summaries."""

    def __init__(
        self, refs: Refs, load_manifest: Callable[[Digest], Manifest], workers: int
    ) -> None:
        self.refs = refs
        self.load_manifest = load_manifest
        self.workers = workers

    def summary(self, ref: VersionRef) -> Summary:
        """What a version is: from its ref when recorded there, else from its manifest."""
        summary = Summary.from_ref(ref.summary)
        if summary is None:
            summary = Summary.of_manifest(self.load_manifest(ref.manifest_id))
        return summary

    def version(
        self,
        ref: VersionRef,
        source: Manifest | Summary | None = None,
        tags: Iterable[str] | None = None,
    ) -> Version:
        """The version ``ref`` names; ``tags`` None reads its current tags."""
        if source is None:
            summary = self.summary(ref)
        else:
            summary = source if isinstance(source, Summary) else Summary.of_manifest(source)
        if tags is None:
            tags = self.refs.tags_by_version(ref.key).get(ref.number, [])
        return Version.of(ref, summary, tags)

    def log(self, key: str) -> list[Version]:
        """Live versions of ``key``, newest first."""
        layout.check_key(key)
        tags = self.refs.tags_by_version(key)
        out = [
            self.version(ref, tags=tags.get(ref.number, []))
            for ref in self.refs.live_versions(key, newest_first=True)
        ]
        if not out:
            raise RefNotFoundError(f"key {key!r} has no versions")
        return out

    def keys(self, prefix: str = "") -> list[KeySummary]:
        """Keys under ``prefix`` that have live versions, with their latest version."""
        out = []
        for key, numbers in sorted(self.refs.iter_keys(prefix)):
            del numbers  # read each ref below: some may be tombstones
            live = list(self.refs.live_versions(key, newest_first=True))
            if live:
                out.append(KeySummary(key, len(live), self.version(live[0])))
        return out

    def everything(self, prefix: str = "") -> list[Version]:
        """Every live version under ``prefix``, with current tags; by key, then newest first.

        One listing of ``refs/<prefix>`` yields every version ref and tag;
        tags are read at once (they are few), version refs in parallel.
        """
        jobs: list[_Job] = []
        for listed in self.refs.scan(prefix):
            tags = self.refs.tags_by_version(listed.key, listed.tags)
            jobs.extend((listed.key, number, tags) for number in reversed(listed.numbers))
        batches = [jobs[i : i + _BATCH] for i in range(0, len(jobs), _BATCH)]
        if len(batches) <= 1 or self.workers <= 1:
            return [v for batch in batches for v in self._read(batch)]
        with ThreadPoolExecutor(self.workers, thread_name_prefix="cas-query") as pool:
            return [v for done in pool.map(self._read, batches) for v in done]

    def _read(self, batch: Sequence[_Job]) -> list[Version]:
        out = []
        for key, number, tags in batch:
            ref = self.refs.read_live(key, number)
            if ref is not None:  # else deleted, or removed since the listing
                out.append(Version.of(ref, self.summary(ref), tags.get(number, ())))
        return out
