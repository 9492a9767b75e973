"""Versions and tags of logical keys.

A version ref ``refs/<key>/@v/<N>`` is created only-if-absent: that write is
the commit point of a put, and two writers racing for N both succeed, one of
them with N+1. Deleting a version overwrites its ref with a tombstone instead
of removing it, so a number is never handed out twice. Tags are small
mutable objects ``refs/<key>/@t/<tag>`` naming a version number.

A version ref may also carry a ``summary``: the manifest's metadata without
its file list (see :mod:`cas.repository._metadata`), so that log, find and lineage read
refs only. It is written in the same create-only write as the ref, so it is
exactly as committed as the version; refs without one stay valid and readers
fall back to the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..backends.base import Backend
from ..digest import Digest
from ..errors import (
    AlreadyExistsError,
    CorruptObjectError,
    NotFoundError,
    PreconditionFailedError,
    RefNotFoundError,
)
from . import _layout as layout
from ._changes import ChangeLog
from ._manifest import canonical_json

#: Compare-and-swap attempts of a ref that others keep changing.
_SWAP_ATTEMPTS = 8


def utc_now() -> str:
    # Imported here: reading a store never needs it, and every get would pay for it.
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class VersionRef:
    """A live version as its ref records it: the manifest it commits."""

    deleted: ClassVar[bool] = False

    key: str
    number: int
    manifest_id: Digest
    created: str
    # None: not recorded (older refs, or too large), read the manifest instead.
    # Left out of == and hash: it is derived from the manifest, and a dict is unhashable.
    summary: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)
    #: Hash of the idempotency token of the put that committed it, if it had one.
    token: str | None = field(default=None, compare=False)

    @property
    def label(self) -> str:
        """``KEY@N``."""
        return f"{self.key}@{self.number}"


@dataclass(frozen=True, slots=True)
class KeyRefs:
    """What one listing of ``refs/`` finds under a key: version numbers and tag names."""

    key: str
    numbers: list[int] = field(default_factory=list)  # deleted ones included, ascending
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DeletedRef:
    """A deleted version: its tombstone keeps the number from being handed out again."""

    deleted: ClassVar[bool] = True

    key: str
    number: int
    created: str


class Refs:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        #: Every change below is announced in the catalog's log first (:mod:`._changes`).
        self.changes = ChangeLog(backend)

    # -- versions --------------------------------------------------------------

    def version_numbers(self, key: str) -> list[int]:
        """Every version number ever given to ``key``, deleted ones included, ascending."""
        numbers = []
        for info in self.backend.list_objects(layout.versions_prefix(key)):
            name = info.key.rpartition("/")[2]
            if name.isascii() and name.isdigit():
                numbers.append(int(name))
        return sorted(numbers)

    def read_version(self, key: str, number: int) -> VersionRef | DeletedRef:
        object_key = layout.version_key(key, number)
        try:
            blob = self.backend.get(object_key)
        except NotFoundError:
            raise RefNotFoundError(f"version {key}@{number} does not exist") from None
        try:
            data = json.loads(blob)
            manifest = data.get("manifest")
            created = str(data["created"])
            if manifest is None:  # null (or absent): deleted; anything else must name one
                return DeletedRef(key, number, created)
            summary = data.get("summary")
            token = data.get("token")
            return VersionRef(
                key,
                number,
                Digest.parse(manifest),
                created,
                summary if isinstance(summary, dict) else None,
                token if isinstance(token, str) else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
            raise CorruptObjectError(f"ref {object_key} is malformed ({err})") from None

    def read_live(self, key: str, number: int) -> VersionRef | None:
        """Version ``number`` of ``key`` if live; None when deleted or removed since listed."""
        try:
            ref = self.read_version(key, number)
        except RefNotFoundError:
            return None
        return ref if isinstance(ref, VersionRef) else None

    def live_versions(self, key: str, *, newest_first: bool = False) -> Iterator[VersionRef]:
        numbers = self.version_numbers(key)
        for number in reversed(numbers) if newest_first else numbers:
            ref = self.read_live(key, number)
            if ref is not None:
                yield ref

    def latest(self, key: str) -> VersionRef:
        for ref in self.live_versions(key, newest_first=True):
            return ref
        raise RefNotFoundError(f"key {key!r} has no versions")

    def create_next(
        self,
        key: str,
        manifest_id: Digest,
        *,
        summary: Mapping[str, Any] | None = None,
        token: str | None = None,
    ) -> VersionRef:
        """Commit a new version: create ``refs/<key>/@v/<N>`` only if absent, N = last + 1.

        ``token`` is the hash of the put's idempotency token, recorded with it.
        """
        numbers = self.version_numbers(key)
        number = (numbers[-1] if numbers else 0) + 1
        created = utc_now()
        fields: dict[str, Any] = {"manifest": manifest_id.hex, "created": created}
        if summary is not None:
            fields["summary"] = dict(summary)
        if token is not None:
            fields["token"] = token
        body = canonical_json(fields)
        while True:
            object_key = layout.version_key(key, number)
            # The note goes first; the flush below makes both durable. A note is an
            # empty object, named only: its creation is journalled before the ref's.
            noted = self.changes.note(object_key)
            try:
                self.backend.put(object_key, body, if_absent=True)
            except AlreadyExistsError:
                # A retried request whose first attempt succeeded sees its own
                # write: the body (with its microsecond timestamp) says so.
                if not self._holds(object_key, body):
                    number += 1  # another writer took it: the next one is ours to try
                    continue
            self.backend.flush()  # the commit is durable before anyone is told of it
            self.changes.landed(object_key, noted)
            return VersionRef(key, number, manifest_id, created, fields.get("summary"), token)

    def _holds(self, object_key: str, body: bytes) -> bool:
        try:
            return self.backend.get(object_key) == body
        except NotFoundError:
            return False

    def replace_manifest(self, key: str, number: int, old: Digest, new: Digest) -> bool:
        """Point a live version at ``new``, a manifest of the same content as ``old``.

        Repacking does this once it has stored the version's chunks so that
        they need other delta bases (docs/format.md, "Repacking"). A
        compare-and-swap: it happens only if the ref still names ``old``, so
        a version deleted or repacked meanwhile is left as it is (False).
        Everything else the ref records stays, and ``repacked`` says when.
        """
        object_key = layout.version_key(key, number)
        for _ in range(_SWAP_ATTEMPTS):
            try:
                blob, token = self.backend.get_versioned(object_key)
                data = json.loads(blob)
            except NotFoundError:
                return False
            except ValueError as err:
                raise CorruptObjectError(f"ref {object_key} is malformed ({err})") from None
            if not isinstance(data, dict) or data.get("manifest") != old.hex:
                return data.get("manifest") == new.hex if isinstance(data, dict) else False
            body = canonical_json({**data, "manifest": new.hex, "repacked": utc_now()})
            noted = self.changes.note(object_key)  # the catalog names the manifest too
            try:
                self.backend.put(object_key, body, if_match=token)
            except PreconditionFailedError:
                continue  # changed meanwhile (or our own write, retried): read it again
            self.backend.flush()
            self.changes.landed(object_key, noted)
            return True
        return False

    def mark_deleted(self, ref: VersionRef | DeletedRef) -> None:
        body = canonical_json({"manifest": None, "created": ref.created, "deleted": utc_now()})
        self._change(layout.version_key(ref.key, ref.number), body)

    def _change(self, object_key: str, body: bytes | None) -> None:
        """Overwrite (or, with ``body`` None, delete) a ref, announced in the catalog's log."""
        noted = self.changes.note(object_key)
        if body is None:
            self.backend.delete([object_key])
        else:
            self.backend.put(object_key, body)
        self.changes.landed(object_key, noted)

    # -- tags ------------------------------------------------------------------

    def tags(self, key: str) -> dict[str, int]:
        """Tag name -> version number, for every readable tag of ``key``.

        A malformed tag object names no version: it is left out here, so that
        it does not break every command that shows a version's tags; reading
        that tag fails, and verify reports it.
        """
        out: dict[str, int] = {}
        for tag in self._list_tags(key):
            try:
                out[tag] = self.read_tag(key, tag)
            except (RefNotFoundError, CorruptObjectError):
                continue
        return out

    def _list_tags(self, key: str) -> list[str]:
        return [
            info.key.rpartition("/")[2]
            for info in self.backend.list_objects(layout.tags_prefix(key))
        ]

    def read_tag(self, key: str, tag: str) -> int:
        object_key = layout.tag_key(key, tag)
        try:
            number = json.loads(self.backend.get(object_key))["version"]
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise ValueError(f"version {number!r} is not a number >= 1")
            return number
        except NotFoundError:
            raise RefNotFoundError(f"tag {key}:{tag} does not exist") from None
        except (ValueError, KeyError, TypeError, RecursionError) as err:
            raise CorruptObjectError(f"ref {object_key} is malformed ({err})") from None

    def set_tag(self, key: str, tag: str, number: int) -> None:
        body = canonical_json({"version": number, "created": utc_now()})
        self._change(layout.tag_key(key, tag), body)

    def remove_tag(self, key: str, tag: str) -> None:
        self._change(layout.tag_key(key, tag), None)

    # -- keys ------------------------------------------------------------------

    def iter_keys(self, prefix: str = "") -> Iterator[tuple[str, list[int]]]:
        """Yield (key, version numbers) for every key starting with ``prefix``, sorted."""
        for listed in self.scan(prefix):
            if listed.numbers and listed.key.startswith(prefix):
                yield listed.key, listed.numbers

    def scan(self, prefix: str = "") -> Iterator[KeyRefs]:
        """Every key whose refs' object keys start with ``refs/<prefix>``, sorted, with what
        one listing finds under it (a prefix ending in ``/`` also finds the key before it)."""
        current: KeyRefs | None = None
        for info in self.backend.list_objects(layout.REFS + prefix):
            parsed = layout.parse_ref_key(info.key)
            if parsed is None:
                continue
            if current is None or parsed.key != current.key:
                if current is not None:
                    yield current
                current = KeyRefs(parsed.key)
            if parsed.version is not None:
                current.numbers.append(parsed.version)
            elif parsed.tag is not None:
                current.tags.append(parsed.tag)
        if current is not None:
            yield current

    def tags_by_version(self, key: str, names: Iterable[str] | None = None) -> dict[int, list[str]]:
        """Version number -> its tags, sorted, of tags ``names`` of ``key`` (None: all).

        A malformed tag is left out, as in :meth:`tags`.
        """
        out: dict[int, list[str]] = {}
        for tag in sorted(self._list_tags(key) if names is None else names):
            try:
                out.setdefault(self.read_tag(key, tag), []).append(tag)
            except (RefNotFoundError, CorruptObjectError):
                continue  # removed while we listed, or names no version
        return out
