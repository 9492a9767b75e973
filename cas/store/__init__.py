"""The Store facade: the one boundary the CLI, the ML layer and users talk to.

``Store`` opens a store on any backend and offers put, get, log, tag,
delete, gc, verify and the reads the ML layer needs. The value types it
returns (``Version``, ``Details``, ``KeySummary``, ``Stats``) live beside it.
"""

from ..chunks._chunking import ChunkerParams
from ..repository._metadata import ARTIFACT_TYPES, ArtifactInfo
from ..transfer._budget import IN_FLIGHT_BYTES
from ._config import ENTROPY_CODERS
from ._facade import DEFAULT_STORE, Store, open
from ._values import Details, KeySummary, Stats, Version

__all__ = [
    "ARTIFACT_TYPES",
    "DEFAULT_STORE",
    "ENTROPY_CODERS",
    "IN_FLIGHT_BYTES",
    "ArtifactInfo",
    "ChunkerParams",
    "Details",
    "KeySummary",
    "Stats",
    "Store",
    "Version",
    "open",
]
