"""Time the metadata queries (log, find, lineage, ls) on a store with many versions.

    python scripts/bench_queries.py [--versions 10000] [--keys 100] [--store DIR]

The store is built directly from manifests and refs (one tiny chunk per
version, written exactly as a put writes them, summaries included), because
10,000 real puts would time the put path, not the queries. The target of the
ML workflow issue: every query under 2 s on the local backend.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cas.backends import LocalBackend
from cas.digest import Digest
from cas.repository import _layout as layout
from cas.repository._manifest import ChunkRef, Entry, Manifest, Parent, canonical_json
from cas.repository._metadata import ArtifactInfo, Summary
from cas.repository._refs import utc_now
from cas.store import Store
from cas.store._config import load_config
from cas.store._writing import write_manifest

TARGET_SECONDS = 2.0


def build_store(root: Path, versions: int = 10_000, keys: int = 100) -> Store:
    """A store of ``versions`` versions over ``keys`` run keys, plus one dataset they derive from.

    Each run key is a chain of checkpoints (each version's parent is the one
    before); the first version of each run derives from ``datasets/corpus@1``.
    Every tenth version is tagged ``keep-<n>``, the last one of each run ``best``.
    """
    backend = LocalBackend(root, fsync=False)
    store = Store(backend, load_config(backend, create=True))
    per_key = max(1, versions // keys)

    def commit(key: str, number: int, info: ArtifactInfo, parents: tuple[Parent, ...]) -> Digest:
        data = f"{key}@{number}".encode()
        chunk = Digest.of(data)
        store.chunks.put(data, digest=chunk)
        entry = Entry("weights.bin", "file", 0o644, len(data), chunk, (ChunkRef(chunk, len(data)),))
        manifest = Manifest(
            key=key,
            kind="file",
            created=utc_now(),
            entries=(entry,),
            parents=parents,
            tags=info.tags,
            metrics=info.metrics,
            metadata={"lr": 0.001, "seed": number % 7},
            artifact=info.record(),
        )
        manifest_id = write_manifest(backend, manifest)
        body = {
            "manifest": manifest_id.hex,
            "created": manifest.created,
            "summary": Summary.of_manifest(manifest).for_ref(),
        }
        backend.put(layout.version_key(key, number), canonical_json(body), if_absent=True)
        for tag in info.tags:
            store.refs.set_tag(key, tag, number)
        return manifest_id

    dataset_id = commit("datasets/corpus", 1, ArtifactInfo(type="dataset"), ())
    dataset = Parent("datasets/corpus", 1, dataset_id)
    made = 1
    for k in range(keys):
        key = f"runs/run-{k:03d}/ckpt"
        parent = dataset
        for n in range(1, per_key + 1):
            if made >= versions:
                break
            tags = ("best",) if n == per_key else (f"keep-{n}",) if n % 10 == 0 else ()
            info = ArtifactInfo(
                type="checkpoint",
                job=f"run-{k:03d}",
                algorithm="adamw",
                metrics={"loss": round(1.0 / (n + k % 5), 6), "step": n * 100},
                tags=tags,
            )
            manifest_id = commit(key, n, info, (parent,))
            parent = Parent(key, n, manifest_id)
            made += 1
    return store


def timed(label: str, fn: Callable[[], Any]) -> tuple[str, float, Any]:
    start = time.perf_counter()
    result = fn()
    return label, time.perf_counter() - start, result


def run_queries(store: Store, versions: int, keys: int) -> list[tuple[str, float, Any]]:
    """Time each query on a store made by :func:`build_store` with the same sizes."""
    from cas.ml.lineage import lineage
    from cas.ml.query import Condition, Query, find

    middle = f"runs/run-{keys // 2:03d}/ckpt"
    job = f"run-{keys // 2:03d}"
    per_key = max(1, versions // keys)
    return [
        timed("log one key", lambda: store.log(middle)),
        timed("ls", lambda: store.list_keys()),
        timed("find (all)", lambda: find(store, Query())),
        timed(
            "find --type checkpoint --where loss<0.3 --sort loss --limit 10",
            lambda: find(
                store,
                Query(
                    type="checkpoint", where=(Condition.parse("loss<0.3"),), sort="loss", limit=10
                ),
            ),
        ),
        timed("find --tag best", lambda: find(store, Query(tags=("best",)))),
        timed(f"find --meta job={job}", lambda: find(store, Query(meta=(("job", job),)))),
        timed("lineage (store-wide)", lambda: lineage(store, f"{middle}@{per_key // 2}")),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--store", help="build here (default: a temporary directory)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="cas-bench-q-"))
    try:
        start = time.perf_counter()
        store = build_store(root, args.versions, args.keys)
        build = time.perf_counter() - start
        results = run_queries(store, args.versions, args.keys)
    finally:
        if not args.store:
            shutil.rmtree(root, ignore_errors=True)
    slow = [label for label, seconds, _ in results if seconds >= TARGET_SECONDS]
    if args.json:
        print(json.dumps({label: round(seconds, 4) for label, seconds, _ in results}, indent=2))
    else:
        print(f"built {args.versions} versions over {args.keys} keys in {build:.1f} s")
        for label, seconds, result in results:
            count = len(result) if isinstance(result, list) else ""
            print(f"{seconds * 1000:9.1f} ms  {label}  {count}")
        print("all under 2 s" if not slow else f"over 2 s: {', '.join(slow)}")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
