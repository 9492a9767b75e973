"""Queries over many versions: ``find`` over the store's catalog.

:meth:`Store.catalog <cas.store.Store.catalog>` lists every live version under
a prefix from the catalog kept in the store: its last checkpoint, and the
refs that changed since, read again, so that a query reflects every version
committed before it started and never shows one deleted before. Its requests
do not grow with the number of versions (docs/performance.md, "Queries";
``scripts/bench_queries.py``).
"""

from __future__ import annotations

import functools
import json
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError
from ..repository import _layout as layout
from ..repository._metadata import ARTIFACT_TYPES, DEFAULT_TYPE

if TYPE_CHECKING:
    from ..store import Store, Version


def catalog(store: Store, prefix: str = "") -> list[Version]:
    """Every live version under ``prefix``, with current tags; by key, then newest first.

    The same as :meth:`Store.catalog <cas.store.Store.catalog>`.
    """
    return store.catalog(prefix)


# -- filters ------------------------------------------------------------------------

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
    "=": operator.eq,
}
_CONDITION = re.compile(r"\s*([A-Za-z0-9_.\-/]+)\s*(<=|>=|==|!=|<|>|=)\s*([^\s<>=!]+)\s*")


@dataclass(frozen=True, slots=True)
class Condition:
    """``METRIC OP NUMBER``, e.g. ``loss<0.3``; a version without the metric never matches."""

    metric: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Condition:
        match = _CONDITION.fullmatch(text)
        if match is None:
            raise InvalidInputError.naming(
                "{condition} {text!r}: expected METRIC OP NUMBER with OP one of "
                "< <= > >= == !=, e.g. 'loss<0.3'",
                condition="condition",
                text=text,
            )
        name, op, raw = match.groups()
        try:
            value = float(raw)
        except ValueError:
            raise InvalidInputError.naming(
                "{condition} {text!r}: {raw!r} is not a number",
                condition="condition",
                text=text,
                raw=raw,
            ) from None
        return cls(name, op, value)

    def __call__(self, version: Version) -> bool:
        number = version.metrics.get(self.metric)
        return number is not None and _OPS[self.op](number, self.value)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_meta_value(text: str) -> Any:
    """A ``--meta`` value: JSON when it parses (numbers, true, lists), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


# Parsed once per query, not once per version it is matched against (only compared).
_wanted = functools.lru_cache(maxsize=64)(parse_meta_value)


def _lookup(data: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    # Exact key first: metadata keys may themselves contain dots.
    if dotted in data:
        return True, data[dotted]
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def meta_matches(version: Version, name: str, raw: str) -> bool:
    """Whether ``name`` (a typed field, a label or a metadata key, dotted for nesting) is ``raw``.

    The value matches as JSON (``--meta epochs=3`` finds the number 3) or as
    its text (``--meta commit=0123`` finds the string "0123").
    """
    wanted = _wanted(raw)
    candidates: list[Any] = []
    if name in ("type",):
        candidates.append(version.artifact.get("type", DEFAULT_TYPE))
    elif name in version.artifact and name != "labels":
        candidates.append(version.artifact[name])
    labels = version.artifact.get("labels") or {}
    if name in labels:
        candidates.append(labels[name])
    found, value = _lookup(version.metadata, name)
    if found:
        candidates.append(value)
    return any(c == wanted or (isinstance(c, str) and c == raw) for c in candidates)


@dataclass(frozen=True)
class Query:
    """What ``cas find`` asks for; every criterion must hold."""

    prefix: str = ""
    type: str | None = None
    tags: Sequence[str] = ()
    meta: Sequence[tuple[str, str]] = ()
    where: Sequence[Condition] = ()
    sort: str | None = None
    descending: bool = False
    limit: int | None = None
    latest_only: bool = False

    def __post_init__(self) -> None:
        if self.type is not None and self.type not in ARTIFACT_TYPES:
            raise InvalidInputError(
                f"unknown artifact type {self.type!r}; use one of {', '.join(ARTIFACT_TYPES)}"
            )
        if self.limit is not None and self.limit < 1:
            raise InvalidInputError.naming(
                "{limit} must be at least 1, got {got}", limit="limit", got=self.limit
            )
        for tag in self.tags:
            layout.check_tag(tag)

    @property
    def selective(self) -> bool:
        """Whether a criterion can leave a version out (``find`` of all skips the check)."""
        return bool(self.type is not None or self.tags or self.meta or self.where)

    def matches(self, version: Version) -> bool:
        if self.type is not None and version.artifact.get("type", DEFAULT_TYPE) != self.type:
            return False
        if any(tag not in version.tags for tag in self.tags):
            return False
        if not all(meta_matches(version, name, raw) for name, raw in self.meta):
            return False
        return all(condition(version) for condition in self.where)


# One C-level call per version: sorting 100,000 versions calls it 100,000 times.
_newest = operator.attrgetter("created", "key", "number")


def find(store: Store, query: Query) -> list[Version]:
    """Live versions matching ``query``: newest first, or by a metric with ``sort``.

    The versions found are those the store checks against their refs when it
    answers from its catalog (docs/format.md, "What cas checks").
    """
    return store.catalog(query.prefix, select=functools.partial(_select, query))


def _select(query: Query, versions: list[Version]) -> list[Version]:
    if query.latest_only:
        seen: set[str] = set()
        latest = []
        for version in versions:  # by key, newest first: the first of each key is its latest
            if version.key not in seen:
                seen.add(version.key)
                latest.append(version)
        versions = latest
    hits = [v for v in versions if query.matches(v)] if query.selective else list(versions)
    if query.sort is None:
        hits.sort(key=_newest, reverse=True)
    else:
        metric = query.sort
        with_metric = [v for v in hits if metric in v.metrics]
        with_metric.sort(key=lambda v: v.metrics[metric], reverse=query.descending)
        # Versions without the metric cannot be ranked: after the others, newest first.
        without = [v for v in hits if metric not in v.metrics]
        without.sort(key=_newest, reverse=True)
        hits = with_metric + without
    return hits[: query.limit] if query.limit is not None else hits
