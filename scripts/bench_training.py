"""Benchmark of saves inside the training loop: time blocked per save, and stored bytes.

Trains a GPT-2 built from a config (nothing is downloaded) on CPU and measures,
in one run:

* **time blocked per save with background=True** against the plain save to
  local disk, for the three integrations:

  - ``CheckpointManager.save(state_dict, background=True)`` against
    ``torch.save(state_dict)`` to a local file;
  - Hugging Face ``Trainer`` with ``CasCallback(background=True)``: the
    trainer's own ``_save_checkpoint`` plus every ``on_save`` callback,
    against the same trainer without the callback;
  - Lightning with ``CasCheckpointIO(background=True)`` against its
    ``TorchCheckpointIO``: the time inside ``save_checkpoint``.

  Plain and cas runs take turns, round after round; the figures are medians
  over every save of every round, and the ratio is cas over plain.
  Target (issue 15): at most 1.5x.

* **stored bytes of a 10-checkpoint Trainer run** against the run's
  ``checkpoint-*`` folders on disk, and what each kind of file costs across
  versions with today's chunking: ``model.safetensors`` (tensor codecs,
  deltas against the parent) and ``optimizer.pt`` (a ``torch.save`` file:
  plain chunks).

* **Lightning ``.ckpt`` files** (``torch.save``) across versions: what each
  new version adds, when every weight trains and when only the head does.

    python scripts/bench_training.py [--rounds 3] [--layers 6] [--width 384] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import lightning as L
import torch
import transformers
from datasets import Dataset
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cas.integrations.lightning import CasCheckpointIO  # noqa: E402
from cas.integrations.transformers import CasCallback  # noqa: E402
from cas.ml.checkpoint import CheckpointManager  # noqa: E402
from cas.store import Store  # noqa: E402
from cas.units import format_size  # noqa: E402

TARGET = 1.5
SEQUENCE = 64
PARTS = ("manager", "trainer", "lightning")


@dataclass(frozen=True)
class Plan:
    """What to train and how often to save, and where the stores go."""

    layers: int
    width: int
    vocab: int
    saves: int  # checkpoints per run
    #: Training steps between two saves. Real runs save every few hundred steps;
    #: here the uploads must keep up with the saves, or what is measured is the
    #: backlog bound (a store slower than training makes saves wait, by design).
    steps_per_save: int
    rounds: int
    work: Path
    #: Where the cas stores are: "local" (a folder on the same disk as the
    #: checkpoints) or "memory" (no disk: as a remote store, the local disk
    #: carries only the trainer's own writes).
    store: str

    def model(self) -> GPT2LMHeadModel:
        return gpt(self.layers, self.width, self.vocab)

    def open_store(self, folder: Path) -> Store:
        if self.store == "memory":
            return Store.init(f"memory://{folder.name}")
        return Store.init(folder / "store")


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextmanager
def scratch(root: Path, name: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=root) as directory:
        yield Path(directory)


def gpt(layers: int, width: int, vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=width,
        n_layer=layers,
        n_head=max(1, width // 64),
        n_positions=SEQUENCE,
        bos_token_id=0,
        eos_token_id=0,
    )
    config.name_or_path = f"gpt2-{layers}x{width}"
    return GPT2LMHeadModel(config)


def token_data(vocab: int, rows: int) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, SEQUENCE), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


# -- CheckpointManager --------------------------------------------------------------------


def bench_manager(plan: Plan) -> dict[str, list[float]]:
    """Blocked seconds per save: torch.save to a local file, and a background save."""
    model = plan.model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    batch = torch.randint(0, model.config.vocab_size, (2, SEQUENCE))
    times: dict[str, list[float]] = {"plain": [], "cas": []}
    with scratch(plan.work, "manager") as folder:
        manager = CheckpointManager(plan.open_store(folder), "bench")
        for step in range(plan.saves * plan.rounds):
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()  # every weight changes, as in training
            for kind in ("plain", "cas") if step % 2 else ("cas", "plain"):
                state = model.state_dict()
                started = time.perf_counter()
                if kind == "plain":
                    torch.save(state, folder / f"step-{step}.pt")
                else:
                    manager.save(state, step, background=True)
                times[kind].append(time.perf_counter() - started)
        manager.wait()
    return times


# -- Hugging Face Trainer -----------------------------------------------------------------


class TimedTrainer(Trainer):
    """A Trainer that notes how long each save held the training loop."""

    blocked: list[float]
    in_callbacks: list[float]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        started = time.perf_counter()
        super()._save_checkpoint(model, trial)
        self.blocked.append(time.perf_counter() - started)


def run_trainer(
    plan: Plan, data: Dataset, output: Path, callback: CasCallback | None
) -> TimedTrainer:
    args = TrainingArguments(
        output_dir=str(output),
        run_name="bench",
        max_steps=plan.steps_per_save * plan.saves,
        save_steps=plan.steps_per_save,
        logging_steps=plan.steps_per_save,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = TimedTrainer(
        model=plan.model(),
        args=args,
        train_dataset=data,
        callbacks=[callback] if callback else [],
    )
    trainer.blocked, trainer.in_callbacks = [], []
    trainer.remove_callback(PrinterCallback)  # the report goes to stdout, not the trainer's logs
    on_save = trainer.callback_handler.on_save

    def timed_on_save(*args: Any, **kwargs: Any) -> Any:
        # Callbacks run right after _save_checkpoint: their time adds to that save's.
        started = time.perf_counter()
        result = on_save(*args, **kwargs)
        trainer.in_callbacks.append(time.perf_counter() - started)
        trainer.blocked[-1] += trainer.in_callbacks[-1]
        return result

    trainer.callback_handler.on_save = timed_on_save  # type: ignore[method-assign]
    trainer.train()
    return trainer


def later_ratio(added: list[int], sizes: list[int]) -> float:
    """Median of what each version after the first added, as a share of its size."""
    return statistics.median(a / s for a, s in zip(added[1:], sizes[1:], strict=True))


def file_costs(folders: list[Path], name: str, work: Path) -> dict[str, Any]:
    """Stored bytes each version of one file adds, put as a chain of versions."""
    with scratch(work, "costs") as folder:
        store = Store.init(folder / "store")
        added = []
        parent: list[str] = []
        before = store.stats().stored_bytes
        sizes = []
        for checkpoint in folders:
            path = checkpoint / name
            version = store.put(path, "costs", parents=parent)
            parent = [version.ref]
            after = store.stats().stored_bytes
            added.append(after - before)
            sizes.append(path.stat().st_size)
            before = after
    return {
        "file": name,
        "size": sizes[0],
        "first_ratio": added[0] / sizes[0],
        "later_ratio_median": later_ratio(added, sizes),
    }


def bench_trainer(plan: Plan) -> dict[str, Any]:
    data = token_data(plan.vocab, rows=4 * plan.steps_per_save * plan.saves)
    times: dict[str, list[float]] = {"plain": [], "cas": []}
    callbacks: list[float] = []
    storage: dict[str, Any] = {}
    for round_number in range(plan.rounds):
        order = ("plain", "cas") if round_number % 2 == 0 else ("cas", "plain")
        for kind in order:
            with scratch(plan.work, f"trainer-{kind}") as folder:
                callback = None
                if kind == "cas":
                    store = plan.open_store(folder)
                    callback = CasCallback(store, "runs/bench", background=True, save_final=False)
                log(f"trainer round {round_number + 1}: {kind}")
                trainer = run_trainer(plan, data, folder / "out", callback)
                times[kind] += trainer.blocked
                if callback is not None:
                    callbacks += trainer.in_callbacks
                    storage = storage or trainer_storage(store, folder / "out", plan.work)
    return {"times": times, "callback": callbacks, "storage": storage}


def trainer_storage(store: Store, output: Path, work: Path) -> dict[str, Any]:
    folders = sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    on_disk = sum(folder_bytes(f) for f in folders)
    stored = store.stats().stored_bytes
    return {
        "checkpoints": len(folders),
        "checkpoint_bytes": folder_bytes(folders[0]),
        "on_disk": on_disk,
        "stored": stored,
        "files": [file_costs(folders, n, work) for n in ("model.safetensors", "optimizer.pt")],
    }


# -- Lightning -------------------------------------------------------------------------------


class TimedIO(CheckpointIO):
    """Delegates to ``inner``; notes the seconds each save held the training loop."""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner
        self.blocked: list[float] = []

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        started = time.perf_counter()
        self.inner.save_checkpoint(checkpoint, path, storage_options)
        self.blocked.append(time.perf_counter() - started)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> Any:
        return self.inner.load_checkpoint(path, map_location, weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


class LitGPT(L.LightningModule):
    def __init__(self, model: GPT2LMHeadModel, head_only: bool = False) -> None:
        super().__init__()
        self.model = model
        if head_only:  # a frozen body: only the last block and the final norm train
            for name, parameter in model.named_parameters():
                parameter.requires_grad = name.startswith(("transformer.ln_f", "transformer.h.0."))

    def training_step(self, batch: list[torch.Tensor], index: int) -> torch.Tensor:
        loss: torch.Tensor = self.model(input_ids=batch[0], labels=batch[0]).loss
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=1e-4)


def run_lightning(plan: Plan, module: LitGPT, io: CheckpointIO, folder: Path) -> TimedIO:
    timed = TimedIO(io)
    every = ModelCheckpoint(
        dirpath=folder / "ckpts", every_n_train_steps=plan.steps_per_save, save_top_k=-1
    )
    trainer = L.Trainer(
        max_steps=plan.steps_per_save * plan.saves,
        plugins=[timed],
        callbacks=[every],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    generator = torch.Generator().manual_seed(0)
    rows = 4 * plan.steps_per_save * plan.saves
    ids = torch.randint(0, plan.vocab, (rows, SEQUENCE), generator=generator)
    trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=4))
    return timed


def bench_lightning(plan: Plan) -> dict[str, Any]:
    times: dict[str, list[float]] = {"plain": [], "cas": []}
    for round_number in range(plan.rounds):
        order = ("plain", "cas") if round_number % 2 == 0 else ("cas", "plain")
        for kind in order:
            with scratch(plan.work, f"lightning-{kind}") as folder:
                io: CheckpointIO = TorchCheckpointIO()
                if kind == "cas":
                    io = CasCheckpointIO(plan.open_store(folder), "runs/lit", background=True)
                log(f"lightning round {round_number + 1}: {kind}")
                times[kind] += run_lightning(plan, LitGPT(plan.model()), io, folder).blocked
    return {"times": times, "dedup": [lightning_dedup(plan, h) for h in (False, True)]}


def lightning_dedup(plan: Plan, head_only: bool) -> dict[str, Any]:
    """What each new .ckpt version adds to a (local) store, as a share of its size."""
    with scratch(plan.work, "lightning-dedup") as folder:
        store = Store.init(folder / "store")
        added: list[int] = []
        sizes: list[int] = []

        class Measured(CasCheckpointIO):
            def _put(self, *args: Any, **kwargs: Any) -> Any:
                before = store.stats().stored_bytes
                version = super()._put(*args, **kwargs)
                added.append(store.stats().stored_bytes - before)
                sizes.append(version.size)
                return version

        module = LitGPT(plan.model(), head_only)
        run_lightning(plan, module, Measured(store, "runs/lit"), folder)
    return {
        "trains": "head and last block" if head_only else "every weight",
        "size": sizes[0],
        "first_ratio": added[0] / sizes[0],
        "later_ratio_median": later_ratio(added, sizes),
    }


# -- report ------------------------------------------------------------------------------------


def blocked_row(name: str, times: dict[str, list[float]]) -> str:
    plain, cas = statistics.median(times["plain"]), statistics.median(times["cas"])
    ratio = cas / plain
    verdict = "ok" if ratio <= TARGET else "over"
    return (
        f"| {name} | {1000 * plain:.0f} | {1000 * cas:.0f} | {ratio:.2f}x | <= {TARGET}x {verdict} "
        f"| {len(times['cas'])} |"
    )


ROW_NAMES = {
    "manager": "CheckpointManager (vs torch.save)",
    "trainer": "Trainer + CasCallback (vs Trainer alone)",
    "lightning": "Lightning CasCheckpointIO (vs TorchCheckpointIO)",
}


def markdown(results: dict[str, Any]) -> str:
    plan = results["plan"]
    lines = [
        f"Model: {results['model']['description']}, {format_size(results['model']['weights'])} "
        f"of fp32 weights; a save every {plan['steps_per_save']} steps, stores in {plan['store']}.",
        "",
    ]
    measured = [part for part in PARTS if part in results]
    if measured:
        lines += [
            "| saves through | plain save, ms (median) | cas background, ms (median) "
            "| cas / plain | target | saves |",
            "|---|---|---|---|---|---|",
        ]
        for part in measured:
            times = results[part] if part == "manager" else results[part]["times"]
            lines.append(blocked_row(ROW_NAMES[part], times))
        lines.append("")
    files: list[tuple[str, dict[str, Any]]] = []
    if "trainer" in results:
        lines += trainer_report(results["trainer"])
        files += [(row["file"], row) for row in results["trainer"]["storage"]["files"]]
    for row in results.get("lightning", {}).get("dedup", []):
        files.append((f"Lightning .ckpt, {row['trains']} trains", row))
    if files:
        lines += [
            "| file | size | first version, stored/size "
            "| each later version, stored/size (median) |",
            "|---|---|---|---|",
        ]
        for name, row in files:
            lines.append(
                f"| {name} | {format_size(row['size'])} | {row['first_ratio']:.3f} "
                f"| {row['later_ratio_median']:.3f} |"
            )
    return "\n".join(lines)


def trainer_report(trainer: dict[str, Any]) -> list[str]:
    storage = trainer["storage"]
    return [
        "Of the Trainer's cas saves, CasCallback.on_save itself (linking the folder aside) "
        f"took {1000 * statistics.median(trainer['callback']):.1f} ms (median); "
        "the rest is the trainer's own save to local disk.",
        "",
        f"A {storage['checkpoints']}-checkpoint Trainer run: checkpoint-* folders "
        f"{format_size(storage['on_disk'])} on disk, {format_size(storage['stored'])} stored "
        f"({storage['stored'] / storage['on_disk']:.3f} of it; one checkpoint is "
        f"{format_size(storage['checkpoint_bytes'])}).",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="runs of each kind, taking turns")
    parser.add_argument("--saves", type=int, default=10, help="checkpoints per run")
    parser.add_argument("--steps-per-save", type=int, default=6, help="training steps per save")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--store", choices=("local", "memory"), default="local")
    parser.add_argument("--only", choices=PARTS, action="append", help="run only these parts")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    # One core trains; the other is left to the uploads (and to the rest of the machine).
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    with tempfile.TemporaryDirectory(dir=args.work) as directory:
        plan = Plan(
            args.layers,
            args.width,
            args.vocab,
            args.saves,
            args.steps_per_save,
            args.rounds,
            Path(directory),
            args.store,
        )
        results: dict[str, Any] = {
            "machine": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "lightning": L.__version__,
            },
            "plan": {**vars(plan), "work": str(plan.work)},
            "model": {
                "description": f"GPT-2, {args.layers} layers of width {args.width}, "
                f"vocabulary {args.vocab}",
                "weights": sum(p.numel() * 4 for p in plan.model().parameters()),
            },
        }
        benches = {"manager": bench_manager, "trainer": bench_trainer, "lightning": bench_lightning}
        for part in args.only or PARTS:
            results[part] = benches[part](plan)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()
