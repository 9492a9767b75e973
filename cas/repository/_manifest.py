"""Manifests: what one version of a key is made of, and what it keeps alive.

A manifest is canonical JSON (sorted keys, compact separators, UTF-8, no NaN
or infinity), framed with zstd. Its id is the BLAKE3 of those stored bytes,
so the same content always gets the same id and a changed byte is detected.

A manifest keeps alive every chunk of its files and, for a chunk stored as a
delta, the chain of bases its entry lists: :meth:`Manifest.live_chunks` says
so, and :func:`live_chunk_names` says the same from a manifest's stored bytes
without building it (garbage collection reads every manifest). Both read a
chunk entry through :func:`_chunk_names`, the one place that rule is written.
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import zstandard

from .._zstd import decompress_bounded, zstd_compressor
from ..digest import DIGEST_SIZE, Digest
from ..errors import CorruptObjectError, InvalidInputError, UnsafePathError

SCHEMA_VERSION = 1
#: The schema of a manifest with delta chunks, whose entries list their bases:
#: a reader that knows only schema 1 refuses it cleanly instead of
#: misreading a chunk entry. Manifests without deltas keep schema 1 (and ids).
DELTA_SCHEMA = 2
SCHEMAS = (SCHEMA_VERSION, DELTA_SCHEMA)
#: The longest raw chunk a manifest may list: the largest maximum chunk size
#: a store's chunker takes. A reader holds a chunk whole, so it trusts no more.
MAX_CHUNK_LENGTH = 1 << 30
#: The longest chain of delta bases a chunk may have. Writers keep chains far
#: shorter (the store's delta setting); this stops a damaged store from
#: sending a read round in circles.
MAX_CHAIN = 64
# A manifest's JSON is hashes and numbers, which zstd shrinks two- or
# threefold; a frame that declares far more than that is a bomb, refused
# before it is decompressed. Small manifests may compress better (repeated
# metadata), so the ratio applies only above a floor.
_JSON_FLOOR = 64 << 20
_JSON_RATIO = 256
#: The BLAKE3 of no bytes: the whole-file hash of every empty file.
EMPTY = Digest.of(b"")
EntryType = Literal["file", "dir", "symlink"]
ArtifactKind = Literal["file", "directory"]


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One chunk of a file, in file order: its hash and its raw (decoded) length."""

    digest: Digest
    length: int
    #: For a chunk stored as a delta: its base, the base's base, and so on
    #: down to a chunk stored whole. Recorded so that garbage collection
    #: keeps the chain alive from manifests alone, whoever else uses it.
    bases: tuple[Digest, ...] = ()


@dataclass(frozen=True, slots=True)
class Entry:
    """One file, directory or symlink of an artifact, by relative POSIX path."""

    path: str
    type: EntryType
    mode: int
    size: int = 0
    digest: Digest | None = None  # BLAKE3 of the whole file
    chunks: tuple[ChunkRef, ...] = ()
    target: str | None = None  # symlink target, relative

    def chunk_offsets(self) -> list[int]:
        """Where each chunk starts in the file, in order (for bisecting a byte range)."""
        offsets, position = [], 0
        for chunk in self.chunks:
            offsets.append(position)
            position += chunk.length
        return offsets


@dataclass(frozen=True, slots=True)
class Parent:
    """A version this one derives from (lineage)."""

    key: str
    version: int
    manifest_id: Digest


@dataclass(frozen=True, slots=True)
class DeltaBase:
    """The version whose chunks a version's delta chunks were coded against.

    A storage choice, not lineage: it may differ from the parents (a put
    that names none takes the key's latest version), and a repack may move
    it to another version that is kept.
    """

    key: str
    version: int

    def __str__(self) -> str:
        return f"{self.key}@{self.version}"


