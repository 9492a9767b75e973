"""The documented import path of :mod:`cas.ml.plain_storage`, which holds the code."""

import sys

from .ml import plain_storage as _module
from .ml.plain_storage import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = _module
