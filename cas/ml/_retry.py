"""Saves retried after a transient failure, as the same save: a retry never adds a version.

Every attempt passes one idempotency token to :meth:`cas.store.Store.put`,
so an attempt whose commit landed but whose answer was lost (a timeout
after the write, a failure while tagging) is found by the next attempt
instead of stored again.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from ..errors import BackendError, ConcurrentCollectionError

T = TypeVar("T")
#: Seconds to wait before the second, third and fourth attempt.
RETRY_DELAYS = (1.0, 2.0, 4.0)


def save_with_retries(save: Callable[[str], T], token: str | None = None) -> T:
    """``save(token)``, again after each transient failure, with the same token throughout.

    A permanent failure (a bad input, a full disk, a refused credential) is
    raised at once; a transient one (the service, a concurrent collection)
    after the last attempt.
    """
    token = token or uuid.uuid4().hex
    for delay in (*RETRY_DELAYS, None):
        try:
            return save(token)
        except (BackendError, ConcurrentCollectionError) as err:
            permanent = isinstance(err, BackendError) and not err.is_transient
            if permanent or delay is None:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")
