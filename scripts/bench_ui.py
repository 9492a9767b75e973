"""Time each page of ``cas ui`` on a store of 10,000 versions, and the queries under them.

    python scripts/bench_ui.py [--versions 10000] [--keys 100] [--repeat 5] [--store DIR]
                               [--fresh 5] [--code DIR ...]

The store is the one scripts/bench_queries.py builds (refs with summaries,
one tiny chunk per version, each key a chain of checkpoints from one
dataset); ``--store DIR`` builds it there once and reuses it after.

In this process a server is started and every page fetched over HTTP: the
first fetch (nothing read yet) and the median of ``--repeat`` more (as on a
page a user keeps open). Beside them, the store-wide calls the pages are
built on, timed alone, show where a page's time goes.

With ``--fresh N``, each page is also the first request of N new ``cas ui``
processes, started the way a user starts it: *start* is the time from
launching the process to the address it prints, *first* the first page's
answer, with the server's CPU time for it, and *complete* the time from
that request until the page shows every figure (a page that answered with
"computing…" is fetched again once ``/changes`` says "ready"). ``--code DIR``
runs those processes on the cas package under DIR (a checkout, or what
``git archive`` of another commit unpacks to); given several times, the
checkouts alternate, process by process, so that they share the machine's
load. The target of the issue: every page within 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_queries import build_store

from cas.ml.lineage import lineage
from cas.store import Store
from cas.ui import UiServer

TARGET_SECONDS = 1.0
ROOT = Path(__file__).resolve().parent.parent
#: What a page shows in a figure's place while the server reads manifests.
COMPUTING = 'class="computing"'


@dataclass(frozen=True)
class Fresh:
    """One page as the first request of a new ``cas ui`` process."""

    start: float  # launching the process to the address it prints
    first: float  # the first answer
    cpu: float  # the server's CPU time (user and system) for that answer
    complete: float  # from the first request to a page that shows every figure
    computing: bool  # whether the first answer said "computing…"


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (Linux: /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read(url: str) -> str:
    with urllib.request.urlopen(url, timeout=120) as reply:
        assert reply.status == 200, (url, reply.status)
        return str(reply.read().decode())


def ready(base: str) -> bool:
    """Whether the server has read every manifest asked for (a server that reads them on
    the request path answers /changes with one line: always ready)."""
    lines = read(base + "/changes").splitlines()
    return len(lines) < 2 or lines[1] == "ready"


def fresh_first(code: Path, store: Path, path: str) -> Fresh:
    """Start ``cas ui`` on the package under ``code``; time its first page, ``path``."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    argv = [sys.executable, "-m", "cas", "--store", str(store), "ui"]
    launched = time.perf_counter()
    server = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=code
    )
    try:
        assert server.stdout is not None
        base = next(line.strip() for line in server.stdout if line.startswith("http")).rstrip("/")
        start = time.perf_counter() - launched
        cpu = cpu_seconds(server.pid)
        asked = time.perf_counter()
        body = read(base + path)
        first = time.perf_counter() - asked
        cpu = cpu_seconds(server.pid) - cpu
        computing = COMPUTING in body
        while COMPUTING in body:
            while not ready(base):
                time.sleep(0.02)
            body = read(base + path)
        complete = time.perf_counter() - asked
    finally:
        server.terminate()
        server.wait(30)
    return Fresh(start, first, cpu, complete, computing)


def fresh_runs(
    codes: list[Path], store: Path, paths: dict[str, str], runs: int
) -> dict[str, dict[str, list[Fresh]]]:
    """``runs`` new processes per checkout and page, the checkouts alternating."""
    found: dict[str, dict[str, list[Fresh]]] = {str(c): {n: [] for n in paths} for c in codes}
    for _ in range(runs):
        for name, path in paths.items():
            for code in codes:
                found[str(code)][name].append(fresh_first(code, store, path))
    return found