@dataclass(frozen=True, slots=True)
class Manifest:
    """What one version holds: its entries, lineage, tags, metrics and metadata."""

    key: str
    kind: ArtifactKind
    created: str  # RFC 3339, UTC
    entries: tuple[Entry, ...]
    parents: tuple[Parent, ...] = ()
    tags: tuple[str, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    message: str = ""
    # Typed artifact record (type, job, algorithm, ...; see cas/repository/_metadata.py).
    # Optional in the JSON: written only when non-empty, so manifests made
    # before it existed, and their ids, stay exactly as they were.
    artifact: Mapping[str, Any] = field(default_factory=dict)
    # Optional in the JSON too, for the same reason: only manifests with
    # delta chunks that a put coded against a former version have it.
    delta_base: DeltaBase | None = None

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)

    @property
    def file_count(self) -> int:
        return sum(1 for e in self.entries if e.type == "file")

    def live_chunks(self) -> Iterator[tuple[Entry, Digest, int]]:
        """Every chunk object this manifest keeps alive, with the file that needs it.

        Each chunk of each file, then the delta bases its entry lists (a delta
        is decoded through its whole chain). The length is the chunk's raw
        length; a base is counted at the length of the delta that needs it.
        A chunk appears once per use.
        """
        for entry, chunk in self.chunk_reads():
            yield entry, chunk.digest, chunk.length

    def chunk_reads(self) -> Iterator[tuple[Entry, ChunkRef]]:
        """:meth:`live_chunks` as a reader reads them: a delta base is as long as
        its delta, and its own chain is the rest of the delta's."""
        for entry in self.entries:
            for chunk in entry.chunks:
                yield entry, chunk
                for index, base in enumerate(chunk.bases):
                    yield entry, ChunkRef(base, chunk.length, chunk.bases[index + 1 :])

    @property
    def only_file(self) -> Entry | None:
        """The file of a one-file artifact (kind "file"), which answers to any name."""
        if self.kind != "file":
            return None
        files = [e for e in self.entries if e.type == "file"]
        return files[0] if len(files) == 1 else None

    def to_bytes(self) -> bytes:
        text = canonical_json(self.to_dict())
        blob = zstd_compressor(3).compress(text)
        if len(text) > json_limit(len(blob)):
            raise InvalidInputError(
                f"manifest of {self.key!r} would be {len(text)} bytes of JSON that compress to "
                f"{len(blob)}; readers refuse such ratios as decompression bombs"
            )
        return blob

    def to_dict(self) -> dict[str, Any]:
        deltas = any(c.bases for e in self.entries for c in e.chunks)
        out = {
            "schema": DELTA_SCHEMA if deltas else SCHEMA_VERSION,
            "key": self.key,
            "kind": self.kind,
            "created": self.created,
            "parents": [
                {"key": p.key, "version": p.version, "manifest": p.manifest_id.hex}
                for p in self.parents
            ],
            "tags": list(self.tags),
            "metrics": dict(self.metrics),
            "metadata": dict(self.metadata),
            "message": self.message,
            "entries": [_entry_to_dict(e) for e in self.entries],
        }
        if self.artifact:
            out["artifact"] = dict(self.artifact)
        if self.delta_base is not None:
            out["delta_base"] = {"key": self.delta_base.key, "version": self.delta_base.version}
        return out

    @classmethod
    def from_bytes(cls, blob: bytes, *, name: str = "manifest") -> Manifest:
        """Decode and check a stored manifest: see :meth:`from_dict`."""
        return cls.from_dict(_decode(blob, name), name=name)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, name: str = "manifest") -> Manifest:
        """Parse a manifest and check it whole before anyone uses it.

        Every field must have its type, and the manifest must agree with
        itself (see :func:`check_manifest`): CorruptObjectError names the
        field, and the file it belongs to, when not; UnsafePathError when a
        path or link would leave the tree.
        """
        schema = _schema(data)
        if schema not in SCHEMAS or isinstance(schema, bool):
            raise CorruptObjectError(f"{name}: unsupported manifest schema {schema!r}")
        try:
            manifest = cls(
                key=_text(data["key"], "key"),
                kind=data["kind"],
                created=_text(data["created"], "created"),
                parents=tuple(_parent_from_dict(p) for p in _list(data["parents"], "parents")),
                tags=tuple(_text(t, "tags") for t in _list(data["tags"], "tags")),
                metrics=_metrics(data["metrics"]),
                metadata=_object(data["metadata"], "metadata"),
                message=_text(data["message"], "message"),
                entries=tuple(_entry_from_dict(e) for e in _list(data["entries"], "entries")),
                artifact=_object(data.get("artifact", {}), "artifact"),
                delta_base=_delta_base(data.get("delta_base")),
            )
        except (KeyError, TypeError, ValueError) as err:
            what = f"field {err}" if isinstance(err, KeyError) else str(err)
            raise CorruptObjectError(f"{name}: malformed ({what})") from None
        check_manifest(manifest, name=name, schema=schema)
        return manifest


