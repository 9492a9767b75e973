"""The Store facade: what the CLI, the ML layer and library users talk to.

A put writes chunks, then the manifest, then creates the version ref
only-if-absent (:mod:`cas.store._writing`). That last write is the commit
point: a crash before it leaves only unreferenced objects, which garbage
collection reclaims. Versions are read from their refs (:mod:`cas.store._catalog`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backends import Backend, open_backend
from ..chunks._chunking import ChunkerParams
from ..chunks._store import ChunkStore
from ..digest import Digest
from ..errors import (
    CasError,
    CorruptObjectError,
    IntegrityError,
    InvalidInputError,
    MissingObjectError,
    NotFoundError,
    RefNotFoundError,
    UnsafePathError,
)
from ..gc._session import SYSTEM_CLOCK, Clock
from ..repository import _layout as layout
from ..repository._manifest import Entry, Manifest, Parent
from ..repository._metadata import ArtifactInfo, Summary, check_ref
from ..repository._refs import DeletedRef, Refs, VersionRef
from ._cache import CacheChoice, cache_for
from ._catalog import Catalog
from ._config import (
    DELTA_METHODS,
    StoreConfig,
    default_chunker,
    load_config,
    write_config,
)
from ._maintenance import StoreMaintenance
from ._restoring import check_restore_options, refuse_replacing_store, restore_version
from ._values import Details, KeySummary, Reclaimable, Restored, Stats, Storage, Version

if TYPE_CHECKING:
    from ..chunks._cache import LocalCache

    # Imported where used: each command pays at start-up for every module
    # it imports, and a get needs none of the put's, nor a put the get's.
    from ..tensors._cutting import LocalChunks
    from ..tensors._safetensors import ChunkCache, StoredFile
    from ..tensors._writer import DeltaMode
    from ._sharded import ShardWriter, VersionFiles
    from ._stats import Summaries
    from ._writing import Record

ProgressFn = Callable[[int], None]
DEFAULT_STORE = ".cas"
#: How errors of calls that take ``force`` say to pass it (the CLI says ``pass --force``).
FORCE = "pass force=True"


class Store(StoreMaintenance):
    """A cas store on any backend. Thread-safe for concurrent puts and gets."""

    def __init__(
        self,
        backend: Backend,
        config: StoreConfig,
        *,
        workers: int | None = None,
        cache: LocalCache | None = None,
    ):
        self.backend = backend
        self.config = config
        self.refs = Refs(backend)
        #: Chunks are read through ``cache``, if any (docs/cache.md).
        self.chunks = ChunkStore(backend, level=config.zstd_level, cache=cache)
        self.workers = workers or backend.concurrency
        #: Local elapsed time for garbage-collection safety; tests inject a fake one.
        self.clock: Clock = SYSTEM_CLOCK
        self._summaries: Summaries | None = None  # what ``stats`` read of each manifest

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(
        cls,
        location: str | os.PathLike[str],
        *,
        create: bool = True,
        cache: CacheChoice = None,
        cache_size: int | str | None = None,
        **options: Any,
    ) -> Store:
        """Open a store; create it with default settings if ``create`` and the location is empty.

        ``cache``: the local chunk cache reads go through (None: on for S3, GCS
        and Azure; False: off; True or a folder: on), ``cache_size`` its limit
        (docs/cache.md).
        """
        backend = open_backend(location, **options)
        local_cache = cache_for(backend, cache, cache_size)
        return cls(backend, load_config(backend, create=create), cache=local_cache)

    @classmethod
    def init(
        cls,
        location: str | os.PathLike[str],
        *,
        chunker: ChunkerParams | None = None,
        max_delta_reads: int | None = None,
        entropy: str = "huffman",
        delta_method: str = DELTA_METHODS[0],
        auto_delta: bool = True,
        create_bucket: bool = False,
        **options: Any,
    ) -> Store:
        """Create a new store; fails if the location already holds one.

        ``entropy="fse"`` codes the exponent streams of tensor chunks with
        FSE: float weights store a little smaller but decode more slowly
        (docs/performance.md, "Tensor-aware storage"), and only a cas that
        reads store format 2 reads the store.
        ``delta_method`` codes delta chunks as the integer difference of
        their elements from the base's, fp32 ones times a factor where that
        codes smaller ("scaled", the default; store format 4), from the
        base's alone ("difference", store format 3), or as their XOR ("xor":
        a store older cas versions read).
        ``auto_delta=False`` stores a version as a delta of its key's latest
        version only when a put asks for it (names a parent).
        ``create_bucket`` first creates the bucket or container of a cloud
        location (fine if it exists already).
        """
        # A bad name fails before any I/O.
        config = StoreConfig.create(
            entropy=entropy, delta_method=delta_method, auto_delta=auto_delta
        )
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
        if_changed: bool = False,
        idempotency_token: str | None = None,
        follow_symlinks: bool = False,
        delta: bool | None = None,
    ) -> Version:
        """Store a file or a directory as the next version of ``key``.

        ``info`` adds typed metadata (type, job, algorithm...); its metrics,
        parents and tags join those given here, which win on a conflict.
        ``workers`` is the number of chunks hashed, compressed and uploaded
        in parallel (default: the store's, from the backend's concurrency).
        ``if_changed`` and ``idempotency_token`` make a retry return the
        version an earlier attempt committed (docs/concepts.md).
        A symbolic link in the tree is stored as a link when it stays inside
        the tree, and as what it points to when it leads out of it (a Hugging
        Face snapshot's links into its cache); ``follow_symlinks`` stores
        every link as what it points to. ``path`` itself may be a link.
        ``delta`` says whether tensor chunks may be stored as deltas of the
        same tensors in a former version: the first parent that has the file,
        else the key's latest version. None (the default) follows the store's
        setting (``auto_delta``), which without parents may turn deltas off;
        False stores every chunk whole, so reading the version never needs
        another one's chunks.
        """
        from ..transfer._ingest import scan
        from ._retries import RetryGuard
        from ._writing import Put, Record, VersionWriter

        workers = self._check_workers(workers)
        deltas = self._delta_mode(delta)
        record = Record.of(
            key,
            parents=parents,
            tags=tags,
            metrics=metrics,
            metadata=metadata,
            message=message,
            info=info,
        )
        resolved = tuple(dict.fromkeys(self._parent(p) for p in record.parents))
        retry = RetryGuard(self.refs, key, idempotency_token, if_changed=if_changed)
        earlier = retry.earlier_commit()
        if earlier is not None:
            return self._tagged(earlier, self.load_manifest(earlier.manifest_id), record.tags)
        kind, items = scan(
            Path(path), skip=self.backend.local_root, follow_symlinks=follow_symlinks
        )
        writer = VersionWriter(
            self.backend, self.config, self.refs, self.clock, self.load_manifest, self.summary
        )
        put = Put(record, kind, items, resolved, progress, workers, retry, deltas)
        ref, manifest = writer.commit(put)
        retry.committed(ref)
        return self._tagged(ref, manifest, record.tags)

    def _tagged(self, ref: VersionRef, manifest: Manifest, tags: tuple[str, ...]) -> Version:
        """Set the tags a put was given (again, for a retry) and describe the version."""
        for tag in tags:
            self.refs.set_tag(ref.key, tag, ref.number)
        return self._catalog().version(ref, manifest, tags)

    def shard_writer(
        self,
        record: Record,
        *,
        parents: Sequence[str] | None = None,
        size_hint: int = 0,
        workers: int | None = None,
        progress: ProgressFn | None = None,
        delta: bool | None = None,
        latest: int | None = None,
    ) -> ShardWriter:
        """One process's share of a version that several processes write at once.

        Every process writes its files from memory and seals them; one commits
        the version from all the parts (see :mod:`cas.store._sharded`).
        ``parents`` (references, default ``record.parents``) should be pinned
        to ``KEY@N`` by the committing process so that every process uses the
        same ones; ``size_hint`` is about how many bytes this process will write.
        ``delta`` is as for ``put``: without parents, tensors are stored as deltas
        of the key's latest version, and ``latest`` (a version number, pinned by
        the committing process like the parents) says which version that is.
        """
        from ._sharded import ShardWriter

        return ShardWriter(
            self,
            record,
            parents=parents,
            size_hint=size_hint,
            workers=workers,
            progress=progress,
            deltas=self._delta_mode(delta),
            latest=latest,
        )

    def open_version(self, ref: str) -> VersionFiles:
        """The files of a version for reading byte ranges, and its tensor index if it has one."""
        from ._sharded import VersionFiles

        return VersionFiles(self, ref)

    def _delta_mode(self, delta: bool | None) -> DeltaMode:
        """Where a put's delta bases come from: the parents and else the latest version,
        the parents only, or nowhere (see ``put``)."""
        if delta is None:
            return "latest" if self.config.auto_delta else "parents"
        if not isinstance(delta, bool):
            raise InvalidInputError.naming(
                "{delta} must be True, False or None, not {got!r}", delta="delta", got=delta
            )
        return "latest" if delta else "none"

    def _check_workers(self, workers: int | None) -> int:
        if workers is None:
            return self.workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InvalidInputError.naming(
                "{workers} must be a whole number >= 1, not {got!r}", workers="workers", got=workers
            )
        return workers

    def _parent(self, text: str) -> Parent:
        ref = self.resolve(text)
        return Parent(ref.key, ref.number, ref.manifest_id)

    # -- reading -----------------------------------------------------------------

    @property
    def uri(self) -> str:
        """Where the store lives, as a URI (``file:///...``, ``s3://bucket/prefix``...)."""
        return self.backend.uri

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

    def manifest(self, ref: str | VersionRef) -> Manifest:
        """The manifest of a version (``KEY``, ``KEY@N``, ``KEY:TAG`` or a resolved ref):
        its files, each with its size, mode, BLAKE3 and chunks.

        Checked whole, and against the version's ref: errors name the version
        (``KEY@N``) as well as the file and the field at fault.
        """
        version_ref = self.resolve(ref) if isinstance(ref, str) else ref
        try:
            manifest = self.load_manifest(version_ref.manifest_id)
        except (IntegrityError, UnsafePathError) as err:
            raise type(err)(f"{version_ref.label}: {err}") from None
        name = f"{version_ref.label}: manifest {version_ref.manifest_id.hex}"
        check_ref(version_ref, manifest, name=name)
        return manifest

    def load_manifest(self, manifest_id: Digest) -> Manifest:
        """The manifest stored under ``manifest_id``, checked against its hash."""
        key = layout.manifest_key(manifest_id)
        try:
            blob = self.backend.get(key)
        except NotFoundError:
            raise MissingObjectError(f"manifest {manifest_id.hex} is missing") from None
        if Digest.of(blob) != manifest_id:
            raise CorruptObjectError(f"manifest {manifest_id.hex} does not match its hash")
        return Manifest.from_bytes(blob, name=f"manifest {manifest_id.hex}")

    def open_file(
        self, entry: Entry, *, label: str, cache: ChunkCache | int | None = None
    ) -> StoredFile:
        """Random access to the bytes of one stored file (an entry of a manifest).

        Reads fetch and verify only the chunks that hold the bytes asked for.
        ``label`` (``KEY@N``) names the version in errors; ``cache`` keeps the
        chunks last read (a number: that many), and may be shared by several
        files (by default a file keeps its last chunk, where a safetensors
        header usually ends).
        """
        from ..tensors._safetensors import ChunkCache, StoredFile

        kept = ChunkCache(cache) if isinstance(cache, int) else cache
        return StoredFile(self.chunks, entry, label, cache=kept)

    def get(
        self,
        ref: str,
        dest: str | os.PathLike[str],
        *,
        force: bool = False,
        progress: ProgressFn | None = None,
        workers: int | None = None,
        link: bool = False,
    ) -> Version:
        """Restore a version to ``dest`` (a file path or a directory), verified.

        ``workers`` is the number of chunks downloaded in parallel (default:
        the store's); ``link`` as for :meth:`restore`.
        """
        restored = self.restore(
            ref, dest, force=force, progress=progress, workers=workers, link=link
        )
        return restored.version

    def restore(
        self,
        ref: str,
        dest: str | os.PathLike[str],
        *,
        force: bool = False,
        update: bool = False,
        delete: bool = False,
        progress: ProgressFn | None = None,
        workers: int | None = None,
        link: bool = False,
    ) -> Restored:
        """:meth:`get`, saying where the bytes came from; with ``update``, bring an
        existing ``dest`` to the version reusing what it holds, each file swapped
        in once verified; ``delete`` removes what the version lacks; ``link``
        hard-links files the local cache holds whole, read-only (docs/cache.md).
        """
        check_restore_options(
            force=force, update=update, delete=delete, link=link,
            cached=self.chunks.cache is not None,
        )  # fmt: skip
        workers = self._check_workers(workers)
        refuse_replacing_store(self.backend.local_root, Path(dest))
        version_ref = self.resolve(ref)
        manifest = self.manifest(version_ref)
        describe = lambda: self._catalog().version(version_ref, manifest)  # noqa: E731
        return restore_version(
            self.chunks, self.config.chunker, manifest, Path(dest), label=version_ref.label,
            describe=describe, force=force, update=update, delete=delete,
            progress=progress, workers=workers, link=link,
        )  # fmt: skip

    def cut_local_file(self, path: str | os.PathLike[str], former: Entry) -> LocalChunks | None:
        """A local file cut as a put of it as the version after ``former`` would cut it:
        where each stored chunk of ``former`` lies in it (None if it is not a file)."""
        from ..tensors._cutting import cut_local_file

        return cut_local_file(Path(path), self.config.chunker, former)

    def read_tensor(self, ref: str, file: str | None, name: str) -> Any:
        """One tensor of a stored safetensors, torch.save or numpy file as a numpy array.

        BF16 comes back as float32, which holds it exactly.

        Fetches and verifies only the chunks that hold the header and the
        tensor. ``file`` is the file's path in the version; for a one-file
        artifact any name (or None) will do. In a version written in parts
        (a distributed checkpoint), ``file=None`` finds the tensor by its
        fully qualified name, its shards put together.
        """
        version_ref = self.resolve(ref)
        manifest = self.manifest(version_ref)
        from ..tensors._formats import read_tensor
        from ..tensors._index import load_index, read_indexed_tensor
        from ..tensors._safetensors import find_file

        label = version_ref.label
        index = load_index(self.chunks, manifest, label=label) if file is None else None
        if index is not None:
            return read_indexed_tensor(self.chunks, manifest, index, name, label=label)
        return read_tensor(self.chunks, find_file(manifest, file), name, label=label)

    def show(self, ref: str) -> Details:
        """A version and the entries of its manifest."""
        version_ref = self.resolve(ref)
        manifest = self.manifest(version_ref)
        version = self._catalog().version(version_ref, manifest)
        return Details(version, manifest.entries, Storage.of_manifest(manifest))

    def summary(self, ref: VersionRef) -> Summary:
        """What a version is: from its ref when recorded there, else from its manifest."""
        return self._catalog().summary(ref)

    def log(self, key: str) -> list[Version]:
        """Live versions of ``key``, newest first."""
        return self._catalog().log(key)

    def list_keys(self, prefix: str = "") -> list[KeySummary]:
        """Keys under ``prefix`` that have live versions, with their latest version."""
        return self._catalog().keys(prefix)

    def catalog(
        self,
        prefix: str = "",
        *,
        select: Callable[[list[Version]], list[Version]] | None = None,
    ) -> list[Version]:
        """Every live version of every key under ``prefix``, with its current tags.

        By key, then newest first. Read from the catalog kept in the store,
        and the refs changed since it was compacted; some of the versions
        returned are read again from their refs to check it (all of them
        when they are few: docs/format.md, "What cas checks"). ``select``
        narrows the answer (a query's filter, sort and limit) before that
        check, so that the versions checked are those returned.
        """
        return self._catalog().everything(prefix, select)

    def _catalog(self) -> Catalog:
        return Catalog(self.refs, self.load_manifest, self.workers)

    # -- tags and deletion ---------------------------------------------------------

    def tag(self, ref: str, tag: str) -> Version:
        """Point ``tag`` of the ref's key at that version (moving it if it exists)."""
        layout.check_tag(tag)
        version_ref = self.resolve(ref)
        self.refs.set_tag(version_ref.key, tag, version_ref.number)
        return self.show(version_ref.label).version

    def untag(self, key: str, tag: str) -> None:
        layout.check_key(key)
        self.refs.read_tag(key, layout.check_tag(tag))  # NotFound if absent
        self.refs.remove_tag(key, tag)

    def delete(self, ref: str, *, force: bool = False) -> Version:
        """Delete one version. A tagged version needs ``force``, which drops its tags too.

        Space comes back at the next garbage collection after the grace period.
        """
        version_ref = self.resolve(ref)
        # A damaged version stays deletable: deleting needs its ref, not its manifest.
        try:
            summary = self.summary(version_ref)
        except (IntegrityError, UnsafePathError):
            summary = Summary(kind="unknown", size=0, files=0)
        version = self._catalog().version(version_ref, summary)
        if version.tags and not force:
            raise InvalidInputError.naming(
                "{ref} is tagged ({tags}); {force} to delete it and its tags",
                ref=version.ref,
                tags=", ".join(version.tags),
                force=FORCE,
            )
        # Deleting is how space is freed: on a full device it may use the reserve.
        with self.backend.drawing_on_reserve():
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


def open(
    location: str | os.PathLike[str] | None = None, *, create: bool = True, **options: Any
) -> Store:
    """Open a store: a path or URI, else ``$CAS_STORE``, else ``./.cas``."""
    if location is None:
        location = os.environ.get("CAS_STORE") or DEFAULT_STORE
    return Store.open(location, create=create, **options)


__all__ = ["CasError", "Details", "KeySummary", "Reclaimable", "Stats", "Store", "Version", "open"]
