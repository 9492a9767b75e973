"""Repacking: store again what live versions need of deleted versions' chunks, so gc frees them.

A chunk stored as a delta needs its chain of bases, and the manifests that
name it list that chain, so that garbage collection keeps it alive from
manifests alone. Once the versions the bases came from are deleted, the
bases stay for those deltas only (*base-only* chunks): a run that keeps the
best 3 of 200 checkpoints would keep almost all 200. Repacking stores each
chunk of a live version whose chain starts with a base-only chunk again,
whole, in groups that free more than they cost (:mod:`cas.gc._repack_plan`
finds them). Then it points each version concerned at a new manifest that
lists the shorter chains, and the next collection after the grace period
frees the base-only chunks. A version's files, metadata and lineage never
change; only its manifest id does (docs/format.md, "Repacking").

Why no version is damaged at any moment, whoever else writes (docs/gc.md,
"Repacking"):

* **A delta chunk is only rewritten whole**, by compare-and-swap on the
  object. A reader follows a chain as its manifest lists it, and accepts one
  that ends early: every manifest that lists the old chain (the version's
  own until its ref is swapped, a put's that learned the chain from it)
  still reads, and keeps alive every base its chunks need. Both encodings
  decode to the same bytes, under the same name. The new manifests list the
  chains read from the chunks after the rewrites.
* **A new manifest is protected like a put's**: written create-only under a
  :class:`~cas.gc._session.WriteSession` and checked younger than the grace
  right before the version ref is swapped to it, by compare-and-swap (a
  version deleted meanwhile is left alone). A crash leaves an unreferenced
  manifest that a later collection removes.
* **What the old manifest kept alive stays for a grace period**: the old
  manifest and the base-only chunks are touched (when old) before the swap,
  so a reader that resolved the version before it still finds them, as it
  finds the chunks of a version deleted while it reads.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

from ..backends.base import Backend
from ..chunks import _codec as codec
from ..chunks._floatcodec import Layout
from ..chunks._store import ChunkStore
from ..digest import Digest
from ..errors import (
    AlreadyExistsError,
    CasError,
    ConcurrentCollectionError,
    IntegrityError,
    NotFoundError,
    PreconditionFailedError,
)
from ..repository import _layout as layout
from ..repository._live import bounded_map
from ..repository._manifest import MAX_CHAIN, ChunkRef, DeltaBase, Manifest
from ..repository._refs import Refs, VersionRef
from ..tensors._encoding import Elements, TensorCodec
from ..tensors._writer import Chains
from ._collect import manifest_chunk_roles
from ._repack_plan import Group, RepackPlan, chunks_of, groups, live
from ._session import SYSTEM_CLOCK, Clock, WriteSession

ProgressFn = Callable[[int], None]
#: Compare-and-swap attempts on one chunk object that others keep rewriting.
_ATTEMPTS = 8
Swap = tuple[VersionRef, Manifest, Digest]


@dataclass
class RepackReport:
    """What one repack did (or, in a dry run, would do). Sizes are stored bytes."""

    dry_run: bool = False
    #: Chunks that live versions need only as delta bases (their versions deleted).
    base_only_chunks: int = 0
    #: Versions pointed at a new manifest, and the chunks stored again for them.
    versions: int = 0
    chunks: int = 0
    #: Of those chunks, how many are now stored whole (no kept base in their chain).
    whole: int = 0
    bytes_before: int = 0
    #: Their stored size after (a dry run estimates it: a chunk stored whole as
    #: its chain's root, a delta as it was).
    bytes_after: int = 0
    #: What the base-only chunks no version needs any more occupy: what a
    #: collection frees once they are older than its grace period.
    frees_bytes: int = 0
    #: Chunks that could not be read (damaged or missing) and were left as
    #: they were; the versions that name them keep their manifests.
    skipped: int = 0

    @property
    def cost_bytes(self) -> int:
        """Stored bytes the repack adds (negative when the new encodings are smaller)."""
        return self.bytes_after - self.bytes_before

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cost_bytes": self.cost_bytes}


@dataclass(frozen=True)
class _Rewrite:
    """One chunk of a repack: as it is stored, and the whole chunk it becomes
    (``new_blob`` None: it stays as it is)."""

    digest: Digest
    blob: bytes
    token: str
    new_blob: bytes | None
    raw_length: int


class Repacker:
    """Carries out a :class:`RepackPlan` by the rules of the module docstring."""

    def __init__(
        self,
        backend: Backend,
        tensor_codec: TensorCodec,
        *,
        workers: int = 8,
        clock: Clock = SYSTEM_CLOCK,
        progress: ProgressFn | None = None,
        readers: bool = True,
    ) -> None:
        """``readers=False`` says that nothing reads the store meanwhile (a collection
        with no grace): what the old manifests held need not be kept for a grace."""
        self.backend = backend
        self.readers = readers
        self.chunks = ChunkStore(backend)
        self.refs = Refs(backend)
        self.codec = tensor_codec
        self.workers = max(1, workers)
        self.clock = clock
        self.progress = progress

    def run(self, repack: RepackPlan, *, dry_run: bool = False) -> RepackReport:
        report = RepackReport(dry_run=dry_run, base_only_chunks=len(repack.base_only))
        if dry_run:
            _estimate(self.backend, repack, report, self.workers)
            return report
        if not repack.versions:
            return report
        session = WriteSession(self.backend, clock=self.clock, workers=self.workers).start()
        try:
            chains = Chains(self.chunks)
            skipped = self._rewrite_all(repack, chains, report)
            swaps = self._new_manifests(repack, chains, skipped, session)
            report.frees_bytes = self._keep_for_readers(repack, swaps, session)
            session.before_commit()
            self.backend.flush()  # chunks and manifests durable before a ref names them
            for ref, _, new in swaps:
                assert ref.manifest_id is not None
                if self.refs.replace_manifest(ref.key, ref.number, ref.manifest_id, new):
                    report.versions += 1
        finally:
            session.close()
        return report

    # -- chunks ----------------------------------------------------------------------

    def _rewrite_all(self, repack: RepackPlan, chains: Chains, report: RepackReport) -> set[bytes]:
        """Store again each group of chunks whose recorded first base is base-only, when
        that frees more than it costs; the chunks that could not be read. ``chains``
        learns the chain each chunk has now."""
        skipped: set[bytes] = set()
        found = groups(repack)
        with ThreadPoolExecutor(self.workers, "cas-repack") as pool:
            jobs = bounded_map(pool, partial(self._repack_group, repack), found, 2 * self.workers)
            for group, done in zip(found, jobs, strict=True):
                if done is None:
                    skipped.update(d.raw for d in group.chunks)
                    report.skipped += len(group.chunks)
                    continue
                for item in done:
                    if item.new_blob is None:
                        continue  # left as it is: whole already, or not worth it
                    chains.record(item.digest, ())
                    report.chunks += 1
                    report.whole += 1
                    report.bytes_before += len(item.blob)
                    report.bytes_after += len(item.new_blob)
                    if self.progress is not None:
                        self.progress(item.raw_length)
        return skipped

    def _repack_group(self, repack: RepackPlan, group: Group) -> list[_Rewrite] | None:
        """Store a group's chunks again if that frees more than it costs (None: a chunk of
        it cannot be read, and the group stays as it is)."""
        prepared = [self._prepare(digest) for digest in group.chunks]
        if any(item is None for item in prepared):
            return None
        items = [item for item in prepared if item is not None]
        cost = sum(len(i.new_blob) - len(i.blob) for i in items if i.new_blob is not None)
        if cost >= sum(_stored_size(self.backend, Digest(raw)) for raw in group.bases):
            return [replace(item, new_blob=None) for item in items]
        return [self._commit(item) for item in items]

    def _prepare(self, digest: Digest) -> _Rewrite | None:
        """A chunk and its new form, whole (``new_blob`` None: whole already); None if it
        cannot be read.

        Whole, not as a delta of a base further down its chain: a reader follows a
        chunk's chain as its manifest lists it, and may find it ending early (a whole
        chunk), never skipping a base, and manifests that list the old chain live on.
        """
        try:
            blob, token = self.backend.get_versioned(layout.chunk_key(digest))
            raw = self.chunks.read(ChunkRef(digest, codec.raw_length(blob)), context="repack")
        except (NotFoundError, IntegrityError):
            return None
        view = memoryview(raw).cast("B")
        item = _Rewrite(digest, blob, token, None, len(view))
        if codec.delta_base(blob) is None:
            return item  # stored whole already (by another repack)
        return replace(item, new_blob=self._whole(view, _elements(blob, self._root(blob))))

    def _commit(self, item: _Rewrite) -> _Rewrite:
        """Write a prepared chunk by compare-and-swap; prepare it again if it changed."""
        for _ in range(_ATTEMPTS):
            if item.new_blob is None:
                return item
            try:
                self.backend.put(layout.chunk_key(item.digest), item.new_blob, if_match=item.token)
                return item
            except PreconditionFailedError:
                pass  # rewritten meanwhile (perhaps by our own retried write): look again
            again = self._prepare(item.digest)
            if again is None:
                raise CasError(f"chunk {item.digest.hex} vanished while it was repacked")
            item = again
        raise CasError(f"chunk {item.digest.hex} kept changing while it was repacked; run gc again")

    def _root(self, blob: bytes) -> bytes:
        """The header of the last chunk of a delta's chain, where the grouping is named."""
        base = codec.delta_base(blob)
        for _ in range(MAX_CHAIN):
            if base is None:
                break
            head = self.backend.get_range(layout.chunk_key(Digest(base)), 0, 64)
            following = codec.delta_base(head)
            if following is None:
                return head
            base = following
        return blob

    def _whole(self, raw: memoryview, elements: Elements) -> bytes:
        if len(raw) % elements.itemsize:
            return codec.encode(raw, self.codec.level)
        return self.codec.grouped(raw, elements)

    # -- manifests and refs -------------------------------------------------------------

    def _new_manifests(
        self, repack: RepackPlan, chains: Chains, skipped: set[bytes], session: WriteSession
    ) -> list[Swap]:
        """For each version, a manifest that lists the chains its chunks have now, read
        from the chunks themselves (a version with a chunk that could not be read, or
        whose chain cannot be followed, keeps its manifest)."""
        rebuilt = []
        for ref, manifest in repack.versions:
            if any(c.digest.raw in skipped for c in chunks_of(manifest)):
                continue
            try:
                rebuilt.append((ref, _with_chains(manifest, chains)))
            except (ConcurrentCollectionError, IntegrityError):
                continue  # a base is gone (the version is being deleted) or damaged
        firsts = {c.bases[0].raw for _, m in rebuilt for c in chunks_of(m) if c.bases}
        owners = _owners(self.refs, firsts, self.workers) if firsts else {}
        swaps = []
        for ref, new in rebuilt:
            new = replace(new, delta_base=_delta_base(new, owners))
            blob = new.to_bytes()
            manifest_id = Digest.of(blob)
            # An existing manifest of that name holds the same bytes.
            with contextlib.suppress(AlreadyExistsError):
                self.backend.put(layout.manifest_key(manifest_id), blob, if_absent=True)
            session.adopt(layout.manifest_key(manifest_id))
            swaps.append((ref, new, manifest_id))
        return swaps

    def _keep_for_readers(
        self, repack: RepackPlan, swaps: list[Swap], session: WriteSession
    ) -> int:
        """Touch the old manifests and the base-only chunks now unneeded before the swaps
        (see above); the stored bytes of those chunks."""
        swapped = {ref for ref, _, _ in swaps}
        kept = [m for ref, m in repack.versions if ref not in swapped]
        still = {
            b.raw
            for m in (*kept, *(new for _, new, _ in swaps))
            for c in chunks_of(m)
            for b in c.bases
        }
        freed = [Digest(raw) for raw in sorted(repack.base_only - still)]
        keys = [layout.manifest_key(ref.manifest_id) for ref, _, _ in swaps if ref.manifest_id]
        keys += [layout.chunk_key(digest) for digest in freed]
        reference, refresh_after = session.reference_time(), session.refresh_after

        def keep(key: str) -> int:
            try:
                info = self.backend.stat(key)
                if self.readers and reference - info.mtime > refresh_after:
                    self.backend.touch(key)
            except NotFoundError:
                return 0
            return info.size if key.startswith(layout.CHUNKS) else 0

        with ThreadPoolExecutor(self.workers, "cas-repack-keep") as pool:
            return sum(pool.map(keep, keys))


