"""What repacking changes, found from the live versions' manifests alone.

See :mod:`cas.gc._repack` for what repacking is. A chunk that a live version
names itself (as a chunk of one of its files) is *named*; a chunk that live
versions need only as a delta base of their chunks is *base-only*. A chunk
whose recorded first base is base-only is stored again whole, when its
group frees more than it costs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from ..digest import Digest
from ..errors import IntegrityError
from ..repository import _layout as layout
from ..repository._live import bounded_map
from ..repository._manifest import ChunkRef, Manifest
from ..repository._refs import Refs, VersionRef
from ._collect import manifest_chunk_roles
from ._digestset import DigestSet

Chain = tuple[Digest, ...]


@dataclass
class RepackPlan:
    """The chunks and versions a repack concerns."""

    #: Chunks live versions name themselves.
    named: DigestSet
    #: Chunks they need only as delta bases.
    base_only: set[bytes]
    #: The versions whose manifests list a base-only chunk, with their manifests.
    versions: list[tuple[VersionRef, Manifest]] = field(default_factory=list)
    #: The shortest chain recorded for each chunk (and base) of those manifests.
    known: dict[bytes, Chain] = field(default_factory=dict)

    def rewrites(self) -> list[Digest]:
        """The chunks to store again: their recorded first base is base-only."""
        out: dict[Digest, None] = {}
        for _, manifest in self.versions:
            for chunk in chunks_of(manifest):
                if chunk.bases and chunk.bases[0].raw not in self.named:
                    out.setdefault(chunk.digest)
        return list(out)


@dataclass(frozen=True)
class Group:
    """Chunks to store again together, and the base-only chunks that then go.

    A base-only chunk goes only once every chunk whose chain holds it is
    stored again; a group is a set of such chunks and the base-only chunks
    their chains hold, closed under both, so that each group frees what it
    frees whatever the other groups do. A repack stores a group again only
    when that frees more than it costs.
    """

    chunks: tuple[Digest, ...]
    bases: frozenset[bytes]


def groups(repack: RepackPlan) -> list[Group]:
    """The chunks to store again, in groups (see :class:`Group`), by their recorded chains."""
    rewrites = repack.rewrites()
    parent = list(range(len(rewrites)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    owner: dict[bytes, int] = {}
    for index, digest in enumerate(rewrites):
        for base in repack.known.get(digest.raw, ()):
            if base.raw in repack.base_only:
                other = owner.setdefault(base.raw, index)
                parent[root(other)] = root(index)
    members: dict[int, list[Digest]] = {}
    for index, digest in enumerate(rewrites):
        members.setdefault(root(index), []).append(digest)
    bases: dict[int, set[bytes]] = {}
    for raw, index in owner.items():
        bases.setdefault(root(index), set()).add(raw)
    return [Group(tuple(chunks), frozenset(bases.get(r, ()))) for r, chunks in members.items()]


def plan(refs: Refs, *, workers: int = 8, excluding: Collection[str] = ()) -> RepackPlan:
    """Read the live versions and find what repacking would change.

    A light pass over every manifest finds the base-only chunks; only when
    there are some are the manifests that list them read in full. Versions
    named in ``excluding`` (``KEY@N``) count as deleted: what repacking would
    do once they are (``prune --dry-run``).
    """
    versions = (ref for ref in live(refs) if f"{ref.key}@{ref.number}" not in excluding)
    named, bases = DigestSet(), DigestSet()
    with_deltas: list[VersionRef] = []
    with ThreadPoolExecutor(workers, "cas-repack-scan") as pool:
        scanned = bounded_map(pool, lambda ref: (ref, _roles(refs, ref)), versions, 4 * workers)
        for ref, (chunks, chains) in scanned:
            for raw in chunks:
                named.add(raw)
            for raw in chains:
                bases.add(raw)
            if chains:
                with_deltas.append(ref)
    base_only = {raw for raw in bases if raw not in named}
    result = RepackPlan(named, base_only)
    if not base_only:
        return result
    with ThreadPoolExecutor(workers, "cas-repack-read") as pool:
        for ref, manifest in zip(
            with_deltas, pool.map(partial(load, refs), with_deltas), strict=True
        ):
            if any(b.raw in base_only for c in chunks_of(manifest) for b in c.bases):
                result.versions.append((ref, manifest))
                _learn(result.known, manifest)
    return result


def live(refs: Refs) -> Iterator[VersionRef]:
    """Every live version ref of the store."""
    for key, _ in refs.iter_keys():
        yield from refs.live_versions(key)


def load(refs: Refs, ref: VersionRef) -> Manifest:
    """The manifest of a live version, checked against its id."""
    assert ref.manifest_id is not None
    blob = refs.backend.get(layout.manifest_key(ref.manifest_id))
    if Digest.of(blob) != ref.manifest_id:
        raise IntegrityError(f"manifest {ref.manifest_id.hex} does not match its hash")
    return Manifest.from_bytes(blob, name=f"manifest {ref.manifest_id.hex}")


def chunks_of(manifest: Manifest) -> Iterator[ChunkRef]:
    for entry in manifest.entries:
        yield from entry.chunks


def _roles(refs: Refs, ref: VersionRef) -> tuple[list[bytes], list[bytes]]:
    assert ref.manifest_id is not None
    return manifest_chunk_roles(refs.backend, ref.manifest_id, f"{ref.key}@{ref.number}")


def _learn(known: dict[bytes, Chain], manifest: Manifest) -> None:
    """Each chunk's chain, and each base's (the rest of the chain): the shortest seen.

    Every chain recorded for a chunk holds every base it needs, perhaps more
    (chains only lose bases), so the shortest is the closest to the truth.
    """
    for chunk in chunks_of(manifest):
        chain = chunk.bases
        for index, digest in enumerate((chunk.digest, *chain)):
            rest = chain[index:]
            current = known.get(digest.raw)
            if current is None or len(rest) < len(current):
                known[digest.raw] = rest
