"""The stored records of a zip file, checked against their local headers, read with bounded memory.

torch.save and numpy's ``savez`` write zip files whose records are stored
uncompressed, so each record's bytes sit at a fixed range of the file and
can be cut like the tensors of a safetensors file. The central directory is
read by :mod:`zipfile` (zip64 included) through a reader that refuses any
read larger than :data:`MAX_READ`; each record is then checked against its
local header, so a central directory that lies (a name, a method or a size
its local header does not repeat, records that overlap or reach past the
directory) makes the file plain bytes, not a plan.
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InvalidInputError

#: No single read of a zip's structure (central directory, a pickle) may be larger.
MAX_READ = 64 * 1024 * 1024
#: More records than this is not a checkpoint we cut.
MAX_RECORDS = 1_000_000

_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_MAGIC = b"PK\x03\x04"
_ENCRYPTED = 0x1
_DATA_DESCRIPTOR = 0x8


@dataclass(frozen=True, slots=True)
class Record:
    """One stored (uncompressed) zip record: its name and the byte range of its data."""

    name: str
    header: int  # offset of its local header
    start: int
    end: int


class _BoundedReader(io.RawIOBase):
    """A seekable file over ``read(offset, length)`` that refuses reads above MAX_READ."""

    def __init__(self, read: Callable[[int, int], bytes], size: int) -> None:
        self._read = read
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self._size}[whence]
        self._position = max(base + offset, 0)
        return self._position

    def read(self, length: int | None = -1) -> bytes:
        available = max(self._size - self._position, 0)
        wanted = available if length is None or length < 0 else min(length, available)
        if wanted > MAX_READ:
            raise InvalidInputError("a zip structure larger than the reading limit")
        data = self._read(self._position, wanted) if wanted else b""
        self._position += len(data)
        return data


def records(read: Callable[[int, int], bytes], size: int) -> list[Record]:
    """Every record of a zip file of ``size`` bytes, by offset; InvalidInputError if not plain.

    Only files whose records are all stored, unencrypted, and agree with
    their local headers qualify.
    """
    if size < 22 or read(0, 4) != _LOCAL_MAGIC:
        raise InvalidInputError("not a zip file")
    try:
        with zipfile.ZipFile(_BoundedReader(read, size)) as archive:
            infos = archive.infolist()
            directory = archive.start_dir
    except (
        zipfile.BadZipFile,
        NotImplementedError,
        ValueError,
        OSError,
        EOFError,
        struct.error,
    ) as err:
        raise InvalidInputError(f"not a readable zip file ({err})") from None
    if len(infos) > MAX_RECORDS:
        raise InvalidInputError("too many zip records")
    out = sorted((_record(read, info, size) for info in infos), key=lambda r: r.header)
    limit = min(directory, size)
    for index, record in enumerate(out):
        end = out[index + 1].header if index + 1 < len(out) else limit
        if record.end > end:
            raise InvalidInputError(f"zip record {record.name!r} overlaps what follows it")
    return out


def _record(read: Callable[[int, int], bytes], info: zipfile.ZipInfo, size: int) -> Record:
    if not 0 <= info.header_offset <= size - _LOCAL.size:
        raise InvalidInputError(f"zip record {info.filename!r} lies outside the file")
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & _ENCRYPTED:
        raise InvalidInputError(f"zip record {info.filename!r} is compressed or encrypted")
    if info.compress_size != info.file_size:
        raise InvalidInputError(f"zip record {info.filename!r}: its sizes disagree")
    head = read(info.header_offset, _LOCAL.size)
    magic, _, flags, method, _, _, _, packed, plain, name_length, extra_length = _LOCAL.unpack(head)
    name = read(info.header_offset + _LOCAL.size, name_length)
    if magic != _LOCAL_MAGIC or method != zipfile.ZIP_STORED or name != _encoded(info):
        raise InvalidInputError(f"zip record {info.filename!r}: its local header disagrees")
    sized = not flags & _DATA_DESCRIPTOR and 0xFFFFFFFF not in (packed, plain)
    if sized and (packed, plain) != (info.compress_size, info.file_size):
        raise InvalidInputError(f"zip record {info.filename!r}: its local sizes disagree")
    start = info.header_offset + _LOCAL.size + name_length + extra_length
    return Record(info.filename, info.header_offset, start, start + info.file_size)


def _encoded(info: zipfile.ZipInfo) -> bytes:
    return info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
