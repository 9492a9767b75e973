"""cas: a content-addressable artifact store for machine learning.

import cas
store = cas.open("./.cas")               # or s3://bucket/prefix, gs://..., az://...
v = store.put("checkpoints/step-100", "runs/bert/ckpt", metrics={"loss": 0.31})
store.get("runs/bert/ckpt@1", "restored/")
"""

from .errors import CasError, NotFoundError
from .store import Details, KeySummary, Stats, Store, Version, open
from .verify import VerifyReport

__version__ = "0.1.0"
__all__ = [
    "CasError",
    "Details",
    "KeySummary",
    "NotFoundError",
    "Stats",
    "Store",
    "VerifyReport",
    "Version",
    "open",
]
