"""CasCheckpointIO in real PyTorch Lightning runs on CPU: ModelCheckpoint, resume, background."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_background_saves import SlowBackend, failing_store
from torch.utils.data import DataLoader, TensorDataset

from cas.errors import BackgroundSaveError, RefNotFoundError
from cas.integrations.lightning import CasCheckpointIO
from cas.store import Store

KEY = "runs/lit"


class Regression(L.LightningModule):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.saved: list[dict[str, torch.Tensor]] = []
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Linear(width, 1)
        )

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> None:
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What each checkpoint held when Lightning handed it over.
        self.saved.append({k: v.clone() for k, v in checkpoint["state_dict"].items()})


def data() -> DataLoader[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)


def trainer(io: CasCheckpointIO, *callbacks: Any, epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        plugins=[io],
        callbacks=list(callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


def fit(io: CasCheckpointIO, checkpoint: ModelCheckpoint, epochs: int, **kw: Any) -> L.Trainer:
    torch.manual_seed(0)
    run = trainer(io, checkpoint, epochs=epochs)
    run.fit(Regression(), data(), data(), **kw)
    return run


def saved_states(run: L.Trainer) -> list[dict[str, torch.Tensor]]:
    module = run.lightning_module
    assert isinstance(module, Regression)
    return module.saved


def top2(dirpath: Path, *, save_last: bool = False) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=dirpath, monitor="val_loss", save_top_k=2, save_last=save_last)


def test_model_checkpoint_top_k_writes_versions_and_tags(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store")
    checkpoint = top2(tmp_path / "ckpts", save_last=True)
    fit(CasCheckpointIO(store, KEY), checkpoint, epochs=4)

    live = store.log(KEY)
    paths = {v.metadata["path"]: v for v in live}
    # Two top-k checkpoints and last.ckpt are left; the rest were removed as Lightning asked.
    assert set(paths) == {*checkpoint.best_k_models, checkpoint.last_model_path}
    assert not (tmp_path / "ckpts").exists()  # nothing written beside the store
    best = store.show(f"{KEY}:best").version
    assert best.metadata["path"] == checkpoint.best_model_path
    assert checkpoint.best_model_score is not None
    assert best.metrics["val_loss"] == pytest.approx(checkpoint.best_model_score.item())
    last = store.show(f"{KEY}:last").version
    assert last.metadata["path"] == checkpoint.last_model_path
    assert store.show(f"{KEY}:latest").version == last
    assert (last.metrics["step"], last.metrics["epoch"]) == (16, 3)
    for version in live:
        assert version.info.type == "checkpoint"
        assert len(version.parents) == 1  # each derives from the one saved before it
    # Every version Lightning saved got a number; the ones removed are tombstones now.
    assert max(v.number for v in live) == 8
    # The records inside are named as Lightning names them, the same in every
    # version whatever the file is called, so unchanged tensors keep their bytes.
    store.get(best.ref, tmp_path / "best.ckpt")
    with zipfile.ZipFile(tmp_path / "best.ckpt") as archive:
        assert {name.split("/")[0] for name in archive.namelist()} == {"archive"}


def test_resume_from_a_reference_and_load_by_path(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store")
    checkpoint = top2(tmp_path / "ckpts")
    fit(CasCheckpointIO(store, KEY), checkpoint, epochs=3)
    best = store.show(f"{KEY}:best").version

    # Another process: a new plugin finds a checkpoint by the path Lightning gave it...
    io = CasCheckpointIO(store, KEY)
    by_path = io.load_checkpoint(checkpoint.best_model_path)
    by_ref = io.load_checkpoint(f"{KEY}:best")
    assert by_path["global_step"] == by_ref["global_step"] == best.metrics["step"]
    for name, tensor in by_ref["state_dict"].items():
        assert torch.equal(tensor, by_path["state_dict"][name])
    with pytest.raises(RefNotFoundError, match="no checkpoint"):
        io.load_checkpoint(tmp_path / "ckpts" / "never.ckpt")

    # ...and Trainer.fit resumes from a reference.
    resumed = fit(io, top2(tmp_path / "ckpts"), epochs=5, ckpt_path=f"{KEY}:best")
    assert resumed.global_step == 5 * 4
    first_new = min(io.versions.values(), key=lambda v: v.number)
    assert first_new.metrics["step"] == best.metrics["step"] + 4


def test_background_saves_wait_within_the_budget_and_finish_at_teardown(tmp_path: Path) -> None:
    base = Store.init(tmp_path / "store")
    # Slow enough that training runs on while a checkpoint waits for the one before.
    store = Store(SlowBackend(base.backend, delay=0.5), base.config)
    model_bytes = sum(p.numel() * 4 for p in Regression().parameters())
    # Each checkpoint holds the weights and two Adam moments: room for two of them.
    budget = 8 * model_bytes
    io = CasCheckpointIO(store, KEY, background=True, memory_budget=budget)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, every_n_epochs=1)
    run = fit(io, checkpoint, epochs=4)
    # fit returned after teardown waited: every checkpoint is stored, each as it was
    # when saved although training went on changing the weights during its upload.
    assert [v.metrics["epoch"] for v in store.log(KEY)] == [3, 2, 1, 0]
    for number, expected in enumerate(saved_states(run), start=1):
        stored = io.load_checkpoint(f"{KEY}@{number}")
        assert stored["global_step"] == 4 * number
        for name, tensor in expected.items():
            assert torch.equal(stored["state_dict"][name], tensor)
    assert io.uploader is not None
    assert 3 * model_bytes <= io.uploader.peak_held_bytes <= budget


def test_a_failed_background_save_stops_fit(tmp_path: Path) -> None:
    io = CasCheckpointIO(failing_store(tmp_path / "store"), KEY, background=True)
    with pytest.raises(BackgroundSaveError, match=r"epoch=0-step=4\.ckpt to runs/lit"):
        fit(io, top2(tmp_path / "ckpts"), epochs=3)