def json_limit(stored: int) -> int:
    """The most JSON a manifest stored in ``stored`` bytes may hold."""
    return max(_JSON_FLOOR, _JSON_RATIO * stored)


def _decode(blob: bytes, name: str) -> Any:
    """The JSON of a stored manifest, decompressed within :func:`json_limit`."""
    try:
        return json.loads(decompress_bounded(blob, json_limit(len(blob))))
    except (zstandard.ZstdError, ValueError, RecursionError) as err:
        raise CorruptObjectError(f"{name}: cannot be read ({err})") from None


def live_chunk_names(blob: bytes, *, name: str = "manifest") -> list[bytes]:
    """The raw digests :meth:`Manifest.live_chunks` names, in its order, read from a
    manifest's stored bytes without building it; a chunk appears once per use.

    Raises CorruptObjectError when the bytes are not a manifest this cas reads.
    """
    return [digest for item in _chunk_items(blob, name) for digest in item]


def live_chunk_roles(blob: bytes, *, name: str = "manifest") -> tuple[list[bytes], list[bytes]]:
    """:func:`live_chunk_names` in two lists: the chunks the files are made of, and the
    delta bases their entries list (which a file may use as a chunk too)."""
    items = _chunk_items(blob, name)
    return [item[0] for item in items], [base for item in items for base in item[1:]]


def _chunk_items(blob: bytes, name: str) -> list[list[bytes]]:
    """Each chunk entry of a manifest's stored bytes: the chunk, then its delta bases."""
    data = _decode(blob, name)
    if not isinstance(data, Mapping) or data.get("schema") not in SCHEMAS:
        raise CorruptObjectError(f"{name}: unsupported manifest schema {_schema(data)!r}")
    try:
        return [
            _chunk_names(item)
            for entry in data["entries"]
            if entry["type"] == "file"
            for item in entry["chunks"]
        ]
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptObjectError(f"{name}: malformed ({type(err).__name__}: {err})") from None


def _schema(data: Any) -> Any:
    return data.get("schema") if isinstance(data, Mapping) else None


def _delta_base(data: Any) -> DeltaBase | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise TypeError(f"delta_base {data!r} is not an object")
    return DeltaBase(
        _text(data["key"], "delta_base key"), _int(data["version"], "delta_base version")
    )


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8; NaN and infinity are refused."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def check_metric(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInputError(f"metric {name!r} must be a finite number, got {value!r}")
    return value


def _entry_to_dict(entry: Entry) -> dict[str, Any]:
    out: dict[str, Any] = {"path": entry.path, "type": entry.type, "mode": entry.mode}
    if entry.type == "file":
        assert entry.digest is not None
        out["size"] = entry.size
        out["blake3"] = entry.digest.hex
        out["chunks"] = [_chunk_to_list(c) for c in entry.chunks]
    elif entry.type == "symlink":
        out["target"] = entry.target
    return out


def _chunk_to_list(chunk: ChunkRef) -> list[Any]:
    if chunk.bases:
        return [chunk.digest.hex, chunk.length, [b.hex for b in chunk.bases]]
    return [chunk.digest.hex, chunk.length]


def _chunk_names(item: Any) -> list[bytes]:
    """The chunk objects a chunk entry names, raw: the chunk, then its delta bases.

    An entry is ``[hash, length]``, or ``[hash, length, [base, ...]]`` for a
    delta chunk, whose chain of bases is needed to decode it.
    """
    if not isinstance(item, list) or len(item) not in (2, 3):
        raise ValueError(f"chunk entry {item!r} is not [hash, length(, bases)]")
    texts = [item[0], *_list(item[2], "bases")] if len(item) == 3 else [item[0]]
    names = []
    for text in texts:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = b""
        # fromhex also takes upper case and spaces: only the canonical spelling is a name.
        if len(raw) != DIGEST_SIZE or raw.hex() != text:
            raise InvalidInputError(f"not a BLAKE3 hex digest: {text!r}")
        names.append(raw)
    return names


