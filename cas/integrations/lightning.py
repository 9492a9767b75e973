"""PyTorch Lightning: checkpoints written to and read from a store, by ``ModelCheckpoint``.

::

    from cas.integrations.lightning import CasCheckpointIO

    io = CasCheckpointIO("s3://bucket/cas", "runs/mnist")
    trainer = Trainer(plugins=[io], callbacks=[ModelCheckpoint(monitor="val_loss", save_top_k=2)])
    trainer.fit(model)
    trainer.fit(model, ckpt_path="runs/mnist:best")   # resume from a reference

Each checkpoint Lightning saves becomes the next version of the key (one
file, named as Lightning named it), with the version before it as parent,
metrics ``epoch``, ``step`` and every ``ModelCheckpoint``'s monitored
score, and tags: ``latest`` on the newest, ``best`` on the one
``ModelCheckpoint`` holds best, ``last`` on ``save_last``'s. The path
Lightning gave is kept in the version's metadata (``path``), so
``load_checkpoint`` and ``remove_checkpoint`` find it by that path, in this
process or another; ``load_checkpoint`` also takes any reference.
``remove_checkpoint`` (a checkpoint that fell out of ``save_top_k``)
deletes its version, and a save to a path saved before in this process
(``last.ckpt``) replaces its version, unless ``keep_removed=True``; garbage
collection then reclaims what no other version shares.

With ``background=True`` the tensors of each checkpoint are copied to host
memory (within ``memory_budget`` bytes: a save beyond it waits) and a
worker writes and stores the copy while training goes on; a failed upload
raises :class:`~cas.errors.BackgroundSaveError` at the next save, when
``fit`` ends (``teardown``), at :meth:`CasCheckpointIO.wait` or at exit.

The tensors of each checkpoint are stored as deltas of the one before where
that saves space (see docs/concepts.md); ``delta=False`` stores every
checkpoint whole, faster to read and larger.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from ..errors import BackgroundSaveError, InvalidInputError, RefNotFoundError
from ..ml._background import BackgroundUploader
from ..store import ArtifactInfo, Store, Version
from ._common import Chain, finite_metrics, open_store

__all__ = ["CasCheckpointIO"]

#: The name ``ModelCheckpoint(save_last=True)`` gives its file (``last.ckpt``, ``last-v1.ckpt``).
LAST_NAME = "last"


class CasCheckpointIO(CheckpointIO):
    """Lightning's ``CheckpointIO`` over a store: ``Trainer(plugins=[CasCheckpointIO(...)])``."""

    def __init__(
        self,
        store: Store | str | os.PathLike[str],
        key: str,
        *,
        background: bool = False,
        memory_budget: int | None = None,
        keep_removed: bool = False,
        info: ArtifactInfo | None = None,
        delta: bool | None = None,
    ) -> None:
        self.store = open_store(store)
        self.key = key
        self.keep_removed = keep_removed
        self.info = info or ArtifactInfo(type="checkpoint")
        #: The version stored for each path Lightning saved to, in this process.
        self.versions: dict[str, Version] = {}
        self._chain = Chain(self.store, key, delta=delta)
        #: The worker that runs the background saves (None when saving in the foreground).
        self.uploader = BackgroundUploader(memory_budget) if background else None
        #: Whether a save has raised a background failure: fit is then unwinding with it.
        self._failure_raised = False

    # -- the CheckpointIO interface ------------------------------------------------------

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        name = os.fspath(path)
        metrics, best = _describe(checkpoint)
        if self.uploader is None:
            self._put(checkpoint, name, metrics, best)
            return
        try:
            self.uploader.check()
        except BackgroundSaveError:
            self._failure_raised = True
            raise
        nbytes = _tensor_bytes(checkpoint)
        self.uploader.reserve(nbytes, f"checkpoint {name}")
        try:
            snapshot = apply_to_collection(checkpoint, torch.Tensor, _host_copy)
        except BaseException:
            self.uploader.release(nbytes)
            raise
        self.uploader.submit(
            self.key,
            f"{Path(name).name} to {self.key}",
            lambda: self._put(snapshot, name, metrics, best),
            hold=nbytes,
        )

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable[..., Any] | str | torch.device | None = "cpu",
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load the checkpoint stored for ``path``, or the version a reference names."""
        self._settle()
        ref = self._find(os.fspath(path))
        with tempfile.TemporaryDirectory(prefix="cas-ckpt-") as scratch:
            file = Path(scratch) / "checkpoint.ckpt"
            self.store.get(ref, file)
            loaded: dict[str, Any] = torch.load(
                file, map_location=map_location, weights_only=weights_only
            )
        return loaded

    def remove_checkpoint(self, path: Any) -> None:
        name = os.fspath(path)
        if self.uploader is None:
            self._remove(name)
        else:
            self.uploader.submit(
                self.key, f"removal of {name} from {self.key}", lambda: self._remove(name)
            )

    def teardown(self) -> None:
        if not self._failure_raised:
            self.wait()
            return
        # Lightning tears down while the failure a save raised unwinds fit: a later
        # failure raised here would replace it (each was logged when it happened).
        with contextlib.suppress(BackgroundSaveError):
            self.wait()

    def wait(self) -> None:
        """Wait for the background saves; raise the first that failed."""
        if self.uploader is not None:
            self.uploader.wait(self.key)

    # -- helpers ----------------------------------------------------------------------

    def _settle(self) -> None:
        if self.uploader is not None:
            self.uploader.wait_below(self.key, 1)

    def _put(
        self, checkpoint: Mapping[str, Any], name: str, metrics: dict[str, float], best: str | None
    ) -> Version:
        tags = ["latest"]
        if Path(name).stem.split("-v")[0] == LAST_NAME:
            tags.append("last")
        with tempfile.TemporaryDirectory(prefix="cas-ckpt-") as scratch:
            file = Path(scratch) / Path(name).name
            with open(file, "wb") as stream:
                # Written through a stream, the zip's records are named "archive/...", as
                # Lightning's own saves are; saved to a path, torch would name them after
                # the file, which changes every checkpoint and moves every record's bytes.
                torch.save(checkpoint, stream)
            version = self._chain.put(
                file, metrics=metrics, metadata={"path": name}, info=self.info, tags=tags
            )
        replaced = self.versions.get(name)
        self.versions[name] = version
        if replaced is not None and not self.keep_removed:
            # A save to a path that was saved before replaces it (save_last's last.ckpt).
            self.store.delete(replaced.ref, force=True)
        if best is not None and best in self.versions:
            self.store.tag(self.versions[best].ref, "best")
        return version

    def _stored(self, name: str) -> list[str]:
        """Live versions of the key stored for path ``name``, newest first."""
        try:
            return [v.ref for v in self.store.log(self.key) if v.metadata.get("path") == name]
        except RefNotFoundError:
            return []

    def _find(self, name: str) -> str:
        known = self.versions.get(name)
        if known is not None:
            return known.ref
        stored = self._stored(name)
        if stored:
            return stored[0]
        try:
            return self.store.show(name).version.ref
        except (InvalidInputError, RefNotFoundError):
            pass  # not a reference (a path), or one that names nothing
        raise RefNotFoundError(
            f"no checkpoint {name!r} in {self.key}: not a path saved there, nor a reference"
        )

    def _remove(self, name: str) -> None:
        self.versions.pop(name, None)
        if self.keep_removed:
            return
        for ref in self._stored(name):
            self.store.delete(ref, force=True)


def _describe(checkpoint: Mapping[str, Any]) -> tuple[dict[str, float], str | None]:
    """Metrics of a Lightning checkpoint, and the path its ``ModelCheckpoint`` holds best."""
    items: list[tuple[str, object]] = [
        ("epoch", checkpoint.get("epoch")),
        ("step", checkpoint.get("global_step")),
    ]
    best = None
    for name, state in (checkpoint.get("callbacks") or {}).items():
        if not str(name).startswith("ModelCheckpoint") or not isinstance(state, Mapping):
            continue
        if state.get("monitor"):
            items.append((str(state["monitor"]), state.get("current_score")))
            best = best or state.get("best_model_path") or None
    return finite_metrics(items), best


def _tensor_bytes(checkpoint: Mapping[str, Any]) -> int:
    sizes: list[int] = []
    apply_to_collection(checkpoint, torch.Tensor, lambda t: sizes.append(t.nbytes))
    return sum(sizes)


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    # A point-in-time copy in host memory: training goes on changing the original.
    return tensor.detach().to("cpu", copy=True)
