"""cas: a content-addressable artifact store for machine learning.

import cas
store = cas.open("./.cas")               # or s3://bucket/prefix, gs://..., az://...
v = store.put("checkpoints/step-100", "runs/bert/ckpt", metrics={"loss": 0.31})
store.get("runs/bert/ckpt@1", "restored/")
"""

from .artifact import ArtifactInfo
from .compat import Storage, get_default_storage, get_storage_backend, get_storage_from_uri
from .errors import CasError, NotFoundError
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
