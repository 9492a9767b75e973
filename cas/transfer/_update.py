"""Bringing a folder or file that holds an older copy to a version, reusing what it holds.

The old copy of each file is read once, in one pass with the building of
the new: each chunk of the version is looked for at its own offset in the
old copy (and, in a file whose size changed, wherever a cut of the old copy
as a put would cut it finds it), read and hashed, and used only if it
hashes to the chunk's name, so a file changed meanwhile gives no wrong
bytes. A chunk the old copy lacks is fetched from the store; a changed
tensor's chunk, stored as a delta of its former self, is rebuilt on the old
copy of that chunk, so only the delta is fetched. A file whose every chunk
is where it was is left alone (its mode set right); any other is written
into a temporary file beside it, checked whole and only then renamed over
the old one, so an update stopped at any moment leaves every file either
as it was or as the version has it. Files the version does not hold are
removed only when asked.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..backends.base import TEMP_PREFIX
from ..chunks._chunking import ChunkerParams
from ..digest import hash_bytes, hasher_for
from ..errors import DestinationExistsError, SourceError
from ..repository._manifest import Entry, Manifest, check_entries
from ..tensors._cutting import cut_local_file
from ._restore import _SAFE_MODE_BITS, Restorer, check_whole

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
    """One file to bring to its new content, and what its old copy offers."""

    entry: Entry
    target: Path
    temp: Path
    #: The size of the old copy (-1: no regular file there), and the copy open
    #: for reading once a chunk is looked for in it (closed when the file is done).
    old_size: int = -1
    old: int | None = None
    #: Offset of each chunk of the new content.
    offsets: list[int] = field(default_factory=list)
    #: Chunks found at their own offset in the old copy (hashed there).
    aligned: set[int] = field(default_factory=set)
    #: Where each chunk of the old copy lies, cut as a put would (None: not cut
    #: yet). Only a file whose size changed is cut: its content may have moved.
    where: dict[bytes, tuple[int, int]] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    cutting: threading.Lock = field(default_factory=threading.Lock)

    @property
    def same_size(self) -> bool:
        return self.old_size == self.entry.size

    def read_old(self, offset: int, length: int) -> tuple[bytes, bytes] | None:
        """(bytes, their BLAKE3) of a range of the old copy; None if it is not there."""
        if self.old_size < 0 or offset + length > self.old_size:
            return None
        try:
            with self.lock:
                if self.old is None:
                    self.old = os.open(self.target, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            data = os.pread(self.old, length, offset)
        except OSError:
            return None  # unreadable, or replaced by a folder: fetch it
        return (data, hash_bytes(data)) if len(data) == length else None

    def close(self) -> None:
        with self.lock:
            if self.old is not None:
                os.close(self.old)
                self.old = None


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
        plans = [self._plan(entry, target) for entry, target in targets]
        by_path = {plan.entry.path: plan for plan in plans}

        def read(entry: Entry, index: int, context: str) -> bytes | memoryview:
            return self._read(by_path[entry.path], index, context)

        def sink(entry: Entry, temp: Path) -> _Rebuilt:
            return _Rebuilt(self, by_path[entry.path], label)

        try:
            self.restorer.write_files(
                [(p.entry, p.temp) for p in plans], label, read=read, sink=sink
            )
        finally:
            for plan in plans:
                plan.close()
                plan.temp.unlink(missing_ok=True)

    def _plan(self, entry: Entry, target: Path) -> _Plan:
        """What the old copy at ``target`` offers (not read yet)."""
        plan = _Plan(entry, target, target.parent / f"{TEMP_PREFIX}-{uuid.uuid4().hex}")
        offset = 0
        for chunk in entry.chunks:
            plan.offsets.append(offset)
            offset += chunk.length
        if not target.is_symlink() and target.is_file():
            plan.old_size = target.stat().st_size
        return plan

    def _read(self, plan: _Plan, index: int, context: str) -> bytes | memoryview:
        """Chunk ``index`` of the new content: from the old copy where it still hashes
        right (at its own offset, else, in a file whose size changed, wherever a cut
        finds it), else from the store, its delta base taken from the old copy."""
        chunk = plan.entry.chunks[index]
        here = plan.read_old(plan.offsets[index], chunk.length)
        if here is not None and here[1] == chunk.digest.raw:
            plan.aligned.add(index)
            return self._reused(here[0])
        known: dict[bytes, bytes | memoryview] = {}
        if here is not None and chunk.bases and here[1] == chunk.bases[0].raw:
            known[here[1]] = here[0]  # the old copy of a changed chunk: its delta base
        elif not plan.same_size and plan.old_size >= 0:
            elsewhere = self._elsewhere(plan, chunk.digest.raw)
            if elsewhere is not None:
                return self._reused(elsewhere)
            base = self._elsewhere(plan, chunk.bases[0].raw) if chunk.bases else None
            if base is not None:
                known[chunk.bases[0].raw] = base
        self._add(missing_bytes=chunk.length, missing_chunks=1)
        return self.restorer.fetch(plan.entry, index, context, known=known)

    def _reused(self, data: bytes) -> bytes:
        self._add(reused_bytes=len(data), reused_chunks=1)
        return data

    def _elsewhere(self, plan: _Plan, digest: bytes) -> bytes | None:
        """The bytes of chunk ``digest`` wherever the old copy holds them, rehashed."""
        with plan.cutting:
            if plan.where is None:
                try:
                    local = cut_local_file(plan.target, self.params, plan.entry)
                except SourceError:
                    local = None  # unreadable or growing: fetch the rest
                plan.where = local.where if local is not None else {}
        found = plan.where.get(digest)
        if found is None:
            return None
        data = plan.read_old(*found)
        # The file may have changed since it was cut: trust only bytes that
        # still hash to the chunk's name.
        return data[0] if data is not None and data[1] == digest else None


class _Rebuilt:
    """The sink of a file being updated.

    A file of the same size as its old copy is not written while every chunk
    is found at its own offset there: if all are, the file is left alone
    (its mode set right). At the first chunk that is not, a temporary file
    beside it is begun: the chunks before are read from the old copy again
    and rehashed (fetched if they changed meanwhile), and the rest written
    as they come. Either way the new content is hashed whole, and a
    rebuilt file replaces the old only once it matches.
    """

    def __init__(self, updater: Updater, plan: _Plan, label: str) -> None:
        self.updater = updater
        self.plan = plan
        self.label = label
        self.hasher = hasher_for(plan.entry.size)
        self.stream: BinaryIO | None = None
        if not plan.same_size:
            self._begin(0)

    def add(self, index: int, raw: bytes | memoryview) -> None:
        if self.stream is None and index not in self.plan.aligned:
            self._begin(index)
        if self.stream is not None:
            self.stream.write(raw)
        self.hasher.update(raw)

    def _begin(self, index: int) -> None:
        """Start the temporary file with the first ``index`` chunks, all found
        at their own offsets in the old copy when they were read."""
        plan = self.plan
        self.stream = open(plan.temp, "wb")  # noqa: SIM115 (closed by finish or close)
        for before in range(index):
            chunk = plan.entry.chunks[before]
            again = plan.read_old(plan.offsets[before], chunk.length)
            if again is None or again[1] != chunk.digest.raw:  # changed since: fetch it
                self.updater._add(missing_bytes=chunk.length, missing_chunks=1)
                self.updater._add(reused_bytes=-chunk.length, reused_chunks=-1)
                context = f"{self.label}: file {plan.entry.path!r}"
                self.stream.write(self.updater.restorer.fetch(plan.entry, before, context))
            else:
                self.stream.write(again[0])

    def finish(self) -> None:
        plan, entry = self.plan, self.plan.entry
        plan.close()
        if self.stream is not None:
            self.stream.close()
        check_whole(entry, self.hasher.digest(), self.label)
        mode = entry.mode & _SAFE_MODE_BITS
        if self.stream is None:  # every chunk where it was: the old copy is the new one
            _set_mode(plan, mode)
            self.updater._add(files_kept=1)
            return
        os.chmod(plan.temp, mode)
        if plan.target.is_dir() and not plan.target.is_symlink():
            shutil.rmtree(plan.target)
        os.replace(plan.temp, plan.target)
        self.updater._add(files_written=1)

    def close(self) -> None:
        self.plan.close()
        if self.stream is not None:
            self.stream.close()
        self.hasher.close()


def _set_mode(plan: _Plan, mode: int) -> None:
    """Give a file kept as it was the version's mode. A file with other names
    (one a ``get --link`` shares with the cache) is first made a file of its
    own: a mode set on it would be set on every name, the cache's too."""
    found = os.stat(plan.target)
    if (found.st_mode & 0o7777) == mode:
        return
    if found.st_nlink > 1:
        shutil.copyfile(plan.target, plan.temp)
        os.chmod(plan.temp, mode)
        os.replace(plan.temp, plan.target)
        return
    os.chmod(plan.target, mode)


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
