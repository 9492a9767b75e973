"""Trace a fine-tuned model back to the dataset it was trained on.

    python examples/trace_model_to_dataset.py [STORE]

datasets/instructions@1 -> runs/ft/checkpoint@1..3 -> models/assistant@1,
with a base model as a second root. `cas lineage models/assistant` prints
the same tree; `--dot` draws it with Graphviz.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

import cas
from cas.ml.checkpoint import CheckpointManager, save_arrays
from cas.ml.lineage import lineage
from cas.ml.query import Query, find


def build(store: cas.Store) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "instructions.jsonl"
        data.write_text('{"prompt": "hi", "answer": "hello"}\n' * 100)
        dataset = store.put(data, "datasets/instructions", info=cas.ArtifactInfo(type="dataset"))
    base = save_arrays(
        store,
        "models/base",
        {"w": np.ones(1000, dtype=np.float32)},
        info=cas.ArtifactInfo(type="model", algorithm="pretraining"),
    )
    manager = CheckpointManager(
        store,
        "ft",
        info=cas.ArtifactInfo(type="checkpoint", job="ft", base_model=base.ref, fine_tuning="lora"),
        parent=dataset.ref,
    )
    for step in (1, 2, 3):
        last = manager.save(
            {"lora.a": np.full(64, step, dtype=np.float32)}, step, {"loss": 1 / step}
        )
    model_file = Path(tempfile.mkdtemp()) / "assistant.safetensors"
    store.get(last.ref, model_file)
    store.put(
        model_file,
        "models/assistant",
        parents=[last.ref, base.ref],
        info=cas.ArtifactInfo(type="model", base_model=base.ref, fine_tuning="lora"),
    )


def main() -> None:
    location = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="cas-example-")
    store = cas.open(location)
    build(store)
    graph = lineage(store, "models/assistant")
    print(graph.to_text())
    datasets = [ref for ref in graph.ancestors if graph.nodes[ref].type == "dataset"]
    assert datasets == ["datasets/instructions@1"], datasets
    assert "models/base@1" in graph.ancestors
    # And the other way round: everything trained on that dataset.
    trained = lineage(store, "datasets/instructions@1").descendants
    assert "models/assistant@1" in trained
    lora = find(store, Query(type="model", meta=(("fine_tuning", "lora"),)))
    assert [v.ref for v in lora] == ["models/assistant@1"]
    print("models/assistant@1 was trained on", datasets[0])


if __name__ == "__main__":
    main()