def _with_chains(manifest: Manifest, chains: Chains) -> Manifest:
    """``manifest`` with the chain each of its chunks has now. A chunk recorded whole is
    whole (nothing makes a chunk need more bases), so only deltas are read."""
    entries = []
    for entry in manifest.entries:
        new_chunks = tuple(
            replace(c, bases=chains.of(c.digest)) if c.bases else c for c in entry.chunks
        )
        entries.append(replace(entry, chunks=new_chunks) if entry.chunks else entry)
    return replace(manifest, entries=tuple(entries))


def _delta_base(manifest: Manifest, owners: dict[bytes, list[DeltaBase]]) -> DeltaBase | None:
    """The version most of the deltas are now coded against, preferring the manifest's
    own key (None when no chunk is a delta any more)."""
    sources: Counter[DeltaBase] = Counter()
    for chunk in chunks_of(manifest):
        found = owners.get(chunk.bases[0].raw) if chunk.bases else None
        if found:
            same_key = [o for o in found if o.key == manifest.key]
            sources[(same_key or found)[-1]] += 1
    return sources.most_common(1)[0][0] if sources else None


def _owners(refs: Refs, wanted: set[bytes], workers: int) -> dict[bytes, list[DeltaBase]]:
    """The live versions that name each of ``wanted``, in listing order (keys sorted,
    versions ascending)."""
    owners: dict[bytes, list[DeltaBase]] = {}

    def named(ref: VersionRef) -> list[bytes]:
        assert ref.manifest_id is not None
        return manifest_chunk_roles(refs.backend, ref.manifest_id, f"{ref.key}@{ref.number}")[0]

    with ThreadPoolExecutor(workers, "cas-repack-owners") as pool:
        for ref, chunks in bounded_map(pool, lambda r: (r, named(r)), live(refs), 4 * workers):
            for raw in set(chunks) & wanted:
                owners.setdefault(raw, []).append(DeltaBase(ref.key, ref.number))
    return owners


