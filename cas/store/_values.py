"""What the Store hands back: immutable, typed results with JSON forms.

``Reclaimable`` is made by the gc layer, which counts what is live.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..gc._usage import Reclaimable
from ..repository._manifest import Entry, Manifest
from ..repository._metadata import ArtifactInfo, Summary
from ..repository._refs import VersionRef


@dataclass(frozen=True, slots=True, kw_only=True)
class Version(Summary):
    """One committed version of a key, as users see it.

    What the version is (kind, size, files, parents, metrics, metadata,
    message, typed ``artifact`` fields) is its :class:`Summary`; a version
    adds its name, its manifest and when it was committed, and carries its
    current tags. A version is identified by its key, number and manifest.
    """

    key: str
    number: int
    manifest_id: str
    created: str

    @classmethod
    def of(cls, ref: VersionRef, summary: Summary, tags: Iterable[str]) -> Version:
        """The version ``ref`` names, described by ``summary``, with its current ``tags``."""
        described = summary.described()
        described["tags"] = tuple(tags)
        return cls(
            **described,
            key=ref.key,
            number=ref.number,
            manifest_id=ref.manifest_id.hex,
            created=ref.created,
        )

    @property
    def ref(self) -> str:
        return f"{self.key}@{self.number}"

    @property
    def info(self) -> ArtifactInfo:
        """The typed artifact record of this version (type, job, metrics, lineage...)."""
        return ArtifactInfo.from_record(
            self.artifact,
            metrics=self.metrics,
            created=self.created,
            version=self.number,
            parents=self.parents,
            tags=self.tags,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "key": self.key,
            "version": self.number,
            "manifest": self.manifest_id,
            "created": self.created,
            **Summary.to_dict(self),
        }


@dataclass(frozen=True, slots=True)
class Storage:
    """How a version's chunks are stored: how many are deltas, and of what."""

    chunks: int  # distinct chunks of its files
    delta_chunks: int  # how many of them are stored as deltas of other chunks
    #: The version whose chunks the deltas were coded against (``KEY@N``), as
    #: recorded when they were written; None when none is recorded.
    delta_base: str | None = None
    max_reads: int = 1  # chunk reads to rebuild its costliest chunk

    @classmethod
    def of_manifest(cls, manifest: Manifest) -> Storage:
        chains = {c.digest.raw: c.bases for e in manifest.entries for c in e.chunks}
        deltas = [bases for bases in chains.values() if bases]
        base = manifest.delta_base
        return cls(
            chunks=len(chains),
            delta_chunks=len(deltas),
            delta_base=str(base) if base is not None and deltas else None,
            max_reads=1 + max(map(len, deltas), default=0),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "chunks": self.chunks,
            "delta_chunks": self.delta_chunks,
            "delta_base": self.delta_base,
            "max_reads": self.max_reads,
        }


@dataclass(frozen=True, slots=True)
class Details:
    """A version, the entries of its manifest, and how its chunks are stored."""

    version: Version
    entries: tuple[Entry, ...]
    storage: Storage = field(default_factory=lambda: Storage(0, 0))


@dataclass(frozen=True, slots=True)
class KeySummary:
    """One key of a store: how many live versions it has, and its latest."""

    key: str
    versions: int
    latest: Version


@dataclass(frozen=True, slots=True)
class Stats:
    """Sizes and counts of a whole store (``cas stats``)."""

    keys: int
    versions: int
    logical_bytes: int  # sum of the sizes of all live versions
    unique_bytes: int  # raw bytes of the distinct chunks they name
    stored_bytes: int  # bytes of every object under chunks/ and manifests/
    chunks: int  # chunk objects in the store
    referenced_chunks: int  # distinct chunks live versions name or need as delta bases
    # stored bytes of the chunks (delta bases included) and manifests live
    # versions need: what the store would hold after a full garbage collection
    live_bytes: int = 0
    # stored bytes of chunks kept only as delta bases of live versions' chunks
    # (their own versions deleted): part of live_bytes that no collection frees
    delta_base_bytes: int = 0
    # about what re-storing those deltas whole would free
    repack_frees_bytes: int = 0
    delta_chunks: int = 0  # needed chunks stored as deltas of other chunks
    delta_bytes: int = 0  # their stored bytes
    base_chunks: int = 0  # distinct chunks those deltas are coded against

    @property
    def version_bytes(self) -> int:
        """Stored bytes of the chunks and manifests live versions name themselves."""
        return self.live_bytes - self.delta_base_bytes

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_bytes / self.stored_bytes if self.stored_bytes else 1.0

    @property
    def total_ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "keys": self.keys,
            "versions": self.versions,
            "logical_bytes": self.logical_bytes,
            "unique_bytes": self.unique_bytes,
            "stored_bytes": self.stored_bytes,
            "chunks": self.chunks,
            "referenced_chunks": self.referenced_chunks,
            "live_bytes": self.live_bytes,
            "version_bytes": self.version_bytes,
            "delta_base_bytes": self.delta_base_bytes,
            "repack_frees_bytes": self.repack_frees_bytes,
            "delta_chunks": self.delta_chunks,
            "delta_bytes": self.delta_bytes,
            "base_chunks": self.base_chunks,
            "dedup_ratio": round(self.dedup_ratio, 4),
            "compression_ratio": round(self.compression_ratio, 4),
            "total_ratio": round(self.total_ratio, 4),
        }


__all__ = ["Details", "KeySummary", "Reclaimable", "Stats", "Version"]


@dataclass(frozen=True)
class Restored:
    """What a get or an update wrote, and where its bytes came from.

    ``fetched_bytes`` are stored (compressed) bytes requested from the store,
    ``cached_bytes`` those taken from the local chunk cache instead. An
    update also counts raw bytes: ``reused_bytes`` that DEST held already,
    ``missing_bytes`` that it did not (and were fetched or found cached).
    """

    version: Version
    dest: str
    fetched_bytes: int = 0
    fetched_chunks: int = 0
    cached_bytes: int = 0
    cached_chunks: int = 0
    reused_bytes: int = 0
    reused_chunks: int = 0
    missing_bytes: int = 0
    missing_chunks: int = 0
    #: An update: files left as they were, rewritten, removed, and left over.
    files_kept: int = 0
    files_written: int = 0
    files_removed: int = 0
    files_extra: int = 0
    update: bool = False
    #: Files hard-linked from the local cache instead of written (``link``).
    linked_files: int = 0
    linked_bytes: int = 0
    link: bool = False

    def to_dict(self) -> dict[str, Any]:
        counts = {
            name: getattr(self, name)
            for name in ("fetched_bytes", "fetched_chunks", "cached_bytes", "cached_chunks")
        }
        if self.link:
            counts.update(linked_files=self.linked_files, linked_bytes=self.linked_bytes)
        if self.update:
            counts.update(
                reused_bytes=self.reused_bytes,
                reused_chunks=self.reused_chunks,
                missing_bytes=self.missing_bytes,
                missing_chunks=self.missing_chunks,
                files_kept=self.files_kept,
                files_written=self.files_written,
                files_removed=self.files_removed,
                files_extra=self.files_extra,
            )
        return {**self.version.to_dict(), "dest": self.dest, **counts}