def fetch(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as reply:
        body = reply.read()
        assert reply.status == 200, (url, reply.status)
    assert body
    return time.perf_counter() - start


def timed(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pages(versions: int, keys: int) -> dict[str, str]:
    per_key = max(1, versions // keys)
    middle = f"runs/run-{keys // 2:03d}/ckpt"
    return {
        "keys": "/",
        f"key ({per_key} versions)": f"/key/{middle}",
        "version (lineage, diff vs parent)": f"/version/{middle}@{max(1, per_key // 2)}",
        "store": "/store",
        "changes (poll)": "/changes",
    }


def in_process(store: Store, paths: dict[str, str], repeat: int) -> dict[str, dict[str, float]]:
    """Each page from one server in this process, prepared as ``cas ui`` prepares it: its
    first answer, then (once the server has read the manifests) the median of ``repeat`` more."""
    results: dict[str, dict[str, float]] = {}
    server = UiServer(store)
    server.prepare()  # as cas ui does before it prints its address
    server.start()
    base = server.url.rstrip("/")
    try:
        for name, path in paths.items():
            first = fetch(base + path)
            while not ready(base):
                time.sleep(0.02)
            median = statistics.median(fetch(base + path) for _ in range(repeat))
            results[name] = {"first": first, "median": median}
    finally:
        server.shutdown()
        server.server_close()
    return results


def calls_underneath(store: Store, args: argparse.Namespace) -> dict[str, float]:
    middle = f"runs/run-{args.keys // 2:03d}/ckpt"
    version = f"{middle}@{max(1, args.versions // args.keys // 2)}"
    calls = {
        "Store.log(KEY)": lambda: store.log(middle),
        "lineage(VERSION)": lambda: lineage(store, version, depth=3),
        "Store.catalog()": lambda: store.catalog(),
        "Store.list_keys()": lambda: store.list_keys(),
        "Store.stats()": lambda: store.stats(),
        "Store.chunk_sizes()": lambda: store.chunk_sizes(),
    }
    return {name: timed(fn, args.repeat) for name, fn in calls.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--store", help="build here (default: a temporary directory)")
    parser.add_argument("--fresh", type=int, default=0, metavar="N", help="new processes a page")
    parser.add_argument("--code", action="append", type=Path, help="checkout the processes run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    codes = [c.resolve() for c in args.code or [ROOT]]
    root = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="cas-bench-ui-"))
    loads = [os.getloadavg()[0]]
    try:
        if not (root / "config").exists():
            build_store(root, args.versions, args.keys)
        paths = pages(args.versions, args.keys)
        fresh = fresh_runs(codes, root, paths, args.fresh) if args.fresh else {}
        store = Store.open(str(root), create=False)
        results = in_process(store, paths, args.repeat)
        underneath = calls_underneath(store, args)
    finally:
        if not args.store:
            shutil.rmtree(root, ignore_errors=True)
    loads.append(os.getloadavg()[0])
    report(args, results, underneath, fresh, loads)
    slow = [r["median"] for r in results.values()] + [
        statistics.median(f.first for f in runs)
        for by_page in list(fresh.values())[-1:]  # the last checkout given: the one under test
        for runs in by_page.values()
    ]
    return 0 if all(seconds <= TARGET_SECONDS for seconds in slow) else 1


def report(
    args: argparse.Namespace,
    results: dict[str, dict[str, float]],
    underneath: dict[str, float],
    fresh: dict[str, dict[str, list[Fresh]]],
    loads: list[float],
) -> None:
    if args.json:
        each = {c: {n: [asdict(f) for f in r] for n, r in p.items()} for c, p in fresh.items()}
        print(json.dumps({"pages": results, "calls": underneath, "fresh": each}, indent=2))
        return
    print(f"{args.versions} versions over {args.keys} keys; medians of {args.repeat}")
    print(f"load average (1 min) {loads[0]:.1f} at the start, {loads[-1]:.1f} at the end")
    for code, by_page in fresh.items():
        print(f"\nfirst page of a new cas ui process ({code}), medians of {args.fresh}:")
        print(f"{'page':<36} {'start':>7} {'first':>7} {'cpu':>7} {'complete':>9}  computing…")
        for name, runs in by_page.items():
            med = {
                field: statistics.median(getattr(f, field) for f in runs)
                for field in ("start", "first", "cpu", "complete")
            }
            shown = sum(f.computing for f in runs)
            print(
                f"{name:<36} {med['start']:>6.3f}s {med['first']:>6.3f}s {med['cpu']:>6.3f}s "
                f"{med['complete']:>8.3f}s  {shown} of {len(runs)}"
            )
            print(f"{'':<36} first each: {', '.join(f'{f.first:.3f}' for f in runs)}")
    print(f"\nin this process: {'page':<19} {'first':>8} {'median':>8}")
    for name, r in results.items():
        verdict = "" if r["median"] <= TARGET_SECONDS else f"  over {TARGET_SECONDS:g} s"
        print(f"{name:<36} {r['first']:>7.3f}s {r['median']:>7.3f}s{verdict}")
    print(f"{'call underneath':<36} {'':>8} {'median':>8}")
    for name, seconds in underneath.items():
        print(f"{name:<36} {'':>8} {seconds:>7.3f}s")


if __name__ == "__main__":
    sys.exit(main())
