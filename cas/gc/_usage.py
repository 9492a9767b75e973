"""What deleting some versions frees at the next garbage collection.

It counts what :class:`~cas.repository._live.LiveVersions` walks and what
:meth:`~cas.repository._manifest.Manifest.live_chunks` says a manifest keeps
alive (its chunks and their delta bases), as garbage collection marks it, so
that ``prune --dry-run`` reports what a collection then frees.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..digest import Digest
from ..errors import NotFoundError
from ..repository import _layout as layout

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..repository._manifest import Manifest
    from ..repository._refs import Refs, VersionRef

# The walk is imported where used: every command loads this module for its
# value type, and only prune walks the store with it.
LoadManifest = Callable[[Digest], "Manifest"]


@dataclass(frozen=True, slots=True)
class Reclaimable:
    """What the next garbage collection frees once some versions are deleted."""

    raw_bytes: int  # raw bytes of the chunks no remaining version needs
    stored_bytes: int  # what those chunks and the freed manifests occupy in the store
    chunks: int


def reclaimable(
    refs: Refs,
    load_manifest: LoadManifest,
    doomed: Mapping[str, Digest],
    *,
    workers: int = 1,
) -> Reclaimable:
    """What deleting the versions ``doomed`` (``KEY@N`` -> manifest id) frees at the next GC.

    The chunks they keep alive that no other live version does, anywhere in
    the store, and their manifests unless another version shares them.
    """
    if not doomed:
        return Reclaimable(0, 0, 0)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="cas-reclaim") as pool:
        candidates: dict[bytes, int] = {}
        for manifest in pool.map(load_manifest, sorted(set(doomed.values()))):
            for _, digest, length in manifest.live_chunks():
                candidates[digest.raw] = length
        kept = _keep_what_others_need(refs, load_manifest, doomed, candidates, workers)
        keys = [layout.chunk_key(Digest(raw)) for raw in candidates]
        keys += [layout.manifest_key(m) for m in set(doomed.values()) - kept]
        backend = refs.backend
        stored = sum(pool.map(lambda key: _stored_size(backend, key), keys))
    return Reclaimable(sum(candidates.values()), stored, len(candidates))


def _keep_what_others_need(
    refs: Refs,
    load_manifest: LoadManifest,
    doomed: Mapping[str, Digest],
    candidates: dict[bytes, int],
    workers: int,
) -> set[Digest]:
    """Drop from ``candidates`` what the versions that stay keep alive; their manifests."""
    from ..repository._live import LiveVersions

    seen: set[Digest] = set()

    def read(ref: VersionRef) -> Manifest | None:
        # Once nothing is left to drop, the walk only collects manifest ids.
        if ref.label in doomed or ref.manifest_id in seen or not candidates:
            return None
        seen.add(ref.manifest_id)
        return load_manifest(ref.manifest_id)

    kept: set[Digest] = set()
    for ref, manifest in LiveVersions(refs, read, workers=workers):
        if ref.label in doomed:
            continue
        kept.add(ref.manifest_id)
        for _, digest, _ in manifest.live_chunks() if manifest is not None else ():
            candidates.pop(digest.raw, None)
    return kept


def _stored_size(backend: Backend, object_key: str) -> int:
    try:
        return backend.stat(object_key).size
    except NotFoundError:
        return 0  # already gone (a damaged store): nothing to reclaim
