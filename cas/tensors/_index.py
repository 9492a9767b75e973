"""The tensor index of a version written in parts: where each tensor's bytes lie.

A version written by several processes at once (a distributed checkpoint:
one file per rank, each holding that rank's shards of the model) is not
made of safetensors files, whose header would say where each tensor is. The
writers know it, though, and the version records it in one more file,
:data:`INDEX_PATH`, canonical JSON::

    {"format": 1, "tensors": {"layers.0.weight": {"dtype": "BF16", "shape": [4096, 4096],
        "shards": [{"file": "__0_0.distcp", "start": 1536, "end": 16778752,
                    "offsets": [0, 0], "shape": [2048, 4096]}, ...]}, ...}}

Each shard is a C-ordered block of the whole tensor (``offsets`` and
``shape`` in elements) whose bytes are ``[start, end)`` of ``file``. The
index lets one tensor be read by name without anything but cas
(:func:`read_indexed_tensor`), lets ``cas diff`` compare tensors, and gives
the next version's writers the tensor ranges of its parent, so that a
shard can be stored as a delta of the same shard before it
(:meth:`TensorIndex.header`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CorruptObjectError, InvalidInputError, NotFoundError
from ..repository._manifest import canonical_json
from ._formats import to_numpy
from ._safetensors import DTYPES, Header, StoredFile, TensorInfo

if TYPE_CHECKING:
    import numpy as np

    from ..chunks._store import ChunkStore
    from ..repository._manifest import Entry, Manifest

#: The path of the index in a version's files.
INDEX_PATH = ".cas-tensors.json"
INDEX_FORMAT = 1


def shard_name(name: str, offsets: tuple[int, ...]) -> str:
    """What a shard is called in chunk plans and diffs: the tensor's name, and where the
    shard starts when that is not the origin (``layers.0.weight@2048,0``)."""
    if not any(offsets):
        return name
    return f"{name}@{','.join(map(str, offsets))}"


def itemsize(dtype: str) -> int | None:
    """Bytes per element of a dtype the index names, None for one cas does not know."""
    return DTYPES[dtype][0] if dtype in DTYPES else None


@dataclass(frozen=True, slots=True)
class Shard:
    """One block of a tensor, stored as bytes ``[start, end)`` of ``file``."""

    file: str
    start: int
    end: int
    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "start": self.start,
            "end": self.end,
            "offsets": list(self.offsets),
            "shape": list(self.shape),
        }


@dataclass(frozen=True, slots=True)
class IndexedTensor:
    """A tensor of the index: its dtype, its whole shape, and its shards."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shards: tuple[Shard, ...]


