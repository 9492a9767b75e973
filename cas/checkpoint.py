"""The documented import path of :mod:`cas.ml.checkpoint`, which holds the code."""

import sys

from .ml import checkpoint as _module
from .ml.checkpoint import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = _module
