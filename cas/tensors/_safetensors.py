"""safetensors files: their header, tensor-aligned chunk boundaries, and reading one tensor.

A safetensors file is an 8-byte little-endian header length, a JSON header
naming each tensor's dtype, shape and byte range, then the tensors' bytes.
Cutting such a file with content-defined chunking mixes tensors (and dtypes)
in one chunk and lets a changed tensor spill into its neighbours' chunks.
Cut instead at tensor boundaries:

* the header is a chunk of its own, so rewriting it (new metadata, a tensor
  added) leaves every tensor's chunks as they were, whatever the offsets;
* a large tensor is cut into whole elements, in pieces of about the store's
  average chunk size, so a changed tensor touches only its own chunks and
  each chunk has one dtype, which the byte-grouping codec needs;
* small tensors of one dtype are grouped, up to the average chunk size.

A file is recognised by its header, never by its name; anything that does
not parse as a plausible safetensors header is chunked with FastCDC.
"""

from __future__ import annotations

import bisect
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..chunks._chunking import ChunkerParams
from ..chunks._floatcodec import Layout
from ..digest import Digest, StreamingHasher
from ..errors import InvalidInputError, NotFoundError

if TYPE_CHECKING:
    from ..chunks._store import ChunkStore
    from ..repository._manifest import ChunkRef, Entry, Manifest

# A header larger than this is not a plausible safetensors header (the
# reference implementation caps it at 100 MB too).
MAX_HEADER = 100_000_000

#: safetensors dtype -> (bytes per element, byte-grouping layout or None).
DTYPES: dict[str, tuple[int, Layout | None]] = {
    "F64": (8, Layout.PLAIN),
    "F32": (4, Layout.FP32),
    "F16": (2, Layout.FP16),
    "BF16": (2, Layout.BF16),
    "I64": (8, None),
    "I32": (4, None),
    "I16": (2, None),
    "I8": (1, None),
    "U64": (8, None),
    "U32": (4, None),
    "U16": (2, None),
    "U8": (1, None),
    "BOOL": (1, None),
    "F8_E4M3": (1, None),
    "F8_E5M2": (1, None),
}

# numpy has no bfloat16: a BF16 tensor is read as float32, which holds every
# bfloat16 value exactly (its upper half is the bfloat16).
NUMPY_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
    "F8_E4M3": "u1",
    "F8_E5M2": "u1",
}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of a safetensors header: its dtype, shape and byte range in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offsets in the file
    end: int
    #: Element strides when the tensor is a strided view of its bytes (torch, Fortran-order numpy).
    strides: tuple[int, ...] | None = None

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0] if self.dtype in DTYPES else 1

    @property
    def layout(self) -> Layout | None:
        return DTYPES[self.dtype][1] if self.dtype in DTYPES else None


@dataclass(frozen=True, slots=True)
class Header:
    """The tensors of a file: a safetensors header, or what a torch.save or numpy parser found."""

    #: Bytes of the header: where the tensors' data begins (0 when no header leads).
    length: int
    #: The byte ranges to cut on, by start offset, none overlapping: each tensor
    #: of a safetensors file, each storage record of a torch.save file.
    tensors: tuple[TensorInfo, ...]
    metadata: Any = None
    #: Every tensor by name when that differs from ``tensors`` (torch views of a storage).
    views: tuple[TensorInfo, ...] = ()
    format: str = "safetensors"

    @property
    def named(self) -> tuple[TensorInfo, ...]:
        """Every tensor a reader can ask for by name."""
        return self.views or self.tensors

    def tensor(self, name: str) -> TensorInfo:
        for info in self.named:
            if info.name == name:
                return info
        raise NotFoundError(f"no tensor named {name!r} in this {self.format} file")