def _elements(blob: bytes, root: bytes) -> Elements:
    """What a chunk holds: grouped as its chain's root when that is grouped with the
    same element size (a whole encoding groups as the put did), else plainly."""
    own = Elements.of_blob(blob)
    first = Elements.of_blob(root)
    if own is None:
        return first or Elements(1, Layout.PLAIN)
    if first is not None and first.itemsize == own.itemsize:
        return first
    return own


def _estimate(backend: Backend, repack: RepackPlan, report: RepackReport, workers: int) -> None:
    """A dry run's figures, from stored sizes: a chunk stored whole costs about what its
    chain's root (a whole chunk of the same tensor range) costs; a group is counted
    when it frees more than that."""
    found = groups(repack)
    roots = {d: repack.known.get(d.raw, (d,))[-1] for g in found for d in g.chunks}
    wanted = [*roots, *roots.values(), *map(Digest, repack.base_only)]
    with ThreadPoolExecutor(workers, "cas-repack-stat") as pool:
        stored = pool.map(partial(_stored_size, backend), wanted)
        sizes = dict(zip([d.raw for d in wanted], stored, strict=True))
    freed: set[bytes] = set()
    for group in found:
        after = {d: sizes[roots[d].raw] for d in group.chunks}
        before = sum(sizes[d.raw] for d in group.chunks)
        if sum(after.values()) - before >= sum(sizes[raw] for raw in group.bases):
            continue
        freed |= group.bases
        report.chunks += len(group.chunks)
        report.whole += len(group.chunks)
        report.bytes_before += before
        report.bytes_after += sum(after.values())
    report.frees_bytes = sum(sizes[raw] for raw in freed)
    report.versions = sum(
        1
        for _, manifest in repack.versions
        if any(b.raw in freed for c in chunks_of(manifest) for b in c.bases)
    )


def _stored_size(backend: Backend, digest: Digest) -> int:
    """The stored size of a chunk (0 for one that is missing)."""
    try:
        return backend.stat(layout.chunk_key(digest)).size
    except NotFoundError:
        return 0
