"""A local folder of chunk objects, shared by every process on the machine.

A read of a remote store keeps each chunk it fetched here, decoded (its raw
bytes, which its name is the hash of), under its hash; the next read of that
chunk, by this process or another, takes it from disk with nothing to
decode: a warm restore costs a copy and a hash per chunk, not a
decompression. Nothing here is trusted: the chunk store rehashes a cached
chunk on every use and drops it (:meth:`LocalCache.discard`) when it does
not match its name.

Sharing needs no lock. An entry is written under a temporary name in
``tmp/`` and renamed into ``chunks/``, so a reader sees a whole object or
none; a reader holds the bytes once it has opened the file, so an eviction
that unlinks it meanwhile takes nothing from it; a torn write (a machine
that lost power) leaves bytes that fail their hash, which the next reader
drops. Recency is the file's modification time, refreshed on use; the
least recently used entries go first when the folder grows past its limit.
A cache that cannot be written (full disk, read-only folder) is reported
once and then only read: the read it served still succeeds.

A get asked to link (``cas get --link``) also keeps each file it restored,
whole, under ``files/``: a hard link to the restored file, made read-only,
so it costs no space while that file exists. The next such get of the same
content links it again instead of writing it, once the linked file hashes
to its name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import shutil
import stat
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..digest import Digest, hash_bytes, hash_file
from ..errors import CacheWarning
from ..repository._manifest import MAX_CHUNK_LENGTH

#: The default limit of a cache folder, all stores together.
DEFAULT_LIMIT = 4 * 1024**3
#: Eviction brings the folder down to this share of its limit, so that the
#: next few writes do not each start another one.
_LOW_WATER = 0.9
#: A use refreshes an entry's time only when it is older than this: a hot
#: chunk read by many workers is not touched on every read.
_TOUCH_AFTER = 60.0
#: Temporary files older than this belong to a writer that died.
_STALE_TEMP = 3600.0
#: No entry is larger than a chunk can be.
_MAX_ENTRY = MAX_CHUNK_LENGTH
#: Where a store's folder keeps its entries (``raw/<h[:2]>/<h>``). Caches
#: written before entries were kept decoded hold stored objects under
#: ``chunks/``: never read, but counted, evicted and cleared like the rest.
_ENTRIES = "raw"
_FORMER_ENTRIES = "chunks"
#: Whole restored files, hard links of files a get wrote (``files/<h[:2]>/<h>``).
_FILES = "files"


@dataclass(frozen=True, slots=True)
class CacheCounts:
    """What one cache object served since it was opened."""

    hits: int = 0
    hit_bytes: int = 0
    misses: int = 0
    saved: int = 0
    dropped: int = 0


@dataclass(frozen=True, slots=True)
class StoreUsage:
    """The entries one store holds in a cache folder: chunks, and whole files
    (``files`` of the ``entries``, kept by gets that link)."""

    store: str
    folder: Path
    entries: int
    size: int
    files: int = 0


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/cas``, else ``~/.cache/cas``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cas"


def store_folder_name(store_uri: str) -> str:
    """A readable, unique folder name for a store: its URI made safe, and a hash of it."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", store_uri.split("://", 1)[-1]).strip("-.")[:48]
    return f"{slug or 'store'}-{hash_bytes(store_uri.encode()).hex()[:12]}"


