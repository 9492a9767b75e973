"""Writers putting fine-tuning steps as deltas, deleting old ones, while gc repacks over and over.

Each writer process puts the checkpoints of a run of its own (every version
a small step from the one before, stored as a delta of the key's latest),
deletes some older versions, and now and then puts again the content of a
version it deleted. This process runs one collection after another, each
repacking what the deletes left. At the end every committed, undeleted
version restores byte for byte, a deep verify passes, and after a final
``gc --grace 0`` the store holds exactly the chunks live versions name: no
delta base of a deleted version is left.

Run as a script, this file is the writer: ``python test_repack_stress.py writer ...``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gc_helpers import (
    GC_BACKENDS,
    check_live,
    live_objects,
    needed_chunks,
    run_writers,
    stored_keys,
    stress_store,
)
from test_tensors import save, step, weights

from cas.errors import ConcurrentCollectionError
from cas.repository import _layout as layout
from cas.store import Store

SECONDS = float(os.environ.get("CAS_GC_STRESS_SECONDS", "12"))
WRITERS = 3


def checkpoint(writer: int, number: int) -> dict[str, np.ndarray]:
    """The weights of a writer's run after ``number`` steps: the same recipe, the same bytes."""
    arrays = weights(1000 + writer)
    for index in range(number):
        arrays = step(arrays, seed=writer * 1000 + index)
    return arrays


def writer(uri: str, number: int, seconds: float, log: Path, workdir: Path) -> None:
    """Put, delete and put again until time is up; log what committed."""
    store = Store.open(uri, create=False)
    rng = random.Random(number)
    mine: list[tuple[str, int]] = []
    gone: list[int] = []
    deadline = time.monotonic() + seconds
    steps = 0
    with log.open("a") as out:

        def record(**event: object) -> None:
            out.write(json.dumps(event) + "\n")
            out.flush()

        while time.monotonic() < deadline:
            if gone and rng.random() < 0.2:
                recipe = rng.choice(gone)  # its chunks may be base-only, or being collected
            else:
                steps += 1
                recipe = steps
            path = save(
                workdir / f"w{number}-{recipe}-{rng.random()}.safetensors",
                checkpoint(number, recipe),
            )
            try:
                version = store.put(path, f"run{number}")
            except ConcurrentCollectionError as err:
                record(event="aborted", error=str(err))
                continue
            finally:
                data = path.read_bytes()
                path.unlink()
            record(
                event="put", ref=version.ref, sha256=hashlib.sha256(data).hexdigest(), recipe=recipe
            )
            mine.append((version.ref, recipe))
            if len(mine) > 2 and rng.random() < 0.7:
                victim, old = mine.pop(rng.randrange(len(mine) - 1))
                store.delete(victim)
                gone.append(old)
                record(event="rm", ref=victim)


@pytest.mark.slow
@pytest.mark.parametrize("kind", [k for k in GC_BACKENDS if k != "memory"])
def test_writers_and_repacking_collections_lose_nothing(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    backend_uri = None if kind == "local" else request.getfixturevalue(f"{kind}_backend").uri
    uri, store, grace = stress_store(kind, backend_uri, tmp_path)
    # A put to a local test server takes ten times one to a folder: enough of them
    # to delete, and to repack after, takes longer.
    seconds = SECONDS if kind == "local" else 2.5 * SECONDS

    run = run_writers(
        __file__, [uri, str(seconds)], WRITERS, tmp_path, lambda: store.gc(grace=grace)
    )
    reports, committed, live = run.results, run.committed, run.live
    repacked = [r.repack for r in reports if r.repack is not None]
    print(
        f"\n{len(committed)} puts, {len(committed) - len(live)} deletes, {run.aborted} aborted "
        f"puts, {len(reports)} collections, {sum(r.chunks for r in repacked)} chunks and "
        f"{sum(r.versions for r in repacked)} versions repacked"
    )
    assert len(reports) >= 5
    assert len(committed) >= WRITERS * 3
    assert sum(r.versions for r in repacked) > 0, "no collection ever repacked"
    assert run.aborted <= len(committed), "most puts lost a race: the protocol is too fragile"

    check_live(store, live, tmp_path)

    # Nothing writes now: a final collection with no grace leaves only what live versions
    # need, and repacked everything that was worth it.
    store.gc(grace=0)
    _, manifests = live_objects(store)
    assert stored_keys(store.backend, layout.CHUNKS) == needed_chunks(store)
    assert stored_keys(store.backend, layout.MANIFESTS) == manifests
    again = store.gc(grace=0)
    assert again.repack is not None
    assert again.repack.chunks == 0
    assert store.verify(deep=True).ok


if __name__ == "__main__" and sys.argv[1:2] == ["writer"]:
    _, _, uri_arg, seconds_arg, number_arg, log_arg, workdir_arg = sys.argv
    writer(uri_arg, int(number_arg), float(seconds_arg), Path(log_arg), Path(workdir_arg))