def parse_header(read: Callable[[int, int], bytes], size: int) -> Header:
    """The header of a safetensors file of ``size`` bytes; ``read(offset, length)`` reads it.

    Raises InvalidInputError (a ValueError) when the file is not one.
    """
    if size < 8:
        raise InvalidInputError("shorter than a safetensors header")
    length = int.from_bytes(read(0, 8), "little")
    if not 2 <= length <= MAX_HEADER or 8 + length > size:
        raise InvalidInputError(f"header length {length} does not fit the file")
    # One byte first: a binary file whose first bytes happen to look like a
    # length must not cost a read of up to 100 MB.
    if read(8, 1) != b"{":
        raise InvalidInputError("header is not a JSON object")
    text = read(8, length)
    try:
        header = json.loads(text)
    except ValueError as err:
        raise InvalidInputError(f"header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise InvalidInputError("header is not a JSON object")
    base = 8 + length
    tensors = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = spec["dtype"]
            shape = tuple(int(n) for n in spec["shape"])
            begin, end = (int(n) for n in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InvalidInputError(f"tensor {name!r} has a malformed entry") from None
        if not isinstance(dtype, str) or not 0 <= begin <= end or base + end > size:
            raise InvalidInputError(f"tensor {name!r} lies outside the file")
        if dtype in DTYPES and end - begin != math.prod(shape) * DTYPES[dtype][0]:
            raise InvalidInputError(f"tensor {name!r}: its byte range does not match its shape")
        tensors.append(TensorInfo(name, dtype, shape, base + begin, base + end))
    tensors.sort(key=lambda t: (t.start, t.end))
    return Header(base, tuple(tensors), header.get("__metadata__"))


# -- tensor-aligned boundaries -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of one tensor inside a chunk, by offsets relative to the tensor's start."""

    name: str
    dtype: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Span:
    """One chunk of a planned file."""

    offset: int
    length: int
    #: The tensor bytes it holds; () for the header or bytes outside any tensor.
    pieces: tuple[Piece, ...] = ()
    #: Set when every piece has the same float dtype: the codec to group with.
    itemsize: int = 1
    layout: Layout | None = None

    @property
    def key(self) -> tuple[Piece, ...]:
        """What the chunk holds, independent of where the file puts it."""
        return self.pieces


# Bytes between tensors shorter than this (a zip's local headers between the
# records of a torch.save or .npz file) join the small tensors around them in
# one chunk, rather than each becoming a chunk of a few dozen bytes.
SMALL_GAP = 4096


def plan(header: Header, size: int, params: ChunkerParams) -> list[Span]:
    """The chunks of a tensor file, in file order, covering it exactly."""
    planner = Planner(params, header.length)
    spans = list(_opaque(0, header.length, params))
    for info in header.tensors:
        spans.extend(planner.tensor(info))
    spans.extend(planner.finish(size))
    return spans


class Planner:
    """:func:`plan` one tensor at a time, for a file whose tensors are known as it is written.

    Each call returns the spans that have become final, in file order; the
    bytes before ``start`` (a header) are the caller's to cut.
    """

    def __init__(self, params: ChunkerParams, start: int = 0) -> None:
        self.params = params
        self.position = start
        self._run = _Run(params)

    def tensor(self, info: TensorInfo) -> list[Span]:
        """The spans made final by the tensor ``info``, which starts at or after the last one."""
        spans: list[Span] = []
        run = self._run
        if info.start > self.position:  # bytes no tensor claims
            if info.start - self.position < SMALL_GAP:
                spans.extend(run.add_gap(self.position, info.start))
            else:
                spans.extend(run.flush())
                spans.extend(_opaque(self.position, info.start, self.params))
        if info.end - info.start >= self.params.min_size:
            spans.extend(run.flush())
            spans.extend(_split(info, self.params))
        elif info.end > info.start:
            spans.extend(run.add(info))
        self.position = max(self.position, info.end)
        return spans

    def finish(self, size: int) -> list[Span]:
        """The last spans of a file of ``size`` bytes."""
        return [*self._run.flush(), *_opaque(self.position, size, self.params)]


class _Run:
    """Consecutive small tensors (and the small gaps between them), cut into chunks of about
    the average size: byte-grouped when they are tensors of one dtype and nothing else."""

    def __init__(self, params: ChunkerParams) -> None:
        self.params = params
        self.tensors: list[TensorInfo] = []
        self.start = self.end = 0
        self.mixed = False

    def add(self, info: TensorInfo) -> list[Span]:
        other_dtype = bool(self.tensors) and self.tensors[0].dtype != info.dtype
        too_big = self.end > self.start and info.end - self.start > self.params.avg_size
        out = self.flush() if (other_dtype and not self.mixed) or too_big else []
        if self.end == self.start:
            self.start = info.start
        self.tensors.append(info)
        self.end = info.end
        return out

    def add_gap(self, start: int, end: int) -> list[Span]:
        out = self.flush() if end - self.start > self.params.avg_size else []
        if self.end == self.start:
            self.start = start
        self.end, self.mixed = end, True
        return out

    def flush(self) -> list[Span]:
        if self.end == self.start:
            return []
        if self.mixed or not self.tensors:
            span = Span(self.start, self.end - self.start)
        else:
            span = _group_span(self.tensors)
        self.tensors, self.start, self.end, self.mixed = [], 0, 0, False
        return [span]


def _opaque(start: int, end: int, params: ChunkerParams) -> Iterator[Span]:
    for offset in range(start, end, params.max_size):
        yield Span(offset, min(params.max_size, end - offset))


def _group_span(group: list[TensorInfo]) -> Span:
    first, last = group[0], group[-1]
    pieces = tuple(Piece(t.name, t.dtype, 0, t.end - t.start) for t in group)
    layout = first.layout if first.itemsize > 1 else None
    return Span(first.start, last.end - first.start, pieces, first.itemsize, layout)


def _split(info: TensorInfo, params: ChunkerParams) -> Iterator[Span]:
    """Whole-element pieces of about the average size, none above the maximum."""
    nbytes = info.end - info.start
    itemsize = info.itemsize if nbytes % info.itemsize == 0 else 1
    elements = nbytes // itemsize
    count = max(round(nbytes / params.avg_size), math.ceil(nbytes / params.max_size), 1)
    per = math.ceil(elements / count) * itemsize
    layout = info.layout if itemsize > 1 else None
    for start in range(0, nbytes, per):
        end = min(start + per, nbytes)
        piece = Piece(info.name, info.dtype, start, end)
        yield Span(info.start + start, end - start, (piece,), itemsize, layout)


def chunk_keys(header: Header, lengths: list[int]) -> Iterator[tuple[Piece, ...] | None]:
    """For each stored chunk of a file, the tensor pieces it holds exactly (None if not).

    Works whatever cut the file: a chunk made by FastCDC that happens to hold
    whole tensor pieces gets a key too.
    """
    starts = [t.start for t in header.tensors]
    offset = 0
    for length in lengths:
        end = offset + length
        pieces = []
        covered = 0
        index = max(bisect.bisect_right(starts, offset) - 1, 0)
        for info in header.tensors[index:]:
            if info.start >= end:
                break
            low, high = max(offset, info.start), min(end, info.end)
            if low < high:
                pieces.append(Piece(info.name, info.dtype, low - info.start, high - info.start))
                covered += high - low
        yield tuple(pieces) if pieces and covered == length else None
        offset = end


# -- reading stored files ----------------------------------------------------------------


class ChunkCache:
    """The chunks last read, as their manifests describe them, verified: a tensor's
    neighbours usually share its edge chunks, and a safetensors header's length and
    JSON its first chunk."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self.items: OrderedDict[ChunkRef, bytes] = OrderedDict()

    def get(self, chunks: ChunkStore, chunk: ChunkRef, context: str) -> bytes:
        data = self.items.get(chunk)
        if data is None:
            data = chunks.get(chunk, context=context)
            self.items[chunk] = data
            if len(self.items) > self.capacity:
                self.items.popitem(last=False)
        else:
            self.items.move_to_end(chunk)
        return data


class StoredFile:
    """Byte ranges of a stored file, fetching (and verifying) only the chunks that hold them.

    Chunks are read through ``cache``, which several files may share; by
    default a file keeps its last chunk only.
    """

    def __init__(
        self, chunks: ChunkStore, entry: Entry, label: str, *, cache: ChunkCache | None = None
    ) -> None:
        self.chunks = chunks
        self.entry = entry
        self.label = label
        self.starts = entry.chunk_offsets()
        self.cache = cache or ChunkCache(capacity=1)
        self._context = f"{label}: file {entry.path!r}"

    def pieces(self, start: int, end: int) -> list[bytes]:
        """The bytes [start, end) of the file, as slices of the chunks that hold them."""
        end = min(end, self.entry.size)
        if end <= start:
            return []
        parts = []
        index = bisect.bisect_right(self.starts, start) - 1
        while index < len(self.starts) and self.starts[index] < end:
            data = self.chunk(index)
            base = self.starts[index]
            parts.append(data[max(start - base, 0) : min(end - base, len(data))])
            index += 1
        return parts

    def read(self, start: int, length: int) -> bytes:
        return b"".join(self.pieces(start, start + length))

    def chunk(self, index: int) -> bytes:
        """The whole chunk ``index`` of the file (in file order), verified."""
        return self.cache.get(self.chunks, self.entry.chunks[index], self._context)

    def header(self) -> Header:
        return parse_header(self.read, self.entry.size)

    def covering(self, start: int, end: int) -> tuple[int, int]:
        """Indexes [first, last] of the chunks holding bytes [start, end)."""
        first = bisect.bisect_right(self.starts, start) - 1
        last = bisect.bisect_right(self.starts, max(start, end - 1)) - 1
        return max(first, 0), max(last, 0)

    def signature(self, start: int, end: int) -> tuple[int, tuple[bytes, ...], int]:
        """Names the bytes [start, end) by chunk digests, reading nothing: two ranges
        with equal signatures hold equal bytes (unequal ones may too)."""
        if end <= start:
            return 0, (), 0
        first, last = self.covering(start, end)
        digests = tuple(c.digest.raw for c in self.entry.chunks[first : last + 1])
        return start - self.starts[first], digests, end - start

    def digest(self, start: int, end: int) -> Digest:
        """The BLAKE3 of the bytes [start, end)."""
        hasher = StreamingHasher()
        for piece in self.pieces(start, end):
            hasher.update(piece)
        return hasher.digest()


def find_file(manifest: Manifest, path: str | None) -> Entry:
    """The file ``path`` of a version; None (or any name) picks the file of a one-file artifact."""
    for entry in manifest.entries:
        if entry.type == "file" and entry.path == path:
            return entry
    if manifest.only_file is not None:
        return manifest.only_file
    raise NotFoundError(f"no file {path!r} in this version")
