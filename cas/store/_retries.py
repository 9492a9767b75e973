"""Puts that a retry does not duplicate: ``if_changed`` and idempotency tokens.

A put killed after its commit but before its caller heard of it leaves a
version the caller does not know about; a plain retry adds a second one.
Two ways out:

* **if_changed** (``cas put --if-changed``): a put whose manifest equals the
  key's latest version's in everything but the creation time (the same
  files with the same contents, modes and link targets, the same parents,
  tags, metrics, metadata, message and artifact fields) commits nothing and
  answers with that version. The content is still read and hashed; chunks
  it finds stored are not uploaded again.
* **an idempotency token**: the caller names the save, and every attempt of
  it passes the same token. The version ref that commits it records a hash
  of the token (in the same create-only write, so exactly as committed as
  the version), and a small record ``refs/<key>/@i/<hash>`` says from which
  version number on to look for it, and, once known, which version it is.
  A retry that finds the version returns it instead of storing again.

Tokens make retries of a save that ended (it failed, was killed, or its
answer was lost) safe. Two attempts running at the same moment with one
token may both commit: the token is not a lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from ..digest import Digest
from ..errors import (
    AlreadyExistsError,
    CasError,
    InvalidInputError,
    NotFoundError,
    PreconditionFailedError,
    RefNotFoundError,
)
from ..repository import _layout as layout
from ..repository._manifest import Manifest, canonical_json
from ..repository._refs import Refs, VersionRef

#: Longest idempotency token accepted, in characters.
MAX_TOKEN = 1024
_UPDATES = 5


def token_hash(token: str) -> str:
    """The name a token is recorded under: 32 hex digits of its SHA-256."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
        raise InvalidInputError(
            f"an idempotency token must be a non-empty string of at most {MAX_TOKEN} "
            f"characters, not {token!r:.60}"
        )
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def essence(manifest: Manifest) -> tuple[object, ...]:
    """What a version is, without when it was made or how its files were cut into chunks."""
    files = tuple((e.path, e.type, e.mode, e.size, e.digest, e.target) for e in manifest.entries)
    return (
        manifest.key,
        manifest.kind,
        files,
        manifest.parents,
        manifest.tags,
        dict(manifest.metrics),
        canonical_json(dict(manifest.metadata)),
        manifest.message,
        canonical_json(dict(manifest.artifact)),
    )


@dataclass(frozen=True, slots=True)
class _Record:
    """What a token's record holds: where to look for its version, and the version once known."""

    first: int
    version: int | None = None


class RetryGuard:
    """Keeps one put from duplicating a version an earlier attempt of it committed."""

    def __init__(
        self, refs: Refs, key: str, token: str | None = None, *, if_changed: bool = False
    ) -> None:
        self.refs = refs
        self.key = key
        self.if_changed = if_changed
        #: What the version ref records of the token (None: no token).
        self.token = None if token is None else token_hash(token)

    # -- tokens ---------------------------------------------------------------------

    def earlier_commit(self) -> VersionRef | None:
        """The live version an earlier attempt with this token committed, if any.

        Otherwise records (once) from which version number on a later retry
        must look, and returns None: this put goes ahead.
        """
        if self.token is None:
            return None
        backend = self.refs.backend
        record_key = layout.token_key(self.key, self.token)
        while True:
            try:
                blob, _ = backend.get_versioned(record_key)
            except NotFoundError:
                numbers = self.refs.version_numbers(self.key)
                body = _record_body(_Record(first=(numbers[-1] if numbers else 0) + 1))
                try:
                    backend.put(record_key, body, if_absent=True)
                except AlreadyExistsError:
                    continue  # another attempt recorded it first: read theirs
                return None
            return self._find(_parse_record(blob))

    def _find(self, record: _Record) -> VersionRef | None:
        candidates = [n for n in self.refs.version_numbers(self.key) if n >= record.first]
        if record.version in candidates:
            candidates.remove(record.version)
            candidates.insert(0, record.version)
        for number in candidates:
            ref = self.refs.read_live(self.key, number)
            if ref is not None and ref.token == self.token:
                if record.version != number:
                    self.committed(ref)
                return ref
        return None

    def committed(self, ref: VersionRef) -> None:
        """Note which version the token's put committed, so that retries find it at once.

        Best effort: a retry that finds no version in the record looks for
        the token in the refs from the recorded first number on.
        """
        if self.token is None:
            return
        backend = self.refs.backend
        record_key = layout.token_key(self.key, self.token)
        for _ in range(_UPDATES):
            try:
                blob, etag = backend.get_versioned(record_key)
                record = _parse_record(blob)
                body = _record_body(_Record(record.first, ref.number))
                backend.put(record_key, body, if_match=etag)
                return
            except PreconditionFailedError:
                continue
            except CasError:
                return

    # -- if_changed --------------------------------------------------------------------

    def unchanged(
        self, manifest: Manifest, load: Callable[[Digest], Manifest]
    ) -> tuple[VersionRef, Manifest] | None:
        """The key's latest version if ``if_changed`` and it equals ``manifest``; else None."""
        if not self.if_changed:
            return None
        try:
            latest = self.refs.latest(self.key)
        except RefNotFoundError:
            return None
        stored = load(latest.manifest_id)
        if essence(stored) != essence(manifest):
            return None
        return latest, stored


def _record_body(record: _Record) -> bytes:
    return canonical_json({"first": record.first, "version": record.version})


def _parse_record(blob: bytes) -> _Record:
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        data = json.loads(blob)
        version = data.get("version")
        return _Record(int(data["first"]), None if version is None else int(version))
    # A damaged record only costs the shortcut: look through every version.
    return _Record(first=1)
