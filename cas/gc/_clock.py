"""Local elapsed time, which tests replace with a clock they move by hand."""

from __future__ import annotations

import time


class Clock:
    """Local elapsed time and sleeping; tests swap in a fake one.

    Only durations are measured with it, never instants that are compared
    with object times: those come from the backend.
    """

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


SYSTEM_CLOCK = Clock()
