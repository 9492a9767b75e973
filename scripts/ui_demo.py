"""A small store to look at with ``cas ui``: the one the UI's tests and screenshots use.

    python scripts/ui_demo.py STORE          # build it (STORE must not exist)
    cas --store STORE ui                     # then look at it

It holds a dataset, four checkpoints of a run (each a child of the one
before, the first of the dataset; ``best`` on @3) with loss and accuracy,
a LoRA adapter made from @3, two versions of a bf16 model (the second
stored as a delta of the first), and ``hostile/notes``, a version whose
metadata, message, label and file name are HTML and ``javascript:`` URLs:
a page must show them as text and run none of them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import doc_fixtures

from cas.store import ArtifactInfo, Store

#: Text that would run script if a page put it into markup unescaped.
HOSTILE = {
    "note": "<script>alert('metadata')</script>",
    "link": "javascript:alert('link')",
    "html": '"><img src=x onerror="alert(\'attribute\')">',
}
HOSTILE_MESSAGE = "<img src=x onerror=alert('message')>"
HOSTILE_FILE = "<svg onload=alert('file')>.txt"
LOSSES = (0.92, 0.61, 0.43, 0.47)
ACCURACIES = (0.55, 0.71, 0.82, 0.80)


def build(root: Path) -> Store:
    store = Store.init(str(root))
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        corpus = work / "corpus.txt"
        corpus.write_text("".join(f"sentence {i}\n" for i in range(5000)))
        store.put(corpus, "datasets/corpus", info=ArtifactInfo(type="dataset"))
        parent = "datasets/corpus@1"
        for step, (loss, acc) in enumerate(zip(LOSSES, ACCURACIES, strict=True), start=1):
            doc_fixtures.checkpoint(work / f"ckpt-{step}", step)
            version = store.put(
                work / f"ckpt-{step}",
                "runs/demo/ckpt",
                parents=[parent],
                metrics={"loss": loss, "acc": acc},
                metadata={"step": 1000 * step},
                message=f"checkpoint at step {1000 * step}",
                info=ArtifactInfo(type="checkpoint", job="demo-run-1", algorithm="adamw"),
            )
            parent = version.ref
        store.tag("runs/demo/ckpt@3", "best")
        doc_fixtures.adapter(work / "adapter")
        store.put(
            work / "adapter",
            "models/demo-lora",
            parents=["runs/demo/ckpt@3"],
            metrics={"acc": 0.86},
            info=ArtifactInfo(type="model", base_model="runs/demo/ckpt@3", fine_tuning="lora"),
        )
        for step in (1, 2):  # a fine-tuning step: the second is stored as a delta of the first
            doc_fixtures.bf16_model(work / f"bf16-{step}", step)
            _small_tensors(work / f"bf16-{step}" / "heads.safetensors")
            store.put(
                work / f"bf16-{step}",
                "models/demo-bf16",
                parents=["models/demo-bf16@1"] if step == 2 else [],
                metrics={"loss": 0.3 - 0.01 * step},
                info=ArtifactInfo(type="model", fine_tuning="full"),
            )
        notes = work / "notes"
        notes.mkdir()
        (notes / HOSTILE_FILE).write_text("hello\n")
        store.put(
            notes,
            "hostile/notes",
            metadata=HOSTILE,
            message=HOSTILE_MESSAGE,
            info=ArtifactInfo(labels={"owner": "<b>x</b>"}),
        )
    return store


def _small_tensors(path: Path) -> None:
    """Eight small float32 tensors: cas stores them grouped, several to a chunk."""
    from cas.checkpoint import write_safetensors

    tensors = [(f"head.{i}", "F32", (64,), bytes([i] * 256)) for i in range(8)]
    with open(path, "wb") as f:
        write_safetensors(f, tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store", type=Path)
    args = parser.parse_args()
    build(args.store)
    print(f"built {args.store}; now: cas --store {args.store} ui")


if __name__ == "__main__":
    main()
