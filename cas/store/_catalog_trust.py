"""Spot checks: a query compares what the catalog told it with the refs themselves.

The catalog's checkpoint passes every format check even when a hostile hand
wrote it: rows of versions that have no ref, live versions left out, tags
moved, metrics altered. So a query that answers from it re-reads, within a
budget of :data:`SPOT_REQUESTS` requests:

* the refs of the versions it returns, and of their tags: all of them when
  they fit in the budget, else a random sample (drawn from the operating
  system's randomness, so a forger cannot know which rows are read);
* the listings of the version refs and the tags of one key (the key asked
  about, else one of the answer drawn at random; their first page each),
  compared with the catalog's versions and tags of that key: a number
  listed that the catalog does not show as live, or a tag it does not show,
  is read too (a few, within the budget); a live version the catalog shows
  that is not listed is wrong outright.

Only rows that came from the checkpoint are checked: what this query read
from the refs (the changes since the last compaction) is the truth already,
and so are rows an earlier query of this process checked (:attr:`State.confirmed`).
A difference is looked at again against a fresh snapshot of the catalog,
because a change committed since the query started also makes one (its note
is then in the fresh snapshot); one that remains is the catalog's, and the
caller rebuilds it. What this guarantees is written in docs/format.md
("What cas checks").
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from ..errors import BackendError, CasError, CorruptObjectError, RefNotFoundError
from ..repository import _layout as layout
from ..repository._metadata import Summary
from ._catalog_table import Raw
from ._values import Version

if TYPE_CHECKING:
    from ._catalog import Catalog
    from ._index import State

#: Requests a query may spend checking the catalog against the refs: with the three
#: a query makes anyway, one to fetch a checkpoint and one to resolve a lineage's
#: root, at most 20.
SPOT_REQUESTS = 15
#: Of them, at most this many read what a key's listing shows the catalog lacks.
_PROBE_READS = 4
#: Objects a listing returns in one request (S3, GCS, Azure: 1,000 at most; more on
#: a local disk, where it is one directory read).
_LISTING_PAGE = 1000
_RANDOM = random.SystemRandom()
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Claim:
    """Something the catalog says about one ref: version ``number`` of ``key`` (live or
    not), or where tag ``tag`` of ``key`` points (or that it points nowhere)."""

    key: str
    number: int = 0
    tag: str | None = None

    @property
    def name(self) -> tuple[str, int | str]:
        return (self.key, self.number if self.tag is None else self.tag)

    def __str__(self) -> str:
        return f"{self.key}:{self.tag}" if self.tag is not None else f"{self.key}@{self.number}"


def spot_check(
    catalog: Catalog, state: State, answer: Sequence[Version], key: str | None
) -> list[Claim]:
    """The claims behind ``answer`` (and about ``key``, or a key of the answer) that the
    refs contradict; empty when every one checked agreed (they are then confirmed)."""
    budget = SPOT_REQUESTS
    if key is None and answer:
        key = _RANDOM.choice(answer).key
    elif key is None:  # an empty answer says nothing: a key of the catalog, or of refs/
        keys = list({name for name, _ in state.versions})
        key = _RANDOM.choice(keys) if keys else _first_key(catalog)
        budget -= 0 if keys else 1
    probed: list[Claim] = []
    if key is not None:
        budget -= 2  # the listings
        probed = _probe(state, key, *_listing(catalog, key))
    reads = probed[:_PROBE_READS]  # outright wrong first, then a random few
    reads += _claims_of(state, answer, budget - len(reads))
    reads = list(dict.fromkeys(reads))  # a claim of the answer may also be one of the probe
    wrong = still_wrong(catalog, state, reads)
    if not wrong:
        state.confirmed.update(claim.name for claim in reads)
    return wrong


def still_wrong(catalog: Catalog, fresh: State, claims: Iterable[Claim]) -> list[Claim]:
    """Of ``claims``, those the refs contradict in ``fresh`` (read now, in parallel)."""
    claims = list(claims)
    agreed = _read_all(catalog, fresh, claims)
    return [claim for claim, good in zip(claims, agreed, strict=True) if not good]


def _first_key(catalog: Catalog) -> str | None:
    """The first key that has a version ref, from the first page of a listing of refs/."""
    for info in itertools.islice(catalog.refs.backend.list_objects(layout.REFS), _LISTING_PAGE):
        parsed = layout.parse_ref_key(info.key)
        if parsed is not None and parsed.version is not None:
            return parsed.key
    return None


def _listing(catalog: Catalog, key: str) -> tuple[list[int], list[str], bool]:
    """The version numbers and tag names the first page of each listing of ``key``'s refs
    shows (two requests), and whether the numbers went on beyond that page."""
    backend = catalog.refs.backend
    numbers = []
    listed = backend.list_objects(layout.versions_prefix(key))
    for info in itertools.islice(listed, _LISTING_PAGE):
        name = info.key.rpartition("/")[2]
        if name.isascii() and name.isdigit():
            numbers.append(int(name))
    tags = [
        info.key.rpartition("/")[2]
        for info in itertools.islice(backend.list_objects(layout.tags_prefix(key)), _LISTING_PAGE)
    ]
    return numbers, tags, len(numbers) == _LISTING_PAGE


def _probe(state: State, key: str, numbers: list[int], tags: list[str], more: bool) -> list[Claim]:
    """What the listing of ``key`` says the catalog may have wrong, unread yet (``more``:
    numbers were listed up to the largest in ``numbers`` only)."""
    live = set(state.numbers(key))
    shown = {tag for (k, tag), n in state.tags.items() if k == key and n in live}
    if more:  # a version beyond the page: said nothing about
        live = {n for n in live if n <= max(numbers)}
    listed = set(numbers)
    # Rows with no ref at all, and tags shown that do not exist, are wrong outright:
    # refs are never removed (a deleted version keeps a tombstone). They come first.
    outright = [Claim(key, n) for n in sorted(live - listed)]
    outright += [Claim(key, tag=tag) for tag in sorted(shown - set(tags))]
    # Numbers and tags the catalog does not show: deleted, or left out.
    maybe = [Claim(key, n) for n in sorted(listed - live)]
    maybe += [Claim(key, tag=tag) for tag in sorted(set(tags) - shown)]
    maybe = [c for c in maybe if _unread(state, c)]
    return [c for c in outright if _unread(state, c)] + _sample(maybe, len(maybe))


def _unread(state: State, claim: Claim) -> bool:
    """Whether ``claim`` comes from the checkpoint and no query of this process checked it."""
    if claim.name in state.confirmed:
        return False
    if claim.tag is not None:
        return (claim.key, claim.tag) not in state.tags_read
    entry = state.versions.get((claim.key, claim.number))
    return entry is None or isinstance(entry, Raw)


def _claims_of(state: State, answer: Sequence[Version], budget: int) -> list[Claim]:
    """Claims behind the versions of ``answer``: all when they fit in ``budget``, else
    those of versions drawn at random until it is spent."""

    def claims(version: Version) -> list[Claim]:
        out = [Claim(version.key, version.number)]
        out += [Claim(version.key, tag=tag) for tag in version.tags]
        return [c for c in out if _unread(state, c)]

    if len(answer) <= budget:
        every = [c for version in answer for c in claims(version)]
        if len(every) <= budget:
            return every
    chosen: list[Claim] = []
    # Twice the budget drawn: some are rows read from the refs already, or checked before.
    for version in _sample(answer, min(len(answer), 2 * budget)):
        more = claims(version)
        if len(chosen) + len(more) <= budget:
            chosen += more
    return chosen


def draw(items: Sequence[T], most: int) -> list[T]:
    """Up to ``most`` of ``items`` drawn at random (all of them, shuffled, if fewer)."""
    return _sample(items, min(len(items), most))


def _sample(items: Sequence[T], count: int) -> list[T]:
    """``count`` of ``items`` drawn at random, in random order."""
    return _RANDOM.sample(items, count)


def _read_all(catalog: Catalog, state: State, claims: Sequence[Claim]) -> list[bool]:
    """Whether the refs agree with each claim of ``state`` (read in parallel)."""

    def agrees(claim: Claim) -> bool:
        try:
            return _agrees(catalog, state, claim)
        except BackendError as err:
            if err.is_transient:
                raise  # retried already: the query fails, as it would reading the refs
            return False
        except CasError:
            return False  # a ref or a row that cannot be read: not confirmed

    run: Callable[[Claim], bool] = agrees
    if len(claims) <= 1 or catalog.workers <= 1:
        return [run(claim) for claim in claims]
    with ThreadPoolExecutor(catalog.workers, thread_name_prefix="cas-spot") as pool:
        return list(pool.map(run, claims))


def _agrees(catalog: Catalog, state: State, claim: Claim) -> bool:
    refs = catalog.refs
    if claim.tag is not None:
        try:
            real: int | None = refs.read_tag(claim.key, claim.tag)
        except (RefNotFoundError, CorruptObjectError):
            real = None  # removed, or names no version: shown nowhere
        seen = state.tags.get((claim.key, claim.tag))
        # A tag of a version that is not live is shown nowhere (whether that version
        # is live is a claim of its own).
        if real is not None and (claim.key, real) not in state.versions:
            real = None
        if seen is not None and (claim.key, seen) not in state.versions:
            seen = None
        return real == seen
    ref = refs.read_live(claim.key, claim.number)
    entry = state.versions.get((claim.key, claim.number))
    if ref is None or entry is None:
        return ref is None and entry is None
    shown = entry.version() if isinstance(entry, Raw) else entry
    truth = Version.of(ref, catalog.summary(ref), ())
    return (
        shown.manifest_id == truth.manifest_id
        and shown.created == truth.created
        and Summary.to_dict(shown) == Summary.to_dict(truth)
    )