def _chunk_from_list(item: Any) -> ChunkRef:
    digest, *bases = _chunk_names(item)
    if len(item) == 3 and not bases:
        raise ValueError(f"chunk entry {item[0]!r} has an empty list of delta bases")
    return ChunkRef(Digest(digest), _int(item[1], "length"), tuple(Digest(b) for b in bases))


def _entry_from_dict(data: Any) -> Entry:
    if not isinstance(data, Mapping):
        raise TypeError(f"entry {data!r} is not an object")
    kind, path, mode = data["type"], _text(data["path"], "path"), _int(data["mode"], "mode")
    if kind == "file":
        return Entry(
            path=path,
            type="file",
            mode=mode,
            size=_int(data["size"], f"size of {path!r}"),
            digest=Digest.parse(_text(data["blake3"], "blake3")),
            chunks=tuple(_chunk_from_list(c) for c in _list(data["chunks"], "chunks")),
        )
    if kind == "dir":
        return Entry(path=path, type="dir", mode=mode)
    if kind == "symlink":
        return Entry(path=path, type="symlink", mode=mode, target=_text(data["target"], "target"))
    raise ValueError(f"unknown entry type {kind!r}")


def _parent_from_dict(data: Any) -> Parent:
    if not isinstance(data, Mapping):
        raise TypeError(f"parent {data!r} is not an object")
    manifest = Digest.parse(_text(data["manifest"], "parent manifest"))
    return Parent(_text(data["key"], "parent key"), _int(data["version"], "version"), manifest)


# Strict JSON types: a reader that took "12" or 1.5 for a number, or 5 for a
# path, would act on what the writer never said.


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, not {value!r}")
    return value


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be a whole number, not {value!r}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"{what} must be a list, not {type(value).__name__}")
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be an object, not {type(value).__name__}")
    return dict(value)


def _metrics(value: Any) -> dict[str, float]:
    metrics = _object(value, "metrics")
    for metric, number in metrics.items():
        try:
            check_metric(metric, number)
        except InvalidInputError as err:
            raise ValueError(str(err)) from None
    return metrics


# -- consistency -----------------------------------------------------------------------


def check_manifest(
    manifest: Manifest, *, name: str = "manifest", schema: int = DELTA_SCHEMA
) -> None:
    """Refuse a manifest that does not agree with itself, before anything uses it.

    O(entries + chunks): no chunk is read. Numbers are checked against each
    other (a file's size against its chunks' lengths), the shape against the
    kind, delta chains against the schema and the limit, and every path and
    link against the path rules (:func:`check_entries`).
    """
    if manifest.kind not in ("file", "directory"):
        raise CorruptObjectError(f"{name}: field 'kind' is {manifest.kind!r}")
    if manifest.kind == "file" and (
        len(manifest.entries) != 1 or manifest.entries[0].type != "file"
    ):
        raise CorruptObjectError(
            f"{name}: a one-file version holds {len(manifest.entries)} entries"
        )
    for parent in manifest.parents:
        if parent.version < 1:
            raise CorruptObjectError(f"{name}: parent {parent.key!r} has version {parent.version}")
    for entry in manifest.entries:
        _check_entry(entry, name, schema)
    try:
        check_entries(manifest.entries)
    except UnsafePathError as err:
        raise UnsafePathError(f"{name}: {err}") from None


def _check_entry(entry: Entry, name: str, schema: int) -> None:
    where = f"{name}: {entry.type} {entry.path!r}"
    if not 0 <= entry.mode <= 0o7777:
        raise CorruptObjectError(f"{where}: field 'mode' is {entry.mode}, not permission bits")
    total = 0
    for chunk in entry.chunks:
        if not 0 <= chunk.length <= MAX_CHUNK_LENGTH:
            raise CorruptObjectError(
                f"{where}: chunk {chunk.digest.hex} has length {chunk.length}, "
                f"outside 0..{MAX_CHUNK_LENGTH}"
            )
        total += chunk.length
        if chunk.bases:
            _check_chain(chunk, where, schema)
    if entry.size != total:
        raise CorruptObjectError(
            f"{where}: field 'size' is {entry.size} but its chunks add up to {total} bytes"
        )
    # The whole-file hash of a file of one chunk is that chunk's name, and of
    # an empty file a constant: checked here, without reading anything.
    whole = entry.chunks[0].digest if len(entry.chunks) == 1 else EMPTY if not total else None
    if entry.type == "file" and whole is not None and entry.digest != whole:
        raise CorruptObjectError(
            f"{where}: field 'blake3' is {entry.digest.hex if entry.digest else None}, "
            f"but its bytes hash to {whole.hex}"
        )


