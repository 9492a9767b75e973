"""The Store facade: the one boundary the CLI, the ML layer and users talk to.

``Store`` opens a store on any backend and offers put, get, log, tag,
delete, gc, verify and the reads the ML layer needs (a catalog of live
versions, a version's manifest, random access to a stored file, what
deleting versions would free). The value types it returns (``Version``,
``Details``, ``KeySummary``, ``Stats``, ``Reclaimable``) live beside it.
``_writing`` is the put's pipeline, ``_catalog`` how versions are read
from refs.
"""

from ..backends import OBJECT_STORE_CONCURRENCY as OBJECT_STORE_WORKERS
from ..backends.local import MAX_CONCURRENCY, MIN_CONCURRENCY
from ..chunks._chunking import ChunkerParams
from ..repository._metadata import ARTIFACT_TYPES, ArtifactInfo
from ..transfer._budget import IN_FLIGHT_BYTES
from ._config import ENTROPY_CODERS
from ._facade import DEFAULT_STORE, Store, open
from ._values import Details, KeySummary, Reclaimable, Stats, Version

#: A put's or get's default workers (``Store.workers``) are its backend's
#: concurrency: ``OBJECT_STORE_WORKERS`` on S3, GCS and Azure; on a folder, one
#: per core within ``FOLDER_WORKERS`` (fewest, most).
FOLDER_WORKERS = (MIN_CONCURRENCY, MAX_CONCURRENCY)

__all__ = [
    "ARTIFACT_TYPES",
    "DEFAULT_STORE",
    "ENTROPY_CODERS",
    "FOLDER_WORKERS",
    "IN_FLIGHT_BYTES",
    "OBJECT_STORE_WORKERS",
    "ArtifactInfo",
    "ChunkerParams",
    "Details",
    "KeySummary",
    "Reclaimable",
    "Stats",
    "Store",
    "Version",
    "open",
]
