"""Integrity checks over a whole store, and the repair of corrupt chunks.

``verify`` reads every version ref and its manifest and checks, with one
listing of ``chunks/``, that every referenced chunk exists, delta bases
included. ``deep`` also reads, decodes and rehashes every referenced chunk,
in parallel, a delta chunk through its whole chain; ``sample`` does that for
a random share of them only. The report names every damaged
version and the files in it that are affected.

``repair`` moves each corrupt chunk out of the way, to ``quarantine/``: it
is never deleted silently, and once its name is free, putting the same
content again (any file that contains it) stores a good copy and heals every
version that needs it. The report lists those versions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..chunks._store import ChunkStore
from ..digest import Digest
from ..errors import (
    CasError,
    IntegrityError,
    InvalidInputError,
    MismatchedObjectError,
    MissingObjectError,
    NotFoundError,
    RefNotFoundError,
)
from ..repository import _layout as layout
from ..repository._live import LiveVersions
from ..repository._manifest import ChunkRef, Manifest
from ..repository._metadata import check_ref
from ..repository._refs import Refs, VersionRef
from ._files import FileKey, hash_files

ProgressFn = Callable[[int], None]
#: Where repair puts corrupt chunks; outside chunks/, so gc never sees them.
QUARANTINE = "quarantine/"


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
    #: Chunks whose header disagrees with a manifest listing them (length, delta base).
    mismatched_chunks: tuple[str, ...] = ()
    #: Files whose bytes do not hash to the BLAKE3 their manifest records.
    mismatched_files: tuple[str, ...] = ()
    damaged: tuple[Damage, ...] = ()
    deep: bool = False
    #: Percentage of chunks read when sampling, else None.
    sample: float | None = None
    #: Corrupt chunk hex -> the quarantine key it was moved to.
    quarantined: tuple[tuple[str, str], ...] = ()
    #: Versions that heal when the content of their damaged files is put again.
    reput: tuple[str, ...] = ()
    #: How the catalog of versions disagreed with the refs (it was then rebuilt), if it did.
    catalog_problem: str | None = None

    @property
    def ok(self) -> bool:
        return not self.damaged and self.catalog_problem is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "deep": self.deep,
            "sample": self.sample,
            "versions": self.versions,
            "manifests": self.manifests,
            "chunks_referenced": self.chunks_referenced,
            "chunks_read": self.chunks_read,
            "missing_chunks": list(self.missing_chunks),
            "corrupt_chunks": list(self.corrupt_chunks),
            "mismatched_chunks": list(self.mismatched_chunks),
            "mismatched_files": list(self.mismatched_files),
            "damaged": [
                {"ref": d.ref, "problem": d.problem, "files": list(d.files)} for d in self.damaged
            ],
            "quarantined": [{"chunk": c, "moved_to": k} for c, k in self.quarantined],
            "reput": list(self.reput),
            "catalog_problem": self.catalog_problem,
        }


@dataclass
class _Survey:
    """What the live versions need: which (version, file) pairs use each chunk, and
    each file of several chunks.

    A chunk is counted as its manifests describe it (hash, length, chain):
    one that two manifests describe differently is read once for each.
    """

    by_chunk: dict[ChunkRef, list[tuple[str, str]]] = field(default_factory=dict)
    files: dict[FileKey, list[tuple[str, str]]] = field(default_factory=dict)
    damaged: dict[str, Damage] = field(default_factory=dict)
    versions: int = 0
    manifests: set[bytes] = field(default_factory=set)

    def add(self, ref: VersionRef, manifest: Manifest | CasError) -> None:
        self.versions += 1
        if isinstance(manifest, CasError):
            problem = str(manifest)
            if ref.manifest_id.hex not in problem:
                problem = f"manifest {ref.manifest_id.hex}: {problem}"
            self.damaged[ref.label] = Damage(ref.label, problem)
            return
        self.manifests.add(ref.manifest_id.raw)
        for entry, chunk in manifest.chunk_reads():
            self.by_chunk.setdefault(chunk, []).append((ref.label, entry.path))
        for entry in manifest.entries:
            if len(entry.chunks) > 1 and entry.digest is not None:
                key = (entry.digest, entry.chunks)
                self.files.setdefault(key, []).append((ref.label, entry.path))

    def unreadable(self, label: str, error: IntegrityError) -> None:
        self.damaged[label] = Damage(label, f"ref: {error}")

    def record(self, problems: dict[str, list[ChunkRef]], files: list[FileKey]) -> None:
        """Per damaged version: the chunks (or files) behind each kind of problem, and the
        files hit."""
        hits = [
            (label, path, problem, chunk.digest.hex)
            for problem, bad in problems.items()
            for chunk in bad
            for label, path in self.by_chunk[chunk]
        ]
        hits += [(label, path, "hash", path) for key in files for label, path in self.files[key]]
        found_by_label: dict[str, dict[str, set[str]]] = {}
        files_by_label: dict[str, set[str]] = {}
        for label, path, problem, subject in hits:
            found_by_label.setdefault(label, {}).setdefault(problem, set()).add(subject)
            files_by_label.setdefault(label, set()).add(path)
        for label, found_here in found_by_label.items():
            paths = tuple(sorted(files_by_label[label]))
            self.damaged[label] = Damage(label, _describe(found_here), paths)


def _survey(refs: Refs, load_manifest: Callable[[Digest], Manifest], workers: int) -> _Survey:
    """Every live version's manifest; what cannot be read is recorded as damage, not raised."""
    survey = _Survey()

    def read(ref: VersionRef) -> Manifest | CasError:
        # Checked whole as a get checks it: paths, numbers, and against its ref.
        try:
            manifest = load_manifest(ref.manifest_id)
            check_ref(ref, manifest, name=f"manifest {ref.manifest_id.hex}")
        except CasError as err:
            return err
        return manifest

    live = LiveVersions(refs, read, workers=workers, on_unreadable=survey.unreadable)
    for ref, manifest in live:
        survey.add(ref, manifest)
    if live.tags:
        _check_tags(refs, survey)
    return survey


