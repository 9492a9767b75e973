"""Bringing a folder or file that holds an older copy to a version, reusing what it holds.

Each file of the version is compared with the one at its path by whole-file
BLAKE3 and left alone when they match. A file that differs is rebuilt in a
temporary file beside it: from the chunks of its current content that still
hash to a chunk of the new one (read again and rehashed as they are used,
so a file changed meanwhile gives no wrong bytes), and from chunks fetched
from the store. The rebuilt file is checked whole and only then renamed
over the old one, so an update stopped at any moment leaves every file
either as it was or as the version has it. Files the version does not hold
are removed only when asked.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..backends.base import TEMP_PREFIX
from ..chunks._chunking import ChunkerParams
from ..digest import hash_bytes
from ..errors import DestinationExistsError, SourceError
from ..repository._manifest import ChunkRef, Entry, Manifest, check_entries
from ..tensors._cutting import cut_local_file
from ._restore import _SAFE_MODE_BITS, Restorer

#: Our own temporary files, as a restore or an update names them; one left by
#: an update that was killed is removed by the next.
_OUR_TEMP = re.compile(re.escape(TEMP_PREFIX) + r"-[0-9a-f]{32}")


@dataclass
class UpdateCounts:
    """What an update did: files kept, rewritten and removed; bytes reused and fetched."""

    files_kept: int = 0
    files_written: int = 0
    files_removed: int = 0
    #: Files in DEST the version does not hold, left in place (no ``delete``).
    files_extra: int = 0
    #: Raw bytes (and chunks) of DEST reused: unchanged files, chunks of changed ones.
    reused_bytes: int = 0
    reused_chunks: int = 0
    #: Raw bytes (and chunks) DEST did not hold: taken from the store or its cache.
    missing_bytes: int = 0
    missing_chunks: int = 0


@dataclass
class _Plan:
    """One file to rebuild, and where each chunk of its new content lies in the old."""

    entry: Entry
    target: Path
    temp: Path
    where: dict[bytes, tuple[int, int]] = field(default_factory=dict)


class Updater:
    """Brings ``dest`` to a manifest through a :class:`Restorer` (its chunks and workers)."""

    def __init__(self, restorer: Restorer, params: ChunkerParams) -> None:
        self.restorer = restorer
        self.params = params
        self.counts = UpdateCounts()
        self._lock = threading.Lock()  # counts are added to from the worker threads

    def _add(self, **more: int) -> None:
        with self._lock:
            for name, value in more.items():
                setattr(self.counts, name, getattr(self.counts, name) + value)

    def update(self, manifest: Manifest, dest: Path, *, label: str, delete: bool) -> UpdateCounts:
        check_entries(manifest.entries)
        dest = Path(os.path.abspath(dest))
        if manifest.kind == "file":
            (entry,) = manifest.entries
            if os.path.isdir(dest) and not os.path.islink(dest):
                raise DestinationExistsError(
                    f"{dest} is a folder and {label} a single file: choose another destination"
                )
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._update_files([(entry, dest)], label)
            return self.counts
        if os.path.lexists(dest) and (os.path.islink(dest) or not os.path.isdir(dest)):
            raise DestinationExistsError(
                f"{dest} is not a folder and {label} is one: choose another destination"
            )
        dest.mkdir(parents=True, exist_ok=True)
        self._update_tree(manifest.entries, dest, label, delete)
        return self.counts

    # -- a tree ----------------------------------------------------------------------

    def _update_tree(
        self, entries: tuple[Entry, ...], root: Path, label: str, delete: bool
    ) -> None:
        _remove_our_temps(root)
        dirs = [e for e in entries if e.type == "dir"]
        for entry in dirs:
            _real_dir(root, entry.path)
        files = [e for e in entries if e.type == "file"]
        for entry in files:
            _real_dir(root, os.path.dirname(entry.path))
        self._update_files([(e, root / e.path) for e in files], label)
        for entry in entries:
            if entry.type == "symlink":
                _real_dir(root, os.path.dirname(entry.path))
                _place_link(root / entry.path, entry.target or "")
        wanted = {e.path for e in entries}
        wanted |= {parent for path in wanted for parent in _parents(path)}
        for extra in sorted(_walk(root), key=lambda p: p.count("/"), reverse=True):
            if extra in wanted:
                continue
            if not delete:
                self.counts.files_extra += not (root / extra).is_dir()
            elif _remove_extra(root / extra):
                self.counts.files_removed += 1
        for entry in sorted(dirs, key=lambda e: e.path.count("/"), reverse=True):
            os.chmod(root / entry.path, entry.mode & _SAFE_MODE_BITS)

    # -- files -----------------------------------------------------------------------

    def _update_files(self, targets: list[tuple[Entry, Path]], label: str) -> None:
        with ThreadPoolExecutor(self.restorer.workers, thread_name_prefix="cas-scan") as pool:
            plans = [p for p in pool.map(lambda t: self._plan(*t), targets) if p is not None]
        by_path = {plan.entry.path: plan for plan in plans}

        def read(entry: Entry, chunk: ChunkRef, context: str) -> bytes | memoryview:
            data = _read_local(by_path[entry.path], chunk)
            if data is None:
                self._add(missing_bytes=chunk.length, missing_chunks=1)
                return self.restorer.fetch(entry, chunk, context)
            self._add(reused_bytes=len(data), reused_chunks=1)
            return data

        def placed(entry: Entry, temp: Path) -> None:
            target = by_path[entry.path].target
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(temp, target)
            self._add(files_written=1)

        try:
            self.restorer._write_files(
                [(p.entry, p.temp) for p in plans], label, read=read, placed=placed
            )
        finally:
            for plan in plans:
                plan.temp.unlink(missing_ok=True)

    def _plan(self, entry: Entry, target: Path) -> _Plan | None:
        """None when ``target`` already holds ``entry`` (its mode set right); else what
        to rebuild it from."""
        temp = target.parent / f"{TEMP_PREFIX}-{uuid.uuid4().hex}"
        if target.is_symlink() or not target.is_file():
            return _Plan(entry, target, temp)
        try:
            local = cut_local_file(target, self.params, entry)
        except SourceError:
            return _Plan(entry, target, temp)  # unreadable or growing: fetch it all
        if local is not None and local.digest == entry.digest:
            if (target.stat().st_mode & 0o7777) != (entry.mode & _SAFE_MODE_BITS):
                os.chmod(target, entry.mode & _SAFE_MODE_BITS)
            self._add(files_kept=1, reused_bytes=entry.size, reused_chunks=len(entry.chunks))
            if self.restorer.progress is not None:
                self.restorer.progress(entry.size)
            return None
        return _Plan(entry, target, temp, local.where if local is not None else {})


def _read_local(plan: _Plan, chunk: ChunkRef) -> bytes | None:
    """The chunk's bytes from the old file, if they are still there and still hash right."""
    found = plan.where.get(chunk.digest.raw)
    if found is None:
        return None
    offset, length = found
    try:
        with open(plan.target, "rb") as stream:
            data = os.pread(stream.fileno(), length, offset)
    except OSError:
        return None
    # The file may have changed since it was cut: trust only bytes that
    # still hash to the chunk's name.
    return data if len(data) == chunk.length and hash_bytes(data) == chunk.digest.raw else None


