"""CasCallback in real Hugging Face Trainer and TRL runs on CPU, tiny models built from a config."""

from __future__ import annotations

import os

# Nothing here is downloaded; keep the libraries from trying (or from reporting usage).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from helpers import snapshot
from peft import LoraConfig
from test_background_saves import SlowBackend, failing_store
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from trl.trainer.sft_config import SFTConfig
from trl.trainer.sft_trainer import SFTTrainer

from cas.digest import StreamingHasher
from cas.errors import BackgroundSaveError
from cas.integrations.transformers import (
    PENDING_FOLDER,
    CasCallback,
    restore_checkpoint,
)
from cas.store import Store

KEY = "runs/bert"


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    config.num_labels = 2
    config.name_or_path = "tiny/bert"
    return BertForSequenceClassification(config)


def classification_data() -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (48, 16), generator=generator)
    labels = (ids[:, 0] > 32).long()
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def bert_args(output: Path, max_steps: int = 6, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "output_dir": str(output),
        "run_name": "bert-test",
        "max_steps": max_steps,
        "per_device_train_batch_size": 8,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "save_steps": 2,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
    return TrainingArguments(**settings)


def train_bert(args: TrainingArguments, *callbacks: TrainerCallback, **train: Any) -> Trainer:
    data = classification_data()
    trainer = Trainer(
        model=bert(),
        args=args,
        train_dataset=data,
        eval_dataset=data.select(range(16)),
        callbacks=list(callbacks),
    )
    trainer.train(**train)
    return trainer


def file_digests(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            hasher = StreamingHasher()
            hasher.update(path.read_bytes())
            out[path.relative_to(folder).as_posix()] = hasher.digest().hex
    return out


def stored_digests(store: Store, ref: str) -> dict[str, str]:
    return {e.path: e.digest.hex for e in store.show(ref).entries if e.type == "file" and e.digest}


class RecordSaves(TrainerCallback):
    """The files of each checkpoint folder as the trainer wrote them, before anyone removes them."""

    def __init__(self) -> None:
        self.saved: dict[int, dict[str, str]] = {}

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir or ".") / f"checkpoint-{state.global_step}"
        self.saved[state.global_step] = file_digests(folder)


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, Trainer, Path]:
    """One Trainer run: eval every 2 steps, the best model (highest eval loss) loaded at the end."""
    root = tmp_path_factory.mktemp("bert")
    store = Store.init(root / "store")
    args = bert_args(
        root / "out",
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # any rule will do: it only has to pick one
    )
    trainer = train_bert(args, CasCallback(store, KEY))
    return store, trainer, root / "out"


def test_every_checkpoint_is_a_version_with_metrics_tags_and_typed_fields(
    bert_run: tuple[Store, Trainer, Path],
) -> None:
    store, trainer, out = bert_run
    versions = {v.number: v for v in store.log(KEY)}
    assert sorted(versions) == [1, 2, 3, 4]
    for number, step in ((1, 2), (2, 4), (3, 6)):
        version = versions[number]
        assert version.parents == ((f"{KEY}@{number - 1}",) if number > 1 else ())
        assert version.metrics["step"] == step
        assert set(version.metrics) == {"loss", "eval_loss", "epoch", "step"}
        evals = [e for e in trainer.state.log_history if "eval_loss" in e and e["step"] == step]
        assert version.metrics["eval_loss"] == evals[-1]["eval_loss"]
        assert version.info.to_dict() | {"metrics": {}, "created": None} == {
            "type": "checkpoint",
            "job": "bert-test",
            "algorithm": None,
            "base_model": "tiny/bert",
            "fine_tuning": None,
            "metrics": {},
            "created": None,
            "version": number,
            "parents": list(version.parents),
            "tags": list(version.tags),
            "labels": {},
        }
    # The folders as the trainer left them (save_total_limit is unset, all are kept).
    assert stored_digests(store, f"{KEY}@3") == file_digests(out / "checkpoint-6")
    assert snapshot(Path(restore_checkpoint(store, f"{KEY}@2", out.parent / "r"))) == snapshot(
        out / "checkpoint-4"
    )

    best_step = trainer.state.best_global_step
    assert best_step is not None
    best = store.show(f"{KEY}:best").version
    assert best.metrics["step"] == best_step
    assert best.metrics["eval_loss"] == max(versions[n].metrics["eval_loss"] for n in (1, 2, 3))
    assert store.show(f"{KEY}:latest").version.number == 3

    final = store.show(f"{KEY}:final").version
    assert final.number == 4
    assert final.info.type == "model"
    assert final.parents == (best.ref,)
    assert final.metrics["train_loss"] == trainer.state.log_history[-1]["train_loss"]
    # load_best_model_at_end: the final weights are the best checkpoint's, byte for byte.
    weights = stored_digests(store, final.ref)["model.safetensors"]
    assert weights == stored_digests(store, best.ref)["model.safetensors"]


