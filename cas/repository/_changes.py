"""The catalog's log: a note, written before each change of a ref, naming that ref.

The catalog (:mod:`cas.store._index`) is a compacted copy of every version
ref and tag. Between compactions, a query learns what changed from these
notes: one object per change, ``catalog/log/<key>/@v/<N>.<random>`` before
version ref N of a key is created or deleted, ``catalog/log/<key>/@t/<tag>.<random>``
before a tag is set or removed. A note carries nothing but its name: a
reader always reads the ref it names, which stays the truth, so a note can
neither add a version nor hide one.

A note is written *before* its change, so that a change that happened has
a note (a writer that dies between the two leaves a note of nothing, which
readers skip). Compaction folds a note into the catalog only once it is
older than :data:`SETTLE` on the backend's clock, by which time its change
has landed: a writer that took longer than half of it, between writing its
note and seeing its change done, writes another note.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from dataclasses import dataclass

from ..backends.base import Backend, ObjectInfo
from ..errors import AlreadyExistsError, CasError
from . import _layout as layout

CATALOG = "catalog/"
LOG = CATALOG + "log/"
#: Seconds after which a note's change has surely landed (see the module's docstring).
SETTLE = 60.0
#: Some services give object times in whole seconds: a note may look this much older.
TIME_GRAIN = 1.0


@dataclass(frozen=True, slots=True)
class Note:
    """One listed note: the ref it names (a version or a tag), and when it was written."""

    name: str  # the object key of the note
    key: str
    version: int | None
    tag: str | None
    mtime: float


def parse_note(info: ObjectInfo) -> Note | None:
    """The note an object of the log is, or None for anything else (never trusted)."""
    if not info.key.startswith(LOG):
        return None
    stem, dot, nonce = info.key.rpartition(".")
    if not dot or len(nonce) != 16:
        return None
    parsed = layout.parse_ref_key(layout.REFS + stem[len(LOG) :])
    if parsed is None or not _valid(parsed):
        return None
    return Note(info.key, parsed.key, parsed.version, parsed.tag, info.mtime)


def _valid(parsed: layout.RefObject) -> bool:
    try:
        layout.check_key(parsed.key)
        if parsed.tag is not None:
            layout.check_tag(parsed.tag)
    except CasError:
        return False
    return parsed.version is None or parsed.version >= 1


def _settle() -> float:
    return SETTLE  # read when used: tests shorten it


def settled(note: Note, now: float) -> bool:
    """Whether ``note``'s change has surely landed by ``now`` (both on the backend's clock)."""
    return note.mtime < now - _settle() - TIME_GRAIN


class ChangeLog:
    """Writes the notes of the changes a process makes to refs."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def note(self, ref_key: str) -> float:
        """Write a note naming ``ref_key``; the local time it started, for :meth:`landed`."""
        started = time.monotonic()
        name = f"{LOG}{ref_key[len(layout.REFS) :]}.{secrets.token_hex(8)}"
        # A retried request may find its own first attempt: the name is ours alone.
        with contextlib.suppress(AlreadyExistsError):
            self.backend.put(name, b"", if_absent=True)
        return started

    def landed(self, ref_key: str, started: float) -> None:
        """The change a note started at ``started`` announced has landed: if that took
        more than half the settle time, a compaction may already have folded the note
        without it, so write another one."""
        if time.monotonic() - started > _settle() / 2:
            self.note(ref_key)

    def list(self) -> list[Note]:
        """Every note in the log, in name order."""
        out = []
        for info in self.backend.list_objects(LOG):
            note = parse_note(info)
            if note is not None:
                out.append(note)
        return out
