"""A folder on a local (or mounted) file system.

Writes go to a temporary file beside the target, are fsynced, then moved into
place: ``os.replace`` for plain writes, ``os.link`` for create-only writes
(``link`` fails if the name exists, atomically), and a lock on the directory
around the check-and-rename of compare-and-swap writes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import stat
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from ..errors import (
    AlreadyExistsError,
    BackendError,
    CasError,
    ConfigurationError,
    InvalidInputError,
    NoSpaceLeftError,
    NotFoundError,
    PreconditionFailedError,
)
from .base import (
    TEMP_PREFIX,
    Backend,
    BytesLike,
    Leftover,
    ObjectInfo,
    check_key,
    check_put_conditions,
)

#: errno values of a full device (or of a used-up quota).
_FULL = (errno.ENOSPC, errno.EDQUOT)
#: The file at the root of a store that holds space back for cleanups; in
#: the reserved ``.cas-tmp`` namespace, so no key can name it.
RESERVE_NAME = f"{TEMP_PREFIX}-reserve"
#: Space a cleanup needs at most: its marker, the tombstones it writes one at
#: a time (each replaces a ref of the same size), a new directory block or two.
RESERVE_SIZE = 256 * 1024

# Errors of the location itself (a folder this user cannot make or write, a
# read-only file system): a setting to change, not a failure of the storage.
_LOCATION_ERRNOS = frozenset((errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR))


def _token(st: os.stat_result) -> str:
    # A rename always brings a new inode, so the triple changes on every write.
    return f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"


@functools.cache
def _load_syncfs() -> Callable[[int], int] | None:
    # On first use: ctypes is a noticeable share of a command's start-up,
    # and only writes sync. The running process already has the C library
    # loaded, so its own symbols are searched instead of finding libc's file.
    import ctypes

    try:
        func = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int]
    func.restype = ctypes.c_int
    return func


def _sync_filesystem(root: Path) -> None:
    """Write back every dirty page and name of the file system holding ``root``.

    syncfs(2) where the C library has it (Linux); elsewhere sync(2), which
    does the same for every file system.
    """
    syncfs = _load_syncfs()
    if syncfs is None:
        os.sync()
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            import ctypes

            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(root))
    finally:
        os.close(fd)


#: Create-only bytes after which a put starts syncing them on a thread, ahead of flush().
WRITEBACK_EVERY = 64 << 20


def _info(key: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(key=key, size=st.st_size, mtime=st.st_mtime, token=_token(st))


#: posix_fadvise's "will need" advice, where the platform has it (not macOS).
_WILLNEED: int | None = getattr(os, "POSIX_FADV_WILLNEED", None)


def _cores() -> int:
    """The CPUs this process may run on (a container's or taskset's limit included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


#: A folder's default workers: one per core, between these bounds.
MIN_CONCURRENCY, MAX_CONCURRENCY = 2, 16


def default_concurrency() -> int:
    """Workers for a folder: one per core, at least 2, at most 16.

    Their time on a folder goes to hashing, coding and copying from the page
    cache, not to waiting: more workers than cores only take turns on the
    same cores, each holding its chunk's buffers, which costs CPU time and
    memory (docs/performance.md, "What changed, and what each change
    measured", has the figures).
    """
    return min(MAX_CONCURRENCY, max(MIN_CONCURRENCY, _cores()))


class LocalBackend(Backend):
    """Objects as files under ``root``; a key's segments are directories."""

    concurrency = default_concurrency()

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root).absolute()
        self._root = os.fspath(self.root)
        self.uri = self.root.as_uri()
        self._fsync = fsync
        # Create-only writes made since the last flush(), whose data and names
        # flush() still owes to the disk.
        self._unsynced = False
        self._unsynced_lock = threading.Lock()
        # Bytes of them not yet handed to an early writeback (see _write_back_early).
        self._unsynced_bytes = 0
        self._writeback: threading.Thread | None = None
        self._reserve_checked = False
        # Cleanups in progress that may draw on the reserve (see drawing_on_reserve),
        # and whether one of them did.
        self._drawing = 0
        self._released = False

    @property
    def local_root(self) -> Path:
        return self.root

    # -- helpers -----------------------------------------------------------------

    def _file(self, key: str) -> str:
        # A plain string, not a pathlib object: a put or get goes through here per
        # chunk, and building Path objects showed in their time (docs/performance.md).
        return os.path.join(self._root, check_key(key))

    def _write_temp(
        self, directory: str, data: bytes | bytearray | memoryview, *, sync: bool
    ) -> str:
        temp = os.path.join(directory, f"{TEMP_PREFIX}-{uuid.uuid4().hex}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(temp, flags, 0o644)
        except FileNotFoundError:
            # The key's directory is made on first need, not checked on every write.
            os.makedirs(directory, exist_ok=True)
            fd = os.open(temp, flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if sync and self._fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        os.close(fd)
        return temp

    def _sync_dir(self, directory: str) -> None:
        if not self._fsync:
            return
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _os_error(self, err: OSError, key: str | None, action: str) -> CasError:
        """The error of a failed file operation, naming the path and the system's reason."""
        target = os.path.join(self._root, key) if key is not None else self._root
        failed = err.filename if isinstance(err.filename, str) else target
        if os.path.basename(failed).startswith(TEMP_PREFIX):
            failed = target  # the temporary file says less than the object it was for
        where = f"{action} {target}" if failed == target else f"create {failed} for {target}"
        reason = err.strerror or str(err)
        if err.errno in _FULL:
            doing = f" (cannot {action} {key!r})" if key is not None else ""
            return NoSpaceLeftError(
                f"no space left on device at {self._root}{doing}; free some space. "
                "Deleting versions and collecting garbage still work on a full store"
            )
        if err.errno in _LOCATION_ERRNOS:
            return ConfigurationError(
                f"local store {self._root}: cannot {where}: {reason}; "
                "choose a location this user can write, or fix its permissions"
            )
        transient = err.errno in (errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT)
        return BackendError(
            f"local store {self._root}: cannot {where}: {reason}", is_transient=transient
        )

    # -- contract ----------------------------------------------------------------

    def put(
        self, key: str, data: BytesLike, *, if_absent: bool = False, if_match: str | None = None
    ) -> None:
        check_put_conditions(if_absent, if_match)
        try:
            self._put(key, data, if_absent=if_absent, if_match=if_match)
        except NoSpaceLeftError:
            if not (self._drawing and self._release_reserve()):
                raise
            self._put(key, data, if_absent=if_absent, if_match=if_match)
        if not self._reserve_checked and not self._drawing:
            # Once per backend, after its first write made the folder: when
            # the device fills up later, the reserve is there for the cleanup.
            self._reserve_checked = True
            self.ensure_reserve()

    def _put(self, key: str, data: BytesLike, *, if_absent: bool, if_match: str | None) -> None:
        path = self._file(key)
        directory = os.path.dirname(path)
        try:
            # Create-only writes (chunks, manifests, version refs) leave their
            # syncing to flush(): one syncfs for a whole put instead of two
            # fsyncs per chunk, each of which waits for a journal commit.
            deferred = if_absent and self._fsync
            temp = self._write_temp(directory, data, sync=not deferred)
            try:
                if if_absent:
                    try:
                        os.link(temp, path)
                    except FileExistsError:
                        raise AlreadyExistsError(f"object {key!r} already exists") from None
                elif if_match is not None:
                    with self._locked(directory):
                        try:
                            current = _token(os.stat(path))
                        except FileNotFoundError:
                            raise PreconditionFailedError(f"object {key!r} is gone") from None
                        if current != if_match:
                            raise PreconditionFailedError(f"object {key!r} changed since read")
                        os.replace(temp, path)
                else:
                    os.replace(temp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
            if deferred:
                self._note_unsynced(memoryview(data).nbytes)
            else:
                self._sync_dir(directory)
        except AlreadyExistsError:
            raise  # also a FileExistsError, so an OSError: keep it out of the clause below
        except OSError as err:
            raise self._os_error(err, key, "write") from err

    def _note_unsynced(self, size: int) -> None:
        with self._unsynced_lock:
            self._unsynced = True
            self._unsynced_bytes += size
            if self._unsynced_bytes < WRITEBACK_EVERY:
                return
            if self._writeback is not None and self._writeback.is_alive():
                return
            self._unsynced_bytes = 0
            self._writeback = threading.Thread(
                target=self._write_back_early, name="cas-writeback", daemon=True
            )
            self._writeback.start()

    def _write_back_early(self) -> None:
        """Sync what is written so far while the put goes on writing.

        flush() owes the disk every chunk of a put; left to the end, its
        syncfs waited for all of them with the pipeline done and the cores
        idle (docs/performance.md has how long). Syncing every 64 MiB on a
        thread of its own (syncfs releases the GIL) overlaps most of that
        wait with hashing and compressing. A failure here is not reported:
        flush() syncs again and reports its own.
        """
        with contextlib.suppress(OSError):
            _sync_filesystem(self.root)

    def flush(self) -> None:
        with self._unsynced_lock:
            writeback = self._writeback
        if writeback is not None:
            writeback.join()
        with self._unsynced_lock:
            if not self._unsynced:
                return
            self._unsynced = False
            self._unsynced_bytes = 0
        try:
            _sync_filesystem(self.root)
        except OSError as err:
            with self._unsynced_lock:
                self._unsynced = True
            raise self._os_error(err, None, "sync") from err

    @contextlib.contextmanager
    def _locked(self, directory: str) -> Iterator[None]:
        fd = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def get(self, key: str) -> bytes:
        try:
            with open(self._file(key), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFoundError(f"object {key!r} not found in {self.uri}") from None
        except OSError as err:
            raise self._os_error(err, key, "read") from err

    def prefetch(self, keys: Sequence[str]) -> None:
        """Start reading the files into the page cache (posix_fadvise WILLNEED).

        The kernel queues the reads and returns: a worker that reads the file
        later finds it in memory instead of waiting for the disk, and the
        disk serves many files at once instead of one per worker. Files
        already in memory cost three system calls each.
        """
        if _WILLNEED is None:
            return
        for key in keys:
            try:
                fd = os.open(self._file(key), os.O_RDONLY)
            except (OSError, InvalidInputError):
                continue  # the read that follows reports it
            try:
                os.posix_fadvise(fd, 0, 0, _WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        path = self._file(key)
        try:
            with open(path, "rb") as f:
                # The token of the open file: a concurrent rename cannot split data from token.
                token = _token(os.fstat(f.fileno()))
                return f.read(), token
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFoundError(f"object {key!r} not found in {self.uri}") from None
        except OSError as err:
            raise self._os_error(err, key, "read") from err

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise InvalidInputError(f"get_range: negative start or length for {key!r}")
        try:
            with open(self._file(key), "rb") as f:
                f.seek(start)
                return f.read(length)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFoundError(f"object {key!r} not found in {self.uri}") from None
        except OSError as err:
            raise self._os_error(err, key, "read") from err

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = os.stat(self._file(key))
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"object {key!r} not found in {self.uri}") from None
        except OSError as err:
            raise self._os_error(err, key, "read") from err
        if not stat.S_ISREG(st.st_mode):
            raise NotFoundError(f"object {key!r} not found in {self.uri}")
        return _info(key, st)

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        directory, _, partial = prefix.rpartition("/")
        start = self.root / directory if directory else self.root
        base = f"{directory}/" if directory else ""
        yield from self._walk(start, base, partial)

    def _walk(self, directory: Path, base: str, partial: str) -> Iterator[ObjectInfo]:
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        # Sort a directory as its name plus "/" so the walk yields keys in
        # plain string order ("a.b" < "a/b"), which the contract promises.
        keyed = []
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX) or not entry.name.startswith(partial):
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            keyed.append((entry.name + "/" if is_dir else entry.name, is_dir, entry))
        keyed.sort(key=lambda item: item[0])
        for _, is_dir, entry in keyed:
            if is_dir:
                yield from self._walk(Path(entry.path), f"{base}{entry.name}/", "")
            elif entry.is_file(follow_symlinks=False):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while we listed
                yield _info(base + entry.name, st)

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            try:
                os.unlink(self._file(key))
            except (FileNotFoundError, NotADirectoryError):
                pass
            except OSError as err:
                raise self._os_error(err, key, "delete") from err

    def touch(self, key: str) -> None:
        try:
            os.utime(self._file(key))
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"object {key!r} not found in {self.uri}") from None
        except OSError as err:
            raise self._os_error(err, key, "touch") from err

    # -- what dead writers leave, and space for cleanups --------------------------

    def list_leftovers(self) -> Iterator[Leftover]:
        """Temporary files of writes that never finished: their writer died.

        A live write's temporary file exists only between its first byte
        and its rename, and its time is that of its last write.
        """
        for directory, subdirs, files in os.walk(self._root):
            subdirs.sort()
            for name in sorted(files):
                if not name.startswith(TEMP_PREFIX) or name == RESERVE_NAME:
                    continue
                path = os.path.join(directory, name)
                try:
                    st = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # its write finished meanwhile
                relative = os.path.relpath(path, self._root).replace(os.sep, "/")
                yield Leftover(name=relative, size=st.st_size, mtime=st.st_mtime)

    def remove_leftovers(self, leftovers: Iterable[Leftover]) -> None:
        for leftover in leftovers:
            name = leftover.name
            if not os.path.basename(name).startswith(TEMP_PREFIX) or ".." in name.split("/"):
                raise InvalidInputError(f"{name!r} is not a temporary file of {self.uri}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._root, name))

    def ensure_reserve(self) -> None:
        """Keep RESERVE_SIZE bytes allocated in a file at the root, or as much as fits.

        Allocated, not sparse (posix_fallocate, else zeros), so that deleting
        it really frees the blocks. A reserve that had to be smaller (the
        device was full) grows back once there is room.
        """
        if not os.path.isdir(self._root):
            return
        target = os.path.join(self._root, RESERVE_NAME)
        try:
            have = os.stat(target).st_size
        except FileNotFoundError:
            have = 0
        size = RESERVE_SIZE
        while size > have and size >= RESERVE_SIZE // 16 and not self._allocate(target, size):
            size //= 2

    def _allocate(self, target: str, size: int) -> bool:
        """Replace ``target`` by a file of ``size`` allocated bytes; False if there is no room.

        Written under a temporary name and renamed, so a crash never leaves a
        reserve smaller than it says.
        """
        temp = os.path.join(self._root, f"{TEMP_PREFIX}-{uuid.uuid4().hex}")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, size)
                except (AttributeError, OSError) as err:
                    if isinstance(err, OSError) and err.errno in _FULL:
                        raise
                    os.write(fd, bytes(size))  # a file system without fallocate
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, target)
        except OSError:
            return False  # no room: the next cleanup that frees space tries again
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        return True

    def _release_reserve(self) -> bool:
        """Free the reserve for a cleanup's write; False if there was none."""
        try:
            os.unlink(os.path.join(self._root, RESERVE_NAME))
        except FileNotFoundError:
            return False
        self._released = True
        return True

    @contextlib.contextmanager
    def drawing_on_reserve(self) -> Iterator[None]:
        """Writes inside may free the reserve when the device is full.

        Afterwards the reserve is set aside again from what is free: a
        deletion writes tombstones no larger than the refs they replace, so
        most of it comes back, and the next cleanup finds it there.
        """
        with self._unsynced_lock:
            self._drawing += 1
        try:
            yield
        finally:
            with self._unsynced_lock:
                self._drawing -= 1
                refill = self._released and not self._drawing
                self._released = self._released and not refill
            if refill:
                self.ensure_reserve()
