"""cas: a content-addressable artifact store for machine learning.

import cas
store = cas.open("./.cas")               # or s3://bucket/prefix, gs://..., az://...
v = store.put("checkpoints/step-100", "runs/bert/ckpt", metrics={"loss": 0.31})
store.get("runs/bert/ckpt@1", "restored/")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import CasError, NotFoundError

if TYPE_CHECKING:
    from .artifact import ArtifactInfo
    from .compat import Storage, get_default_storage, get_storage_backend, get_storage_from_uri
    from .store import Details, KeySummary, Stats, Store, Version, open
    from .verify import VerifyReport

__version__ = "0.1.0"
__all__ = [
    "ArtifactInfo",
    "CasError",
    "Details",
    "KeySummary",
    "NotFoundError",
    "Stats",
    "Storage",
    "Store",
    "VerifyReport",
    "Version",
    "get_default_storage",
    "get_storage_backend",
    "get_storage_from_uri",
    "open",
]

# Where each public name lives. They load on first access, so that a command
# (or `import cas.errors`) pays start-up time only for the modules it uses.
_HOMES = {
    "ArtifactInfo": "artifact",
    "Storage": "compat",
    "get_default_storage": "compat",
    "get_storage_backend": "compat",
    "get_storage_from_uri": "compat",
    "Details": "store",
    "KeySummary": "store",
    "Stats": "store",
    "Store": "store",
    "Version": "store",
    "open": "store",
    "VerifyReport": "verify",
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
