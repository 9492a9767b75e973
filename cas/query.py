"""The documented import path of :mod:`cas.ml.query`, which holds the code."""

import sys

from .ml import query as _module
from .ml.query import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = _module
