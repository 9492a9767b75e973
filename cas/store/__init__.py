"""The Store facade: the one boundary the CLI, the ML layer and users talk to.

``Store`` opens a store on any backend and offers put, get, log, tag,
delete, gc, verify and the reads the ML layer needs (a catalog of live
versions, a version's manifest, random access to a stored file, what
deleting versions would free). The value types it returns (``Version``,
``Details``, ``KeySummary``, ``Stats``, ``Reclaimable``) live beside it.
``_writing`` is the put's pipeline, ``_catalog`` how versions are read
(from the catalog kept in the store, ``_index`` and ``_catalog_table``, and
the refs changed since), ``_sharded`` the writer and reader of versions
written by several processes at once (``ShardWriter``, ``VersionFiles``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..backends import OBJECT_STORE_CONCURRENCY as OBJECT_STORE_WORKERS
from ..backends.local import MAX_CONCURRENCY, MIN_CONCURRENCY
from ..chunks._chunking import ChunkerParams
from ..chunks._codec import DEFAULT_DELTA_READS
from ..gc._history import LastRun
from ..repository._metadata import ARTIFACT_TYPES, ArtifactInfo
from ..transfer._budget import IN_FLIGHT_BYTES
from ._cache import CachedStore, CacheReport, cache_report, clear_cache
from ._catalog_table import CatalogUnavailable
from ._config import DELTA_METHODS, ENTROPY_CODERS
from ._facade import DEFAULT_STORE, Store, open
from ._index import CatalogStatus
from ._values import Details, KeySummary, Reclaimable, Restored, Stats, Version

#: A put's or get's default workers (``Store.workers``) are its backend's
#: concurrency: ``OBJECT_STORE_WORKERS`` on S3, GCS and Azure; on a folder, one
#: per core within ``FOLDER_WORKERS`` (fewest, most).
FOLDER_WORKERS = (MIN_CONCURRENCY, MAX_CONCURRENCY)

if TYPE_CHECKING:
    from ._sharded import (
        INDEX_PATH,
        IndexedTensor,
        Record,
        Shard,
        ShardPart,
        ShardWriter,
        TensorIndex,
        TensorPart,
        VersionFiles,
    )

#: Names of versions written in parts, from ``_sharded``: they load on first
#: use, so a command that does not need them does not pay for their modules.
_IN_PARTS = frozenset(
    {
        "INDEX_PATH",
        "IndexedTensor",
        "Record",
        "Shard",
        "ShardPart",
        "ShardWriter",
        "TensorIndex",
        "TensorPart",
        "VersionFiles",
    }
)


if not TYPE_CHECKING:  # type checkers see the imports above, and no name beyond them

    def __getattr__(name: str) -> Any:
        if name not in _IN_PARTS:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from . import _sharded

        return getattr(_sharded, name)


__all__ = [
    "ARTIFACT_TYPES",
    "DEFAULT_DELTA_READS",
    "DEFAULT_STORE",
    "DELTA_METHODS",
    "ENTROPY_CODERS",
    "FOLDER_WORKERS",
    "INDEX_PATH",
    "IN_FLIGHT_BYTES",
    "OBJECT_STORE_WORKERS",
    "ArtifactInfo",
    "CacheReport",
    "CachedStore",
    "CatalogStatus",
    "CatalogUnavailable",
    "ChunkerParams",
    "Details",
    "IndexedTensor",
    "KeySummary",
    "LastRun",
    "Reclaimable",
    "Record",
    "Restored",
    "Shard",
    "ShardPart",
    "ShardWriter",
    "Stats",
    "Store",
    "TensorIndex",
    "TensorPart",
    "Version",
    "VersionFiles",
    "VersionSpec",
    "cache_report",
    "clear_cache",
    "open",
]