class LocalCache:
    """The cache folder ``root`` as seen by one store (``store_uri``).

    ``limit`` is the size of the whole folder (every store in it) that
    eviction keeps to. Thread-safe; any number of processes may share it.
    """

    def __init__(self, root: Path, store_uri: str, *, limit: int = DEFAULT_LIMIT) -> None:
        self.root = Path(root)
        self.store_uri = store_uri
        self.limit = limit
        self.folder = self.root / store_folder_name(store_uri)
        self._lock = threading.Lock()
        self._counts = CacheCounts()
        self._writable = True
        self._links_reported = False
        #: Bytes in the folder as last scanned plus what this process added
        #: since (None: not scanned yet); other processes' writes show at the
        #: next scan, so each may overshoot the limit by what it writes meanwhile.
        self._estimate: int | None = None

    # -- reading -------------------------------------------------------------------

    def entry_path(self, digest: Digest) -> Path:
        name = digest.hex
        return self.folder / _ENTRIES / name[:2] / name

    def load(self, digest: Digest) -> bytes | None:
        """The cached raw bytes of ``digest`` (unverified), or None if they are not here."""
        path = self.entry_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            # Not there, or evicted just now: the store has it.
            self._count(misses=1)
            return None
        try:
            stat = os.fstat(fd)
            blob = None if stat.st_size > _MAX_ENTRY else _read_all(fd, stat.st_size)
            if blob is not None and time.time() - stat.st_mtime > _TOUCH_AFTER:
                self._touch(fd)
        except OSError:
            # Unreadable: the store has it.
            self._count(misses=1)
            return None
        finally:
            os.close(fd)
        if blob is None:
            self.discard(digest, "it is larger than any chunk object can be")
            self._count(misses=1)
            return None
        self._count(hits=1, hit_bytes=len(blob))
        return blob

    def contains(self, digest: Digest) -> bool:
        return self.entry_path(digest).is_file()

    @staticmethod
    def _touch(fd: int) -> None:
        # A folder we may read but not write: recency is a hint only.
        with contextlib.suppress(OSError):
            os.utime(fd)

    # -- writing -------------------------------------------------------------------

    def save(self, digest: Digest, blob: bytes | memoryview) -> None:
        """Keep ``blob`` (the verified raw bytes of ``digest``) for its next read."""
        if not self._writable:
            return
        path = self.entry_path(digest)
        temp = self._temp_name()
        try:
            self._make_folders(temp, path)
            with open(temp, "wb", buffering=0) as stream:
                _write_all(stream.fileno(), blob)
            os.replace(temp, path)
        except OSError as err:
            _unlink(temp)
            # A folder vanishing under us is a concurrent clear: this entry is just
            # not kept. Anything else (a full disk, a read-only or unwritable
            # folder) stops the writes; the read goes on without them.
            if err.errno != errno.ENOENT:
                self._stop_writing(err)
            return
        self._count(saved=1)
        self._added(len(blob))

    # -- whole files -----------------------------------------------------------------

    def file_path(self, digest: Digest) -> Path:
        name = digest.hex
        return self.folder / _FILES / name[:2] / name

    def link_file(self, digest: Digest, size: int, mode: int, path: Path) -> bool:
        """Hard-link the cached whole file ``digest`` to ``path`` (which must not
        exist); True once the link is there and hashes to ``digest``.

        The link is checked, not the entry before it: what is verified is
        exactly what ``path`` now holds. A file of another size or ``mode``
        (the permission bits), or owned by another user, is left alone; one
        that fails its hash is dropped and reported.
        """
        if size == 0:
            return False
        source = self.file_path(digest)
        try:
            os.link(source, path)
        except OSError as err:
            # Not held (or evicted just now), or not ours to link: restore it.
            # Only another filesystem is worth a word: it holds for every file.
            if err.errno == errno.EXDEV:
                self._cannot_link(err)
            return False
        try:
            linked = os.stat(path)
            # A file another user owns stays theirs to change after it was checked.
            if (
                not stat.S_ISREG(linked.st_mode)
                or linked.st_size != size
                or stat.S_IMODE(linked.st_mode) != mode
                or linked.st_uid != os.geteuid()
            ):
                _unlink(path)
                return False
            good = hash_file(path) == digest
        except OSError:
            _unlink(path)
            return False
        if not good:
            _unlink(path)
            self._discard_file(digest, linked.st_ino)
            return False
        if time.time() - linked.st_mtime > _TOUCH_AFTER:
            with contextlib.suppress(OSError):
                os.utime(path)
        return True

    def keep_file(self, digest: Digest, path: Path) -> None:
        """Keep ``path`` (a restored, verified, read-only file whose content is
        ``digest``) as a hard link, for the next get that links."""
        if not self._writable:
            return
        target = self.file_path(digest)
        temp = self._temp_name()
        try:
            size = os.stat(path).st_size
            self._make_folders(temp, target)
            os.link(path, temp)
            os.replace(temp, target)
        except OSError as err:
            _unlink(temp)
            if err.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                self._cannot_link(err)
            elif err.errno != errno.ENOENT:
                self._stop_writing(err)
            return
        self._added(size)

    def _cannot_link(self, err: OSError) -> None:
        with self._lock:
            if self._links_reported:
                return
            self._links_reported = True
        warnings.warn(
            CacheWarning(
                f"cannot hard-link files between the cache in {self.root} and the "
                f"destination ({err.strerror or err}); they are written, not linked"
            ),
            stacklevel=2,
        )

    def _discard_file(self, digest: Digest, inode: int) -> None:
        path = self.file_path(digest)
        # Only the entry that was checked: another process may have put a good one since.
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                path.unlink()
        self._count(dropped=1)
        warnings.warn(
            CacheWarning(
                f"cached file {digest.hex} in {self.folder} was damaged (its content does "
                "not match its hash: a linked copy was written to?); dropped it and "
                "restored the file from its chunks"
            ),
            stacklevel=2,
        )

    def _temp_name(self) -> Path:
        return self.folder / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex}"

    def _make_folders(self, temp: Path, target: Path) -> None:
        for folder in (temp.parent, target.parent):
            folder.mkdir(parents=True, exist_ok=True)
        self._write_store_name()

    def _write_store_name(self) -> None:
        """Name the store a folder belongs to, for ``cas cache stats``."""
        name = self.folder / "store"
        if name.exists():
            return
        temp = self._temp_name()
        temp.write_text(self.store_uri + "\n")
        os.replace(temp, name)

    def _stop_writing(self, err: OSError) -> None:
        with self._lock:
            if not self._writable:
                return
            self._writable = False
        warnings.warn(
            CacheWarning(
                f"the chunk cache in {self.root} cannot be written ({err.strerror or err}); "
                "reading on without keeping what is fetched"
            ),
            stacklevel=2,
        )

    def discard(self, digest: Digest, reason: str) -> None:
        """Drop a damaged entry, and say so: a cache is never trusted over its store."""
        path = self.entry_path(digest)
        _unlink(path)
        self._count(dropped=1)
        warnings.warn(
            CacheWarning(
                f"cached chunk {digest.hex} in {self.folder} was damaged ({reason}); "
                "dropped it and fetched the chunk from the store"
            ),
            stacklevel=2,
        )

    # -- size ----------------------------------------------------------------------

    def _added(self, size: int) -> None:
        with self._lock:
            scan = self._estimate is None or self._estimate + size > self.limit
            if self._estimate is not None:
                self._estimate += size
        if scan:
            remaining = evict(self.root, self.limit)
            with self._lock:
                self._estimate = remaining

    @property
    def counts(self) -> CacheCounts:
        with self._lock:
            return self._counts

    def _count(self, **more: int) -> None:
        with self._lock:
            now = self._counts
            self._counts = dataclasses.replace(
                now, **{name: getattr(now, name) + value for name, value in more.items()}
            )


