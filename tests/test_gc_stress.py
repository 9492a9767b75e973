"""Writers in several processes, garbage collection over and over with a short grace.

Each writer process puts files made of shared blocks (so chunks are reused
across writers and versions) and deletes some of its older versions, while
this process runs one collection after another. At the end every committed,
undeleted version must restore byte for byte, a deep verify must pass, and
after a final ``gc --grace 0`` the store must hold only what live versions
reference.

Run as a script, this file is the writer: ``python test_gc_stress.py writer ...``
(see :func:`gc_helpers.run_writers`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import TypedDict

import pytest
from gc_helpers import (
    GC_BACKENDS,
    check_live,
    live_objects,
    random_bytes,
    run_writers,
    stored_keys,
    stress_store,
)

from cas.chunks._chunking import ChunkerParams
from cas.errors import ConcurrentCollectionError
from cas.repository import _layout as layout
from cas.store import Store

KiB = 1024
SECONDS = float(os.environ.get("CAS_GC_STRESS_SECONDS", "12"))
WRITERS = 3
BLOCKS = 10
BLOCK_SIZE = 96 * KiB
PARAMS = ChunkerParams.from_average(32 * KiB)


class Recipe(TypedDict):
    """What :func:`content` makes a file from."""

    parts: list[int]
    tail_size: int
    tail_seed: int


def content(parts: list[int], tail_size: int, tail_seed: int) -> bytes:
    """A file of shared blocks plus a tail of its own: the same recipe, the same bytes."""
    blocks = b"".join(random_bytes(BLOCK_SIZE, seed=1000 + i) for i in parts)
    return blocks + random_bytes(tail_size, seed=tail_seed)


def writer(uri: str, number: int, seconds: float, log: Path, workdir: Path) -> None:
    """Put, and now and then delete an older version, until time is up; log what committed."""
    store = Store.open(uri, create=False)
    rng = random.Random(number)
    mine: dict[str, list[tuple[str, Recipe]]] = {}
    gone: list[Recipe] = []
    deadline = time.monotonic() + seconds
    count = 0
    with log.open("a") as out:

        def record(**event: object) -> None:
            out.write(json.dumps(event) + "\n")
            out.flush()

        while time.monotonic() < deadline:
            count += 1
            key = f"w{number}/k{rng.randrange(3)}"
            if gone and rng.random() < 0.3:
                # The content of a deleted version again: its unique chunks
                # are unreferenced and ageing, maybe being collected right now.
                recipe: Recipe = rng.choice(gone)
            else:
                recipe = {
                    "parts": rng.sample(range(BLOCKS), rng.randrange(2, 5)),
                    "tail_size": rng.randrange(1, 64 * KiB),
                    "tail_seed": number * 1_000_000 + count,
                }
            data = content(**recipe)
            path = workdir / f"w{number}-{count}.bin"
            path.write_bytes(data)
            try:
                version = store.put(path, key)
            except ConcurrentCollectionError as err:
                record(event="aborted", error=str(err))
                continue
            finally:
                path.unlink()
            record(event="put", ref=version.ref, sha256=hashlib.sha256(data).hexdigest(), **recipe)
            mine.setdefault(key, []).append((version.ref, recipe))
            if len(mine[key]) > 2 and rng.random() < 0.5:
                victim, old_recipe = mine[key].pop(rng.randrange(len(mine[key]) - 1))
                store.delete(victim)
                gone.append(old_recipe)
                record(event="rm", ref=victim)


@pytest.mark.slow
@pytest.mark.parametrize("kind", [k for k in GC_BACKENDS if k != "memory"])
def test_writers_and_repeated_gc_lose_nothing(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    backend_uri = None if kind == "local" else request.getfixturevalue(f"{kind}_backend").uri
    uri, store, grace = stress_store(kind, backend_uri, tmp_path)

    run = run_writers(
        __file__, [uri, str(SECONDS)], WRITERS, tmp_path, lambda: store.gc(grace=grace)
    )
    reports, committed, live = run.results, run.committed, run.live
    print(
        f"\n{len(committed)} puts, {len(committed) - len(live)} deletes, {run.aborted} aborted "
        f"puts, {len(reports)} collections, {sum(r.deleted for r in reports)} objects "
        f"collected, {sum(r.deferred for r in reports)} deferred"
    )
    assert len(reports) >= 5
    assert len(committed) >= WRITERS * 3
    assert sum(r.deleted for r in reports) > 0, "the collections never collected anything"
    assert run.aborted <= len(committed), "most puts lost a race: the protocol is too fragile"

    check_live(store, live, tmp_path)
    for event in live.values():
        data = content(event["parts"], event["tail_size"], event["tail_seed"])
        assert hashlib.sha256(data).hexdigest() == event["sha256"]

    # Nothing writes now: a final collection with no grace leaves only the live set.
    final = store.gc(grace=0)
    assert final.unsafe is not None
    chunks, manifests = live_objects(store)
    assert stored_keys(store.backend, layout.CHUNKS) == chunks
    assert stored_keys(store.backend, layout.MANIFESTS) == manifests
    stats = store.stats()
    assert stats.chunks == stats.referenced_chunks
    assert abs(stats.stored_bytes - stats.live_bytes) <= 0.01 * stats.live_bytes
    # Random data does not compress: stored chunk bytes are the raw bytes plus headers.
    assert stats.unique_bytes <= stats.stored_bytes <= stats.unique_bytes * 1.05
    assert store.verify(deep=True).ok


if __name__ == "__main__" and sys.argv[1:2] == ["writer"]:
    _, _, uri_arg, seconds_arg, number_arg, log_arg, workdir_arg = sys.argv
    writer(uri_arg, int(number_arg), float(seconds_arg), Path(log_arg), Path(workdir_arg))
