"""Version a training run: one checkpoint per evaluation, with metrics and lineage.

    python examples/version_training_run.py [STORE]

The dataset is stored first; each checkpoint is a new version of
runs/demo/checkpoint whose parent is the one before (the first one's parent
is the dataset). Tensors that did not change cost no new storage.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

import cas
from cas.ml.checkpoint import CheckpointManager


def train(store: cas.Store, run: str = "demo", evaluations: int = 5) -> CheckpointManager:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("the quick brown fox\n" * 1000)
        dataset = store.put(corpus, "datasets/corpus", info=cas.ArtifactInfo(type="dataset"))

    rng = np.random.default_rng(0)
    state = {
        "embed.weight": rng.standard_normal((1024, 1024)).astype(np.float32),
        "head.weight": rng.standard_normal((1024, 10)).astype(np.float32),
    }
    manager = CheckpointManager(
        store,
        run,
        info=cas.ArtifactInfo(type="checkpoint", job=run, algorithm="sgd"),
        parent=dataset.ref,
    )
    for evaluation in range(1, evaluations + 1):
        state["head.weight"] -= 0.01  # only the head trains; the embedding is frozen
        loss = round(1.0 / evaluation + 0.05 * (evaluation % 2), 4)
        version = manager.save(state, step=evaluation * 100, metrics={"loss": loss})
        print(f"saved {version.ref}  step={evaluation * 100}  loss={loss}")
    return manager


def main() -> None:
    location = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="cas-example-")
    store = cas.open(location)
    manager = train(store)
    log = store.log(manager.key)
    for version in log:
        print(version.ref, dict(version.metrics), "parents:", ", ".join(version.parents))
    assert [v.number for v in log] == [5, 4, 3, 2, 1]
    assert log[-1].parents == ("datasets/corpus@1",)
    assert log[0].parents == ("runs/demo/checkpoint@4",)
    stats = store.stats()
    print(f"{stats.versions} versions, dedup {stats.dedup_ratio:.2f}x")
    assert stats.dedup_ratio > 3  # the frozen embedding is stored once, not five times


if __name__ == "__main__":
    main()