def test_resume_from_a_stored_checkpoint_goes_on_along_its_chain(
    bert_run: tuple[Store, Trainer, Path], tmp_path: Path
) -> None:
    store, _, _ = bert_run
    path = restore_checkpoint(store, f"{KEY}@1", tmp_path / "out")
    assert path == str(tmp_path / "out" / "checkpoint-2")
    callback = CasCallback(store, KEY, save_final=False)
    trainer = train_bert(
        bert_args(tmp_path / "out", max_steps=4), callback, resume_from_checkpoint=path
    )
    assert trainer.state.global_step == 4
    resumed = callback.versions[4]
    assert resumed.parents == (f"{KEY}@1",)  # from the checkpoint it resumed from
    assert resumed.metrics["step"] == 4


def test_a_failed_background_upload_stops_training_and_keeps_the_files(tmp_path: Path) -> None:
    store = failing_store(tmp_path / "store")
    callback = CasCallback(store, KEY, background=True)
    with pytest.raises(BackgroundSaveError, match="checkpoint-2 to runs/bert") as raised:
        train_bert(bert_args(tmp_path / "out", max_steps=4, eval_strategy="no"), callback)
    assert "injected fault" in str(raised.value.__cause__)
    pending = tmp_path / "out" / PENDING_FOLDER / "checkpoint-2"
    assert str(pending) in str(raised.value)
    assert file_digests(pending) == file_digests(tmp_path / "out" / "checkpoint-2")


def test_background_uploads_outlive_the_trainers_rotation(tmp_path: Path) -> None:
    """A slow store: the trainer deletes each folder (save_total_limit=1) before it is stored."""
    base = Store.init(tmp_path / "store")
    store = Store(SlowBackend(base.backend, delay=0.3), base.config)
    recorder = RecordSaves()
    callback = CasCallback(store, KEY, background=True, keep_local=False, max_pending=3)
    args = bert_args(tmp_path / "out", max_steps=6, eval_strategy="no", save_total_limit=1)
    train_bert(args, recorder, callback)
    assert sorted(callback.versions) == [2, 4, 6]
    for step, version in callback.versions.items():
        assert stored_digests(store, version.ref) == recorder.saved[step]
    # Stored and checked, so nothing stays on disk: no checkpoint folder, no linked copy.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [PENDING_FOLDER]
    assert list((tmp_path / "out" / PENDING_FOLDER).iterdir()) == []


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def test_trl_sft_with_a_lora_adapter(tmp_path: Path) -> None:
    words = ["the", "cat", "dog", "sat", "on", "mat", "ran", "far", "and", "a", "big", "red"]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(32)]
    tokenizer = word_tokenizer(words)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=4096,  # a base model much larger than its adapter
        n_embd=64,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    config.name_or_path = "tiny/gpt2"
    model = GPT2LMHeadModel(config)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    store = Store.init(tmp_path / "store")
    growth: list[int] = []

    class Measure(TrainerCallback):
        def on_save(self, *args: Any, **kwargs: Any) -> None:
            callback.wait()
            growth.append(store.stats().stored_bytes)

    callback = CasCallback(store, "runs/sft")
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        save_steps=2,
        logging_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=32,
        disable_tqdm=True,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=8, lora_alpha=16, target_modules=["c_attn"], task_type="CAUSAL_LM"
        ),
        callbacks=[callback, Measure()],
    )
    trainer.train()

    versions = store.log("runs/sft")
    assert [v.info.type for v in versions] == ["model", "checkpoint", "checkpoint", "checkpoint"]
    for version in versions:
        assert version.artifact["algorithm"] == "sft"
        assert version.artifact["fine_tuning"] == "lora"
        assert version.artifact["base_model"] == "tiny/gpt2"
    # Only the adapter (and its optimizer state) changes between versions: each one
    # adds about what those files hold, a small fraction of the base model.
    checkpoint = tmp_path / "out" / "checkpoint-6"
    adapter = (checkpoint / "adapter_model.safetensors").stat().st_size
    changing = adapter + (checkpoint / "optimizer.pt").stat().st_size
    small_files = 64 * 1024  # rng state, scheduler, trainer state: whole small chunks
    steps = [later - earlier for earlier, later in itertools.pairwise(growth)]
    assert len(steps) == 2
    for added in steps:
        assert adapter / 2 < added < changing + small_files
        assert added < base_bytes / 16
