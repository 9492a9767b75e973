"""The compacted catalog as one Parquet file: a row per live version, its current tags.

Parquet, through pyarrow, because every tool of the field reads it as it is
(duckdb, pandas, polars, Spark), and its columns compress the repetitive
keys, types and metric names of a catalog to a few bytes a version.
cas reads five columns back (``key``, ``version``, ``manifest``,
``created``, ``summary``, ``tags``); the others (``type``, ``size``,
``metrics``...) spell the summary out for those tools. The format is
described in docs/format.md ("The catalog").

Nothing in a file is believed until checked: every row is read with the
checks a version ref's summary gets, and a file that fails any of them is
refused whole (:class:`CatalogDamaged`); the catalog is then rebuilt from
the refs.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from ..errors import CasError, CorruptObjectError
from ..repository import _layout as layout
from ..repository._manifest import canonical_json
from ..repository._metadata import DEFAULT_TYPE, Summary, summary_fields
from ._values import Version

#: Increased when cas can no longer read an older file (then it rebuilds).
TABLE_FORMAT = 1
_META_KEY = b"cas.catalog"
#: Refuse a file that claims more rows than this: ten million versions is far beyond any store.
MAX_ROWS = 10_000_000
_READ = ["key", "version", "manifest", "created", "summary", "tags"]


class CatalogDamaged(CorruptObjectError):
    """A catalog object that cas refuses: damaged, or not written by cas."""


class CatalogUnavailable(CasError):
    """pyarrow is not installed: queries read the refs instead."""


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise CatalogUnavailable(
            "the catalog needs pyarrow (pip install 'cas-store[catalog]'); "
            "queries read every version ref instead"
        ) from None
    return pyarrow


def require() -> None:
    """CatalogUnavailable unless pyarrow can be imported."""
    _pyarrow()


class Raw:
    """A row as read: checked but for its summary, which is read (and checked) when asked.

    A query about one key reads the summaries of that key only; the first
    that fails its checks makes the whole file refused (:class:`CatalogDamaged`).
    """

    __slots__ = ("created", "key", "manifest", "number", "parsed", "summary")

    def __init__(self, key: str, number: int, manifest: str, created: str, summary: str) -> None:
        self.key = key
        self.number = number
        self.manifest = manifest
        self.created = created
        self.summary = summary
        self.parsed: Version | None = None

    def version(self, name: str = "catalog") -> Version:
        if self.parsed is None:
            parse_all([self], name)
        assert self.parsed is not None
        return self.parsed


@contextlib.contextmanager
def bulk() -> Iterator[None]:
    """No cyclic garbage collection while a catalog's rows become objects.

    Making 100,000 versions allocates millions of containers, none of them
    garbage: the collector would run hundreds of times and walk all of them
    each time, which cost a third of the CPU of decoding a whole catalog.
    On the way out, what was made is moved to the oldest generation
    (``gc.freeze`` then ``gc.unfreeze``, unless the process holds frozen
    objects of its own): else the first allocation after would walk all of
    it at once as young objects, and again when they age. Only when cyclic
    garbage is collected changes; nothing is kept that would be freed.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            if gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


def parse_all(raws: Sequence[Raw], name: str = "catalog") -> None:
    """Read the summaries of ``raws`` not read yet: one JSON parse for all of them."""
    todo = [raw for raw in raws if raw.parsed is None]
    if not todo:
        return
    with bulk():
        _parse(todo, name)


_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _parse(todo: Sequence[Raw], name: str) -> None:
    try:
        # One array: parsing costs one call, not one per row. A row that is not one
        # JSON value shifts or breaks the array, and every element is checked below.
        values = json.loads("[" + ",".join(raw.summary for raw in todo) + "]")
        if len(values) != len(todo):
            raise ValueError("a summary is not one JSON value")
    except (ValueError, RecursionError) as err:
        raise CatalogDamaged(f"{name}: a summary is not JSON ({err})") from None
    for raw, value in zip(todo, values, strict=True):
        try:
            described = summary_fields(value)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CatalogDamaged(f"{name}: {raw.key}@{raw.number}: bad summary ({err})") from None
        described["tags"] = ()  # current tags are the state's, not the row's
        # Fresh dicts: no copy needed; empty ones share one read-only view.
        metrics, metadata, artifact = (
            described["metrics"],
            described["metadata"],
            described["artifact"],
        )
        described["metrics"] = MappingProxyType(metrics) if metrics else _EMPTY
        described["metadata"] = MappingProxyType(metadata) if metadata else _EMPTY
        described["artifact"] = MappingProxyType(artifact) if artifact else _EMPTY
        raw.parsed = Version(
            **described,
            key=raw.key,
            number=raw.number,
            manifest_id=raw.manifest,
            created=raw.created,
        )


