"""Checkpoints straight to and from a store: safetensors files, metrics, lineage.

A PyTorch ``state_dict`` or a dict of numpy arrays is written as one
safetensors file (the format needs no pickle to load, so loading a
checkpoint cannot run code, and ``cas diff`` can tell which tensors
changed). Consecutive checkpoints of a run differ in few tensors, and
content-defined chunking stores only the chunks that changed.

torch is optional: the numpy helpers never import it, the torch helpers
import it when called. numpy is needed by both.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, overload

from ..errors import ConfigurationError, InvalidInputError, RefNotFoundError
from ..repository import _layout as layout
from ..repository._metadata import ArtifactInfo
from ..tensors._safetensors import parse_header
from ._background import BackgroundUploader
from ._retry import save_with_retries

if TYPE_CHECKING:
    from ..store import Store, Version

FILENAME = "model.safetensors"

# safetensors dtype names <-> numpy dtype names (little-endian throughout).
_NUMPY = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_FROM_NUMPY = {v: k for k, v in _NUMPY.items()}
# torch dtype names (str(dtype) without "torch.") <-> safetensors names.
_TORCH = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def _numpy() -> Any:
    try:
        import numpy
    except ImportError as err:
        raise ConfigurationError("checkpoint helpers need numpy: pip install numpy") from err
    return numpy


def _torch() -> Any:
    try:
        import torch
    except ImportError as err:
        raise ConfigurationError(
            "saving or loading a PyTorch state_dict needs torch: pip install torch"
        ) from err
    return torch


# -- safetensors, written and read without the safetensors package ---------------------


def write_safetensors(
    stream: BinaryIO,
    tensors: Iterable[tuple[str, str, tuple[int, ...], bytes]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write (name, safetensors dtype, shape, little-endian bytes) tuples as one file."""
    items = list(tensors)
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape, data in items:
        if name in header or name == "__metadata__":
            raise InvalidInputError(f"tensor name {name!r} appears twice or is reserved")
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    stream.write(len(blob).to_bytes(8, "little"))
    stream.write(blob)
    for _, _, _, data in items:
        stream.write(data)


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """{name: (dtype, shape, bytes)} and ``__metadata__`` of a safetensors file."""
    with open(path, "rb") as stream:

        def read(offset: int, length: int) -> bytes:
            stream.seek(offset)
            return stream.read(length)

        try:
            header = parse_header(read, os.fstat(stream.fileno()).st_size)
        except InvalidInputError as err:
            raise InvalidInputError(f"{path}: not a safetensors file ({err})") from None
        out: dict[str, Any] = {}
        for info in header.tensors:
            out[info.name] = (info.dtype, info.shape, read(info.start, info.end - info.start))
        return out, dict(header.metadata or {})


def _array_tensors(arrays: Mapping[str, Any]) -> Iterator[tuple[str, str, tuple[int, ...], bytes]]:
    np = _numpy()
    for name, value in sorted(arrays.items()):
        array = np.asarray(value)
        dtype = _FROM_NUMPY.get(array.dtype.name)
        if dtype is None:
            raise InvalidInputError(f"array {name!r}: dtype {array.dtype} has no safetensors type")
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        yield name, dtype, tuple(array.shape), little.tobytes()


def _torch_tensors(state: Mapping[str, Any]) -> Iterator[tuple[str, str, tuple[int, ...], bytes]]:
    torch = _torch()
    for name, value in sorted(state.items()):
        if not isinstance(value, torch.Tensor):
            raise InvalidInputError(
                f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor; "
                "safetensors holds tensors only"
            )
        tensor = value.detach().cpu().contiguous()
        dtype = _TORCH.get(str(tensor.dtype).removeprefix("torch."))
        if dtype is None:
            raise InvalidInputError(f"tensor {name!r}: dtype {tensor.dtype} is not supported")
        # Raw bytes through a uint8 view: works for bfloat16, which numpy lacks.
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        yield name, dtype, tuple(tensor.shape), data


def _nbytes(state: Mapping[str, Any], torch: bool) -> int:
    """The bytes a host copy of ``state`` takes, known before copying it."""
    if torch:
        return sum(v.numel() * v.element_size() for v in state.values() if hasattr(v, "numel"))
    np = _numpy()
    return sum(np.asarray(v).nbytes for v in state.values())


