"""The record of the last garbage collection, ``gc/last-run``: what a status page shows.

A collection that ran (not a dry run) writes what it did when it finishes;
the object's modification time, set by the backend, is when. It is a note
for people: nothing in cas decides anything from it, and readers of the
format ignore ``gc/`` (docs/format.md).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..backends.base import Backend
from ..errors import CasError, NotFoundError
from ..repository import _layout as layout
from ..repository._manifest import canonical_json

if TYPE_CHECKING:
    from ._collect import GcReport

LAST_RUN_KEY = f"{layout.GC}last-run"
_FIELDS = (
    "grace",
    "deleted_chunks",
    "deleted_manifests",
    "bytes_reclaimed",
    "kept_by_grace",
    "bytes_kept_by_grace",
    "seconds",
)


@dataclass(frozen=True, slots=True)
class LastRun:
    """What the last collection did, and when it finished (backend time, seconds)."""

    finished: float
    grace: float = 0.0
    deleted_chunks: int = 0
    deleted_manifests: int = 0
    bytes_reclaimed: int = 0
    kept_by_grace: int = 0
    bytes_kept_by_grace: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"finished": self.finished, **{name: getattr(self, name) for name in _FIELDS}}


def record_run(backend: Backend, report: GcReport) -> None:
    """Write ``report`` as the last run; a store that refuses the write loses only the note."""
    body = canonical_json({name: getattr(report, name) for name in _FIELDS})
    with contextlib.suppress(CasError, OSError):
        backend.put(LAST_RUN_KEY, body)


def read_last_run(backend: Backend) -> LastRun | None:
    """The last collection's record; None if no collection ran or the record is unreadable."""
    try:
        blob = backend.get(LAST_RUN_KEY)
        finished = backend.stat(LAST_RUN_KEY).mtime
    except NotFoundError:
        return None
    try:
        data = json.loads(blob)
        return LastRun(finished=finished, **{k: data[k] for k in _FIELDS if k in data})
    except (ValueError, TypeError):
        return None
