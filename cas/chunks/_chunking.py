"""Content-defined chunking (FastCDC) over streams, in bounded memory.

The cut points come from the compiled FastCDC of the ``fastcdc`` package. A
file is read in blocks; every cut whose look-ahead window lies wholly inside
the block is final, and the bytes after the last final cut are carried into
the next block. The result is therefore the same as chunking the whole file
at once, which is what makes dedup independent of the block size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..digest import hash_bytes
from ..errors import InvalidInputError

KiB = 1024
MiB = 1024 * KiB

# The compiled chunker's own limits (fastcdc_cy asserts them).
_MIN_LIMITS = (64, 64 * MiB)
_AVG_LIMITS = (256, 256 * MiB)
_MAX_LIMITS = (1024, 1024 * MiB)


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


class BinaryReadable(Readable, Protocol):
    def read(self, size: int, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class ChunkerParams:
    """FastCDC sizes, fixed for the life of a store (they decide every chunk's hash)."""

    min_size: int = 256 * KiB
    avg_size: int = 1 * MiB
    max_size: int = 4 * MiB

    def __post_init__(self) -> None:
        checks = (
            ("minimum", self.min_size, _MIN_LIMITS),
            ("average", self.avg_size, _AVG_LIMITS),
            ("maximum", self.max_size, _MAX_LIMITS),
        )
        for label, value, (low, high) in checks:
            if not low <= value <= high:
                raise InvalidInputError(
                    f"chunk {label} size {value} is outside {low}..{high} bytes"
                )
        if not self.min_size <= self.avg_size <= self.max_size:
            raise InvalidInputError(
                f"chunk sizes must satisfy min <= avg <= max, got "
                f"{self.min_size} / {self.avg_size} / {self.max_size}"
            )

    @classmethod
    def for_object_store(cls) -> ChunkerParams:
        """The default on object stores: 1 / 4 / 16 MiB.

        There every chunk is a request, with its latency and its fee; four
        times fewer of them is worth the coarser dedup inside files edited in
        place. Tensors are still cut at their own boundaries, so a fine-tuned
        checkpoint stores only its changed tensors either way.
        """
        return cls.from_average(4 * MiB)

    @classmethod
    def from_average(cls, avg_size: int) -> ChunkerParams:
        """The usual spread around an average: a quarter of it to four times it."""
        low, high = _AVG_LIMITS[0] * 4, _MAX_LIMITS[1] // 4
        if not low <= avg_size <= high:
            raise InvalidInputError(
                f"average chunk size {avg_size} bytes is outside {low}..{high} "
                "(the minimum is a quarter of it and the maximum four times it)"
            )
        return cls(
            min_size=max(avg_size // 4, _MIN_LIMITS[0]),
            avg_size=avg_size,
            max_size=max(avg_size * 4, _MAX_LIMITS[0]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "algorithm": "fastcdc",
            "min_size": self.min_size,
            "avg_size": self.avg_size,
            "max_size": self.max_size,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChunkerParams:
        if data.get("algorithm") != "fastcdc":
            raise InvalidInputError(f"unknown chunker {data.get('algorithm')!r}")
        return cls(int(data["min_size"]), int(data["avg_size"]), int(data["max_size"]))

    @property
    def window(self) -> int:
        """Bytes FastCDC looks at from a chunk start before it decides a cut."""
        return max(64 * KiB, self.max_size)


def cut_points(data: memoryview, params: ChunkerParams) -> Iterator[tuple[int, int]]:
    """Yield (offset, length) of every chunk of ``data``, treating its end as the end of input."""
    if len(data) == 0:
        return
    if len(data) <= params.min_size:
        # FastCDC never cuts before the minimum: one chunk, as it would say,
        # without importing it: its package's import is a large share of a
        # command's start-up (docs/performance.md), which a checkpoint's small
        # JSON files would otherwise cost a put.
        yield 0, len(data)
        return
    # Imported here, not at the top: the fastcdc package loads its own
    # command line (click) when imported, which costs every cas command
    # start-up time, and gets and tensor-cut puts never need it.
    from fastcdc.fastcdc_cy import fastcdc_cy

    for chunk in fastcdc_cy(data, params.min_size, params.avg_size, params.max_size):
        yield chunk.offset, chunk.length


def iter_chunks(
    stream: Readable,
    params: ChunkerParams,
    *,
    block_size: int = 16 * MiB,
    size_hint: int | None = None,
    on_read: Callable[[memoryview], None] | None = None,
) -> Iterator[memoryview]:
    """Yield the chunks of ``stream`` as read-only views.

    Each view stays valid as long as it is referenced (a new block is
    allocated per read, never overwritten), so callers can hand views to
    worker threads. ``size_hint`` (the expected length) keeps small files from
    costing a whole block each; a wrong hint only costs an extra read.
    ``on_read`` sees every byte once, in order, as it is read: the place to
    feed a whole-file hash.
    """
    block_size = max(block_size, 2 * params.window)
    carry = b""
    eof = False
    consumed = 0
    while not eof:
        size = block_size
        if size_hint is not None and consumed <= size_hint:
            # +1 so that a file of exactly the hinted size sees its end in this block;
            # once more than the hint was read, the hint is wrong: use whole blocks.
            size = min(block_size, len(carry) + size_hint - consumed + 1)
        block = bytearray(size)
        block[: len(carry)] = carry
        filled = len(carry)
        while filled < size:
            view = memoryview(block)[filled:]
            count = stream.readinto(view)
            if not count:
                eof = True
                break
            if on_read is not None:
                on_read(view[:count])
            filled += count
            consumed += count
        data = memoryview(block)[:filled].toreadonly()
        next_start = filled
        for offset, length in cut_points(data, params):
            if not eof and offset + params.window > filled:
                next_start = offset  # cut not final: redo it with the next block
                break
            yield data[offset : offset + length]
        carry = bytes(data[next_start:])


class _Prefixed:
    """A stream that gives ``head`` first, then whatever ``rest`` gives."""

    def __init__(self, head: bytes, rest: Readable) -> None:
        self._head = memoryview(head)
        self._rest = rest

    def readinto(self, buffer: memoryview, /) -> int | None:
        if not self._head:
            return self._rest.readinto(buffer)
        count = min(len(buffer), len(self._head))
        buffer[:count] = self._head[:count]
        self._head = self._head[count:]
        return count


def follow_chunks(
    stream: BinaryReadable,
    params: ChunkerParams,
    previous: Sequence[tuple[int, bytes]],
    previous_size: int,
    size: int,
    *,
    on_read: Callable[[memoryview], None] | None = None,
) -> Iterator[tuple[memoryview, bytes | None]]:
    """The chunks :func:`iter_chunks` gives, found faster while a former version's recur.

    ``previous`` holds the (length, BLAKE3) of the chunks of a former version
    of this file, ``previous_size`` bytes long, cut by FastCDC with the same
    parameters; ``size`` is this file's size. FastCDC decides each cut from
    the bytes after the cut before it, within a window of ``params.window``
    bytes, or up to the end of the input where that comes sooner. So while a
    former chunk recurs byte for byte (same hash) with a window's worth of
    bytes after its start in both files (or both files ending alike), FastCDC
    would cut this file exactly there: the chunk is taken as it is, hashed
    but not scanned for a cut. From the first chunk that does not recur,
    FastCDC cuts the rest. An unchanged shard of a dataset costs a hash, not
    a FastCDC scan, which is several times slower (docs/performance.md, "What
    makes the local store fast"). Each view comes with its hash when it was
    checked here, else None.
    """
    offset = 0
    ends_alike = size == previous_size
    for index, (length, digest) in enumerate(previous):
        if not ends_alike and min(size, previous_size) - offset < params.window:
            break
        data = stream.read(length)
        view = memoryview(data)
        if (
            len(data) != length
            or hash_bytes(view) != digest
            or (index == 0 and _may_be_tensor_header(view, params))
        ):
            rest = _Prefixed(data, stream)
            for chunk in iter_chunks(rest, params, size_hint=size - offset, on_read=on_read):
                yield chunk, None
            return
        if on_read is not None:
            on_read(view)
        offset += length
        yield view, digest
    for chunk in iter_chunks(stream, params, size_hint=size - offset, on_read=on_read):
        yield chunk, None


def _may_be_tensor_header(first: memoryview, params: ChunkerParams) -> bool:
    """Whether a first chunk may be the header of a safetensors file, not a FastCDC cut.

    Only FastCDC cuts may be followed. A version stored as safetensors was
    cut at tensor boundaries, its first chunk being its header, capped at the
    maximum chunk size (cas.tensors._safetensors.plan); a file whose first chunk recurs
    has the same first 8 bytes, which give that header's length. A FastCDC
    chunk of exactly that length is merely not followed.
    """
    if len(first) < 8:
        return False
    header = int.from_bytes(first[:8], "little")
    return len(first) == min(params.max_size, 8 + header)
