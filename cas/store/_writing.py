"""A put: what it records about the new version, and how it commits it.

Chunks first, then the manifest, then the version ref, created only if
absent. That last write is the commit point: a crash before it leaves only
unreferenced objects, which garbage collection reclaims; garbage collection
cannot take what the ref names (see docs/gc.md and :mod:`cas.gc._session`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..backends import Backend
from ..chunks._listing import ChunkIndex, expected_chunks
from ..chunks._listing import plan_in_background as plan_index
from ..chunks._store import ChunkStore
from ..digest import Digest
from ..errors import (
    AlreadyExistsError,
    CasError,
    ConcurrentCollectionError,
    IntegrityError,
    InvalidInputError,
    RefNotFoundError,
    UnsafePathError,
)
from ..gc._session import Clock, WriteSession
from ..repository import _layout as layout
from ..repository._manifest import (
    ArtifactKind,
    DeltaBase,
    Entry,
    Manifest,
    Parent,
    canonical_json,
    check_metric,
)
from ..repository._metadata import ArtifactInfo, Summary
from ..repository._refs import Refs, VersionRef, utc_now
from ._config import StoreConfig
from ._notices import warn_of_kind_change

if TYPE_CHECKING:
    from ..tensors._writer import DeltaMode
    from ..transfer._ingest import Ingestor, SourceItem
    from ._retries import RetryGuard

ProgressFn = Callable[[int], None]
#: A put that loses a reused chunk to a concurrent collection starts over this often.
PUT_ATTEMPTS = 3


@dataclass(frozen=True)
class Record:
    """What a put records about the new version besides its files, checked."""

    key: str
    parents: tuple[str, ...]  # references, as given
    tags: tuple[str, ...]
    metrics: Mapping[str, float]
    metadata: Mapping[str, Any]
    message: str
    artifact: Mapping[str, Any]

    @classmethod
    def of(
        cls,
        key: str,
        *,
        parents: Iterable[str],
        tags: Iterable[str],
        metrics: Mapping[str, float] | None,
        metadata: Mapping[str, Any] | None,
        message: str,
        info: ArtifactInfo | None,
    ) -> Record:
        """The record of ``put``'s arguments; ``info``'s metrics, parents and tags join
        those given, which win on a conflict. Fails on anything malformed."""
        layout.check_key(key)
        if info is not None:
            parents = (*info.parents, *parents)
            tags = (*info.tags, *tags)
            metrics = {**info.metrics, **(metrics or {})}
        checked_tags = tuple(dict.fromkeys(layout.check_tag(t) for t in tags))
        checked = {name: check_metric(name, value) for name, value in (metrics or {}).items()}
        metadata = dict(metadata or {})
        try:
            canonical_json(metadata)
        except (TypeError, ValueError) as err:
            raise InvalidInputError(f"metadata is not JSON-serialisable: {err}") from None
        artifact = info.record() if info is not None else {}
        return cls(key, tuple(parents), checked_tags, checked, metadata, message, artifact)

    def manifest(
        self,
        kind: ArtifactKind,
        parents: tuple[Parent, ...],
        entries: tuple[Entry, ...],
        delta_base: DeltaBase | None = None,
    ) -> Manifest:
        return Manifest(
            delta_base=delta_base,
            key=self.key,
            kind=kind,
            created=utc_now(),
            entries=entries,
            parents=parents,
            tags=self.tags,
            metrics=self.metrics,
            metadata=self.metadata,
            message=self.message,
            artifact=self.artifact,
        )


@dataclass(frozen=True)
class Put:
    """One put: the record, what was found under the path, the parents resolved."""

    record: Record
    kind: ArtifactKind
    items: list[SourceItem]
    parents: tuple[Parent, ...]
    progress: ProgressFn | None
    workers: int
    #: What keeps a retry from duplicating a version (if_changed, a token).
    retry: RetryGuard
    #: Where delta bases come from (see :class:`cas.tensors._writer.TensorWriter`).
    deltas: DeltaMode = "latest"


def write_manifest(backend: Backend, manifest: Manifest) -> Digest:
    """Store a manifest under its id (once: an existing one holds the same bytes)."""
    blob = manifest.to_bytes()
    manifest_id = Digest.of(blob)
    with contextlib.suppress(AlreadyExistsError):
        backend.put(layout.manifest_key(manifest_id), blob, if_absent=True)
    return manifest_id


@dataclass(frozen=True)
class VersionWriter:
    """Commits new versions to a store: chunks, then the manifest, then the ref."""

    backend: Backend
    config: StoreConfig
    refs: Refs
    clock: Clock
    load_manifest: Callable[[Digest], Manifest]
    describe: Callable[[VersionRef], Summary]

    def commit(self, put: Put) -> tuple[VersionRef, Manifest]:
        """Store ``put`` as the next version of its key; the new ref and its manifest."""
        attempt = 1
        while True:
            try:
                return self._attempt(put)
            except ConcurrentCollectionError:
                # A collection removed a chunk this put was reusing, before
                # anything was committed; a new attempt uploads it again.
                if attempt == PUT_ATTEMPTS:
                    raise
                attempt += 1

    def _attempt(self, put: Put) -> tuple[VersionRef, Manifest]:
        from ..transfer._ingest import build_entries

        workers, parents = put.workers, put.parents
        session = WriteSession(self.backend, clock=self.clock, workers=workers).start()
        index = None
        # The latest version's manifest is read beside the files, not before them.
        latest = ThreadPoolExecutor(1, thread_name_prefix="cas-latest")
        try:
            # One listing of chunks/ instead of a stat per chunk, when cheaper.
            sizes = (item.size for item in put.items if item.type == "file")
            expected = expected_chunks(sizes, self.config.chunker)
            index = plan_index(self.backend, expected, workers=workers)
            parent_manifests = [self.load_manifest(p.manifest_id) for p in parents]
            ingestor = self.ingestor(
                session,
                index,
                parents,
                parent_manifests,
                latest.submit(self.latest_manifest, put.record.key, parents),
                put.progress,
                workers,
                deltas=put.deltas,
            )
            former_kind = latest.submit(self.former_kind, put.record.key)
            entries = build_entries(put.items, ingestor)
            assert ingestor.tensors is not None
            source = ingestor.tensors.delta_source
            delta_base = DeltaBase(*source) if source is not None else None
            manifest = put.record.manifest(put.kind, parents, entries, delta_base)
            unchanged = put.retry.unchanged(manifest, self.load_manifest)
            if unchanged is not None:
                return unchanged  # nothing new to commit: the latest version is this one
            ref = self.commit_manifest(session, manifest, former_kind, put.retry.token)
            return ref, manifest
        finally:
            latest.shutdown(wait=True)
            if index is not None:
                index.close()
            session.close()

    def ingestor(
        self,
        session: WriteSession,
        index: ChunkIndex | None,
        parents: tuple[Parent, ...],
        parent_manifests: list[Manifest],
        latest_manifest: Future[Sequence[tuple[Manifest, int]]],
        progress: ProgressFn | None,
        workers: int,
        *,
        deltas: DeltaMode = "latest",
    ) -> Ingestor:
        """The pipeline that stores a version's chunks under ``session``'s protection;
        ``deltas`` says where delta bases come from (see :class:`Put`)."""
        from ..tensors._writer import TensorWriter
        from ..transfer._ingest import FormerFiles, Ingestor

        chunks = ChunkStore(
            self.backend,
            level=self.config.zstd_level,
            refresh_after=session.refresh_after,
            index=index,
        )
        numbered = [(m, p.version) for m, p in zip(parent_manifests, parents, strict=True)]
        return Ingestor(
            chunks,
            self.config.chunker,
            workers=workers,
            progress=progress,
            reference_time=session.reference_time,
            observer=session.observe,
            previous=FormerFiles(parent_manifests, latest_manifest).find,
            tensors=TensorWriter(
                chunks,
                self.config.chunker,
                # Delta bases come from the parents' versions of the same files,
                # else from the latest version's.
                parents=numbered,
                latest=latest_manifest,
                max_reads=self.config.max_delta_reads,
                level=self.config.zstd_level,
                fse=self.config.holds_fse,
                method=self.config.delta_codec,
                deltas=deltas,
            ),
        )

    def commit_manifest(
        self,
        session: WriteSession,
        manifest: Manifest,
        former_kind: Future[tuple[int, str] | None],
        token: str | None,
        *,
        stacklevel: int = 6,
    ) -> VersionRef:
        """Write the manifest and create the version ref: the commit, once every object
        ``session`` recorded is durable and within the grace of garbage collection.
        ``stacklevel`` counts the frames from here up to the caller a warning names."""
        manifest_id = write_manifest(self.backend, manifest)
        session.adopt(layout.manifest_key(manifest_id))
        session.before_commit()
        self.backend.flush()  # chunks and manifest durable before the ref names them
        summary = Summary.of_manifest(manifest).for_ref()
        former = former_kind.result()  # read before this version exists
        ref = session.commit(  # the commit point
            lambda: self.refs.create_next(manifest.key, manifest_id, summary=summary, token=token),
            self.refs.mark_deleted,
        )
        # By default the warning points at the caller of Store.put, five frames up.
        warn_of_kind_change(ref, former, manifest.kind, stacklevel=stacklevel)
        return ref

    def former_kind(self, key: str) -> tuple[int, str] | None:
        """The number and kind of the key's latest version before a put, if it has one."""
        try:
            latest = self.refs.latest(key)
            return latest.number, self.describe(latest).kind
        except CasError:
            return None  # none, or unreadable: not worth failing the put over a warning

    def latest_manifest(
        self, key: str, parents: tuple[Parent, ...], number: int | None = None
    ) -> Sequence[tuple[Manifest, int]]:
        """The key's latest version unless a parent: what a new version of a key most
        often reuses (its chains spare a header read per reused chunk), and its delta
        base when the put names no parent. ``number`` pins which version counts as the
        latest (the writers of one version in parts must agree); none if deleted since."""
        try:
            latest = self.refs.latest(key) if number is None else self.refs.read_live(key, number)
        except RefNotFoundError:
            return []
        if latest is None or any(p.manifest_id == latest.manifest_id for p in parents):
            return []
        try:
            return [(self.load_manifest(latest.manifest_id), latest.number)]
        except (IntegrityError, UnsafePathError):
            return []  # a damaged or refused version spares nothing, and blocks no put