# -- store helpers -----------------------------------------------------------------------


@contextmanager
def _scratch() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="cas-ckpt-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _save(
    store: Store,
    key: str,
    tensors: Iterable[tuple[str, str, tuple[int, ...], bytes]],
    *,
    metrics: Mapping[str, float] | None,
    parent: str | None,
    info: ArtifactInfo | None,
    tags: Iterable[str],
    message: str,
    fmt: str,
    if_changed: bool = False,
    idempotency_token: str | None = None,
    delta: bool | None = None,
) -> Version:
    with _scratch() as directory:
        path = directory / FILENAME
        with open(path, "wb") as stream:
            # "format" is the safetensors convention for the framework ("pt", "np"):
            # loading picks tensors or arrays from it.
            write_safetensors(stream, tensors, {"format": fmt})
        return store.put(
            path,
            key,
            parents=[parent] if parent else [],
            tags=tags,
            metrics=metrics,
            message=message,
            info=info or ArtifactInfo(type="checkpoint"),
            if_changed=if_changed,
            idempotency_token=idempotency_token,
            delta=delta,
        )


def save_arrays(
    store: Store,
    key: str,
    arrays: Mapping[str, Any],
    *,
    metrics: Mapping[str, float] | None = None,
    parent: str | None = None,
    info: ArtifactInfo | None = None,
    tags: Iterable[str] = (),
    message: str = "",
    if_changed: bool = False,
    idempotency_token: str | None = None,
    delta: bool | None = None,
) -> Version:
    """Store a dict of numpy arrays as a safetensors file, the next version of ``key``.

    ``if_changed``, ``idempotency_token`` and ``delta`` are those of :meth:`Store.put`
    (``delta=False`` stores every chunk whole).
    """
    return _save(
        store,
        key,
        _array_tensors(arrays),
        metrics=metrics,
        parent=parent,
        info=info,
        tags=tags,
        message=message,
        fmt="np",
        if_changed=if_changed,
        idempotency_token=idempotency_token,
        delta=delta,
    )


def load_arrays(store: Store, ref: str) -> dict[str, Any]:
    """The arrays of a version stored by :func:`save_arrays` (or any safetensors file)."""
    np = _numpy()
    out = {}
    for name, (dtype, shape, data) in _load(store, ref)[0].items():
        if dtype not in _NUMPY:
            raise InvalidInputError(f"{ref}: tensor {name!r} is {dtype}, which numpy cannot hold")
        out[name] = (
            np.frombuffer(data, dtype=np.dtype(_NUMPY[dtype]).newbyteorder("<"))
            .reshape(shape)
            .copy()
        )
    return out


def save_state_dict(
    store: Store,
    key: str,
    state_dict: Mapping[str, Any],
    *,
    metrics: Mapping[str, float] | None = None,
    parent: str | None = None,
    info: ArtifactInfo | None = None,
    tags: Iterable[str] = (),
    message: str = "",
    if_changed: bool = False,
    idempotency_token: str | None = None,
    delta: bool | None = None,
) -> Version:
    """Store a PyTorch ``state_dict`` as a safetensors file, the next version of ``key``.

    ``if_changed``, ``idempotency_token`` and ``delta`` are those of :meth:`Store.put`.
    """
    return _save(
        store,
        key,
        _torch_tensors(state_dict),
        metrics=metrics,
        parent=parent,
        info=info,
        tags=tags,
        message=message,
        fmt="pt",
        if_changed=if_changed,
        idempotency_token=idempotency_token,
        delta=delta,
    )


def load_state_dict(store: Store, ref: str, *, device: str = "cpu") -> dict[str, Any]:
    """The tensors of a version stored by :func:`save_state_dict`, on ``device``."""
    torch = _torch()
    by_name = {v: k for k, v in _TORCH.items()}
    out = {}
    for name, (dtype, shape, data) in _load(store, ref)[0].items():
        if dtype not in by_name:
            raise InvalidInputError(f"{ref}: tensor {name!r} has unsupported dtype {dtype}")
        flat = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data
            else torch.empty(0, dtype=torch.uint8)
        )
        out[name] = flat.view(getattr(torch, by_name[dtype])).reshape(shape).to(device)
    return out


