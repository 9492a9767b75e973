"""The documented import path of :mod:`cas.ml.lineage`, which holds the code."""

import sys

from .ml import lineage as _module
from .ml.lineage import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = _module
