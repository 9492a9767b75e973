"""The documented import path of :mod:`cas.ml.prune`, which holds the code."""

import sys

from .ml import prune as _module
from .ml.prune import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = _module
