"""CasReader: every rank reads the byte ranges its plan needs, straight from the store.

DCP's planner decides which stored items (or parts of them) each rank
needs, whatever the world size the checkpoint was saved with; this reader
serves them. A tensor's bytes are found through the version's tensor index
and fetched alone (no ``torch.load`` of the framing around them), chunks
fetched ahead in parallel and each verified; a whole stored shard that
lands in a whole destination tensor is copied into it directly. An item
the index does not describe (a checkpoint put with ``cas put`` from a
folder) is read as FileSystemReader reads it.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from .. import store as cas_store
from ..errors import InvalidInputError
from ..store import IndexedTensor, Shard, Store, VersionFiles
from ._dcp_files import METADATA_FILE, check_location, torch_dtype


@dataclass(frozen=True)
class _Job:
    """One read item and the bytes that serve it."""

    item: ReadItem
    path: str
    start: int
    end: int
    shard: Shard | None  # set when the bytes are a tensor's own, without framing
    dtype: torch.dtype | None


class CasReader(StorageReader):
    """A DCP storage reader that loads a checkpoint from a version of a cas store.

    ``store`` is a location or an open :class:`~cas.store.Store` (one process
    only); ``ref`` is ``KEY``, ``KEY@N`` or ``KEY:TAG``. Every rank must load
    the same version: pass ``KEY@N`` when a save to the key may commit
    meanwhile, or the load stops with an error saying so. ``workers`` is
    the number of chunks each rank fetches at once (default: the store's).
    """

    def __init__(
        self, store: str | os.PathLike[str] | Store, ref: str, *, workers: int | None = None
    ) -> None:
        super().__init__()
        self._location = store if isinstance(store, Store) else check_location(store)
        self.ref = ref
        self.workers = workers
        self._store: Store | None = None
        self._files: VersionFiles | None = None
        self._shards: dict[tuple[str, tuple[int, ...]], tuple[IndexedTensor, Shard]] = {}
        self._storage: dict[MetadataIndex, Any] = {}
        self._load_id = uuid.uuid4().hex

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """A new load begins; ``checkpoint_id``, when given, is the reference to load."""
        if checkpoint_id is not None:
            self.ref = os.fspath(checkpoint_id)
        self._files = None
        self._load_id = uuid.uuid4().hex

    def _open(self) -> Store:
        if self._store is None:
            location = self._location
            if isinstance(location, Store):
                self._store = location
            else:
                self._store = cas_store.open(location, create=False)
        return self._store

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise InvalidInputError("a cas version holds one .metadata for all ranks")
        files = self._open().open_version(self.ref)
        metadata: Metadata = pickle.loads(files.read(METADATA_FILE))
        meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        meta.load_id = self._load_id
        metadata.storage_meta = meta
        self._files = files
        self._shards = {}
        if files.tensors is not None:
            for tensor in files.tensors.tensors.values():
                for shard in tensor.shards:
                    self._shards[(tensor.name, shard.offsets)] = (tensor, shard)
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if metadata.storage_data is None:
            raise InvalidInputError(f"{self.ref}: its .metadata has no storage data")
        self._storage = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return dataclasses.replace(plan, storage_data=self._version_files().version.ref)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        loaded = sorted({plan.storage_data for plan in plans})
        if len(loaded) > 1:
            raise InvalidInputError(
                f"the ranks resolved {self.ref} to different versions ({', '.join(loaded)}): "
                "a save committed while they started; load KEY@N"
            )
        return plans

    def _version_files(self) -> VersionFiles:
        if self._files is None:
            raise InvalidInputError("read_metadata was not called before this load's plan")
        return self._files

    # -- reading -----------------------------------------------------------------------

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        files = self._version_files()
        jobs = sorted((self._job(item) for item in plan.items), key=lambda j: (j.path, j.start))
        # Whole stored shards that land in whole destination tensors are
        # decoded straight into them (and verified there); the rest come as
        # pieces of chunks, and are copied.
        direct: list[tuple[_Job, torch.Tensor]] = []
        others: list[_Job] = []
        for job in jobs:
            target = _direct_target(job, planner)
            if target is None:
                others.append(job)
            else:
                direct.append((job, target))
        fills = [(job.path, job.start, job.end, _writable_bytes(t)) for job, t in direct]
        files.read_into(fills, workers=self.workers)
        for job, target in direct:
            planner.commit_tensor(job.item, target)
        ranges = [(job.path, job.start, job.end) for job in others]
        for job, pieces in zip(
            others, files.read_ranges(ranges, workers=self.workers), strict=True
        ):
            if job.item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(job.item, io.BytesIO(b"".join(pieces)))
            else:
                _load_tensor(job, pieces, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _job(self, item: ReadItem) -> _Job:
        info = self._storage[item.storage_index]
        if getattr(info, "transform_descriptors", None):
            raise InvalidInputError(
                f"{item.storage_index.fqn}: saved with stream transforms, which CasReader lacks"
            )
        offsets = tuple(item.storage_index.offset or ())
        found = self._shards.get((item.storage_index.fqn, offsets))
        if item.type == LoadItemType.TENSOR and found is not None:
            tensor, shard = found
            dtype = torch_dtype(tensor.dtype)
            if dtype is not None:
                return _Job(item, shard.file, shard.start, shard.end, shard, dtype)
        end = info.offset + info.length
        return _Job(item, info.relative_path, info.offset, end, None, None)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, str) and bool(checkpoint_id)


def _direct_target(job: _Job, planner: LoadPlanner) -> torch.Tensor | None:
    """The destination of a whole stored shard, when its bytes can go straight into it."""
    item = job.item
    if job.shard is None or item.type != LoadItemType.TENSOR:
        return None
    if any(item.storage_offsets) or tuple(item.lengths) != job.shard.shape:
        return None
    target = planner.resolve_tensor(item).detach()
    if target.device.type != "cpu" or target.dtype != job.dtype or not target.is_contiguous():
        return None
    if target.nbytes != job.end - job.start:
        return None
    return target


def _writable_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without a copy."""
    array: np.ndarray[Any, Any] = tensor.reshape(-1).view(torch.uint8).numpy()
    return array.data


def _load_tensor(job: _Job, pieces: Sequence[memoryview], planner: LoadPlanner) -> None:
    item = job.item
    target = planner.resolve_tensor(item).detach()
    if job.shard is None:
        # A whole torch.save, as FileSystemReader reads it.
        stored = torch.load(io.BytesIO(b"".join(pieces)), map_location="cpu", weights_only=True)
    else:
        assert job.dtype is not None
        buffer = torch.empty(job.end - job.start, dtype=torch.uint8)
        _copy_pieces(buffer, pieces)
        stored = buffer.view(job.dtype).reshape(job.shard.shape)
    region = narrow_tensor_by_index(stored, item.storage_offsets, item.lengths)
    if target.size() != region.size():
        raise InvalidInputError(
            f"{item.storage_index.fqn}: stored block {tuple(region.size())} does not fit "
            f"{tuple(target.size())}"
        )
    target.copy_(region)
    planner.commit_tensor(item, target)


def _copy_pieces(target: torch.Tensor, pieces: Sequence[memoryview]) -> None:
    flat: np.ndarray[Any, Any] = target.reshape(-1).view(torch.uint8).numpy()
    position = 0
    for piece in pieces:
        flat[position : position + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
        position += len(piece)