def _check_tags(refs: Refs, survey: _Survey) -> None:
    """Record the tags a get could not follow: malformed, or naming no version ever made."""
    for info in refs.backend.list_objects(layout.REFS):
        parsed = layout.parse_ref_key(info.key)
        if parsed is None or parsed.tag is None:
            continue
        label = f"{parsed.key}:{parsed.tag}"
        try:
            number = refs.read_tag(parsed.key, parsed.tag)
        except IntegrityError as err:
            survey.damaged[label] = Damage(label, f"tag: {err}")
            continue
        except RefNotFoundError:
            continue  # removed while we listed
        try:
            refs.read_version(parsed.key, number)  # a deleted version is no damage
        except IntegrityError:
            continue  # the version's own damage is reported as such
        except RefNotFoundError:
            problem = f"tag names {parsed.key}@{number}, which does not exist"
            survey.damaged[label] = Damage(label, problem)


def _check_options(deep: bool, sample: float | None, repair: bool) -> None:
    if sample is not None and not 0 < sample <= 100:
        raise InvalidInputError.naming(
            "{sample} takes a percentage in (0, 100], got {got:g}", sample="sample", got=sample
        )
    if repair and not deep and sample is None:
        raise InvalidInputError.naming(
            "{repair} needs {deep} or {sample}: only reading finds corruption",
            repair="repair",
            deep="deep",
            sample="sample",
        )


def verify_store(
    refs: Refs,
    chunks: ChunkStore,
    load_manifest: Callable[[Digest], Manifest],
    *,
    deep: bool = False,
    sample: float | None = None,
    repair: bool = False,
    workers: int = 4,
    progress: ProgressFn | None = None,
    rng: random.Random | None = None,
) -> VerifyReport:
    """Check the store; ``sample`` (a percentage) reads that share of chunks.

    ``repair`` needs ``deep`` or ``sample``: only reading a chunk shows that
    it is corrupt.
    """
    _check_options(deep, sample, repair)
    survey = _survey(refs, load_manifest, workers)
    present = {digest.raw for digest, _ in chunks.list_chunks()}
    missing = [c for c in survey.by_chunk if c.digest.raw not in present]
    reading = _Reading()
    if deep or sample is not None:
        reading = _read(chunks, survey, present, sample, workers, progress, rng)
    missing += reading.of("missing")
    corrupt = reading.of("corrupt")
    mismatched = reading.of("mismatched")
    problems = {"missing": missing, "corrupt": corrupt, "mismatched": mismatched}
    survey.record(problems, reading.mismatched_files)
    quarantined: list[tuple[str, str]] = []
    reput: set[str] = set()
    if repair:
        # Only a chunk corrupt in itself: one that disagrees with a manifest may be
        # whole, and a file's hash is the manifest's word.
        quarantined = _quarantine_all(chunks, corrupt)
        # A missing chunk heals the same way as a quarantined one.
        for chunk in (*missing, *corrupt):
            reput.update(label for label, _ in survey.by_chunk[chunk])
    return VerifyReport(
        versions=survey.versions,
        manifests=len(survey.manifests),
        chunks_referenced=len(survey.by_chunk),
        chunks_read=len(reading.read),
        missing_chunks=_hexes(missing),
        corrupt_chunks=_hexes(corrupt),
        mismatched_chunks=_hexes(mismatched),
        mismatched_files=tuple(
            sorted({path for key in reading.mismatched_files for _, path in survey.files[key]})
        ),
        damaged=tuple(survey.damaged[k] for k in sorted(survey.damaged)),
        deep=deep or sample is not None,
        sample=sample,
        quarantined=tuple(sorted(quarantined)),
        reput=tuple(sorted(reput)),
    )


