"""A get or an update of one version, and the account of where its bytes came from."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..chunks._chunking import ChunkerParams
from ..chunks._store import ChunkStore
from ..errors import InvalidInputError
from ..repository._manifest import Manifest
from ._values import Restored, Version

ProgressFn = Callable[[int], None]


def check_restore_options(
    *, force: bool, update: bool, delete: bool, link: bool = False, cached: bool = True
) -> None:
    if force and update:
        raise InvalidInputError.naming(
            "give {force_or_update}, not both: the first replaces DEST whole, "
            "the second reuses it (choose one)",
            force_or_update="force=True or update=True",
        )
    if delete and not update:
        raise InvalidInputError.naming(
            "{delete} removes files an update does not need; it needs {update}",
            delete="delete=True",
            update="update=True",
        )
    if link and update:
        raise InvalidInputError.naming(
            "{link} hard-links whole files from the cache into a new DEST; an update "
            "rewrites only what changed: give one of {link} and {update}",
            link="link=True",
            update="update=True",
        )
    if link and not cached:
        raise InvalidInputError.naming(
            "{link} links files from the local chunk cache, and this store is read "
            "without one: open it with a cache (a remote store, or {cache})",
            link="link=True",
            cache="cache=DIR",
        )


def refuse_replacing_store(store_root: Path | None, dest: Path) -> None:
    """A forced restore replaces DEST whole: never when DEST holds this store
    (whose folder is ``store_root``, None for one not on a local folder)."""
    if store_root is None or not os.path.lexists(dest):
        return
    target, root = dest.resolve(), store_root.resolve()
    if root == target or target in root.parents:
        raise InvalidInputError(
            f"destination {dest} holds this store ({root}); restoring there would "
            "replace the store itself: choose another destination"
        )


def restore_version(
    chunks: ChunkStore,
    params: ChunkerParams,
    manifest: Manifest,
    dest: Path,
    *,
    label: str,
    describe: Callable[[], Version],
    force: bool,
    update: bool,
    delete: bool,
    progress: ProgressFn | None,
    workers: int,
    link: bool = False,
) -> Restored:
    """Write ``manifest`` to ``dest`` (see :meth:`Store.restore`); ``describe``
    gives the version for the result."""
    # Imported here: every command imports this module, only gets need these.
    from ..transfer._restore import Restorer
    from ..transfer._update import UpdateCounts, Updater

    restorer = Restorer(chunks, workers=workers, progress=progress, link=link)
    if update and os.path.lexists(dest):
        counts = Updater(restorer, params).update(manifest, dest, label=label, delete=delete)
    else:
        restorer.restore(manifest, dest, label=label, force=force)
        files = [e for e in manifest.entries if e.type == "file"]
        counts = UpdateCounts(
            files_written=len(files),
            missing_bytes=sum(e.size for e in files),
            missing_chunks=sum(len(e.chunks) for e in files),
        )
    tally = restorer.tally
    return Restored(
        describe(),
        os.path.abspath(dest),
        fetched_bytes=tally.fetched_bytes,
        fetched_chunks=tally.fetched_chunks,
        cached_bytes=tally.cached_bytes,
        cached_chunks=tally.cached_chunks,
        reused_bytes=counts.reused_bytes,
        reused_chunks=counts.reused_chunks,
        missing_bytes=counts.missing_bytes,
        missing_chunks=counts.missing_chunks,
        files_kept=counts.files_kept,
        files_written=counts.files_written,
        files_removed=counts.files_removed,
        files_extra=counts.files_extra,
        update=update,
        linked_files=restorer.linked_files,
        linked_bytes=restorer.linked_bytes,
        link=link,
    )
