"""Files written from parts in memory: one process's share of a version written by several.

A distributed checkpoint has each rank write a file of its own shards. The
rank holds them in memory already, so the file is never written to disk:
its parts (opaque bytes, and the bytes of tensors) are cut into chunks as
they arrive, exactly as a tensor file on disk would be cut
(:class:`cas.tensors._safetensors.Planner`, the incremental form of the
planner of safetensors and torch.save files):

* a tensor of at least the minimum chunk size starts chunks of its own, cut
  into whole elements of about the average chunk size, so its chunks get
  the tensor codecs (byte grouping, deltas of the same shard before);
* small tensors and the short runs of bytes between them (the framing a
  format puts around each tensor) share chunks of about the average size;
  longer runs of other bytes are cut at the maximum size.

Every tensor part is also recorded for the version's tensor index
(:mod:`cas.tensors._index`): its name, dtype, shape and byte range.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..chunks._chunking import ChunkerParams
from ..errors import InvalidInputError
from ..tensors._index import Shard, itemsize, shard_name
from ..tensors._safetensors import Planner, Span, TensorInfo

#: One row of a tensor index: name, dtype, whole shape, and where this shard is.
IndexRow = tuple[str, str, tuple[int, ...], Shard]


@dataclass(frozen=True)
class TensorPart:
    """The bytes of a tensor, or of one block (shard) of it, in a file written in parts.

    ``dtype`` is a safetensors dtype name (``F32``, ``BF16``, ``I64``...);
    any other name is stored too, as plain bytes. ``data`` holds the
    elements in C order. A shard says where it starts in the whole tensor
    (``offsets``) and the whole tensor's shape; a whole tensor leaves both
    out.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes | bytearray | memoryview
    offsets: tuple[int, ...] = ()
    whole_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidInputError("a tensor part needs a name")
        shape = tuple(int(n) for n in self.shape)
        offsets = tuple(int(n) for n in self.offsets) or (0,) * len(shape)
        whole = tuple(int(n) for n in self.whole_shape) if self.whole_shape else shape
        if not len(offsets) == len(whole) == len(shape):
            raise InvalidInputError(
                f"tensor {self.name!r}: offsets {offsets}, shape {shape} and whole shape "
                f"{whole} do not have the same number of dimensions"
            )
        if any(o < 0 or n < 0 or o + n > w for o, n, w in zip(offsets, shape, whole, strict=True)):
            raise InvalidInputError(
                f"tensor {self.name!r}: a block of {shape} at {offsets} does not fit in {whole}"
            )
        size = itemsize(self.dtype)
        if size is not None and self.nbytes != math.prod(shape) * size:
            raise InvalidInputError(
                f"tensor {self.name!r}: {self.nbytes} bytes for {shape} of {self.dtype}"
            )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "whole_shape", whole)

    @property
    def view(self) -> memoryview:
        try:
            return memoryview(self.data).cast("B")
        except TypeError:
            raise InvalidInputError(
                f"tensor {self.name!r}: its data is not one contiguous buffer"
            ) from None

    @property
    def nbytes(self) -> int:
        return self.view.nbytes


Part = bytes | bytearray | memoryview | TensorPart


class PartsCutter:
    """Cuts the parts of one file into spans as they arrive; records its tensors."""

    def __init__(self, path: str, params: ChunkerParams) -> None:
        self.path = path
        self.planner = Planner(params)
        #: Where each tensor part went, for the tensor index.
        self.rows: list[IndexRow] = []
        #: Bytes cut so far: the file's size once :meth:`spans` is exhausted.
        self.size = 0
        # Parts not yet wholly in a span, by file offset: a large tensor's own
        # spans are views of it; spans across parts join copies of them.
        self._held: list[tuple[int, memoryview]] = []

    def spans(self, parts: Iterable[Part]) -> Iterator[tuple[memoryview, Span]]:
        """(bytes, span) of each chunk of the file, in order."""
        for part in parts:
            start = self.size
            view = part.view if isinstance(part, TensorPart) else memoryview(part).cast("B")
            self._held.append((start, view))
            self.size += len(view)
            if isinstance(part, TensorPart):
                assert part.whole_shape is not None
                shard = Shard(self.path, start, self.size, part.offsets, part.shape)
                self.rows.append((part.name, part.dtype, part.whole_shape, shard))
                name = shard_name(part.name, part.offsets)
                info = TensorInfo(name, part.dtype, part.shape, start, self.size)
                yield from self._cut(self.planner.tensor(info))
        yield from self._cut(self.planner.finish(self.size))

    def _cut(self, spans: list[Span]) -> Iterator[tuple[memoryview, Span]]:
        for span in spans:
            yield self._bytes(span.offset, span.offset + span.length), span
            end = span.offset + span.length
            while self._held and self._held[0][0] + len(self._held[0][1]) <= end:
                self._held.pop(0)

    def _bytes(self, start: int, end: int) -> memoryview:
        pieces = []
        for offset, view in self._held:
            if offset >= end:
                break
            low, high = max(start, offset), min(end, offset + len(view))
            if low < high:
                pieces.append(view[low - offset : high - offset])
        if len(pieces) == 1:
            return pieces[0]
        return memoryview(b"".join(pieces))