@dataclass
class _Reading:
    """What reading the chunks and files found."""

    #: The chunks read, as the manifests describe them.
    read: set[ChunkRef] = field(default_factory=set)
    #: (chunk, "missing" | "corrupt" | "mismatched") for each bad one.
    found: list[tuple[ChunkRef, str]] = field(default_factory=list)
    mismatched_files: list[FileKey] = field(default_factory=list)

    def of(self, problem: str) -> list[ChunkRef]:
        return [chunk for chunk, found in self.found if found == problem]


def _read(
    chunks: ChunkStore,
    survey: _Survey,
    present: set[bytes],
    sample: float | None,
    workers: int,
    progress: ProgressFn | None,
    rng: random.Random | None,
) -> _Reading:
    """Read every chunk (or a sample of ``sample`` percent), and without a sample every
    file of several chunks whole, as a get hashes it: a chunk a file read is not read again."""
    reading = _Reading()
    to_read = [c for c in survey.by_chunk if c.digest.raw in present]
    if sample is not None and sample < 100:
        count = math.ceil(len(to_read) * sample / 100)
        to_read = (rng or random.Random()).sample(to_read, count)
    elif sample is None:
        skip = {c.digest.raw for c in survey.by_chunk if c.digest.raw not in present}
        check = hash_files(chunks, survey.files, skip=skip, workers=workers, progress=progress)
        reading.mismatched_files = check.mismatched
        reading.read = check.verified & survey.by_chunk.keys()
        to_read = [c for c in to_read if c not in check.verified]
    reading.read.update(to_read)
    reading.found = _read_all(chunks, to_read, workers, progress)
    return reading


def _hexes(chunks: list[ChunkRef]) -> tuple[str, ...]:
    return tuple(sorted({c.digest.hex for c in chunks}))


def _quarantine_all(chunks: ChunkStore, corrupt: list[ChunkRef]) -> list[tuple[str, str]]:
    quarantined = []
    for chunk in corrupt:
        moved = quarantine_chunk(chunks, chunk)
        if moved is not None:
            quarantined.append((chunk.digest.hex, moved))
    return quarantined


def _read_all(
    chunks: ChunkStore, refs: list[ChunkRef], workers: int, progress: ProgressFn | None
) -> list[tuple[ChunkRef, str]]:
    """Read and rehash chunks in parallel; (chunk, kind of problem) for the bad ones."""

    def check(chunk: ChunkRef) -> tuple[ChunkRef, str] | None:
        try:
            data = chunks.read(chunk)
        except MissingObjectError:
            return chunk, "missing"  # removed after the listing
        except MismatchedObjectError:
            return chunk, "mismatched"
        except IntegrityError:
            return chunk, "corrupt"
        if progress is not None:
            progress(len(data))
        return None

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="cas-verify") as pool:
        return [bad for bad in pool.map(check, refs) if bad is not None]


def quarantine_chunk(chunks: ChunkStore, chunk: ChunkRef) -> str | None:
    """Move a corrupt chunk to ``quarantine/``; its key, or None if it was gone or is fine now.

    The stored bytes are copied first and the chunk deleted only after it
    is read and found corrupt once more, so a good copy that a concurrent put
    stored meanwhile is left alone.
    """
    backend = chunks.backend
    key = layout.chunk_key(chunk.digest)
    try:
        blob = backend.get(key)
    except NotFoundError:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = f"{QUARANTINE}{key}.{stamp}"
    backend.put(target, blob)
    try:
        chunks.read(chunk)
    except MissingObjectError:
        return target
    except IntegrityError:
        backend.delete([key])
        return target
    backend.delete([target])  # healed meanwhile: nothing to move
    return None


#: How each kind of damage reads: for one (chunk hash or file path), and for several.
_PHRASES = {
    "missing": ("missing chunk {}", "{} missing chunks (first {})"),
    "corrupt": ("corrupt chunk {}", "{} corrupt chunks (first {})"),
    "mismatched": (
        "chunk {} disagrees with the manifest (length or delta base)",
        "{} chunks disagree with the manifest (first {})",
    ),
    "hash": (
        "file {!r} does not match its recorded BLAKE3",
        "{} files do not match their recorded BLAKE3 (first {!r})",
    ),
}


def _describe(problems: dict[str, set[str]]) -> str:
    """'missing chunk <h>' for one chunk; counts and the first one for several."""
    parts = []
    for problem, (one, several) in _PHRASES.items():
        subjects = sorted(problems.get(problem, ()))
        if len(subjects) == 1:
            parts.append(one.format(subjects[0]))
        elif subjects:
            parts.append(several.format(len(subjects), subjects[0]))
    return ", ".join(parts)
