"""What changed between two versions: files, tensors inside tensor files, and bytes.

Files are compared by their recorded BLAKE3, so no data is read for them.
For a safetensors, torch.save or numpy file that changed, the structure of
each side is read (a safetensors header; a zip's directory and pickle), and
for a file of a version written in parts (a distributed checkpoint's rank
file) the version's tensor index tells where its tensors lie; each tensor
is then compared: first by the chunks that cover it (identical chunk
runs at the same offset mean identical bytes, read nothing), and only when
that cannot decide, by hashing the tensor's bytes.
Byte counts are over distinct chunks: ``shared`` bytes are already in the
old version, ``new`` bytes are what the new version added to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..repository._manifest import Entry, Manifest
from ..tensors._formats import parse
from ..tensors._index import find_index, read_index
from ..tensors._safetensors import ChunkCache, StoredFile, TensorInfo

if TYPE_CHECKING:
    from ..store import Store

#: Files whose tensors a diff compares: safetensors, torch.save and numpy files by their
#: usual names (a put recognises them by their bytes; a diff, to read nothing of other
#: files, by their names).
TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npy", ".npz")


@dataclass(frozen=True)
class TensorDiff:
    """Tensors of one safetensors file, old side against new side."""

    changed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    unchanged: int = 0
    metadata_changed: bool = False
    error: str | None = None  # why tensors could not be compared

    def to_dict(self) -> dict[str, Any]:
        return {
            "changed": list(self.changed),
            "added": list(self.added),
            "removed": list(self.removed),
            "unchanged": self.unchanged,
            "metadata_changed": self.metadata_changed,
            "error": self.error,
        }


@dataclass(frozen=True)
class FileChange:
    path: str
    status: str  # "added", "removed", "changed"
    old_size: int | None = None
    new_size: int | None = None
    old_path: str | None = None  # a single-file artifact stored under another name
    tensors: TensorDiff | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "status": self.status,
            "old_size": self.old_size,
            "new_size": self.new_size,
        }
        if self.old_path is not None:
            out["old_path"] = self.old_path
        if self.tensors is not None:
            out["tensors"] = self.tensors.to_dict()
        return out


@dataclass(frozen=True)
class DiffReport:
    old: str
    new: str
    changes: tuple[FileChange, ...] = ()
    unchanged: int = 0
    shared_bytes: int = 0  # bytes of distinct chunks of the new version also in the old one
    new_bytes: int = 0  # bytes of distinct chunks of the new version not in the old one
    dropped_bytes: int = 0  # bytes of distinct chunks of the old version not in the new one
    metrics: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)

    def of_status(self, status: str) -> list[FileChange]:
        return [c for c in self.changes if c.status == status]

    def to_dict(self) -> dict[str, Any]:
        return {
            "old": self.old,
            "new": self.new,
            "added": [c.to_dict() for c in self.of_status("added")],
            "removed": [c.to_dict() for c in self.of_status("removed")],
            "changed": [c.to_dict() for c in self.of_status("changed")],
            "unchanged": self.unchanged,
            "shared_bytes": self.shared_bytes,
            "new_bytes": self.new_bytes,
            "dropped_bytes": self.dropped_bytes,
            "metrics": {k: {"old": a, "new": b} for k, (a, b) in sorted(self.metrics.items())},
        }


def read_tensor_header(reader: StoredFile) -> tuple[dict[str, TensorInfo], Any]:
    """Tensors by name, and the metadata, of a stored safetensors, torch.save or numpy file."""
    header = parse(reader.read, reader.entry.size)
    return {t.name: t for t in header.named}, header.metadata


def diff_tensors(old: StoredFile, new: StoredFile) -> TensorDiff | None:
    """The tensors that changed; None for a file that is not a tensor file cas reads.

    A ``.safetensors`` file is one by its name, so one that does not parse is
    reported as unreadable; a ``.bin`` or ``.pt`` file may hold anything (a
    pickled object, any binary), and is then compared as a whole file.
    """
    try:
        old_tensors, old_meta = read_tensor_header(old)
        new_tensors, new_meta = read_tensor_header(new)
    except (ValueError, KeyError, TypeError) as err:
        if new.entry.path.endswith(".safetensors"):
            return TensorDiff(error=f"not a readable safetensors file ({err})")
        return None
    return compare_tensors(old, old_tensors, new, new_tensors, old_meta != new_meta)


def compare_tensors(
    old: StoredFile,
    old_tensors: Mapping[str, TensorInfo],
    new: StoredFile,
    new_tensors: Mapping[str, TensorInfo],
    metadata_changed: bool = False,
) -> TensorDiff:
    """Tensors of one file on both sides, by name: their chunks first, their bytes if need be."""
    changed, unchanged = [], 0
    for name in sorted(old_tensors.keys() & new_tensors.keys()):
        a, b = old_tensors[name], new_tensors[name]
        if (a.dtype, a.shape, a.strides, a.end - a.start) != (
            b.dtype,
            b.shape,
            b.strides,
            b.end - b.start,
        ):
            changed.append(name)
        elif old.signature(a.start, a.end) == new.signature(b.start, b.end):
            unchanged += 1  # the same chunks at the same offsets: the same bytes, none read
        elif old.digest(a.start, a.end) == new.digest(b.start, b.end):
            unchanged += 1
        else:
            changed.append(name)
    return TensorDiff(
        changed=tuple(changed),
        added=tuple(sorted(new_tensors.keys() - old_tensors.keys())),
        removed=tuple(sorted(old_tensors.keys() - new_tensors.keys())),
        unchanged=unchanged,
        metadata_changed=metadata_changed,
    )


class _Indexes:
    """The tensor indexes of both sides, for files written in parts (distributed checkpoints)."""

    def __init__(self, store: Store, old: Manifest, new: Manifest, labels: tuple[str, str]):
        self.sides = tuple(
            read_index(store.open_file(entry, label=label)) if entry is not None else None
            for entry, label in ((find_index(old), labels[0]), (find_index(new), labels[1]))
        )

    def diff(self, old: StoredFile, new: StoredFile) -> TensorDiff | None:
        """The tensors of a file both indexes describe; None when one does not."""
        old_index, new_index = self.sides
        if old_index is None or new_index is None:
            return None
        if old.entry.path not in old_index.files or new.entry.path not in new_index.files:
            return None
        old_tensors = {t.name: t for t in old_index.shards_in(old.entry.path)}
        new_tensors = {t.name: t for t in new_index.shards_in(new.entry.path)}
        return compare_tensors(old, old_tensors, new, new_tensors)


# -- the diff ---------------------------------------------------------------------------


def _comparable(manifest: Manifest) -> dict[str, Entry]:
    return {e.path: e for e in manifest.entries if e.type in ("file", "symlink")}


def _same(a: Entry, b: Entry) -> bool:
    return (a.type, a.digest, a.target, a.mode) == (b.type, b.digest, b.target, b.mode)


def _chunk_bytes(manifest: Manifest) -> dict[bytes, int]:
    return {c.digest.raw: c.length for e in manifest.entries for c in e.chunks}


def diff_manifests(
    store: Store, old: Manifest, new: Manifest, *, old_label: str, new_label: str
) -> DiffReport:
    old_entries, new_entries = _comparable(old), _comparable(new)
    renamed: dict[str, str] = {}
    if old.kind == new.kind == "file" and len(old_entries) == len(new_entries) == 1:
        # A single-file artifact: compare the file whatever it was called.
        (old_path, entry), (new_path,) = next(iter(old_entries.items())), new_entries
        if old_path != new_path:
            old_entries = {new_path: entry}
            renamed[new_path] = old_path
    # One cache for both sides: their tensors often share chunks.
    cache = ChunkCache()
    indexes = _Indexes(store, old, new, (old_label, new_label))
    changes: list[FileChange] = []
    unchanged = 0
    for path in sorted(old_entries.keys() | new_entries.keys()):
        a, b = old_entries.get(path), new_entries.get(path)
        if a is None and b is not None:
            changes.append(FileChange(path, "added", new_size=b.size))
        elif b is None and a is not None:
            changes.append(FileChange(path, "removed", old_size=a.size))
        elif a is not None and b is not None:
            if _same(a, b) and path not in renamed:
                unchanged += 1
                continue
            tensors = None
            if a.type == b.type == "file" and a.digest != b.digest:
                files = (
                    store.open_file(a, label=old_label, cache=cache),
                    store.open_file(b, label=new_label, cache=cache),
                )
                tensors = indexes.diff(*files)
                if tensors is None and path.endswith(TENSOR_SUFFIXES):
                    tensors = diff_tensors(*files)
            changes.append(FileChange(path, "changed", a.size, b.size, renamed.get(path), tensors))
    old_chunks, new_chunks = _chunk_bytes(old), _chunk_bytes(new)
    names = old.metrics.keys() | new.metrics.keys()
    return DiffReport(
        old=old_label,
        new=new_label,
        changes=tuple(changes),
        unchanged=unchanged,
        shared_bytes=sum(n for d, n in new_chunks.items() if d in old_chunks),
        new_bytes=sum(n for d, n in new_chunks.items() if d not in old_chunks),
        dropped_bytes=sum(n for d, n in old_chunks.items() if d not in new_chunks),
        metrics={k: (old.metrics.get(k), new.metrics.get(k)) for k in names},
    )


def diff(store: Store, old_ref: str, new_ref: str) -> DiffReport:
    """Compare two versions (any refs, of one key or of two)."""
    sides = []
    for text in (old_ref, new_ref):
        ref = store.resolve(text)
        sides.append((ref.label, store.manifest(ref)))
    (old_label, old), (new_label, new) = sides
    return diff_manifests(store, old, new, old_label=old_label, new_label=new_label)
