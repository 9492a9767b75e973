"""cas: a content-addressable artifact store for machine learning.

import cas
store = cas.open("./.cas")               # or s3://bucket/prefix, gs://..., az://...
v = store.put("checkpoints/step-100", "runs/bert/ckpt", metrics={"loss": 0.31})
store.get("runs/bert/ckpt@1", "restored/")

The code is in layers, each importing only from those below it (see
docs/concepts.md, "How the code is laid out"). Bottom to top: errors, digest
and units; backends/ (bytes under keys); repository/ (the store format:
object keys, manifests, refs, metadata); chunks/ (cutting, encoding and
storing chunks); tensors/ (safetensors); transfer/ (the put and restore
pipelines); gc/ (what is live: collection and verification); store/ (the
Store facade); ml/ (checkpoints, queries, lineage, retention, diffs, the
plain storage API); integrations/ (the trainers: Hugging Face, Lightning;
torch.distributed.checkpoint); cli/ (the command). testing/ holds the
backend conformance suite.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import CasError, NotFoundError

if TYPE_CHECKING:
    from .gc._collect import GcReport
    from .gc._repack import RepackReport
    from .gc._verify import VerifyReport
    from .ml.plain_storage import (
        Storage,
        get_default_storage,
        get_storage_backend,
        get_storage_from_uri,
    )
    from .ml.storage_manager import ArtifactMetadata, StorageManager, get_storage_manager
    from .repository._metadata import ArtifactInfo
    from .store import Details, KeySummary, Stats, Store, Version, open

#: The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0"
__all__ = [
    "ArtifactInfo",
    "ArtifactMetadata",
    "CasError",
    "Details",
    "GcReport",
    "KeySummary",
    "NotFoundError",
    "RepackReport",
    "Stats",
    "Storage",
    "StorageManager",
    "Store",
    "VerifyReport",
    "Version",
    "get_default_storage",
    "get_storage_backend",
    "get_storage_from_uri",
    "get_storage_manager",
    "open",
]

# Where each public name lives. They load on first access, so that a command
# (or `import cas.errors`) pays start-up time only for the modules it uses.
_HOMES = {
    "ArtifactInfo": "repository._metadata",
    "Storage": "ml.plain_storage",
    "get_default_storage": "ml.plain_storage",
    "get_storage_backend": "ml.plain_storage",
    "get_storage_from_uri": "ml.plain_storage",
    "ArtifactMetadata": "ml.storage_manager",
    "StorageManager": "ml.storage_manager",
    "get_storage_manager": "ml.storage_manager",
    "Details": "store",
    "KeySummary": "store",
    "Stats": "store",
    "Store": "store",
    "Version": "store",
    "open": "store",
    "VerifyReport": "gc._verify",
    "GcReport": "gc._collect",
    "RepackReport": "gc._repack",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'cas' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
