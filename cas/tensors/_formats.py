"""Which tensor format a file is, by its bytes: safetensors, torch.save, numpy, or none.

Each parser turns a file into the same :class:`~cas.tensors._safetensors.Header`
(the byte ranges to cut on, each with its dtype and a name that stays the
same across versions), so one planner, one writer and one reader serve all
three. A file is recognised by its first bytes, never by its name; one that
no parser accepts whole is plain bytes to cas, chunked with FastCDC.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError
from . import _numpy, _torchsave
from ._safetensors import NUMPY_DTYPES, Header, StoredFile, TensorInfo, parse_header

if TYPE_CHECKING:
    import numpy as np

    from ..chunks._store import ChunkStore
    from ..repository._manifest import Entry

_ZIP = b"PK\x03\x04"


def parse(read: Callable[[int, int], bytes], size: int) -> Header:
    """The tensors of a file of ``size`` bytes; InvalidInputError when it is no format cas cuts."""
    lead = read(0, min(size, 8))
    if lead.startswith(_ZIP):
        try:
            return _torchsave.parse(read, size)
        except InvalidInputError as torch_error:
            try:
                return _numpy.parse(read, size)
            except InvalidInputError:
                raise torch_error from None
    if lead.startswith(_numpy.MAGIC[:6]):
        return _numpy.parse(read, size)
    return parse_header(read, size)


def sniff(stream: Any, size: int) -> Header | None:
    """The tensors of an open file if it is one cas cuts on tensor boundaries, else None."""

    def read(offset: int, length: int) -> bytes:
        stream.seek(offset)
        data: bytes = stream.read(length)
        if len(data) != length:
            raise InvalidInputError("file is shorter than its header says")
        return data

    try:
        header = parse(read, size)
    except InvalidInputError:
        return None
    finally:
        stream.seek(0)
    position = header.length
    for info in header.tensors:
        if info.start < position:
            return None  # overlapping ranges: a plausible header, not a file we can cut
        position = info.end
    return header


def read_tensor(chunks: ChunkStore, entry: Entry, name: str, *, label: str) -> np.ndarray[Any, Any]:
    """One tensor of a stored file as a numpy array (BF16 as float32, exactly).

    Fetches and verifies only the chunks that hold the file's structure and the tensor.
    """
    reader = StoredFile(chunks, entry, label)
    try:
        header = parse(reader.read, entry.size)
    except InvalidInputError as err:
        raise InvalidInputError(
            f"{label}: file {entry.path!r} is not a tensor file cas reads ({err})"
        ) from None
    info = header.tensor(name)
    data = reader.read(info.start, info.end - info.start)
    return to_numpy(data, info, f"{label}: tensor {name!r}")


def to_numpy(data: bytes, info: TensorInfo, what: str) -> np.ndarray[Any, Any]:
    """The tensor ``info`` as a numpy array, from ``data``, the bytes of its range."""
    import numpy as np

    if info.dtype == "BF16":
        words = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        flat: np.ndarray[Any, Any] = words.view(np.float32)
    elif info.dtype in NUMPY_DTYPES:
        flat = np.frombuffer(data, dtype=NUMPY_DTYPES[info.dtype])
    else:
        raise InvalidInputError(f"{what} has dtype {info.dtype} numpy lacks")
    if info.strides is None:
        out: np.ndarray[Any, Any] = flat.reshape(info.shape).copy()
        return out
    itemsize = flat.dtype.itemsize
    strided = np.lib.stride_tricks.as_strided(
        flat, info.shape, tuple(s * itemsize for s in info.strides), writeable=False
    )
    return np.array(strided)