def _parents(path: str) -> Iterator[str]:
    """``a/b/c`` -> ``a/b``, ``a``."""
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        yield path


def _real_dir(root: Path, relative: str) -> None:
    """Make ``root/relative`` a real folder, replacing a link or file in its way at
    any level: nothing is ever written through a link an old copy held."""
    path = root
    for part in [p for p in relative.split("/") if p]:
        path = path / part
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            path.unlink()
        if not path.exists():
            path.mkdir()


def _place_link(path: Path, target: str) -> None:
    if path.is_symlink() and os.readlink(path) == target:
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    temp = path.parent / f"{TEMP_PREFIX}-{uuid.uuid4().hex}"
    os.symlink(target, temp)
    os.replace(temp, path)


def _walk(root: Path) -> Iterator[str]:
    """Every path under ``root``, relative and ``/``-separated; links are not followed."""
    for folder, dirnames, filenames in os.walk(root):
        base = Path(folder).relative_to(root)
        for name in dirnames + filenames:
            yield (base / name).as_posix()


def _remove_extra(path: Path) -> bool:
    """Remove a file or link the version does not hold, or an emptied folder; True
    if something went."""
    if path.is_dir() and not path.is_symlink():
        try:
            path.rmdir()
        except OSError:
            return False  # still holds what the version keeps
        return False
    path.unlink(missing_ok=True)
    return True


def _remove_our_temps(root: Path) -> None:
    for folder, _, filenames in os.walk(root):
        for name in filenames:
            if _OUR_TEMP.fullmatch(name):
                (Path(folder) / name).unlink(missing_ok=True)
