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

import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..digest import Digest
from ..errors import CasError, CorruptObjectError
from ..repository import _layout as layout
from ..repository._manifest import canonical_json
from ..repository._metadata import DEFAULT_TYPE, Summary
from ..repository._refs import VersionRef

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


@dataclass(frozen=True, slots=True)
class Entry:
    """A live version of the catalog: its ref (summary included) and what it is."""

    ref: VersionRef
    summary: Summary


def encode(entries: Iterable[Entry], tags: Mapping[tuple[str, int], list[str]]) -> bytes:
    """The Parquet file of ``entries`` (sorted by key, then number), with current ``tags``."""
    pa = _pyarrow()
    rows = sorted(entries, key=lambda e: (e.ref.key, e.ref.number))
    columns: dict[str, list[Any]] = {name: [] for name in _COLUMNS}
    for entry in rows:
        ref, summary = entry.ref, entry.summary
        described = Summary.to_dict(summary)  # a Version's own to_dict says more
        values = {
            "key": ref.key,
            "version": ref.number,
            "manifest": ref.manifest_id.hex,
            "created": ref.created,
            "summary": canonical_json(described).decode(),
            "tags": sorted(tags.get((ref.key, ref.number), [])),
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


def decode(blob: bytes, *, name: str) -> tuple[list[Entry], dict[tuple[str, str], int]]:
    """The live versions and tags a file holds, every row checked; CatalogDamaged if any fails."""
    pa = _pyarrow()
    try:
        parquet = pa.parquet.ParquetFile(io.BytesIO(blob))
        declared = json.loads((parquet.schema_arrow.metadata or {})[_META_KEY])
        if declared.get("format") != TABLE_FORMAT:
            raise ValueError(f"table format {declared.get('format')!r}")
        if not 0 <= parquet.metadata.num_rows <= MAX_ROWS:
            raise ValueError(f"{parquet.metadata.num_rows} rows")
        table = parquet.read(columns=_READ)
        data = {column: table.column(column).to_pylist() for column in _READ}
    except (pa.ArrowException, OSError, ValueError, KeyError, TypeError) as err:
        raise CatalogDamaged(f"{name} is not a catalog file cas can read ({err})") from None
    return _rows(data, name)


def _rows(
    data: Mapping[str, list[Any]], name: str
) -> tuple[list[Entry], dict[tuple[str, str], int]]:
    entries: list[Entry] = []
    tags: dict[tuple[str, str], int] = {}
    seen: set[tuple[str, int]] = set()
    parsed_keys: dict[str, None] = {}
    rows = zip(*(data[column] for column in _READ), strict=True)
    for index, (key, number, manifest, created, summary, tag_list) in enumerate(rows):
        try:
            if key not in parsed_keys:
                layout.check_key(key)
                parsed_keys[key] = None
            if type(number) is not int or number < 1 or (key, number) in seen:
                raise ValueError(f"version {number!r}")
            seen.add((key, number))
            if not isinstance(created, str):
                raise ValueError(f"created {created!r}")
            described = Summary.from_ref(json.loads(summary))
            if described is None:
                raise ValueError("summary does not parse")
            ref = VersionRef(key, number, Digest.parse(manifest), created, None)
            for tag in tag_list:
                layout.check_tag(tag)
                if tags.setdefault((key, tag), number) != number:
                    raise ValueError(f"tag {tag!r} on two versions")
        except (CasError, ValueError, TypeError, AttributeError, RecursionError) as err:
            raise CatalogDamaged(f"{name}: row {index} is not a valid version ({err})") from None
        entries.append(Entry(ref, described))
    return entries, tags
