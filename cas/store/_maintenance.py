"""What the Store does to the store as a whole: stats, verify, gc and repack,
the catalog's upkeep and the gc settings.

Kept apart from :mod:`cas.store._facade` so each stays small; ``Store``
inherits these methods, and the attributes they use are the Store's.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..digest import Digest
from ..gc._session import GcSettings, read_settings, write_settings
from ._catalog import Catalog, catalog_optional
from ._values import Reclaimable, Stats, Version

if TYPE_CHECKING:
    from ..backends import Backend
    from ..chunks._store import ChunkStore
    from ..gc._collect import GcReport
    from ..gc._history import LastRun
    from ..gc._repack import RepackReport
    from ..gc._session import Clock
    from ..gc._verify import VerifyReport
    from ..repository._manifest import Manifest
    from ..repository._refs import Refs, VersionRef
    from ..tensors._encoding import TensorCodec
    from ._config import StoreConfig
    from ._index import CatalogStatus
    from ._stats import Summaries

ProgressFn = Callable[[int], None]
#: Makes a store's kept manifest summaries once, whichever thread asks first.
_SUMMARIES_LOCK = threading.Lock()


class StoreMaintenance:
    """Store-wide operations; mixed into :class:`cas.store.Store`."""

    backend: Backend
    config: StoreConfig
    refs: Refs
    chunks: ChunkStore
    workers: int
    clock: Clock
    _summaries: Summaries | None

    if TYPE_CHECKING:  # defined by Store

        def load_manifest(self, manifest_id: Digest) -> Manifest: ...
        def resolve(self, text: str) -> VersionRef: ...
        def _catalog(self) -> Catalog: ...

    def catalog_status(self, *, check: bool = False) -> CatalogStatus:
        """The catalog of versions kept in the store (docs/format.md, "The catalog").

        ``check`` compares it with every ref and rebuilds it if they disagree
        (``problem`` then says how). Needs pyarrow (CatalogUnavailable).
        """
        from ._index import check as check_catalog
        from ._index import status

        index = self._catalog().index()
        return check_catalog(index) if check else status(index)

    def compact_catalog(self, *, rebuild: bool = False) -> CatalogStatus:
        """Fold the changes since into a new checkpoint; ``rebuild`` reads every ref instead
        of trusting the last one. Safe while others write, query and compact."""
        from ._index import status

        index = self._catalog().index()
        index.compact(full=rebuild)
        return status(index)

    # -- store-wide ----------------------------------------------------------------

    def stats(self, *, versions: Iterable[Version] | None = None) -> Stats:
        """What the store holds: live versions, what they need, what only deltas keep.

        ``versions`` is every live version as :meth:`catalog` returned it a
        moment ago, for a caller that shows both (one catalog read, not two);
        by default the catalog is read here, or every ref where it cannot answer.
        """
        from ._stats import live_from_refs, measure

        summaries = self._kept_summaries()
        if versions is None:
            live = self._live_from_catalog()
        else:
            live = [(v.key, Digest.parse(v.manifest_id)) for v in versions]
        stats = measure(
            live if live is not None else live_from_refs(self.refs, workers=self.workers),
            self.load_manifest,
            self.chunks,
            self.backend,
            workers=self.workers,
            summaries=summaries,
        )
        if not stats.delta_base_bytes:
            return stats
        # What gc's repack would free: the bases, less what storing their deltas again costs.
        estimate = self.repack_estimate()
        frees = max(estimate.frees_bytes - estimate.cost_bytes, 0)
        return dataclasses.replace(stats, repack_frees_bytes=frees)

    def live_chunks(self, manifest_id: str) -> frozenset[bytes]:
        """What a version with this manifest keeps alive: the raw digests
        (``Digest.raw``) of the chunks its files name and of their delta bases.

        Kept as :meth:`stats` keeps what it counts of each manifest (a manifest
        is named by its hash and never changes), so this and ``stats`` read a
        manifest once between them. A missing or damaged manifest raises
        (IntegrityError), and is read again when asked again.
        """
        summary, _ = self._kept_summaries().get(Digest.parse(manifest_id), self.load_manifest)
        return summary.needed

    def _kept_summaries(self) -> Summaries:
        from ._stats import Summaries

        with _SUMMARIES_LOCK:
            if self._summaries is None:
                self._summaries = Summaries()
            return self._summaries

    def _live_from_catalog(self) -> list[tuple[str, Digest]] | None:
        """Every live version's key and manifest id, as the catalog answers a query (a few
        requests, not one per version, spot-checked as a query's are); None where it
        cannot answer (no pyarrow, ...)."""
        return self._catalog().manifests()

    def chunk_sizes(self) -> dict[str, int]:
        """The stored (compressed or delta-coded) size of every chunk object, by hex digest.

        One listing of the chunks, as ``stats`` makes: what a version or a
        key really costs is the stored size of the chunks it needs.
        """
        return {digest.hex: info.size for digest, info in self.chunks.list_chunks()}

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
        same content again heals the versions the report lists. The catalog
        of versions is compared with the refs, and rebuilt if they disagree.
        """
        from ..gc._verify import verify_store

        report = verify_store(
            self.refs,
            self.chunks,
            self.load_manifest,
            deep=deep,
            sample=sample,
            repair=repair,
            workers=self.workers,
            progress=progress,
        )
        problem = None
        with catalog_optional():
            problem = self.catalog_status(check=True).problem
        return dataclasses.replace(report, catalog_problem=problem)

    def gc(
        self,
        *,
        grace: float | None = None,
        dry_run: bool = False,
        progress: ProgressFn | None = None,
        repack: bool = True,
    ) -> GcReport:
        """Delete chunks and manifests no version needs, older than ``grace`` seconds.

        Safe while others put, as long as ``grace`` is at least the store's
        setting (the default when None); see docs/gc.md. Also removes what
        writers that died left: their markers, temporary files and partial
        uploads. Works on a full device (it may use the store's reserve).
        ``repack`` first stores again the chunks of live versions that are
        deltas of deleted versions' chunks, so that those chunks go too
        (docs/gc.md, "Repacking").
        """
        from ..gc._collect import collect

        report = collect(
            self.backend,
            grace=grace,
            dry_run=dry_run,
            workers=self.workers,
            clock=self.clock,
            progress=progress,
            repack=self._tensor_codec() if repack else None,
        )
        if not dry_run:  # a collection reads every ref anyway: the catalog is rebuilt from them
            with catalog_optional():
                self._catalog().index().compact(full=True)
        return report

    def last_gc(self) -> LastRun | None:
        """What the last collection (not a dry run) did and when it finished; None if none ran."""
        from ..gc._history import read_last_run

        return read_last_run(self.backend)

    def repack_estimate(self, *, deleting: Iterable[str] = ()) -> RepackReport:
        """What the repack of the next :meth:`gc` would do, once the versions
        ``deleting`` (references) are deleted too; nothing is written."""
        from ..gc._repack import Repacker
        from ..gc._repack_plan import plan

        excluding = set()
        for text in deleting:
            ref = self.resolve(text)
            excluding.add(f"{ref.key}@{ref.number}")
        repacker = Repacker(self.backend, self._tensor_codec(), workers=self.workers)
        return repacker.run(
            plan(self.refs, workers=self.workers, excluding=excluding), dry_run=True
        )

    def _tensor_codec(self) -> TensorCodec:
        """How this store codes tensor chunks: what a repack stores them with."""
        from ..tensors._encoding import TensorCodec

        config = self.config
        return TensorCodec(config.zstd_level, config.holds_fse, config.delta_codec)

    def gc_settings(self) -> GcSettings:
        """The grace writers refresh against and collections default to (defaults if never set)."""
        return read_settings(self.backend)

    def set_gc_grace(self, seconds: float) -> GcSettings:
        """Set the grace that writers refresh against and collections default to."""
        return write_settings(self.backend, seconds)

    def set_gc_lease(self, seconds: float) -> GcSettings:
        """Set how long a marker may go unrenewed before its put or collection counts as dead."""
        return write_settings(self.backend, lease=seconds)
