"""BLAKE3-256 digests: the names of chunks, manifests and whole files."""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass

import blake3

from .errors import InvalidInputError

DIGEST_SIZE = 32
HEX_LENGTH = DIGEST_SIZE * 2
_HEX_CHARS = frozenset("0123456789abcdef")

# Inputs at least this large are hashed with blake3's own threads; below it
# the thread start-up costs more than it saves.
_PARALLEL_THRESHOLD = 4 << 20


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    """A 32-byte BLAKE3 hash. Compares and hashes by value."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != DIGEST_SIZE:
            raise InvalidInputError(f"a digest has {DIGEST_SIZE} bytes, got {len(self.raw)}")

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse 64 lower-case hex characters."""
        if len(text) != HEX_LENGTH or not set(text) <= _HEX_CHARS:
            raise InvalidInputError(f"not a BLAKE3 hex digest: {text!r}")
        return cls(bytes.fromhex(text))

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> Digest:
        """Hash ``data`` in one call."""
        return cls(hash_bytes(data))

    @property
    def hex(self) -> str:
        return self.raw.hex()

    @property
    def short(self) -> str:
        """The first 12 hex characters, for messages and listings."""
        return self.raw[:6].hex()

    def __str__(self) -> str:
        return self.hex


def hash_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """Return the 32-byte BLAKE3 of ``data``; blake3 releases the GIL meanwhile."""
    threads = blake3.blake3.AUTO if len(data) >= _PARALLEL_THRESHOLD else 1
    return blake3.blake3(data, max_threads=threads).digest()


#: What :func:`hash_file` reads at a time: large enough for blake3's threads.
_FILE_BLOCK = 16 << 20


def hash_file(path: str | os.PathLike[str]) -> Digest:
    """The BLAKE3 of a file's whole content, hashed on every core.

    Read, not mapped: a file another process truncates meanwhile gives a
    short read and a wrong hash, where a memory map would kill the process
    with SIGBUS.
    """
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    block = memoryview(bytearray(_FILE_BLOCK))
    with open(path, "rb", buffering=0) as stream:
        while size := stream.readinto(block):
            hasher.update(block[:size])
    return Digest(hasher.digest())


class StreamingHasher:
    """Incremental BLAKE3 over a sequence of buffers (e.g. a whole file)."""

    def __init__(self) -> None:
        self._hasher = blake3.blake3(max_threads=1)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hasher.update(data)

    def digest(self) -> Digest:
        return Digest(self._hasher.digest())

    def close(self) -> None:
        """Release what the hasher holds; nothing for this one."""


#: Files at least this large hash their whole content on a thread of their own,
#: on a put and on a get.
BACKGROUND_HASH_SIZE = 32 << 20


def hasher_for(size: int) -> StreamingHasher:
    """The whole-file hasher for a file of ``size`` bytes; close it when done."""
    return BackgroundHasher() if size >= BACKGROUND_HASH_SIZE else StreamingHasher()


class BackgroundHasher(StreamingHasher):
    """A StreamingHasher that hashes on a thread of its own.

    blake3 releases the GIL while it hashes, so the whole-file hash of a
    large file runs beside the reader that cuts its chunks instead of adding
    to it. Buffers given to :meth:`update` must not change afterwards; at
    most ``depth`` of them wait at a time. Call :meth:`digest` or
    :meth:`close` to end the thread.
    """

    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        self._queue: queue.Queue[bytes | bytearray | memoryview | None] = queue.Queue(depth)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="cas-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            super().update(data)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._queue.put(data)

    def digest(self) -> Digest:
        self.close()
        return super().digest()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
