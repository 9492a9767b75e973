"""Keep the 3 best checkpoints of a run (and the latest), delete the rest.

    python examples/keep_best_three.py [STORE]

The same policy from the shell:

    cas prune runs/sweep/checkpoint --keep-best 3 --metric loss --min --keep-last 1 --dry-run
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np

import cas
from cas.ml.checkpoint import CheckpointManager
from cas.ml.prune import Policy, prune

LOSSES = [0.9, 0.42, 0.51, 0.3, 0.47, 0.35, 0.6, 0.55]


def main() -> None:
    location = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="cas-example-")
    store = cas.open(location)
    manager = CheckpointManager(store, "sweep")
    rng = np.random.default_rng(1)
    for step, loss in enumerate(LOSSES, start=1):
        # Each checkpoint has its own weights, so each frees its own bytes when pruned.
        manager.save({"w": rng.standard_normal(20_000).astype(np.float32)}, step, {"loss": loss})

    policy = Policy(keep_best=3, metric="loss", direction="min", keep_last=1)
    plan = prune(store, manager.key, policy, dry_run=True)
    for version in plan.kept:
        why = "; ".join(plan.reasons[version.ref])
        print(f"keep   {version.ref}  loss={version.metrics['loss']}  ({why})")
    print(f"would delete {len(plan.deleted)} versions, {plan.reclaimable_bytes} bytes for gc")

    report = prune(store, manager.key, policy)
    kept = sorted(v.metrics["loss"] for v in store.log(manager.key))
    # The three lowest losses (0.3, 0.35, 0.42), plus the latest one (0.55).
    assert kept == [0.3, 0.35, 0.42, 0.55], kept
    assert len(report.deleted) == len(LOSSES) - 4
    # Each deleted checkpoint held 80,000 bytes of its own weights (and a header).
    assert report.reclaimable_bytes >= 4 * 80_000
    best = manager.load_best("loss")
    assert best is not None
    assert best.metrics["loss"] == 0.3
    print(f"best is {best.version.ref} (loss {best.metrics['loss']})")


if __name__ == "__main__":
    main()
