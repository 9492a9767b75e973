"""Versions as users see them: one version, a key's log, a whole catalog.

Whole-store answers (``log``, ``ls``, ``find``, ``lineage``) come from the
catalog kept in the store (:mod:`cas.store._index`): a checkpoint of every
live version, and the refs named by the notes written since. Without
pyarrow, or on a store where the catalog cannot be written and there is
none yet, they read every version ref instead, as before the catalog
existed: each carries its summary (see :mod:`cas.repository._metadata`), so
listing versions reads small ref objects and never a manifest, except for
refs written without one, whose manifest is read instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ..digest import Digest
from ..errors import (
    BackendError,
    CasError,
    CatalogMismatchWarning,
    IntegrityError,
    RefNotFoundError,
    UnsafePathError,
)
from ..repository import _layout as layout
from ..repository._manifest import Manifest
from ..repository._metadata import Summary
from ..repository._refs import Refs, VersionRef
from . import _catalog_trust as trust
from ._catalog_table import CatalogDamaged, CatalogUnavailable, Raw, bulk
from ._index import Index, State, state_of
from ._values import KeySummary, Version

# Reading refs is one small GET each: a pool hides the latency of object
# stores; on a local disk it costs little. Batches, not one task per ref: a
# future per small read costs more than the read.
_BATCH = 256

_Job = tuple[str, int, Mapping[int, list[str]]]
A = TypeVar("A")
#: Narrows a list of versions (a query's filter, sort and limit).
Select = Callable[[list[Version]], list[Version]]
#: Answers a query may compute: a change committed meanwhile, then a rebuilt catalog.
_ROUNDS = 3


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

    def index(self) -> Index:
        """The catalog kept in the store (rebuilt from :meth:`from_refs` when needed)."""
        return Index(
            self.refs.backend,
            self.refs,
            self.summary,
            lambda: state_of(self.from_refs()),
            self.workers,
        )

    def _state(self) -> State | None:
        try:
            return self.index().snapshot()
        except (CatalogUnavailable, CatalogDamaged, IntegrityError, UnsafePathError):
            # No pyarrow, a catalog that kept failing its checks, or a damaged version
            # (which verify reports) that no catalog can describe: the refs, as they are.
            return None
        except BackendError as err:
            if err.is_transient:
                raise
            return None  # no catalog yet, and none can be written here: read the refs

    def _tagged(self, state: State, chosen: list[tuple[str, int]]) -> list[Version] | None:
        """The versions ``chosen`` names with their current tags; None when a row of the
        checkpoint fails its checks (the catalog is then rebuilt for the next query)."""
        try:
            versions = state.read(chosen)
        except CatalogDamaged:
            with contextlib.suppress(CasError):
                self.index().compact(full=True)
            return None
        tags = state.tags_by_version()
        with bulk():
            return [
                dataclasses.replace(v, tags=tuple(tags[named])) if named in tags else v
                for named, v in zip(chosen, versions, strict=True)
            ]

    def _checked(
        self, answer: Callable[[State], tuple[A, list[Version]] | None], key: str | None = None
    ) -> A | None:
        """``answer`` of the catalog's state, spot-checked against the refs
        (:mod:`._catalog_trust`); None when the refs must be read instead.

        ``answer`` gives the answer and the versions it shows; ``key`` is a key
        the query is about, whose listing is compared with the catalog.
        """
        rebuilt = False
        fresh: State | None = None
        for round_ in range(_ROUNDS):
            state = fresh if fresh is not None else self._state()
            found = None if state is None else answer(state)
            if state is None or found is None:
                return None
            wrong = trust.spot_check(self, state, found[1], key)
            if not wrong:
                return found[0]
            fresh = self._state()  # a change committed since the query started?
            if fresh is None:
                return None
            wrong = trust.still_wrong(self, fresh, wrong)
            if not wrong and round_ == _ROUNDS - 1:
                # Changes kept landing on what was checked: the fresh snapshot holds them
                # as its refs say, and the rest was checked in the rounds before.
                found = answer(fresh)
                return None if found is None else found[0]
            if not wrong:
                continue  # it was: ask the fresh catalog again
            fresh = None
            warnings.warn(
                CatalogMismatchWarning(
                    f"the catalog of versions disagrees with the refs "
                    f"({', '.join(map(str, wrong[:5]))}): it is rebuilt from them"
                ),
                stacklevel=4,
            )
            if rebuilt or not self._rebuild():
                return None
            rebuilt = True
        return None

    def _rebuild(self) -> bool:
        try:
            self.index().compact(full=True)
        except CasError:
            return False  # a store that cannot be written: the refs answer
        return True

    def log(self, key: str) -> list[Version]:
        """Live versions of ``key``, newest first."""
        layout.check_key(key)

        def answer(state: State) -> tuple[list[Version], list[Version]] | None:
            chosen = sorted(state.numbers(key), reverse=True)
            found = self._tagged(state, [(key, n) for n in chosen])
            return None if found is None else (found, found)

        out = self._checked(answer, key)
        if out is None:
            out = [v for v in self.from_refs(key) if v.key == key]
        if not out:
            raise RefNotFoundError(f"key {key!r} has no versions")
        return out

    def keys(self, prefix: str = "") -> list[KeySummary]:
        """Keys under ``prefix`` that have live versions, with their latest version."""

        def answer(state: State) -> tuple[list[KeySummary], list[Version]] | None:
            counts: dict[str, int] = {}
            latest: dict[str, int] = {}
            for key, number in state.versions:
                if key.startswith(prefix):
                    counts[key] = counts.get(key, 0) + 1
                    latest[key] = max(latest.get(key, 0), number)
            names = sorted(counts)
            found = self._tagged(state, [(k, latest[k]) for k in names])
            if found is None:
                return None
            summaries = [KeySummary(k, counts[k], v) for k, v in zip(names, found, strict=True)]
            return summaries, found

        checked = self._checked(answer)
        if checked is not None:
            return checked
        out: dict[str, KeySummary] = {}
        for version in self.from_refs(prefix):  # by key, newest first: the first is the latest
            if version.key.startswith(prefix):
                known = out.get(version.key)
                count = 1 if known is None else known.versions + 1
                out[version.key] = KeySummary(
                    version.key, count, known.latest if known else version
                )
        return [out[key] for key in sorted(out)]

    def everything(self, prefix: str = "", select: Select | None = None) -> list[Version]:
        """Every live version under ``prefix``, with current tags; by key, then newest first.

        ``select`` narrows that answer (a query's filter, sort and limit) before
        it is checked against the refs: the versions it keeps are those checked.
        """
        pick: Select = select if select is not None else list

        def answer(state: State) -> tuple[list[Version], list[Version]] | None:
            chosen = [
                named
                for named in state.ordered()
                if named[0].startswith(prefix) or (named[0] + "/").startswith(prefix)
            ]
            found = self._tagged(state, chosen)
            if found is None:
                return None
            picked = pick(found)
            return picked, picked

        # A query about one key (its latest, its best) probes that key's listing.
        key = prefix.rstrip("/")
        checked = self._checked(answer, key if _is_key(key) else None)
        return checked if checked is not None else pick(self.from_refs(prefix))

    def manifests(self) -> list[tuple[str, Digest]] | None:
        """Every live version's key and manifest id from the catalog (spot-checked on a
        sample of versions drawn at random); None when the refs must be read instead."""

        def answer(state: State) -> tuple[list[tuple[str, Digest]], list[Version]] | None:
            names = list(state.versions)
            sample = trust.draw(names, 2 * trust.SPOT_REQUESTS)
            shown = self._tagged(state, sample)
            if shown is None:
                return None
            rows = [
                (key, Digest.parse(row.manifest if isinstance(row, Raw) else row.manifest_id))
                for (key, _), row in state.versions.items()
            ]
            return rows, shown

        return self._checked(answer)

    def from_refs(self, prefix: str = "") -> list[Version]:
        """:meth:`everything`, read from the refs alone (the catalog's own source).

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


def _is_key(text: str) -> bool:
    try:
        layout.check_key(text)
    except CasError:
        return False
    return True


@contextlib.contextmanager
def catalog_optional() -> Iterator[None]:
    """Verify and gc look after the catalog where they can: not without pyarrow, nor
    where the store cannot be written or holds a damaged version."""
    try:
        yield
    except (CatalogUnavailable, IntegrityError, UnsafePathError):
        pass  # no pyarrow, or a damaged version (reported by verify) that none can describe
    except BackendError as err:
        if err.is_transient:
            raise
