"""Where things live in a store (formats 1 to 4), and the syntax of keys and references.

Pure functions only: nothing here touches a backend. ``docs/format.md``
describes the same layout for people.

    config                     store configuration (JSON)
    chunks/<h[:2]>/<h>         one chunk, h = BLAKE3 of its raw bytes
    manifests/<m[:2]>/<m>      one manifest, m = BLAKE3 of its stored bytes
    refs/<key>/@v/<N>          version N of key (N zero-padded to 12 digits)
    refs/<key>/@t/<tag>        a tag of key
    refs/<key>/@i/<hash>       where to find the version a put with an idempotency token made
    gc/...                     garbage-collection state
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..digest import Digest
from ..errors import InvalidKeyError, InvalidRefError

#: The oldest format, of a store that asks for nothing newer. A store whose
#: tensor chunks may hold FSE streams (``cas init --entropy fse``) is format
#: 2, and one whose delta chunks may be integer differences (codec 4, what
#: ``cas init --delta-method difference``) format 3, and one whose fp32 delta
#: chunks may be differences from their base times a factor (codec 5, what
#: ``cas init`` sets by default) format 4, so that a cas that cannot decode
#: them refuses the store by its config instead of failing on chunks. Each
#: format holds everything the ones below it do.
#: docs/format.md, "Changes", has the rule for when the number goes up.
FORMAT_VERSION = 1
FSE_FORMAT = 2
DIFFERENCE_FORMAT = 3
SCALED_FORMAT = 4
READABLE_FORMATS = (1, 2, 3, 4)
CONFIG_KEY = "config"
CHUNKS = "chunks/"
MANIFESTS = "manifests/"
REFS = "refs/"
GC = "gc/"
VERSION_DIR = "@v"
TAG_DIR = "@t"
TOKEN_DIR = "@i"
VERSION_DIGITS = 12

_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_TAG = re.compile(r"[A-Za-z0-9._-]+")


def check_key(key: str) -> str:
    """Validate a logical key: '/'-separated segments of letters, digits, '.', '_', '-'."""
    if not key:
        raise InvalidKeyError("key is empty")
    if key.startswith("/"):
        raise InvalidKeyError(f"invalid key {key!r}: a key is relative; drop the leading '/'")
    if key.endswith("/"):
        raise InvalidKeyError(f"invalid key {key!r}: drop the trailing '/'")
    if "//" in key:
        raise InvalidKeyError(f"invalid key {key!r}: empty segment ('//'); use a single '/'")
    for segment in key.split("/"):
        if segment in (".", ".."):
            raise InvalidKeyError(f"invalid key {key!r}: segment {segment!r} is not allowed")
        if not _SEGMENT.fullmatch(segment):
            raise InvalidKeyError(
                f"invalid key {key!r}: segment {segment!r} must be letters, digits, '.', '_' or '-'"
            )
    return key


def check_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag) or tag in (".", "..") or tag.isdigit():
        raise InvalidRefError(
            f"invalid tag {tag!r}: use letters, digits, '.', '_' or '-', not only digits"
        )
    return tag


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed reference: ``KEY`` (latest), ``KEY@N`` or ``KEY:TAG``."""

    key: str
    version: int | None = None
    tag: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.key}@{self.version}"
        if self.tag is not None:
            return f"{self.key}:{self.tag}"
        return self.key


def parse_ref(text: str) -> Reference:
    """Parse ``KEY``, ``KEY@N`` or ``KEY:TAG``; InvalidRefError names what is wrong."""
    if "@" in text and ":" in text:
        raise InvalidRefError(f"invalid reference {text!r}: use KEY@N or KEY:TAG, not both")
    try:
        if "@" in text:
            key, _, number = text.rpartition("@")
            if not (number.isascii() and number.isdigit()) or int(number) < 1:
                raise InvalidRefError(
                    f"invalid reference {text!r}: version after '@' must be a number >= 1"
                )
            return Reference(check_key(key), version=int(number))
        if ":" in text:
            key, _, tag = text.rpartition(":")
            return Reference(check_key(key), tag=check_tag(tag))
        return Reference(check_key(text))
    except InvalidKeyError as err:
        raise InvalidRefError(f"invalid reference {text!r}: {err}") from None


def chunk_key(digest: Digest) -> str:
    h = digest.hex
    return f"{CHUNKS}{h[:2]}/{h}"


def manifest_key(manifest_id: Digest) -> str:
    m = manifest_id.hex
    return f"{MANIFESTS}{m[:2]}/{m}"


def digest_from_key(key: str) -> Digest | None:
    """The digest named by a chunk or manifest key, or None for anything else."""
    name = key.rpartition("/")[2]
    try:
        return Digest.parse(name)
    except ValueError:
        return None


def versions_prefix(key: str) -> str:
    return f"{REFS}{key}/{VERSION_DIR}/"


def version_key(key: str, number: int) -> str:
    return f"{versions_prefix(key)}{number:0{VERSION_DIGITS}d}"


def tags_prefix(key: str) -> str:
    return f"{REFS}{key}/{TAG_DIR}/"


def tag_key(key: str, tag: str) -> str:
    return f"{tags_prefix(key)}{tag}"


def token_key(key: str, hashed: str) -> str:
    """The record of an idempotency token of ``key`` (see :mod:`cas.store._retries`)."""
    return f"{REFS}{key}/{TOKEN_DIR}/{hashed}"


@dataclass(frozen=True, slots=True)
class RefObject:
    """What a ``refs/`` object key names: a version or a tag of a key."""

    key: str
    version: int | None = None
    tag: str | None = None


def parse_ref_key(object_key: str) -> RefObject | None:
    """Parse ``refs/<key>/@v/<N>`` or ``refs/<key>/@t/<tag>``; None for anything else."""
    if not object_key.startswith(REFS):
        return None
    parts = object_key[len(REFS) :].split("/")
    if len(parts) < 3:
        return None
    key, kind, name = "/".join(parts[:-2]), parts[-2], parts[-1]
    if kind == VERSION_DIR and name.isascii() and name.isdigit():
        return RefObject(key, version=int(name))
    if kind == TAG_DIR:
        return RefObject(key, tag=name)
    return None