# -- the whole folder ------------------------------------------------------------------


def _read_all(fd: int, size: int) -> bytes:
    """The ``size`` bytes of an open entry (fewer if it is shorter: its hash will not match)."""
    blob = os.read(fd, size)
    while len(blob) < size and (more := os.read(fd, size - len(blob))):
        blob += more
    return blob


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def _store_entries(store: str) -> Iterator[os.DirEntry[str]]:
    """Every entry file of one store's folder, current and former layout."""
    for kind in (_ENTRIES, _FORMER_ENTRIES, _FILES):
        for shard in _scandir(os.path.join(store, kind)):
            yield from _scandir(shard.path)


def _entries(root: Path) -> Iterator[tuple[float, int, str]]:
    """(last use, size, path) of every entry of every store under ``root``."""
    for store in _scandir(root):
        for entry in _store_entries(store.path):
            try:
                stat = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # evicted meanwhile
            yield stat.st_mtime, stat.st_size, entry.path


def _scandir(path: str | Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return [e for e in entries if e.is_dir(follow_symlinks=False) or e.is_file()]
    except OSError:
        return []


def evict(root: Path, limit: int) -> int:
    """Delete the least recently used entries until the folder holds at most
    ``limit`` bytes (down to a little under it); returns the bytes left.

    Safe beside readers: one that opened an entry keeps its bytes, one that
    comes after finds it missing and fetches from the store. Temporary
    files of writers that died are removed too.
    """
    _remove_stale_temps(root)
    entries = sorted(_entries(root))
    total = sum(size for _, size, _ in entries)
    if total <= limit:
        return total
    target = int(limit * _LOW_WATER)
    for _, size, path in entries:
        if total <= target:
            break
        _unlink(Path(path))
        total -= size
    return total


def _remove_stale_temps(root: Path) -> None:
    cutoff = time.time() - _STALE_TEMP
    for store in _scandir(root):
        for temp in _scandir(os.path.join(store.path, "tmp")):
            try:
                if temp.stat().st_mtime < cutoff:
                    os.unlink(temp.path)
            except OSError:
                pass


def usage(root: Path) -> list[StoreUsage]:
    """What each store holds in the cache folder ``root``."""
    found = []
    for store in _scandir(root):
        if not store.is_dir():
            continue
        entries = size = files = 0
        whole = os.path.join(store.path, _FILES, "")
        for entry in _store_entries(store.path):
            try:
                size += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
            entries += 1
            files += entry.path.startswith(whole)
        try:
            name = (Path(store.path) / "store").read_text().strip()
        except OSError:
            name = "(unknown)"
        found.append(StoreUsage(name, Path(store.path), entries, size, files))
    return sorted(found, key=lambda u: u.store)


def clear(root: Path) -> StoreUsage:
    """Empty the cache folder ``root``; returns what it held (as one total).

    Each store's folder is renamed aside before it is deleted, so a process
    reading meanwhile sees either the old entries or none.
    """
    held = usage(root)
    for store in held:
        aside = root / f".deleting-{uuid.uuid4().hex}"
        try:
            os.rename(store.folder, aside)
        except OSError:
            continue
        shutil.rmtree(aside, ignore_errors=True)
    return StoreUsage(
        "all",
        root,
        sum(u.entries for u in held),
        sum(u.size for u in held),
        sum(u.files for u in held),
    )


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
