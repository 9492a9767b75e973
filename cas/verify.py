"""Integrity checks over a whole store.

``verify`` reads every version ref and its manifest and checks, with one
listing of ``chunks/``, that every referenced chunk exists. ``deep`` also
reads, decodes and rehashes every referenced chunk, in parallel. The report
names every damaged version and the files in it that are affected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .chunkstore import ChunkStore
from .digest import Digest
from .errors import CasError
from .manifest import Manifest
from .refs import Refs, VersionRef

ProgressFn = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class Damage:
    """One damaged version: why, and which of its files are affected."""

    ref: str
    problem: str
    files: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VerifyReport:
    versions: int
    manifests: int
    chunks_referenced: int
    chunks_read: int
    missing_chunks: tuple[str, ...] = ()
    corrupt_chunks: tuple[str, ...] = ()
    damaged: tuple[Damage, ...] = ()
    deep: bool = False

    @property
    def ok(self) -> bool:
        return not self.damaged

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "deep": self.deep,
            "versions": self.versions,
            "manifests": self.manifests,
            "chunks_referenced": self.chunks_referenced,
            "chunks_read": self.chunks_read,
            "missing_chunks": list(self.missing_chunks),
            "corrupt_chunks": list(self.corrupt_chunks),
            "damaged": [
                {"ref": d.ref, "problem": d.problem, "files": list(d.files)} for d in self.damaged
            ],
        }


@dataclass
class _Usage:
    """Which (version, file) pairs use each chunk."""

    by_chunk: dict[bytes, list[tuple[str, str]]] = field(default_factory=dict)

    def add(self, digest: Digest, ref: str, path: str) -> None:
        self.by_chunk.setdefault(digest.raw, []).append((ref, path))


def iter_live_versions(refs: Refs) -> Iterator[VersionRef]:
    for key, numbers in refs.iter_keys():
        for number in numbers:
            ref = refs.read_version(key, number)
            if not ref.deleted:
                yield ref


def verify_store(
    refs: Refs,
    chunks: ChunkStore,
    load_manifest: Callable[[Digest], Manifest],
    *,
    deep: bool = False,
    workers: int = 4,
    progress: ProgressFn | None = None,
) -> VerifyReport:
    usage = _Usage()
    damaged: dict[str, Damage] = {}
    versions = 0
    manifests: set[bytes] = set()
    for ref in iter_live_versions(refs):
        versions += 1
        label = f"{ref.key}@{ref.number}"
        assert ref.manifest_id is not None
        try:
            manifest = load_manifest(ref.manifest_id)
        except CasError as err:
            damaged[label] = Damage(label, f"manifest {ref.manifest_id.hex}: {err}")
            continue
        manifests.add(ref.manifest_id.raw)
        for entry in manifest.entries:
            for chunk in entry.chunks:
                usage.add(chunk.digest, label, entry.path)

    present = {digest.raw for digest, _ in chunks.list()}
    missing = [raw for raw in usage.by_chunk if raw not in present]
    corrupt: list[bytes] = []
    read = 0
    if deep:
        to_read = [raw for raw in usage.by_chunk if raw in present]
        read = len(to_read)

        def check(raw: bytes) -> bytes | None:
            try:
                data = chunks.get(Digest(raw))
            except CasError:
                return raw
            if progress is not None:
                progress(len(data))
            return None

        with ThreadPoolExecutor(workers, thread_name_prefix="cas-verify") as pool:
            corrupt = [raw for raw in pool.map(check, to_read) if raw is not None]

    for problem, raws in (("missing chunk", missing), ("corrupt chunk", corrupt)):
        for raw in raws:
            for label, path in usage.by_chunk[raw]:
                old = damaged.get(label)
                files = tuple(sorted({*(old.files if old else ()), path}))
                text = old.problem if old else f"{problem} {raw.hex()}"
                damaged[label] = Damage(label, text, files)

    return VerifyReport(
        versions=versions,
        manifests=len(manifests),
        chunks_referenced=len(usage.by_chunk),
        chunks_read=read,
        missing_chunks=tuple(sorted(r.hex() for r in missing)),
        corrupt_chunks=tuple(sorted(r.hex() for r in corrupt)),
        damaged=tuple(damaged[k] for k in sorted(damaged)),
        deep=deep,
    )
