"""What the chunk cache, ``get --update`` and the cas:// filesystem save, on a local S3 server.

Run from the repository root (the virtualenv has boto3, moto, numpy, fsspec)::

    .venv/bin/python scripts/bench_cache.py                     # 1 GB checkpoint, 3 repeats
    .venv/bin/python scripts/bench_cache.py --size 256M --repeat 1   # quick
    .venv/bin/python scripts/bench_cache.py --json out.json

The checkpoint is bench_s3.py's: safetensors-like fp32 tensors, v2 with 10%
of them changed. Per repeat, against one moto_server on 127.0.0.1, with every
request the store makes counted (a counting wrapper around its backend):

1. put v1 and v2 into a fresh store (requests of the first put, per GB);
2. get v1 without a cache, then with an empty cache (cold: what filling it
   costs), then again into a new folder with the cache it filled (warm):
   time and chunk requests of each; then the cold and the warm get again
   with ``link=True`` (``cas get --link``) and a new cache, where the warm
   get hard-links the file the cold one kept and hashes it;
3. a fresh get of v2 without a cache, then ``get --update`` of v2 over the
   folder holding v1 (no cache either, so every missing chunk comes from the
   store): time, and the stored bytes fetched against the stored size of the
   chunks v2 has and v1 lacks;
4. one tensor of v1 read through ``cas://`` (header, then the tensor's
   bytes), without a cache: time and chunk requests, against the chunks that
   hold the header and the tensor.

Each step's wall time is printed beside the CPU time of this process (all
its threads; the S3 server's own CPU is not in it). Medians over the
repeats, with the targets: warm get >= 10x faster than cold
and no chunk requests; update's fetched bytes within 10% of the changed
chunks' stored size and >= 5x faster than a fresh get; one tensor through
fsspec >= 20x faster than a full get.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers  # noqa: E402
from bench_s3 import MB, checkpoint, parse_size, sha256  # noqa: E402

GB = 1_000_000_000
TIMES = (
    "get, no cache",
    "cold get",
    "warm get",
    "cold get --link",
    "warm get --link",
    "fresh get v2",
    "update v1->v2",
    "fsspec one tensor",
)


def counted_store(uri: str, cache: Path | None) -> Any:
    """A store on ``uri`` whose requests are counted, reading through ``cache``."""
    from cas.chunks._cache import LocalCache
    from cas.store import Store
    from cas.testing.faults import FaultyBackend

    plain = Store.open(uri, create=False, cache=False)
    local = LocalCache(cache, uri) if cache is not None else None
    return Store(FaultyBackend(plain.backend), plain.config, cache=local)


def requests(store: Any) -> int:
    return int(sum(store.backend.calls.values()))


def chunk_gets(store: Any) -> int:
    return sum(1 for key in store.backend.keys["get"] if key.startswith("chunks/"))


def one_tensor(store: Any, ref: str) -> tuple[int, int]:
    """Read the middle tensor of a stored safetensors file through cas://; returns
    (chunk requests made, chunks that hold the header and the tensor)."""
    from cas.integrations.fsspec import CasFileSystem

    fs = CasFileSystem(store=store, skip_instance_cache=True)
    entry = store.manifest(ref).entries[0]
    before = chunk_gets(store)
    with fs.open(ref) as stream:
        length = int.from_bytes(stream.read(8), "little")
        header = json.loads(stream.read(length))
        names = sorted(k for k in header if k != "__metadata__")
        start, end = header[names[len(names) // 2]]["data_offsets"]
        stream.seek(8 + length + start)
        stream.read(end - start)
    spans = [(0, 8 + length), (8 + length + start, 8 + length + end)]
    needed, offset = 0, 0
    for chunk in entry.chunks:
        if any(offset < hi and offset + chunk.length > lo for lo, hi in spans):
            needed += 1
        offset += chunk.length
    return chunk_gets(store) - before, needed


def timer(out: dict[str, float]) -> Callable[[str, Callable[[], object]], None]:
    """Times a step into ``out``: wall seconds under its name, this process's CPU
    seconds (every thread) under ``NAME cpu`` (the S3 server's own CPU is not in it)."""

    def timed(name: str, fn: Callable[[], object]) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        out[f"{name} cpu"] = time.process_time() - cpu
        out[name] = time.perf_counter() - wall

    return timed


def one_repeat(repeat: int, info: dict[str, Any], scratch: Path) -> dict[str, float]:
    from cas.store import Store

    v1, v2 = Path(info["paths"]["v1"]), Path(info["paths"]["v2"])
    uri = f"s3://cas-bench-cache/r{repeat}"
    Store.init(uri, create_bucket=True)
    out: dict[str, float] = {}
    timed = timer(out)
    writer = counted_store(uri, None)
    writer.put(v1, "ckpt")
    out["put v1 requests/GB"] = requests(writer) / (info["size"] / GB)
    writer.put(v2, "ckpt")

    plain = counted_store(uri, None)
    timed("get, no cache", lambda: plain.get("ckpt@1", scratch / "v1-plain"))
    (scratch / "v1-plain").unlink()
    cache = scratch / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    reader = counted_store(uri, cache)
    dest = scratch / "v1"
    timed("cold get", lambda: reader.get("ckpt@1", dest))
    out["cold get requests/GB"] = requests(reader) / (info["size"] / GB)
    out["cold get chunk requests"] = chunk_gets(reader)
    before = chunk_gets(reader)
    warm_dest = scratch / "v1-warm"
    timed("warm get", lambda: reader.get("ckpt@1", warm_dest))
    out["warm get chunk requests"] = chunk_gets(reader) - before
    if repeat == 0:
        assert sha256(warm_dest) == info["sha256"]["v1"], "warm get restored different bytes"
    warm_dest.unlink()
    link_gets(reader_for=lambda: counted_store(uri, scratch / "cache-link"), info=info,
              scratch=scratch, timed=timed, out=out, check=repeat == 0)  # fmt: skip

    uncached = counted_store(uri, None)
    fresh = scratch / "v2-fresh"
    timed("fresh get v2", lambda: uncached.get("ckpt@2", fresh))
    fresh.unlink()
    result: dict[str, Any] = {}

    def update() -> None:
        result["r"] = uncached.restore("ckpt@2", dest, update=True)

    timed("update v1->v2", update)
    if repeat == 0:
        assert sha256(dest) == info["sha256"]["v2"], "update gave different bytes"
    out["update fetched MB"] = result["r"].fetched_bytes / MB
    out["changed chunks stored MB"] = changed_stored_bytes(uncached) / MB
    dest.unlink()

    holder: dict[str, tuple[int, int]] = {}
    timed("fsspec one tensor", lambda: holder.update(r=one_tensor(uncached, "ckpt@1")))
    out["fsspec chunk requests"], out["header+tensor chunks"] = holder["r"]
    uncached.backend.delete([i.key for i in uncached.backend.list_objects()])
    return out


def link_gets(
    *,
    reader_for: Callable[[], Any],
    info: dict[str, Any],
    scratch: Path,
    timed: Callable[[str, Callable[[], object]], None],
    out: dict[str, float],
    check: bool,
) -> None:
    """Step 2 again with ``link=True``, from an empty cache of its own: the cold
    get keeps the restored file in the cache, the warm one links it."""
    shutil.rmtree(scratch / "cache-link", ignore_errors=True)
    reader = reader_for()
    cold, warm = scratch / "v1-link-cold", scratch / "v1-link-warm"
    timed("cold get --link", lambda: reader.restore("ckpt@1", cold, link=True))
    before = chunk_gets(reader)
    held: dict[str, Any] = {}
    timed("warm get --link", lambda: held.update(r=reader.restore("ckpt@1", warm, link=True)))
    out["warm get --link chunk requests"] = chunk_gets(reader) - before
    out["warm get --link linked MB"] = held["r"].linked_bytes / MB
    if check:
        assert sha256(warm) == info["sha256"]["v1"], "a linked get restored different bytes"
    for path in (cold, warm):
        path.unlink()
    shutil.rmtree(scratch / "cache-link", ignore_errors=True)


def changed_stored_bytes(store: Any) -> int:
    """Stored size of the chunks v2 holds and v1 does not."""
    from cas.repository import _layout as layout

    old = {c.digest for c in store.manifest("ckpt@1").entries[0].chunks}
    new = {c.digest for c in store.manifest("ckpt@2").entries[0].chunks} - old
    wanted = {layout.chunk_key(d) for d in new}
    return sum(i.size for i in store.backend.list_objects("chunks/") if i.key in wanted)


def report(info: dict[str, Any], runs: list[dict[str, float]]) -> dict[str, Any]:
    med = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
    print(
        f"\ncheckpoint: {info['size'] / MB:,.0f} MB, {info['tensors']} tensors, "
        f"{info['changed']} changed in v2; {len(runs)} repeat(s), medians\n"
    )
    for name in TIMES:
        print(f"{name:<20} {med[name]:>8.2f} s wall {med[name + ' cpu']:>8.2f} s CPU")
    print()
    for name in med:
        if name not in TIMES and not name.endswith(" cpu"):
            print(f"{name:<28} {med[name]:>10.1f}")
    ratios = {
        "cold get / warm get": med["cold get"] / med["warm get"],
        "no cache / warm get": med["get, no cache"] / med["warm get"],
        "cold / warm get, --link": med["cold get --link"] / med["warm get --link"],
        "cold get / warm get --link": med["cold get"] / med["warm get --link"],
        "fresh get / update": med["fresh get v2"] / med["update v1->v2"],
        "update fetched / changed": med["update fetched MB"] / med["changed chunks stored MB"],
        "full get / one tensor": med["cold get"] / med["fsspec one tensor"],
    }
    targets = {
        "cold get / warm get": ">= 10",
        "no cache / warm get": "(context)",
        "cold / warm get, --link": ">= 10",
        "cold get / warm get --link": ">= 10",
        "fresh get / update": ">= 5",
        "update fetched / changed": "<= 1.10",
        "full get / one tensor": ">= 20",
    }
    print()
    for name, ratio in ratios.items():
        print(f"{name:<28} {ratio:>8.2f}   target {targets[name]}")
    return {"checkpoint": info, "runs": runs, "medians": med, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="checkpoint size (default 1G)")
    parser.add_argument("--tensor-size", default="8M", help="bytes per tensor (default 8M)")
    parser.add_argument("--changed", type=float, default=0.10, help="fraction of tensors changed")
    parser.add_argument("--repeat", type=int, default=3)
    default_workdir = Path(tempfile.gettempdir()) / "cas-bench-s3"
    parser.add_argument("--workdir", type=Path, default=default_workdir)
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)

    info = checkpoint(
        args.workdir, parse_size(args.size), parse_size(args.tensor_size), args.changed
    )
    server = servers.start_moto()
    os.environ.update(server.env)
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="cas-bench-cache-") as scratch:
            for repeat in range(args.repeat):
                runs.append(one_repeat(repeat, info, Path(scratch)))
                print(f"repeat {repeat + 1}/{args.repeat} done", file=sys.stderr, flush=True)
    finally:
        server.stop()
    doc = report(info, runs)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
