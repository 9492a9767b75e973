"""numpy ``.npy`` files and the records of uncompressed ``.npz`` files.

A ``.npy`` file is a magic string, a version, a header length and a Python
dict literal naming the dtype (``descr``), the element order and the shape;
the array's bytes follow to the end. The dict is read with
:func:`ast.literal_eval`, which evaluates literals only, never code. Only
simple little-endian numeric dtypes qualify: an object array (pickled) or a
structured one stays plain bytes. An ``.npz`` written by ``numpy.savez`` is
a zip of ``.npy`` records stored as they are, each cut like a ``.npy``
file; ``savez_compressed`` deflates them, and such a file stays plain bytes.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable

from ..errors import InvalidInputError
from ._safetensors import DTYPES, Header, TensorInfo
from ._zip import records

MAGIC = b"\x93NUMPY"
# numpy caps a header at 10 kB when it reads one (numpy.lib.format).
MAX_HEADER = 10_000

#: numpy ``descr`` -> safetensors dtype name.
DESCRS = {
    "<f8": "F64",
    "<f4": "F32",
    "<f2": "F16",
    "<i8": "I64",
    "<i4": "I32",
    "<i2": "I16",
    "|i1": "I8",
    "<u8": "U64",
    "<u4": "U32",
    "<u2": "U16",
    "|u1": "U8",
    "|b1": "BOOL",
}


def parse_npy(read: Callable[[int, int], bytes], start: int, end: int, name: str) -> TensorInfo:
    """The array of the ``.npy`` bytes [start, end) of a file; InvalidInputError if not plain."""
    if end - start < 10 or read(start, 6) != MAGIC:
        raise InvalidInputError("not a .npy array")
    major = read(start + 6, 1)[0]
    width = {1: 2, 2: 4, 3: 4}.get(major)
    if width is None:
        raise InvalidInputError(f".npy version {major} is unknown")
    length = int.from_bytes(read(start + 8, width), "little")
    data = start + 8 + width + length
    if length > MAX_HEADER or data > end:
        raise InvalidInputError(".npy header does not fit")
    try:
        fields = ast.literal_eval(read(start + 8 + width, length).decode("latin-1"))
        descr, fortran, shape = fields["descr"], fields["fortran_order"], fields["shape"]
    except (ValueError, SyntaxError, KeyError, TypeError, MemoryError, RecursionError) as err:
        raise InvalidInputError(f".npy header is not a plain dict ({err})") from None
    if not isinstance(descr, str) or descr not in DESCRS:
        raise InvalidInputError(f".npy dtype {descr!r} is not a plain numeric dtype")
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise InvalidInputError(".npy shape is malformed")
    dtype = DESCRS[descr]
    if (end - data) != math.prod(shape) * DTYPES[dtype][0]:
        raise InvalidInputError(".npy data does not match its shape")
    strides = _fortran_strides(shape) if fortran is True and len(shape) > 1 else None
    return TensorInfo(name, dtype, shape, data, end, strides)


def _fortran_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in shape:
        strides.append(step)
        step *= n
    return tuple(strides)


def parse(read: Callable[[int, int], bytes], size: int) -> Header:
    """The arrays of a ``.npy`` or uncompressed ``.npz`` file; InvalidInputError if neither."""
    if read(0, len(MAGIC)) == MAGIC:
        info = parse_npy(read, 0, size, "array")
        return Header(info.start, (info,), format="npy")
    tensors = []
    for record in records(read, size):
        if not record.name.endswith(".npy"):
            raise InvalidInputError(f"npz record {record.name!r} is not an array")
        name = record.name[: -len(".npy")]
        tensors.append(parse_npy(read, record.start, record.end, name))
    if not tensors:
        raise InvalidInputError("no arrays")
    return Header(0, tuple(tensors), format="npz")