@dataclass(frozen=True)
class TensorIndex:
    """Every tensor of a version written in parts, by name."""

    tensors: Mapping[str, IndexedTensor]

    @classmethod
    def build(cls, rows: list[tuple[str, str, tuple[int, ...], Shard]]) -> TensorIndex:
        """The index of ``(name, dtype, whole shape, shard)`` rows, several per sharded tensor."""
        grouped: dict[str, list[Shard]] = {}
        kinds: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name, dtype, shape, shard in rows:
            if kinds.setdefault(name, (dtype, shape)) != (dtype, shape):
                raise InvalidInputError(
                    f"tensor {name!r} was written with two dtypes or shapes: "
                    f"{kinds[name]} and {(dtype, shape)}"
                )
            grouped.setdefault(name, []).append(shard)
        tensors = {
            name: IndexedTensor(name, *kinds[name], tuple(sorted(shards, key=_shard_order)))
            for name, shards in grouped.items()
        }
        return cls(tensors)

    def to_bytes(self) -> bytes:
        tensors = {
            name: {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "shards": [s.to_dict() for s in t.shards],
            }
            for name, t in sorted(self.tensors.items())
        }
        return canonical_json({"format": INDEX_FORMAT, "tensors": tensors})

    @classmethod
    def from_bytes(cls, blob: bytes, *, name: str = INDEX_PATH) -> TensorIndex:
        try:
            data = json.loads(blob)
            if data["format"] != INDEX_FORMAT:
                raise CorruptObjectError(f"{name}: unknown index format {data['format']!r}")
            tensors = {
                str(key): IndexedTensor(
                    str(key),
                    str(spec["dtype"]),
                    tuple(int(n) for n in spec["shape"]),
                    tuple(_shard(s) for s in spec["shards"]),
                )
                for key, spec in data["tensors"].items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CorruptObjectError(f"{name}: malformed tensor index ({err})") from None
        return cls(tensors)

    def rows(self) -> Iterator[tuple[str, str, tuple[int, ...], Shard]]:
        """What :meth:`build` takes: one row per shard."""
        for tensor in self.tensors.values():
            for shard in tensor.shards:
                yield tensor.name, tensor.dtype, tensor.shape, shard

    def tensor(self, name: str) -> IndexedTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise NotFoundError(f"no tensor named {name!r} in this version") from None

    def shards_in(self, path: str) -> Iterator[TensorInfo]:
        """Every shard stored in file ``path``, as a tensor of that file."""
        for tensor in self.tensors.values():
            for shard in tensor.shards:
                if shard.file == path:
                    name = shard_name(tensor.name, shard.offsets)
                    yield TensorInfo(name, tensor.dtype, shard.shape, shard.start, shard.end)

    def header(self, path: str) -> Header:
        """File ``path`` as a safetensors header would describe it: its tensors' byte ranges."""
        tensors = tuple(sorted(self.shards_in(path), key=lambda t: (t.start, t.end)))
        return Header(tensors[0].start if tensors else 0, tensors)

    @property
    def files(self) -> set[str]:
        return {s.file for t in self.tensors.values() for s in t.shards}


def _shard(data: Mapping[str, Any]) -> Shard:
    start, end = int(data["start"]), int(data["end"])
    if not 0 <= start <= end:
        raise ValueError(f"shard bytes [{start}, {end}) are not a range")
    return Shard(
        str(data["file"]),
        start,
        end,
        tuple(int(n) for n in data["offsets"]),
        tuple(int(n) for n in data["shape"]),
    )


def _shard_order(shard: Shard) -> tuple[tuple[int, ...], str, int]:
    return shard.offsets, shard.file, shard.start


def find_index(manifest: Manifest) -> Entry | None:
    """The index file of a version, if it has one."""
    for entry in manifest.entries:
        if entry.type == "file" and entry.path == INDEX_PATH:
            return entry
    return None


def load_index(chunks: ChunkStore, manifest: Manifest, *, label: str) -> TensorIndex | None:
    """The tensor index of a version, None when it has none."""
    entry = find_index(manifest)
    return read_index(StoredFile(chunks, entry, label)) if entry is not None else None


def read_index(file: StoredFile) -> TensorIndex:
    """The tensor index in a stored index file (:func:`find_index`)."""
    blob = file.read(0, file.entry.size)
    return TensorIndex.from_bytes(blob, name=f"{file.label}: {INDEX_PATH}")


def read_indexed_tensor(
    chunks: ChunkStore, manifest: Manifest, index: TensorIndex, name: str, *, label: str
) -> np.ndarray[Any, Any]:
    """One tensor of a version written in parts, its shards put together, as a numpy array."""
    import numpy as np

    tensor = index.tensor(name)
    what = f"{label}: tensor {name!r}"
    files = {e.path: e for e in manifest.entries if e.type == "file"}
    out: np.ndarray[Any, Any] | None = None
    covered = 0
    for shard in tensor.shards:
        entry = files.get(shard.file)
        if entry is None:
            raise CorruptObjectError(f"{what}: its shard's file {shard.file!r} is missing")
        data = StoredFile(chunks, entry, label).read(shard.start, shard.end - shard.start)
        info = TensorInfo(tensor.name, tensor.dtype, shard.shape, shard.start, shard.end)
        block = to_numpy(data, info, what)
        if out is None:
            out = np.zeros(tensor.shape, dtype=block.dtype)
        region = tuple(slice(o, o + n) for o, n in zip(shard.offsets, shard.shape, strict=True))
        out[region] = block
        covered += block.size
    if out is None or covered != math.prod(tensor.shape):
        raise CorruptObjectError(f"{what}: its shards do not cover it")
    return out
