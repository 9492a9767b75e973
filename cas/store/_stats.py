"""What a store holds, in the terms a user acts on (``cas stats``).

A live version names its chunks; a chunk stored as a delta also needs its
bases. Once the version a base came from is deleted, the base is kept only
for the deltas of live versions: those bytes belong to no live version's
content, yet no collection frees them until gc's repack has stored those
deltas again (:mod:`cas.gc._repack`); the store fills in what that frees.
"""

from __future__ import annotations

from collections.abc import Callable

from ..backends import Backend
from ..chunks._store import ChunkStore
from ..digest import Digest
from ..repository import _layout as layout
from ..repository._live import LiveVersions
from ..repository._manifest import ChunkRef, Manifest
from ..repository._refs import Refs
from ._values import Stats


def measure(
    refs: Refs,
    load_manifest: Callable[[Digest], Manifest],
    chunks: ChunkStore,
    backend: Backend,
    *,
    workers: int = 1,
) -> Stats:
    """Sizes and counts of the store behind ``refs``, walked as garbage collection walks it."""
    keys: set[str] = set()
    versions = logical = 0
    named: dict[bytes, ChunkRef] = {}  # chunks live versions name, by raw digest
    needed: set[bytes] = set()  # and what they keep alive: those and their delta bases
    bases: set[bytes] = set()
    deltas: set[bytes] = set()  # needed chunks that are deltas: all of a chain but its root
    live_manifests: set[str] = set()
    walk = LiveVersions(refs, lambda ref: load_manifest(ref.manifest_id), workers=workers)
    for ref, manifest in walk:
        live_manifests.add(layout.manifest_key(ref.manifest_id))
        keys.add(ref.key)
        versions += 1
        logical += manifest.size
        needed.update(digest.raw for _, digest, _ in manifest.live_chunks())
        for entry in manifest.entries:
            for chunk in entry.chunks:
                named[chunk.digest.raw] = chunk
                if chunk.bases:
                    bases.update(base.raw for base in chunk.bases)
                    deltas.update(d.raw for d in (chunk.digest, *chunk.bases[:-1]))
    stored_sizes = {digest.raw: info.size for digest, info in chunks.list_chunks()}
    base_only = needed - named.keys()
    manifest_bytes = live_manifest_bytes = 0
    for info in backend.list_objects(layout.MANIFESTS):
        manifest_bytes += info.size
        live_manifest_bytes += info.size if info.key in live_manifests else 0
    base_only_bytes = sum(stored_sizes.get(raw, 0) for raw in base_only)
    return Stats(
        keys=len(keys),
        versions=versions,
        logical_bytes=logical,
        unique_bytes=sum(chunk.length for chunk in named.values()),
        stored_bytes=sum(stored_sizes.values()) + manifest_bytes,
        chunks=len(stored_sizes),
        referenced_chunks=len(needed),
        live_bytes=sum(stored_sizes.get(raw, 0) for raw in needed) + live_manifest_bytes,
        delta_base_bytes=base_only_bytes,
        delta_chunks=len(deltas),
        delta_bytes=sum(stored_sizes.get(raw, 0) for raw in deltas),
        base_chunks=len(bases),
    )
