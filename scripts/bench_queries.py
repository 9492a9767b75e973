"""Time the metadata queries (log, find, lineage, ls) on a store with many versions.

    python scripts/bench_queries.py [--versions 100000] [--keys 1000] [--s3] [--since 100]

The store is built directly from manifests and refs (one tiny chunk per
version, written exactly as a put writes them, summaries included), because
100,000 real puts would time the put path, not the queries; on the S3 test
server (``--s3``, a moto server on 127.0.0.1 started by this script) only the
refs are written, which is all the queries read. Then, in one run:

1. ``baseline``: each query read from the refs alone, as before the catalog
   (``--no-baseline`` skips it; on S3 it costs one request per version);
2. ``rebuild``: the catalog built from the refs (``cas catalog rebuild``);
3. ``cold``: each query in a process that holds no catalog yet;
4. ``warm``: each query again (the checkpoint decoded once per process);
5. ``since``: ``--since`` more versions committed through the put's own
   path (a note, then the ref), and each query again, before compaction.

Every query prints its time and the requests it made (a listing counts one
request per page). The targets of the queries-at-scale issue: every query
under 2 s, at most 20 requests, plus one per version committed since the
last compaction.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cas.backends import Backend, LocalBackend
from cas.backends._delegating import DelegatingBackend
from cas.backends.base import ObjectInfo
from cas.digest import Digest
from cas.repository import _layout as layout
from cas.repository._manifest import ChunkRef, Entry, Manifest, Parent, canonical_json
from cas.repository._metadata import ArtifactInfo, Summary
from cas.repository._refs import utc_now
from cas.store import Store, _index
from cas.store._catalog import Catalog
from cas.store._config import load_config
from cas.store._writing import write_manifest

TARGET_SECONDS = 2.0
TARGET_REQUESTS = 20
T = TypeVar("T")


def build_store(
    root: Path | None = None,
    versions: int = 10_000,
    keys: int = 100,
    *,
    backend: Backend | None = None,
    refs_only: bool = False,
) -> Store:
    """A store of ``versions`` versions over ``keys`` run keys, plus one dataset they derive from.

    Each run key is a chain of checkpoints (each version's parent is the one
    before); the first version of each run derives from ``datasets/corpus@1``.
    Every tenth version is tagged ``keep-<n>``, the last one of each run ``best``.
    ``refs_only`` writes no chunk and no manifest (the queries read neither).
    """
    if backend is None:
        assert root is not None
        backend = LocalBackend(root, fsync=False)
    store = Store(backend, load_config(backend, create=True))
    per_key = max(1, versions // keys)

    def commit(key: str, number: int, info: ArtifactInfo, parents: tuple[Parent, ...]) -> Digest:
        data = f"{key}@{number}".encode()
        chunk = Digest.of(data)
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
        if refs_only:
            manifest_id = Digest.of(manifest.to_bytes())
        else:
            store.chunks.put(data, digest=chunk)
            manifest_id = write_manifest(backend, manifest)
        body = {
            "manifest": manifest_id.hex,
            "created": manifest.created,
            "summary": Summary.of_manifest(manifest).for_ref(),
        }
        backend.put(layout.version_key(key, number), canonical_json(body), if_absent=True)
        for tag in info.tags:  # straight to the ref, as the refs of a store made before the catalog
            tag_body = canonical_json({"version": number, "created": utc_now()})
            backend.put(layout.tag_key(key, tag), tag_body)
        return manifest_id

    dataset_id = commit("datasets/corpus", 1, ArtifactInfo(type="dataset"), ())
    dataset = Parent("datasets/corpus", 1, dataset_id)

    def run(k: int) -> None:
        key = f"runs/run-{k:03d}/ckpt"
        parent = dataset
        for n in range(1, min(per_key, versions - 1 - k * per_key) + 1):
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

    with ThreadPoolExecutor(backend.concurrency) as pool:
        list(pool.map(run, range(keys)))
    return store


class Counting(DelegatingBackend):
    """Counts requests; a listing counts one per page of the inner backend."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.requests = 0
        self.page = inner.list_page_size or 1000

    def _call(self, op: str, keys: Sequence[str], request: Callable[[], T]) -> T:
        self.requests += 1 if op != "delete" else max(1, -(-len(keys) // 1000))
        result = request()
        if op == "list":
            return self._pages(result)  # type: ignore[arg-type, return-value]
        return result

    def _pages(self, listing: Iterator[ObjectInfo]) -> Iterator[ObjectInfo]:
        for index, info in enumerate(listing):
            if index and index % self.page == 0:
                self.requests += 1
            yield info


def timed(label: str, fn: Callable[[], Any], counter: Counting) -> Row:
    before = counter.requests
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return Row(label, elapsed, counter.requests - before, result, cpu)


@dataclass
class Row:
    label: str
    seconds: float
    requests: int
    result: Any
    #: CPU time of this process (all its threads; a server's is not counted): a machine's
    #: load moves it far less than wall time.
    cpu: float = 0.0


def queries(store: Store, versions: int, keys: int) -> list[tuple[str, Callable[[], Any]]]:
    """The queries of the issue's table, on a store made by :func:`build_store`."""
    from cas.ml.lineage import lineage
    from cas.ml.query import Condition, Query, find

    middle = f"runs/run-{keys // 2:03d}/ckpt"
    job = f"run-{keys // 2:03d}"
    per_key = max(1, versions // keys)
    sorted_query = Query(
        type="checkpoint", where=(Condition.parse("loss<0.3"),), sort="loss", limit=10
    )
    return [
        ("log one key", lambda: store.log(middle)),
        ("ls", lambda: store.list_keys()),
        ("find (all)", lambda: find(store, Query())),
        (
            "find --type checkpoint --where loss<0.3 --sort loss --limit 10",
            lambda: find(store, sorted_query),
        ),
        ("find --tag best", lambda: find(store, Query(tags=("best",)))),
        (f"find --meta job={job}", lambda: find(store, Query(meta=(("job", job),)))),
        ("lineage (store-wide)", lambda: lineage(store, f"{middle}@{per_key // 2}")),
        (
            "best version of one key",
            lambda: find(store, Query(prefix=middle, sort="loss", limit=1)),
        ),
    ]


def measure(store: Store, versions: int, keys: int, counter: Counting) -> list[Row]:
    return [timed(label, fn, counter) for label, fn in queries(store, versions, keys)]


def run_queries(store: Store, versions: int, keys: int) -> list[tuple[str, float, Any]]:
    """Time each query: (label, seconds, result)."""
    rows = measure(store, versions, keys, Counting(store.backend))
    return [(row.label, row.seconds, row.result) for row in rows]


def forget_catalog() -> None:
    """As a new process on a machine that never read this store's catalog."""
    _index._DECODED.clear()
    shutil.rmtree(os.environ["CAS_CATALOG_CACHE"], ignore_errors=True)


def commit_more(store: Store, count: int, keys: int) -> None:
    """``count`` versions committed the way a put commits them (a note, then the ref)."""
    for n in range(count):
        key = f"runs/run-{n % keys:03d}/ckpt"
        data = f"since-{n}".encode()
        summary = Summary("file", len(data), 1, metrics={"loss": 0.5}).for_ref()
        store.refs.create_next(key, Digest.of(data), summary=summary)


def open_backend(args: argparse.Namespace, root: Path, stack: ExitStack) -> Backend:
    if not args.s3:
        return LocalBackend(root, fsync=False)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import servers

    from cas.backends.s3 import S3Backend

    server = stack.enter_context(servers.start_moto())
    os.environ.update(server.env)
    backend = S3Backend("cas-bench-queries", "store", endpoint_url=server.endpoint)
    backend.create_bucket()
    return backend


def phase(name: str, rows: list[Row], out: dict[str, Any]) -> None:
    print(f"-- {name}")
    for row in rows:
        count = len(row.result) if isinstance(row.result, list) else ""
        print(
            f"{row.seconds * 1000:9.1f} ms {row.cpu * 1000:9.1f} ms CPU {row.requests:7d} req  "
            f"{row.label}  {count}"
        )
    out[name] = {
        r.label: {"seconds": round(r.seconds, 4), "cpu": round(r.cpu, 4), "requests": r.requests}
        for r in rows
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument(
        "--store",
        help="build here, or reuse what an earlier run built (default: a temporary directory)",
    )
    parser.add_argument("--s3", action="store_true", help="on a local S3 server (moto)")
    parser.add_argument("--since", type=int, default=100, help="versions committed after")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="cas-bench-q-"))
    os.environ["CAS_CATALOG_CACHE"] = str(root.with_name(root.name + "-cache"))
    out: dict[str, Any] = {"versions": args.versions, "keys": args.keys, "s3": args.s3}
    try:
        with ExitStack() as stack:
            counter = Counting(open_backend(args, root, stack))
            start = time.perf_counter()
            if not (args.store and (root / "config").exists()):  # else built by an earlier run
                build_store(
                    root, args.versions, args.keys, backend=counter.inner, refs_only=args.s3
                )
            out["build_seconds"] = round(time.perf_counter() - start, 1)
            store = Store(counter, load_config(counter, create=False))
            print(
                f"built {args.versions} versions over {args.keys} keys in {out['build_seconds']} s"
            )
            phases(store, args, counter, out)
    finally:
        if not args.store:
            shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(os.environ["CAS_CATALOG_CACHE"], ignore_errors=True)
    slow = [
        f"{name}: {label}"
        for name in ("cold", "warm")
        for label, row in out[name].items()
        if row["seconds"] >= TARGET_SECONDS or row["requests"] > TARGET_REQUESTS
    ]
    if args.json:
        print(json.dumps(out, indent=2))
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("all under 2 s and 20 requests" if not slow else f"missed: {'; '.join(slow)}")
    return 1 if slow else 0


def phases(store: Store, args: argparse.Namespace, counter: Counting, out: dict[str, Any]) -> None:
    if args.baseline:
        with _refs_only():
            phase("baseline (refs only)", measure(store, args.versions, args.keys, counter), out)
    index = store._catalog().index()
    phase("rebuild", [timed("catalog rebuild", lambda: index.compact(full=True), counter)], out)
    forget_catalog()
    phase("cold", measure(store, args.versions, args.keys, counter), out)
    phase("warm", measure(store, args.versions, args.keys, counter), out)
    commit_more(store, args.since, args.keys)
    phase(
        f"since ({args.since} new versions)", measure(store, args.versions, args.keys, counter), out
    )


@contextmanager
def _refs_only() -> Iterator[None]:
    """Queries as before the catalog: every version ref read."""
    original = Catalog._state
    Catalog._state = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        Catalog._state = original  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(main())