def encode(versions: Iterable[Version], tags: Mapping[tuple[str, int], list[str]]) -> bytes:
    """The Parquet file of ``versions`` (sorted by key, then number), with current ``tags``."""
    pa = _pyarrow()
    rows = sorted(versions, key=lambda v: (v.key, v.number))
    columns: dict[str, list[Any]] = {name: [] for name in _COLUMNS}
    for summary in rows:
        described = Summary.to_dict(summary)  # a Version's own to_dict says more
        described["tags"] = []  # a Version's tags are its current ones: in their own column
        values = {
            "key": summary.key,
            "version": summary.number,
            "manifest": summary.manifest_id,
            "created": summary.created,
            "summary": canonical_json(described).decode(),
            "tags": sorted(tags.get((summary.key, summary.number), [])),
            "type": str(summary.artifact.get("type", DEFAULT_TYPE)),
            "kind": summary.kind,
            "size": summary.size,
            "files": summary.files,
            "parents": list(summary.parents),
            "metrics": [(k, float(v)) for k, v in sorted(summary.metrics.items())],
            "message": summary.message,
            "metadata": json.dumps(described["metadata"], sort_keys=True),
            "artifact": json.dumps(described["artifact"], sort_keys=True),
        }
        for name in _COLUMNS:
            columns[name].append(values[name])
    schema = pa.schema(
        [pa.field(name, _type(pa, kind)) for name, kind in _COLUMNS.items()],
        metadata={_META_KEY: json.dumps({"format": TABLE_FORMAT, "rows": len(rows)})},
    )
    table = pa.Table.from_pydict(columns, schema=schema)
    sink = io.BytesIO()
    pa.parquet.write_table(table, sink, compression="zstd")
    return sink.getvalue()


_COLUMNS = {
    "key": "string",
    "version": "int64",
    "manifest": "string",
    "created": "string",
    "summary": "string",
    "tags": "list",
    "type": "string",
    "kind": "string",
    "size": "int64",
    "files": "int64",
    "parents": "list",
    "metrics": "map",
    "message": "string",
    "metadata": "string",
    "artifact": "string",
}


def _type(pa: Any, kind: str) -> Any:
    if kind == "list":
        return pa.list_(pa.string())
    if kind == "map":
        return pa.map_(pa.string(), pa.float64())
    return getattr(pa, kind)()


def decode(blob: bytes, *, name: str) -> tuple[list[Raw], dict[tuple[str, str], int]]:
    """The rows and tags a file holds, checked (summaries when read); CatalogDamaged if not."""
    pa = _pyarrow()
    try:
        parquet = pa.parquet.ParquetFile(io.BytesIO(blob))
        declared = json.loads((parquet.schema_arrow.metadata or {})[_META_KEY])
        if declared.get("format") != TABLE_FORMAT:
            raise ValueError(f"table format {declared.get('format')!r}")
        if not 0 <= parquet.metadata.num_rows <= MAX_ROWS:
            raise ValueError(f"{parquet.metadata.num_rows} rows")
        table = parquet.read(columns=_READ)
        with bulk():
            data = {column: table.column(column).to_pylist() for column in _READ}
    except (pa.ArrowException, OSError, ValueError, KeyError, TypeError) as err:
        raise CatalogDamaged(f"{name} is not a catalog file cas can read ({err})") from None
    with bulk():
        return _rows(data, name)


_MANIFEST = re.compile(r"[0-9a-f]{64}")


def _rows(data: Mapping[str, list[Any]], name: str) -> tuple[list[Raw], dict[tuple[str, str], int]]:
    """Every row checked: by column when all is well, else row by row to name the first
    that fails (the same checks; :func:`_each_row`)."""
    keys, numbers, manifests, created, summaries, tag_lists = (data[c] for c in _READ)
    tags: dict[tuple[str, str], int] = {}
    try:
        well_formed = (
            _types(numbers) == {int}
            and _types(manifests) | _types(created) | _types(summaries) == {str}
            and _types(tag_lists) == {list}
            and min(numbers) >= 1
            and len(set(zip(keys, numbers, strict=True))) == len(keys)
            and all(map(_MANIFEST.fullmatch, manifests))
        )
        if well_formed:  # empty columns are not: row by row costs nothing then
            for key in set(keys):
                layout.check_key(key)
            for index in [i for i, listed in enumerate(tag_lists) if listed]:
                key, number = keys[index], numbers[index]
                for tag in tag_lists[index]:
                    layout.check_tag(tag)
                    if tags.setdefault((key, tag), number) != number:
                        well_formed = False
    except (CasError, TypeError, ValueError, AttributeError):
        well_formed = False
    if not well_formed:
        return _each_row(data, name)
    return list(map(Raw, keys, numbers, manifests, created, summaries)), tags


def _types(column: list[Any]) -> set[type]:
    return set(map(type, column))


def _each_row(
    data: Mapping[str, list[Any]], name: str
) -> tuple[list[Raw], dict[tuple[str, str], int]]:
    raws: list[Raw] = []
    tags: dict[tuple[str, str], int] = {}
    seen: set[tuple[str, int]] = set()
    keys: set[str] = set()
    rows = zip(*(data[column] for column in _READ), strict=True)
    for index, (key, number, manifest, created, summary, tag_list) in enumerate(rows):
        try:
            if key not in keys:
                layout.check_key(key)
                keys.add(key)
            if type(number) is not int or number < 1 or (key, number) in seen:
                raise ValueError(f"version {number!r}")
            seen.add((key, number))
            if not isinstance(manifest, str) or not _MANIFEST.fullmatch(manifest):
                raise ValueError(f"manifest {manifest!r}")
            if not isinstance(created, str) or not isinstance(summary, str):
                raise ValueError("created and summary must be text")
            for tag in tag_list:
                layout.check_tag(tag)
                if tags.setdefault((key, tag), number) != number:
                    raise ValueError(f"tag {tag!r} on two versions")
        except (CasError, ValueError, TypeError) as err:
            raise CatalogDamaged(f"{name}: row {index} is not a valid version ({err})") from None
        raws.append(Raw(key, number, manifest, created, summary))
    return raws, tags
