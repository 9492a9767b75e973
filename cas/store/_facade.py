"""The Store facade: what the CLI and library users talk to.

A put writes chunks, then the manifest, then creates the version ref
only-if-absent. That last write is the commit point: a crash before it leaves
only unreferenced objects, which garbage collection reclaims.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backends import Backend, open_backend
from ..chunks._chunking import ChunkerParams
from ..chunks._listing import expected_chunks
from ..chunks._listing import plan_in_background as plan_index
from ..chunks._store import ChunkStore
from ..digest import Digest
from ..errors import (
    AlreadyExistsError,
    CasError,
    ConcurrentCollectionError,
    CorruptObjectError,
    InvalidInputError,
    MissingObjectError,
    NotFoundError,
    RefNotFoundError,
)
from ..gc._session import (
    SYSTEM_CLOCK,
    Clock,
    GcSettings,
    WriteSession,
    read_settings,
    write_settings,
)
from ..repository import _layout as layout
from ..repository._manifest import Entry, Manifest, Parent, canonical_json, check_metric
from ..repository._metadata import ArtifactInfo, Summary
from ..repository._refs import DeletedRef, Refs, VersionRef, utc_now
from ._config import StoreConfig, default_chunker, load_config, write_config
from ._notices import warn_of_kind_change
from ._values import Details, KeySummary, Reclaimable, Stats, Version

if TYPE_CHECKING:
    # Imported where used: each command pays at start-up for every module
    # it imports, and a get needs none of the put's, nor a put the get's.
    from ..gc._collect import GcReport
    from ..gc._verify import VerifyReport
    from ..tensors._cutting import LocalChunks
    from ..transfer._ingest import SourceItem

ProgressFn = Callable[[int], None]
DEFAULT_STORE = ".cas"
#: How errors of calls that take ``force`` say to pass it (the CLI says ``pass --force``).
FORCE = "pass force=True"
#: A put that loses a reused chunk to a concurrent collection starts over this often.
PUT_ATTEMPTS = 3


class Store:
    """A cas store on any backend. Thread-safe for concurrent puts and gets."""

    def __init__(self, backend: Backend, config: StoreConfig, *, workers: int | None = None):
        self.backend = backend
        self.config = config
        self.refs = Refs(backend)
        self.chunks = ChunkStore(backend, level=config.zstd_level)
        self.workers = workers or backend.concurrency
        #: Local elapsed time for garbage-collection safety; tests inject a fake one.
        self.clock: Clock = SYSTEM_CLOCK

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(
        cls, location: str | os.PathLike[str], *, create: bool = True, **options: Any
    ) -> Store:
        """Open a store; create it with default settings if ``create`` and the location is empty."""
        backend = open_backend(location, **options)
        return cls(backend, load_config(backend, create=create))

    @classmethod
    def init(
        cls,
        location: str | os.PathLike[str],
        *,
        chunker: ChunkerParams | None = None,
        max_delta_reads: int | None = None,
        entropy: str = "huffman",
        create_bucket: bool = False,
        **options: Any,
    ) -> Store:
        """Create a new store; fails if the location already holds one.

        ``entropy="fse"`` codes the exponent streams of tensor chunks with
        FSE: float weights store a little smaller but decode more slowly
        (docs/performance.md, "Tensor-aware storage"), and only a cas that
        reads store format 2 reads the store.
        ``create_bucket`` first creates the bucket or container of a cloud
        location (fine if it exists already).
        """
        config = StoreConfig.create(entropy=entropy)  # a bad name fails before any I/O
        backend = open_backend(location, **options)
        if create_bucket:
            backend.create_bucket()
        config = dataclasses.replace(config, chunker=chunker or default_chunker(backend))
        if max_delta_reads is not None:
            # A chunk stored as a delta is rebuilt from at most this many reads.
            config = dataclasses.replace(config, max_delta_reads=max_delta_reads)
        return cls(backend, write_config(backend, config, exist_ok=False))

    def __repr__(self) -> str:
        return f"Store({self.backend.uri!r})"

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------

    def put(
        self,
        path: str | os.PathLike[str],
        key: str,
        *,
        parents: Iterable[str] = (),
        tags: Iterable[str] = (),
        metrics: Mapping[str, float] | None = None,
        metadata: Mapping[str, Any] | None = None,
        message: str = "",
        progress: ProgressFn | None = None,
        info: ArtifactInfo | None = None,
        workers: int | None = None,
    ) -> Version:
        """Store a file or a directory as the next version of ``key``.

        ``info`` adds typed metadata (type, job, algorithm...); its metrics,
        parents and tags join those given here, which win on a conflict.
        ``workers`` is the number of chunks hashed, compressed and uploaded
        in parallel (default: the store's, from the backend's concurrency).
        """
        workers = self._check_workers(workers)
        layout.check_key(key)
        if info is not None:
            parents = (*info.parents, *parents)
            tags = (*info.tags, *tags)
            metrics = {**info.metrics, **(metrics or {})}
        tags = tuple(dict.fromkeys(layout.check_tag(t) for t in tags))
        metrics = {name: check_metric(name, value) for name, value in (metrics or {}).items()}
        metadata = dict(metadata or {})
        try:
            canonical_json(metadata)
        except (TypeError, ValueError) as err:
            raise InvalidInputError(f"metadata is not JSON-serialisable: {err}") from None
        resolved = tuple(dict.fromkeys(self._parent(p) for p in parents))
        from ..transfer._ingest import scan

        kind, items = scan(Path(path), skip=self.backend.local_root)

        def build(entries: tuple[Entry, ...]) -> Manifest:
            return Manifest(
                key=key,
                kind=kind,
                created=utc_now(),
                entries=entries,
                parents=resolved,
                tags=tags,
                metrics=metrics,
                metadata=metadata,
                message=message,
                artifact=info.record() if info is not None else {},
            )

        for attempt in range(1, PUT_ATTEMPTS + 1):
            try:
                ref, manifest = self._store_version(
                    key, items, build, progress, workers, parents=resolved
                )
                break
            except ConcurrentCollectionError:
                # A collection removed a chunk this put was reusing, before
                # anything was committed; a new attempt uploads it again.
                if attempt == PUT_ATTEMPTS:
                    raise
        for tag in tags:
            self.refs.set_tag(key, tag, ref.number)
        return self._version(ref, manifest, tags)

    def _store_version(
        self,
        key: str,
        items: list[SourceItem],
        build: Callable[[tuple[Entry, ...]], Manifest],
        progress: ProgressFn | None,
        workers: int,
        *,
        parents: tuple[Parent, ...] = (),
    ) -> tuple[VersionRef, Manifest]:
        """Chunks, then the manifest, then the ref; garbage collection cannot take
        what the ref names (see docs/gc.md and :mod:`cas.gc._session`)."""
        from ..tensors._writer import TensorWriter
        from ..transfer._ingest import FormerFiles, Ingestor, build_entries

        session = WriteSession(self.backend, clock=self.clock, workers=workers).start()
        index = None
        # The latest version's manifest is read beside the files, not before them.
        latest = ThreadPoolExecutor(1, thread_name_prefix="cas-latest")
        try:
            # One listing of chunks/ instead of a stat per chunk, when cheaper.
            sizes = (item.size for item in items if item.type == "file")
            expected = expected_chunks(sizes, self.config.chunker)
            index = plan_index(self.backend, expected, workers=workers)
            chunks = ChunkStore(
                self.backend,
                level=self.config.zstd_level,
                refresh_after=session.refresh_after,
                index=index,
            )
            parent_manifests = [self.load_manifest(p.manifest_id) for p in parents]
            latest_manifest = latest.submit(self._latest_manifest, key, parents)
            former_kind = latest.submit(self._former_kind, key)
            ingestor = Ingestor(
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
                    # Delta bases come from the parents' versions of the same files.
                    parents=[
                        (m, p.version) for m, p in zip(parent_manifests, parents, strict=True)
                    ],
                    known=latest_manifest,
                    max_reads=self.config.max_delta_reads,
                    level=self.config.zstd_level,
                    fse=self.config.holds_fse,
                ),
            )
            manifest = build(build_entries(items, ingestor))
            manifest_id = self._write_manifest(manifest)
            session.adopt(layout.manifest_key(manifest_id))
            session.before_commit()
            self.backend.flush()  # chunks and manifest durable before the ref names them
            summary = Summary.of_manifest(manifest).for_ref()
            former = former_kind.result()  # read before this version exists
            ref = self.refs.create_next(key, manifest_id, summary=summary)  # the commit point
            warn_of_kind_change(ref, former, manifest.kind)
        finally:
            latest.shutdown(wait=True)
            if index is not None:
                index.close()
            session.close()
        return ref, manifest

    def _latest_manifest(self, key: str, parents: tuple[Parent, ...]) -> Sequence[Manifest]:
        """The manifest of the key's latest version unless a parent: what a new version
        of a key most often reuses, so its chains spare a header read per reused chunk."""
        try:
            latest = self.refs.latest(key)
        except RefNotFoundError:
            return []
        if any(p.manifest_id == latest.manifest_id for p in parents):
            return []
        return [self.load_manifest(latest.manifest_id)]

    def _former_kind(self, key: str) -> tuple[int, str] | None:
        """The number and kind of the key's latest version before a put, if it has one."""
        try:
            latest = self.refs.latest(key)
            return latest.number, self.summary(latest).kind
        except CasError:
            return None  # none, or unreadable: not worth failing the put over a warning

    def _check_workers(self, workers: int | None) -> int:
        if workers is None:
            return self.workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InvalidInputError.naming(
                "{workers} must be a whole number >= 1, not {got!r}", workers="workers", got=workers
            )
        return workers

    def _write_manifest(self, manifest: Manifest) -> Digest:
        blob = manifest.to_bytes()
        manifest_id = Digest.of(blob)
        # An existing manifest of that name holds identical bytes.
        with contextlib.suppress(AlreadyExistsError):
            self.backend.put(layout.manifest_key(manifest_id), blob, if_absent=True)
        return manifest_id

    def _parent(self, text: str) -> Parent:
        ref = self.resolve(text)
        return Parent(ref.key, ref.number, ref.manifest_id)

    # -- reading -----------------------------------------------------------------

    def resolve(self, text: str) -> VersionRef:
        """Turn ``KEY``, ``KEY@N`` or ``KEY:TAG`` into a live version ref."""
        reference = layout.parse_ref(text)
        if reference.tag is not None:
            number = self.refs.read_tag(reference.key, reference.tag)
            ref = self.refs.read_version(reference.key, number)
            if isinstance(ref, DeletedRef):
                raise RefNotFoundError(f"tag {text} points at deleted version {number}")
            return ref
        if reference.version is not None:
            ref = self.refs.read_version(reference.key, reference.version)
            if isinstance(ref, DeletedRef):
                raise RefNotFoundError(f"version {text} was deleted")
            return ref
        return self.refs.latest(reference.key)

    def load_manifest(self, manifest_id: Digest) -> Manifest:
        key = layout.manifest_key(manifest_id)
        try:
            blob = self.backend.get(key)
        except NotFoundError:
            raise MissingObjectError(f"manifest {manifest_id.hex} is missing") from None
        if Digest.of(blob) != manifest_id:
            raise CorruptObjectError(f"manifest {manifest_id.hex} does not match its hash")
        return Manifest.from_bytes(blob, name=f"manifest {manifest_id.hex}")

    def get(
        self,
        ref: str,
        dest: str | os.PathLike[str],
        *,
        force: bool = False,
        progress: ProgressFn | None = None,
        workers: int | None = None,
    ) -> Version:
        """Restore a version to ``dest`` (a file path or a directory), verified.

        ``workers`` is the number of chunks downloaded in parallel (default: the store's).
        """
        workers = self._check_workers(workers)
        self._refuse_replacing_self(Path(dest))
        version_ref = self.resolve(ref)
        manifest = self.load_manifest(version_ref.manifest_id)
        from ..transfer._restore import Restorer

        restorer = Restorer(self.chunks, workers=workers, progress=progress)
        label = f"{version_ref.key}@{version_ref.number}"
        restorer.restore(manifest, Path(dest), label=label, force=force)
        return self._version(version_ref, manifest)

    def _refuse_replacing_self(self, dest: Path) -> None:
        """A forced restore replaces DEST whole: never when DEST holds this store."""
        store_root = self.backend.local_root
        if store_root is None or not os.path.lexists(dest):
            return
        target, root = dest.resolve(), store_root.resolve()
        if root == target or target in root.parents:
            raise InvalidInputError(
                f"destination {dest} holds this store ({root}); restoring there would "
                "replace the store itself: choose another destination"
            )

    def cut_local_file(self, path: str | os.PathLike[str], former: Entry) -> LocalChunks | None:
        """A local file cut as a put of it as the version after ``former`` would cut it:
        where each stored chunk of ``former`` lies in it (None if it is not a file)."""
        from ..tensors._cutting import cut_local_file

        return cut_local_file(Path(path), self.config.chunker, former)

    def read_tensor(self, ref: str, file: str | None, name: str) -> Any:
        """One tensor of a stored safetensors file as a numpy array (BF16 as float32).

        Fetches and verifies only the chunks that hold the header and the
        tensor. ``file`` is the file's path in the version; for a one-file
        artifact any name (or None) will do.
        """
        version_ref = self.resolve(ref)
        manifest = self.load_manifest(version_ref.manifest_id)
        label = f"{version_ref.key}@{version_ref.number}"
        from ..tensors._safetensors import find_file, read_tensor

        return read_tensor(self.chunks, find_file(manifest, file), name, label=label)

    def show(self, ref: str) -> Details:
        version_ref = self.resolve(ref)
        manifest = self.load_manifest(version_ref.manifest_id)
        return Details(self._version(version_ref, manifest), manifest.entries)

    def log(self, key: str) -> list[Version]:
        """Live versions of ``key``, newest first."""
        layout.check_key(key)
        tags = self._tags_by_version(key)
        out = []
        for ref in self.refs.live_versions(key, newest_first=True):
            out.append(self._version(ref, self.summary(ref), tags=tags))
        if not out:
            raise RefNotFoundError(f"key {key!r} has no versions")
        return out

    def list_keys(self, prefix: str = "") -> list[KeySummary]:
        """Keys under ``prefix`` that have live versions, with their latest version."""
        out = []
        for key, numbers in sorted(self.refs.iter_keys(prefix)):
            del numbers  # read each ref below: some may be tombstones
            live = list(self.refs.live_versions(key, newest_first=True))
            if live:
                latest = self._version(live[0], self.summary(live[0]))
                out.append(KeySummary(key, len(live), latest))
        return out

    # -- tags and deletion ---------------------------------------------------------

    def tag(self, ref: str, tag: str) -> Version:
        """Point ``tag`` of the ref's key at that version (moving it if it exists)."""
        layout.check_tag(tag)
        version_ref = self.resolve(ref)
        self.refs.set_tag(version_ref.key, tag, version_ref.number)
        return self.show(f"{version_ref.key}@{version_ref.number}").version

    def untag(self, key: str, tag: str) -> None:
        layout.check_key(key)
        self.refs.read_tag(key, layout.check_tag(tag))  # NotFound if absent
        self.refs.remove_tag(key, tag)

    def delete(self, ref: str, *, force: bool = False) -> Version:
        """Delete one version. A tagged version needs ``force``, which drops its tags too.

        Space comes back at the next garbage collection after the grace period.
        """
        version_ref = self.resolve(ref)
        version = self.show(f"{version_ref.key}@{version_ref.number}").version
        if version.tags and not force:
            raise InvalidInputError.naming(
                "{ref} is tagged ({tags}); {force} to delete it and its tags",
                ref=version.ref,
                tags=", ".join(version.tags),
                force=FORCE,
            )
        for tag in version.tags:
            self.refs.remove_tag(version.key, tag)
        self.refs.mark_deleted(version_ref)
        return version

    def delete_all(self, key: str, *, force: bool = False) -> list[Version]:
        layout.check_key(key)
        versions = self.log(key)
        tagged = [v for v in versions if v.tags]
        if tagged and not force:
            raise InvalidInputError.naming(
                "{key} has tagged versions ({refs}); {force} to delete them and their tags",
                key=key,
                refs=", ".join(v.ref for v in tagged),
                force=FORCE,
            )
        return [self.delete(v.ref, force=True) for v in versions]

    # -- store-wide ----------------------------------------------------------------

    def stats(self) -> Stats:
        """What the store holds: live versions, what they need, what only deltas keep."""
        from ._stats import measure

        return measure(
            self.refs, self.load_manifest, self.chunks, self.backend, workers=self.workers
        )

    def reclaimable(self, versions: Iterable[Version]) -> Reclaimable:
        """What the next garbage collection frees once ``versions`` are deleted.

        The chunks they keep alive (delta bases included) that no other live
        version needs, and their manifests unless shared; nothing is deleted.
        """
        from ..gc._usage import reclaimable

        doomed = {v.ref: Digest.parse(v.manifest_id) for v in versions}
        return reclaimable(self.refs, self.load_manifest, doomed, workers=self.workers)

    def verify(
        self,
        *,
        deep: bool = False,
        sample: float | None = None,
        repair: bool = False,
        progress: ProgressFn | None = None,
    ) -> VerifyReport:
        """Check every version; ``deep`` rehashes every chunk, ``sample`` a percentage of them.

        ``repair`` moves corrupt chunks to quarantine/ so that putting the
        same content again heals the versions the report lists.
        """
        from ..gc._verify import verify_store

        return verify_store(
            self.refs,
            self.chunks,
            self.load_manifest,
            deep=deep,
            sample=sample,
            repair=repair,
            workers=self.workers,
            progress=progress,
        )

    def gc(
        self,
        *,
        grace: float | None = None,
        dry_run: bool = False,
        progress: ProgressFn | None = None,
    ) -> GcReport:
        """Delete chunks and manifests no version needs, older than ``grace`` seconds.

        Safe while others put, as long as ``grace`` is at least the store's
        setting (the default when None); see docs/gc.md.
        """
        from ..gc._collect import collect

        return collect(
            self.backend,
            grace=grace,
            dry_run=dry_run,
            workers=self.workers,
            clock=self.clock,
            progress=progress,
        )

    def gc_settings(self) -> GcSettings:
        """The grace writers refresh against and collections default to (defaults if never set)."""
        return read_settings(self.backend)

    def set_gc_grace(self, seconds: float) -> GcSettings:
        """Set the grace that writers refresh against and collections default to."""
        return write_settings(self.backend, seconds)

    # -- helpers -------------------------------------------------------------------

    def _tags_by_version(self, key: str) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for tag, number in sorted(self.refs.tags(key).items()):
            out.setdefault(number, []).append(tag)
        return out

    def summary(self, ref: VersionRef) -> Summary:
        """What queries need of a version: from its ref when recorded there, else its manifest."""
        summary = Summary.from_ref(ref.summary)
        if summary is None:
            summary = Summary.of_manifest(self.load_manifest(ref.manifest_id))
        return summary

    def _version(
        self,
        ref: VersionRef,
        source: Manifest | Summary,
        tags: Iterable[str] | dict[int, list[str]] | None = None,
    ) -> Version:
        summary = source if isinstance(source, Summary) else Summary.of_manifest(source)
        if tags is None:
            tags = self._tags_by_version(ref.key)
        current = tags.get(ref.number, []) if isinstance(tags, dict) else list(tags)
        return Version(
            key=ref.key,
            number=ref.number,
            manifest_id=ref.manifest_id.hex,
            created=ref.created,
            kind=summary.kind,
            size=summary.size,
            files=summary.files,
            parents=summary.parents,
            tags=tuple(current),
            metrics=dict(summary.metrics),
            metadata=dict(summary.metadata),
            message=summary.message,
            artifact=dict(summary.artifact),
        )


def open(
    location: str | os.PathLike[str] | None = None, *, create: bool = True, **options: Any
) -> Store:
    """Open a store: a path or URI, else ``$CAS_STORE``, else ``./.cas``."""
    if location is None:
        location = os.environ.get("CAS_STORE") or DEFAULT_STORE
    return Store.open(location, create=create, **options)


__all__ = ["CasError", "Details", "KeySummary", "Stats", "Store", "Version", "open"]
