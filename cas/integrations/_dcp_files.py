"""What a distributed checkpoint looks like as the files of a cas version.

The files are the ones DCP's own ``FileSystemWriter`` writes, so that a
restored copy (``cas get``) loads with ``FileSystemReader`` and every tool
built on it:

* ``.metadata``: the pickled ``Metadata`` of the checkpoint, whose
  ``storage_data`` says for each item which file holds it, at which offset,
  how long;
* ``__{rank}_0.distcp``: one file per rank, its items one after the other.
  A tensor item is a ``torch.save`` of the tensor (a zip archive whose one
  large record holds the tensor's bytes as they are in memory); any other
  item is the bytes the planner serialised.

Inside each ``torch.save`` the tensor's bytes are handed to cas as a tensor
part, so they start chunks of their own and get the tensor codecs; the
zip framing around them is plain bytes. cas adds its tensor index
(``.cas-tensors.json``), which FileSystemReader ignores.
"""

from __future__ import annotations

import io
import os
from typing import IO, Any, cast
from urllib.parse import urlsplit

import numpy as np
import torch

from ..errors import ConfigurationError

METADATA_FILE = ".metadata"
#: Schemes a store location may have; a plain path is a local folder.
_SCHEMES = ("file", "s3", "gs", "az", "memory")
_BUCKETED = ("s3", "gs", "az")

#: torch dtypes by the names cas's tensor index and codecs use (safetensors' names).
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The index's name of a torch dtype; dtypes cas has no codec for keep torch's name."""
    return DTYPE_NAMES.get(dtype) or str(dtype)


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype an index name stands for, None when it is not one cas names."""
    return _BY_NAME.get(name)


def data_file(rank: int) -> str:
    """The file of one rank's items, named as FileSystemWriter names it."""
    return f"__{rank}_0.distcp"


def check_location(location: str | os.PathLike[str]) -> str:
    """The location as text, if it can name a store; no I/O, so every rank fails alike."""
    text = os.fspath(location)
    if not text:
        raise ConfigurationError("the store location is empty")
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme not in _SCHEMES:
            raise ConfigurationError(
                f"unknown store scheme {parts.scheme!r} in {text!r}; "
                "use a path, file://, s3://, gs:// or az://"
            )
        if parts.scheme in _BUCKETED and not parts.netloc:
            raise ConfigurationError(f"store location {text!r} names no bucket or container")
    return text


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor whose storage is exactly its elements in C order (copied only if not)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if not (
        tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.nbytes
    ):
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a compact CPU tensor, without a copy."""
    array: np.ndarray[Any, Any] = tensor.reshape(-1).view(torch.uint8).numpy()
    return array.data


class _FramingSink(io.RawIOBase):
    """Receives a ``torch.save``, keeping what is written around the tensor's bytes.

    torch writes the storage in one call, straight from the tensor's memory:
    that call is recognised by its address and skipped, so the tensor is
    neither copied nor held twice.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.address = tensor.untyped_storage().data_ptr()
        self.nbytes = tensor.nbytes
        self.head = bytearray()
        self.tail = bytearray()
        self.found = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if not self.found and self.nbytes and len(view) == self.nbytes:
            address = np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]
            if address == self.address:
                self.found = True
                return len(view)
        (self.tail if self.found else self.head).extend(view)
        return len(view)


def framing(tensor: torch.Tensor) -> tuple[bytes, bytes] | None:
    """What ``torch.save(tensor)`` writes before and after the tensor's bytes.

    None when the bytes did not come in one piece (a torch that writes
    differently): then the caller stores the whole ``torch.save`` as bytes.
    """
    sink = _FramingSink(tensor)
    torch.save(tensor, cast(IO[bytes], sink))
    if sink.nbytes and not sink.found:
        return None
    return bytes(sink.head), bytes(sink.tail)


def whole_save(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()
