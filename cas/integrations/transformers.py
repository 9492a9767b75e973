"""Hugging Face ``Trainer`` (and TRL's trainers, which are Trainers): every checkpoint into a store.

::

    from cas.integrations.transformers import CasCallback, restore_checkpoint

    trainer = Trainer(..., callbacks=[CasCallback("s3://bucket/cas", "runs/sst2")])
    trainer.train()

Each ``checkpoint-N`` folder the trainer saves becomes the next version of
the key, with the one before it as parent (so tensor deltas apply), type
``checkpoint``, the trainer state's metrics (latest ``loss``, every
``eval_*`` metric, ``step``, ``epoch``) and typed fields found without
asking: job (the run name, else the output folder's name), algorithm (from
TRL's config class: ``DPOConfig`` -> ``dpo``, ``SFTConfig`` -> ``sft``),
base model (the model config's name or path) and fine-tuning method (the
PEFT adapter's type). Tag ``latest`` marks the newest checkpoint and
``best`` the best one by ``metric_for_best_model``. When training ends, the
model as it stands (the best one, with ``load_best_model_at_end``) is
stored as type ``model`` with tag ``final``.

To resume, :func:`restore_checkpoint` writes a version where
``trainer.train(resume_from_checkpoint=...)`` reads it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import RefNotFoundError, SourceError
from ..ml._background import BackgroundUploader
from ..store import ArtifactInfo, Store, Version
from ._common import Chain, check_stored, finite_metrics, open_store

log = logging.getLogger("cas.integrations.transformers")

__all__ = ["CasCallback", "restore_checkpoint"]

# The suffixes of the Trainer's speed metrics (transformers' speed_metrics()).
_SPEED_METRICS = ("_runtime", "_samples_per_second", "_steps_per_second", "_compilation_time")

#: Where background saves keep their hard-linked copy of a checkpoint folder,
#: inside the output folder (one file system, so links work) but outside the
#: ``checkpoint-*`` pattern the trainer rotates and resumes from.
PENDING_FOLDER = ".cas-pending"


@dataclass(frozen=True)
class _Save:
    """One checkpoint the trainer saved, as it was described at that moment."""

    folder: Path
    step: int
    info: ArtifactInfo
    metrics: Mapping[str, float]
    best: int | None  # the step of the best checkpoint so far
    needed: bool  # it is the best, and the trainer will load the best at the end


class CasCallback(TrainerCallback):
    """Puts every checkpoint a ``Trainer`` saves into ``store`` as the next version of ``key``.

    ``info`` sets typed fields (job, algorithm, base model, fine-tuning,
    labels) instead of the ones found from the trainer. With
    ``background=True``, each checkpoint folder is hard-linked aside (no
    copy) and stored by a worker while training goes on; at most
    ``max_pending`` checkpoints wait at once (a save beyond waits), and a
    failed upload raises :class:`~cas.errors.BackgroundSaveError` at the
    next save, at the end of training, at :meth:`wait` or at exit. With
    ``keep_local=False``, a ``checkpoint-N`` folder is deleted once stored
    and checked against the store (the best one stays until training ends
    when ``load_best_model_at_end`` needs it). ``save_final=False`` skips
    the final ``model`` version. The tensors of each checkpoint are stored
    as deltas of the one before where that saves space; ``delta=False``
    stores every checkpoint whole.
    """

    def __init__(
        self,
        store: Store | str | os.PathLike[str],
        key: str,
        *,
        background: bool = False,
        max_pending: int = 2,
        keep_local: bool = True,
        save_final: bool = True,
        info: ArtifactInfo | None = None,
        delta: bool | None = None,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.store = open_store(store)
        self.key = key
        self.background = background
        self.max_pending = max_pending
        self.keep_local = keep_local
        self.save_final = save_final
        self.info = info or ArtifactInfo()
        #: Versions stored by this callback, by training step.
        self.versions: dict[int, Version] = {}
        self._chain = Chain(self.store, key, delta=delta)
        # Folders stored and checked, to delete on the training thread (keep_local=False),
        # and the one kept for load_best_model_at_end.
        self._stored: deque[_Save] = deque()
        self._kept: Path | None = None
        #: The worker that runs the background saves (None when saving in the foreground).
        self.uploader = BackgroundUploader() if background else None

    # -- trainer events ---------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero and state.global_step > 0:
            # Resumed: the next checkpoint derives from the one training resumed from.
            self._chain.latest = self._stored_step(state.global_step) or self._chain.latest

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero:
            return
        folder = _output_dir(args) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            raise SourceError(f"the trainer saved no checkpoint folder at {folder}")
        self._drop_stored()
        save = _Save(
            folder,
            state.global_step,
            self._info(args, model, "checkpoint"),
            _metrics(state),
            state.best_global_step,
            needed=bool(args.load_best_model_at_end)
            and state.best_global_step == state.global_step,
        )
        if self.uploader is None:
            self._store_checkpoint(save, folder)
            self._drop_stored()
            return
        self.uploader.check()
        self.uploader.wait_below(self.key, self.max_pending)
        copy = _link_copy(folder, _output_dir(args) / PENDING_FOLDER / folder.name)
        self.uploader.submit(
            self.key,
            f"{folder.name} to {self.key} (its files wait in {copy})",
            lambda: self._store_checkpoint(save, copy),
        )

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero:
            return
        self.wait()
        self._drop_stored()
        if self.save_final and model is not None:
            self._store_final(args, state, model, processing_class)
        if self._kept is not None:  # the trainer has loaded the best model by now
            shutil.rmtree(self._kept, ignore_errors=True)
            self._kept = None

    def wait(self) -> None:
        """Wait for the background uploads; raise the first that failed."""
        if self.uploader is not None:
            self.uploader.wait(self.key)

    # -- storing ----------------------------------------------------------------------

    def _stored_step(self, step: int) -> str | None:
        """The newest stored checkpoint of ``step``, if any."""
        try:
            versions = self.store.log(self.key)
        except RefNotFoundError:
            return None
        for version in versions:
            if version.info.type == "checkpoint" and version.metrics.get("step") == step:
                return version.ref
        return None

    def _store_checkpoint(self, save: _Save, source: Path) -> Version:
        """Put ``source`` (the folder or its linked copy); runs on the worker when in background."""
        version = self._chain.put(source, metrics=save.metrics, info=save.info, tags=["latest"])
        self.versions[save.step] = version
        if save.best is not None and save.best in self.versions:
            self.store.tag(self.versions[save.best].ref, "best")
        if not self.keep_local:
            check_stored(self.store, version.ref, source)
            self._stored.append(save)
        if source != save.folder:
            shutil.rmtree(source, ignore_errors=True)
        return version

    def _drop_stored(self) -> None:
        """Delete the folders stored and checked so far (on the training thread, between the
        trainer's own rotations), but the best one while the trainer may still load it."""
        while self._stored:
            save = self._stored.popleft()
            if not save.needed:
                shutil.rmtree(save.folder, ignore_errors=True)
                continue
            if self._kept is not None:  # a former best, no longer needed
                shutil.rmtree(self._kept, ignore_errors=True)
            self._kept = save.folder

    def _store_final(
        self, args: TrainingArguments, state: TrainerState, model: Any, processing_class: Any
    ) -> None:
        best = state.best_global_step
        source = self.versions.get(best) if args.load_best_model_at_end and best else None
        if source is None and self.versions:
            source = self.versions[max(self.versions)]
        metrics = dict(source.metrics) if source else _metrics(state)
        losses = [entry["train_loss"] for entry in state.log_history if "train_loss" in entry]
        metrics.update(finite_metrics([("train_loss", losses[-1])] if losses else []))
        with tempfile.TemporaryDirectory(prefix="cas-final-") as scratch:
            model.save_pretrained(scratch)
            if processing_class is not None and hasattr(processing_class, "save_pretrained"):
                processing_class.save_pretrained(scratch)
            parents = [source.ref] if source else self._chain.parents()
            version = self.store.put(
                scratch,
                self.key,
                parents=parents,
                metrics=metrics,
                info=self._info(args, model, "model"),
                tags=["final"],
                delta=self._chain.delta,
            )
        log.info("stored the final model as %s", version.ref)

    def _info(self, args: TrainingArguments, model: Any, kind: str) -> ArtifactInfo:
        given = self.info
        return ArtifactInfo(
            type=kind,
            job=given.job or args.run_name or _output_dir(args).name or None,
            algorithm=given.algorithm or _algorithm(args),
            base_model=given.base_model or _base_model(model),
            fine_tuning=given.fine_tuning or _fine_tuning(model),
            labels=given.labels,
        )


def restore_checkpoint(
    store: Store | str | os.PathLike[str], ref: str, output_dir: str | os.PathLike[str]
) -> str:
    """Restore ``ref`` as ``output_dir/checkpoint-STEP`` and return that path.

    Pass it to ``trainer.train(resume_from_checkpoint=...)``. A folder of that
    name is replaced (the restore is verified, then swapped in whole).
    """
    opened = open_store(store)
    version = opened.show(ref).version
    step = version.metrics.get("step")
    name = f"{PREFIX_CHECKPOINT_DIR}-{int(step) if step is not None else version.number}"
    dest = Path(output_dir) / name
    opened.get(version.ref, dest, force=True)
    return os.fspath(dest)


# -- what the trainer state tells -----------------------------------------------------


def _metrics(state: TrainerState) -> dict[str, float]:
    """The latest training loss and eval metrics of the log (not eval speed), step and epoch."""
    out: dict[str, float] = {}
    for entry in state.log_history:
        out.update(finite_metrics((k, v) for k, v in entry.items() if _is_kept(k)))
    out["step"] = state.global_step
    if state.epoch is not None:
        out["epoch"] = float(state.epoch)
    return out


def _is_kept(name: str) -> bool:
    # Model metrics, not how fast the evaluation ran (eval_runtime, eval_samples_per_second...).
    if name.startswith("eval_"):
        return not name.endswith(_SPEED_METRICS)
    return name in ("loss", "train_loss")


def _output_dir(args: TrainingArguments) -> Path:
    return Path(args.output_dir or ".")  # TrainingArguments fills it in; "." only if unset


def _algorithm(args: TrainingArguments) -> str | None:
    # TRL gives every trainer a config class of its name: DPOTrainer takes DPOConfig.
    name = type(args).__name__
    if name.endswith("Config") and len(name) > len("Config"):
        return name.removesuffix("Config").lower()
    return None


def _peft_config(model: Any) -> Any:
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, Mapping) and configs:
        return next(iter(configs.values()))
    return None


def _base_model(model: Any) -> str | None:
    peft = _peft_config(model)
    name = getattr(peft, "base_model_name_or_path", None) if peft is not None else None
    if not name:
        name = getattr(getattr(model, "config", None), "name_or_path", None)
    return str(name) if name else None


def _fine_tuning(model: Any) -> str | None:
    peft = _peft_config(model)
    kind = getattr(peft, "peft_type", None)
    if kind is None:
        return None
    return str(getattr(kind, "value", kind)).lower()


def _link_copy(folder: Path, dest: Path) -> Path:
    """``folder`` mirrored at ``dest`` by hard links (copies where links fail): a snapshot.

    The trainer writes each checkpoint into a new folder and deletes whole
    folders when it rotates them, so linked files keep their bytes for the
    upload even after the trainer removed its own folder.
    """
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(folder, dest, copy_function=link, symlinks=True)
    return dest