def _check_chain(chunk: ChunkRef, where: str, schema: int) -> None:
    what = f"{where}: chunk {chunk.digest.hex}"
    if schema < DELTA_SCHEMA:
        raise CorruptObjectError(f"{what} lists delta bases in a manifest of schema {schema}")
    if len(chunk.bases) >= MAX_CHAIN:
        raise CorruptObjectError(f"{what} has {len(chunk.bases)} delta bases, over {MAX_CHAIN - 1}")
    if len({b.raw for b in (chunk.digest, *chunk.bases)}) != len(chunk.bases) + 1:
        raise CorruptObjectError(f"{what}: its chain of delta bases runs in a circle")


def check_relative_path(path: str) -> str:
    """Refuse paths that could write outside a destination: absolute, '..', empty parts."""
    if not path or "\x00" in path or "\\" in path:
        raise UnsafePathError(f"unsafe path in artifact: {path!r}")
    if path.startswith("/"):
        raise UnsafePathError(f"absolute path in artifact: {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"path with '..', '.' or an empty part in artifact: {path!r}")
    return path


def check_link_target(path: str, target: str) -> str:
    """Refuse a symlink whose target is absolute or resolves outside the artifact's tree."""
    if not target or target.startswith("/") or "\x00" in target:
        raise UnsafePathError(f"symlink {path!r} points outside the artifact ({target!r})")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafePathError(f"symlink {path!r} points outside the artifact ({target!r})")
    return target


def check_entries(entries: tuple[Entry, ...]) -> None:
    """Validate every path and link of a manifest before anything is written."""
    seen: set[str] = set()
    links: set[str] = set()
    for entry in entries:
        check_relative_path(entry.path)
        if entry.path in seen:
            raise UnsafePathError(f"path appears twice in artifact: {entry.path!r}")
        seen.add(entry.path)
        if entry.type == "symlink":
            check_link_target(entry.path, entry.target or "")
            links.add(entry.path)
    # Nothing may sit below a symlink: writing it would follow the link. Nor
    # below a file, which a restore cannot make a directory of.
    files = {e.path for e in entries if e.type == "file"}
    for entry in entries:
        parts = entry.path.split("/")
        for depth in range(1, len(parts)):
            above = "/".join(parts[:depth])
            if above in links:
                raise UnsafePathError(f"path {entry.path!r} lies below a symlink in artifact")
            if above in files:
                raise UnsafePathError(f"path {entry.path!r} lies below the file {above!r}")
    # Each link alone stays inside, but a chain can still leave the tree
    # ("a/b -> ../.." then "z -> a/b/.."): resolve every link through the others.
    targets = {e.path: e.target or "" for e in entries if e.type == "symlink"}
    for path, target in targets.items():
        _resolve_inside(targets, path.split("/")[:-1], target, path, 0)


_MAX_LINK_HOPS = 40  # as the kernel's own limit on nested links


def _resolve_inside(
    links: Mapping[str, str], base: list[str], target: str, origin: str, hops: int
) -> list[str]:
    """Resolve ``target`` from directory ``base`` through the artifact's own links.

    Returns the resolved path as parts; raises UnsafePathError if any step goes
    above the root of the artifact or the links loop.
    """
    if hops > _MAX_LINK_HOPS:
        raise UnsafePathError(f"symlink {origin!r} is part of a loop of links")
    parts = list(base)
    for component in target.split("/"):
        if component in ("", "."):
            continue
        if component == "..":
            if not parts:
                raise UnsafePathError(
                    f"symlink {origin!r} leads outside the artifact through other links"
                )
            parts.pop()
            continue
        parts.append(component)
        joined = "/".join(parts)
        if joined in links:
            parts = _resolve_inside(links, parts[:-1], links[joined], origin, hops + 1)
    return parts