def _load(store: Store, ref: str) -> tuple[dict[str, Any], dict[str, str]]:
    with _scratch() as directory:
        dest = directory / "restored"
        version = store.get(ref, dest)
        path = dest
        if version.kind == "directory":
            files = sorted(p for p in dest.rglob("*.safetensors") if p.is_file())
            if len(files) != 1:
                raise InvalidInputError(
                    f"{ref}: expected one .safetensors file, found {len(files)}"
                )
            path = files[0]
        return read_safetensors(path)


# -- a run's checkpoints -----------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its tensors, step, metrics and version."""

    state: dict[str, Any]
    version: Version
    step: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Save:
    """What one save stores besides the tensors."""

    step: int
    metrics: Mapping[str, float]
    tags: tuple[str, ...]
    message: str
    fmt: str


class CheckpointManager:
    """Checkpoints of one training run under ``runs/<run>/checkpoint`` (or ``key``).

    Each :meth:`save` is a new version whose parent is the previous one, so
    ``cas lineage`` shows the run as a chain and ``cas prune --keep-best``
    can thin it by any metric. Its tensors are stored as deltas of the
    previous checkpoint's where that saves space; ``delta=False`` stores
    every checkpoint whole (faster to read, larger).

    ``save(..., background=True)`` copies the tensors to host memory and
    returns; a worker stores the copy. The copies waiting to be stored stay
    within ``memory_budget`` bytes (default: a quarter of the machine's
    memory): a save that would exceed it waits. A failed background save
    raises :class:`~cas.errors.BackgroundSaveError` at the next save, at
    :meth:`wait` and at exit.
    """

    def __init__(
        self,
        store: Store,
        run: str,
        *,
        key: str | None = None,
        framework: Literal["auto", "torch", "numpy"] = "auto",
        info: ArtifactInfo | None = None,
        parent: str | None = None,
        memory_budget: int | None = None,
        delta: bool | None = None,
    ) -> None:
        self.store = store
        #: Whether checkpoints may be stored as deltas of the previous one
        #: (None: the store's setting; False: every checkpoint whole).
        self.delta = delta
        #: What the run's first checkpoint derives from (a dataset, a base model).
        self.parent = parent
        self.run = run
        self.key = layout.check_key(key or f"runs/{run}/checkpoint")
        self.framework = framework
        self.info = info or ArtifactInfo(type="checkpoint", job=run)
        self.memory_budget = memory_budget
        self._uploader: BackgroundUploader | None = None

    def _is_torch(self, state: Mapping[str, Any]) -> bool:
        if self.framework != "auto":
            return self.framework == "torch"
        first = next(iter(state.values()), None)
        return type(first).__module__.startswith("torch")

    @property
    def uploader(self) -> BackgroundUploader:
        """The worker that runs this manager's background saves (made on first use)."""
        if self._uploader is None:
            self._uploader = BackgroundUploader(self.memory_budget)
        return self._uploader

    @overload
    def save(
        self,
        state: Mapping[str, Any],
        step: int,
        metrics: Mapping[str, float] | None = None,
        *,
        tags: Iterable[str] = (),
        message: str = "",
        background: Literal[False] = False,
        idempotency_token: str | None = None,
    ) -> Version: ...

    @overload
    def save(
        self,
        state: Mapping[str, Any],
        step: int,
        metrics: Mapping[str, float] | None = None,
        *,
        tags: Iterable[str] = (),
        message: str = "",
        background: Literal[True],
        idempotency_token: str | None = None,
    ) -> Future[Version]: ...

    def save(
        self,
        state: Mapping[str, Any],
        step: int,
        metrics: Mapping[str, float] | None = None,
        *,
        tags: Iterable[str] = (),
        message: str = "",
        background: bool = False,
        idempotency_token: str | None = None,
    ) -> Version | Future[Version]:
        """Store ``state`` (a torch state_dict or numpy arrays) as the checkpoint of ``step``.

        With ``background=True`` the tensors are copied to host memory and a
        future of the version is returned at once; see the class docstring.

        Saving never duplicates a checkpoint. A transient failure is retried
        as the same save (with one idempotency token, the one given or a new
        one), so a retry returns the version an earlier attempt committed.
        A save of the same step with the same content and metrics as the
        latest checkpoint (a save repeated after a restart) returns that
        checkpoint instead of storing it again.
        """
        if self._uploader is not None:
            self._uploader.check()
        torch = self._is_torch(state)
        fmt = "pt" if torch else "np"
        tensors = _torch_tensors if torch else _array_tensors
        save = _Save(step, {**(metrics or {}), "step": step}, tuple(tags), message, fmt)
        if not background:
            if self._uploader is not None:
                # In order: the background saves before this one are its ancestors.
                self._uploader.wait(self.key)
            return self._put(lambda: tensors(state), save, idempotency_token)
        uploader = self.uploader
        nbytes = _nbytes(state, torch)
        uploader.reserve(nbytes, f"the checkpoint of step {step} of {self.key}")
        try:
            snapshot = list(tensors(state))
        except BaseException:
            uploader.release(nbytes)
            raise
        return uploader.submit(
            self.key,
            f"{self.key} step {step}",
            lambda: self._put(lambda: iter(snapshot), save, idempotency_token),
            hold=nbytes,
        )

    def wait(self) -> None:
        """Wait for this manager's background saves; raise the first that failed."""
        if self._uploader is not None:
            self._uploader.wait(self.key)

    def _put(
        self,
        tensors: Callable[[], Iterable[tuple[str, str, tuple[int, ...], bytes]]],
        save: _Save,
        idempotency_token: str | None,
    ) -> Version:
        # Not self.versions(): that waits for the background saves, this one among them.
        try:
            versions = self.store.log(self.key)
        except RefNotFoundError:
            versions = []
        parent = versions[0].ref if versions else self.parent
        if versions and versions[0].metrics.get("step") == save.step:
            # The step again: derived from what the latest one derives from.
            parent = versions[0].parents[0] if versions[0].parents else self.parent
        return save_with_retries(
            lambda token: _save(
                self.store,
                self.key,
                tensors(),
                metrics=save.metrics,
                parent=parent,
                info=self.info,
                tags=save.tags,
                message=save.message,
                fmt=save.fmt,
                if_changed=True,
                idempotency_token=token,
                delta=self.delta,
            ),
            idempotency_token,
        )

    def _load(self, version: Version) -> Checkpoint:
        framework = self.framework
        if framework == "auto":
            # Back as it was saved: tensors for a state_dict, arrays for arrays.
            framework = "torch" if _format(self.store, version.ref) == "pt" else "numpy"
        if framework == "torch":
            state = load_state_dict(self.store, version.ref)
        else:
            state = load_arrays(self.store, version.ref)
        step = version.metrics.get("step")
        return Checkpoint(
            state, version, int(step) if step is not None else None, dict(version.metrics)
        )

    def versions(self) -> list[Version]:
        if self._uploader is not None:
            self._uploader.wait_below(self.key, 1)  # the saves still in flight are versions too
        try:
            return self.store.log(self.key)
        except RefNotFoundError:
            return []

    def load_latest(self) -> Checkpoint | None:
        """The newest checkpoint, or None when the run has none yet (a fresh start)."""
        versions = self.versions()
        return self._load(versions[0]) if versions else None

    def load_best(self, metric: str, mode: Literal["min", "max"] = "min") -> Checkpoint | None:
        """The checkpoint with the lowest (``min``) or highest (``max``) ``metric``."""
        if mode not in ("min", "max"):
            raise InvalidInputError(f"mode must be 'min' or 'max', got {mode!r}")
        ranked = [v for v in self.versions() if metric in v.metrics]
        if not ranked:
            return None
        pick = min if mode == "min" else max
        return self._load(pick(ranked, key=lambda v: v.metrics[metric]))


def _format(store: Store, ref: str) -> str | None:
    """The ``format`` recorded in a stored safetensors header, read from its first bytes."""
    manifest = store.manifest(ref)
    files = [e for e in manifest.entries if e.type == "file" and e.path.endswith(".safetensors")]
    if len(files) != 1:
        return None
    try:
        metadata = store.open_file(files[0], label=ref).header().metadata
    except (ValueError, KeyError, TypeError):
        return None
    return metadata.get("format") if isinstance(metadata, dict) else None
