"""Resume a training job from its latest checkpoint, wherever it stopped.

    python examples/resume_from_latest.py [STORE]

The job is started twice: the first run stops after 3 of 6 steps (as a
preempted job would), the second picks up at step 4 from the store alone.
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np

import cas
from cas.ml.checkpoint import CheckpointManager

TOTAL_STEPS = 6


def job(store: cas.Store, stop_after: int | None = None) -> list[int]:
    manager = CheckpointManager(store, "resumable")
    latest = manager.load_latest()
    if latest is None:
        start, weights = 1, np.zeros(1000, dtype=np.float32)
        print("no checkpoint: starting from scratch")
    else:
        assert latest.step is not None
        start, weights = latest.step + 1, latest.state["w"]
        print(f"resuming from {latest.version.ref} (step {latest.step})")
    done = []
    for step in range(start, TOTAL_STEPS + 1):
        weights = weights + 1.0  # one "training step"
        manager.save({"w": weights}, step, {"loss": 1.0 / step})
        done.append(step)
        if stop_after is not None and len(done) == stop_after:
            print(f"preempted after step {step}")
            break
    return done


def main() -> None:
    location = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="cas-example-")
    store = cas.open(location)
    assert job(store, stop_after=3) == [1, 2, 3]
    assert job(store) == [4, 5, 6]
    final = CheckpointManager(store, "resumable").load_latest()
    assert final is not None
    assert final.step == TOTAL_STEPS
    # Six steps in total, as if the job had never stopped.
    assert float(final.state["w"][0]) == TOTAL_STEPS
    print(f"finished at step {final.step}: {final.version.ref}")


if __name__ == "__main__":
    main()
