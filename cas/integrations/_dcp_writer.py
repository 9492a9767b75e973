"""CasWriter: every rank uploads its own items; the coordinator commits one version.

The order of a save, and what each step does here:

1. ``set_up_storage_writer`` (every rank, inside DCP's planning collective):
   open the store. A store that cannot be opened on any rank fails the
   save on every rank, before anything is uploaded.
2. ``prepare_global_plan`` (coordinator): pin the parents to ``KEY@N``, and
   without parents the key's latest version, so every rank bases its deltas
   on the same version, and name each rank's file.
3. ``write_data`` (every rank, at once): chunk, hash, compress and upload
   the rank's items from memory through a :class:`~cas.store.ShardWriter`,
   make them durable, and seal them into a part for the coordinator.
4. ``finish`` (coordinator, once every rank succeeded): store ``.metadata``
   and commit exactly one version from all the parts.

A rank that fails or dies before 4 leaves no version: its chunks are
unreferenced objects that garbage collection reclaims, and the next save
reuses whatever of them it needs (docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import uuid
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ..errors import InvalidInputError, RefNotFoundError
from ..store import ArtifactInfo, Record, ShardPart, Store, TensorPart, Version
from ._common import open_store
from ._dcp_files import (
    METADATA_FILE,
    check_location,
    compact,
    data_file,
    dtype_name,
    framing,
    raw_bytes,
    whole_save,
)


@dataclass(frozen=True)
class _RankPlan:
    """What the coordinator tells each rank: its file, the pinned parents and latest version."""

    file: str
    parents: tuple[str, ...]
    latest: int | None = None


@dataclass(frozen=True)
class _SealedItem:
    """The storage data of a rank's first item, carrying the rank's part to the coordinator."""

    info: _StorageInfo
    part: ShardPart


class CasWriter(StorageWriter):
    """A DCP storage writer that saves a checkpoint as the next version of ``key``.

    ``store`` is a location (a path, ``s3://bucket/prefix``, ``gs://...``,
    ``az://...``) or an open :class:`~cas.store.Store` (one process only).
    ``parents`` are references the version derives from; the same tensors
    of the first one are the bases of its deltas. Without parents, the same
    tensors of the key's latest version are (a storage choice, recorded as
    the version's delta base, not as lineage); ``delta=False`` stores every
    tensor whole, and None follows the store's setting, as for ``Store.put``.
    ``tags``, ``metrics``, ``metadata``, ``message`` and ``info`` are
    recorded as by ``Store.put``.
    ``workers`` is the number of chunks each rank uploads at once (default:
    the store's). After a save, :attr:`version` is the committed version on
    the coordinator, and the ``Metadata`` that ``dcp.save`` returns on every
    rank names it in ``storage_meta.checkpoint_id`` (``KEY@N``).

    Every argument is checked when the writer is made, on every rank alike,
    so a bad key, tag, metric or location fails before the save starts.
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | Store,
        key: str,
        *,
        parents: Sequence[str] = (),
        tags: Sequence[str] = (),
        metrics: Mapping[str, float] | None = None,
        metadata: Mapping[str, Any] | None = None,
        message: str = "",
        info: ArtifactInfo | None = None,
        workers: int | None = None,
        delta: bool | None = None,
    ) -> None:
        super().__init__()
        if delta is not None and not isinstance(delta, bool):
            raise InvalidInputError(f"delta must be True, False or None, not {delta!r}")
        self.delta = delta
        self._location = store if isinstance(store, Store) else check_location(store)
        self._fields: dict[str, Any] = {
            "parents": tuple(parents),
            "tags": tuple(tags),
            "metrics": dict(metrics or {}),
            "metadata": dict(metadata or {}),
            "message": message,
            "info": info,
        }
        self.record = Record.of(key, **self._fields)
        self.workers = workers
        #: The version the last save committed (on the coordinator), else None.
        self.version: Version | None = None
        self._store: Store | None = None
        self._is_coordinator = False
        self._pinned: tuple[str, ...] = ()
        self._latest: int | None = None
        self._save_id = uuid.uuid4().hex

    # -- set-up and planning --------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """A new save begins; ``checkpoint_id``, when given, is the key to save to."""
        if checkpoint_id is not None:
            self.record = Record.of(os.fspath(checkpoint_id), **self._fields)
        self._save_id = uuid.uuid4().hex
        self.version = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives", True) is False:
            raise InvalidInputError(
                "CasWriter commits one version from every rank's files: "
                "save with use_collectives=True"
            )
        self._is_coordinator = is_coordinator
        self._open()

    def _open(self) -> Store:
        if self._store is None:
            self._store = open_store(self._location)
        return self._store

    def storage_meta(self) -> StorageMeta | None:
        return self._meta()

    def _meta(self) -> StorageMeta:
        return StorageMeta(checkpoint_id=self.record.key, save_id=self._save_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        store = self._open()
        refs = [store.resolve(parent) for parent in self.record.parents]
        self._pinned = tuple(f"{ref.key}@{ref.number}" for ref in refs)
        self._latest = None if refs or self.delta is False else _latest(store, self.record.key)
        return [
            dataclasses.replace(
                plan, storage_data=_RankPlan(data_file(rank), self._pinned, self._latest)
            )
            for rank, plan in enumerate(plans)
        ]

    # -- every rank: its own items ------------------------------------------------------

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        rank_plan: _RankPlan = plan.storage_data
        # Serialised objects first, as FileSystemWriter does; tensors in plan order.
        items = sorted(plan.items, key=lambda item: item.type != WriteItemType.BYTE_IO)
        results: list[WriteResult] = []
        if items:
            writer = self._open().shard_writer(
                self.record,
                parents=rank_plan.parents,
                size_hint=sum(_item_bytes(item) for item in items),
                workers=self.workers,
                delta=self.delta,
                latest=rank_plan.latest,
            )
            with writer:
                writer.write(rank_plan.file, _parts(items, planner, rank_plan.file, results))
                part = writer.seal()
            first = results[0]
            sealed = _SealedItem(first.storage_data, part)
            results[0] = WriteResult(first.index, first.size_in_bytes, sealed)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    # -- the coordinator: one commit ------------------------------------------------------

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        parts: list[ShardPart] = []
        storage: dict[Any, _StorageInfo] = {}
        for rank_results in results:
            for result in rank_results:
                info = result.storage_data
                if isinstance(info, _SealedItem):
                    parts.append(info.part)
                    info = info.info
                storage[result.index] = info
        metadata.version = CURRENT_DCP_VERSION
        metadata.storage_data = storage
        meta = metadata.storage_meta = self._meta()
        blob = pickle.dumps(metadata)
        with self._open().shard_writer(
            self.record, parents=self._pinned, delta=self.delta, latest=self._latest
        ) as writer:
            writer.write(METADATA_FILE, [blob])
            self.version = writer.commit(parts)
        # Every rank gets this Metadata back from dcp.save: it names the version.
        meta.checkpoint_id = self.version.ref

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        try:
            Record.of(
                os.fspath(checkpoint_id),
                parents=(),
                tags=(),
                metrics=None,
                metadata=None,
                message="",
                info=None,
            )
        except (InvalidInputError, TypeError):
            return False
        return True


def _latest(store: Store, key: str) -> int | None:
    """The number of the key's latest version, None before its first."""
    try:
        return store.resolve(key).number
    except RefNotFoundError:
        return None


def _item_bytes(item: WriteItem) -> int:
    data = item.tensor_data
    if data is None:
        return 0
    return int(torch.Size(data.chunk.sizes).numel()) * data.properties.dtype.itemsize


def _parts(
    items: Iterable[WriteItem], planner: SavePlanner, path: str, results: list[WriteResult]
) -> Iterator[bytes | TensorPart]:
    """The parts of one rank's file, item by item; records where each item went.

    Items are resolved one at a time, so a rank holds one tensor copied off
    its device (if any) beside those still being uploaded.
    """
    offset = 0
    for item in items:
        data = planner.resolve_data(item)
        if isinstance(data, torch.Tensor):
            length = yield from _tensor_parts(item, compact(data))
        else:
            blob = data.getvalue()
            yield blob
            length = len(blob)
        info = _StorageInfo(path, offset, length)
        results.append(WriteResult(index=item.index, size_in_bytes=length, storage_data=info))
        offset += length


def _tensor_parts(
    item: WriteItem, tensor: torch.Tensor
) -> Generator[bytes | TensorPart, None, int]:
    """A ``torch.save`` of ``tensor``, its bytes as a tensor part; returns its length."""
    frame = framing(tensor)
    if frame is None:
        blob = whole_save(tensor)
        yield blob
        return len(blob)
    head, tail = frame
    assert item.tensor_data is not None
    chunk = item.tensor_data.chunk
    yield head
    yield TensorPart(
        item.index.fqn,
        dtype_name(tensor.dtype),
        tuple(tensor.shape),
        raw_bytes(tensor),
        offsets=tuple(chunk.offsets),
        whole_shape=tuple(item.tensor_data.size),
    )
    yield tail
    return len(head) + tensor.nbytes + len(tail)
