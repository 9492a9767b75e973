"""How a file is cut into chunks: the one rule a put follows, and whatever must match its cuts.

A tensor file (safetensors, torch.save or numpy, :mod:`cas.tensors._formats`)
is cut at tensor boundaries (:func:`cas.tensors._safetensors.plan`);
any other file by FastCDC, led by the cuts of its former version where one
is known (:func:`cas.chunks._chunking.follow_chunks`, which cuts as FastCDC
alone would, only faster). A put cuts by this rule, and so must anything
that looks for a stored file's chunks in a local copy (a download that
reuses what the local file already holds, an update of a checkout): a
local file cut any other way yields chunks the store never made, and every
byte is fetched again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BufferedIOBase
from pathlib import Path

from ..chunks._chunking import ChunkerParams, follow_chunks, iter_chunks
from ..digest import Digest, StreamingHasher, hash_bytes
from ..errors import SourceError
from ..repository._manifest import Entry
from ._formats import sniff
from ._safetensors import Span, plan

#: A chunk as it is cut: its bytes, its index in the file's tensor plan (0
#: for FastCDC), the tensor span it holds (None for FastCDC) and its BLAKE3
#: when cutting already computed it.
Cut = tuple[memoryview, int, Span | None, bytes | None]


def tensor_spans(stream: BufferedIOBase, size: int, params: ChunkerParams) -> list[Span] | None:
    """The tensor-aligned chunks of a tensor file, or None to cut it with FastCDC."""
    header = sniff(stream, size)
    return plan(header, size, params) if header is not None else None


def cut_file(
    stream: BufferedIOBase,
    size: int,
    params: ChunkerParams,
    *,
    spans: list[Span] | None,
    former: Entry | None,
    on_read: Callable[[memoryview], None],
    name: str = "the file",
) -> Iterator[Cut]:
    """The chunks of an open file of ``size`` bytes, in order.

    ``spans`` is the file's tensor plan (:func:`tensor_spans`), or None for
    FastCDC, which follows ``former`` (the file's former version) while its
    chunks recur. ``on_read`` sees every byte once, in order.
    """
    if spans is not None:
        for view, index, span in read_spans(stream, spans, on_read, name):
            yield view, index, span, None
        return
    if former is None or former.type != "file" or not former.chunks:
        for view in iter_chunks(stream, params, size_hint=size, on_read=on_read):
            yield view, 0, None, None
        return
    lengths = [(c.length, c.digest.raw) for c in former.chunks]
    for view, digest in follow_chunks(stream, params, lengths, former.size, size, on_read=on_read):
        yield view, 0, None, digest


def read_spans(
    stream: BufferedIOBase,
    spans: list[Span],
    on_read: Callable[[memoryview], None],
    name: str = "the file",
) -> Iterator[tuple[memoryview, int, Span]]:
    """(bytes, index, span) of each span, read in file order; a new buffer each."""
    for index, span in enumerate(spans):
        # read(), not readinto() a new bytearray: a bytearray is filled with
        # zeros first, one more pass over every byte of the file.
        data = stream.read(span.length)
        view = memoryview(data)
        on_read(view)
        yield view, index, span
        if len(data) < span.length:
            return  # the file shrank: the size check of the entry reports it
    # The plan covers the size the file had when it was listed; bytes past
    # it would be left out silently, where FastCDC would have read them.
    if stream.read(1):
        raise SourceError(f"{name} grew while it was read; put it again once it is written")


@dataclass(frozen=True, slots=True)
class LocalChunks:
    """A local file cut as a put would cut it, for finding stored chunks in it."""

    #: Chunk BLAKE3 -> (offset, length) of its first occurrence in the file.
    where: dict[bytes, tuple[int, int]]
    #: Chunks the file was cut into, repeats included.
    count: int
    #: BLAKE3 of the whole file.
    digest: Digest


def cut_local_file(path: Path, params: ChunkerParams, former: Entry | None) -> LocalChunks | None:
    """Cut the file at ``path`` as a put of it as the next version of ``former`` would.

    ``former`` is the stored file the local one is compared with; None cuts
    it as a new file. Returns None when ``path`` is not a regular file.
    """
    if not path.is_file():
        return None
    hasher = StreamingHasher()
    where: dict[bytes, tuple[int, int]] = {}
    offset = count = 0
    try:
        with open(path, "rb") as stream:
            size = path.stat().st_size
            spans = tensor_spans(stream, size, params)
            cuts = cut_file(
                stream,
                size,
                params,
                spans=spans,
                former=former,
                on_read=hasher.update,
                name=str(path),
            )
            for view, _, _, known in cuts:
                digest = known if known is not None else hash_bytes(view)
                where.setdefault(digest, (offset, len(view)))
                offset += len(view)
                count += 1
    except OSError as err:
        raise SourceError(f"cannot read {path}: {err.strerror or err}") from None
    return LocalChunks(where, count, hasher.digest())
