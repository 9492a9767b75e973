"""Build a large synthetic local store cheaply, and measure ``cas gc`` on it.

    .venv/bin/python scripts/make_big_store.py /tmp/big                # 1,000,000 chunks
    .venv/bin/python scripts/make_big_store.py /tmp/big --measure      # + time and RSS of gc
    .venv/bin/python scripts/make_big_store.py /tmp/big --chunks 100000 --manifests 1000

The store is a real format-1 store (``cas verify`` and ``cas get`` work on
it), written with plain file calls instead of through the backend, without
fsync: tiny chunks (16 raw bytes each) make a million objects take seconds
of I/O rather than gigabytes. Its shape:

* ``--manifests`` versions over ``--manifests / 10`` keys (10 versions each),
  one file per version, made of a run of chunks of its own plus a few
  chunks shared with the versions before it (as checkpoints share layers);
* ``--deleted`` of the versions are deleted (tombstones): their own chunks
  and their manifests are garbage;
* ``--orphans`` of the chunks are referenced by nothing (a crashed put's);
* every object's modification time is ``--age`` in the past, so the default
  grace lets gc delete all the garbage.

``--measure`` then runs ``cas gc --json`` (once with ``--dry-run``, once for
real) under ``/usr/bin/time`` and prints wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import blake3

from cas.chunks import _codec as codec
from cas.chunks._chunking import ChunkerParams
from cas.digest import Digest
from cas.repository import _layout as layout
from cas.repository._manifest import ChunkRef, Entry, Manifest, canonical_json
from cas.store import Store

RAW_SIZE = 16
SHARED = 20  # chunks each version shares with the one before it


def _raw(i: int) -> bytes:
    """The content of chunk ``i``: distinct for every i, recomputable without storing it."""
    return i.to_bytes(8, "big") + (i * 0x9E3779B97F4A7C15 % (1 << 64)).to_bytes(8, "big")


def _write(path: str, data: bytes, mtime: float) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.utime(fd, (mtime, mtime))
    finally:
        os.close(fd)


def build(
    root: Path, chunks: int, manifests: int, deleted: float, orphans: float, age: float
) -> dict[str, int]:
    if root.exists():
        shutil.rmtree(root)
    Store.init(root, chunker=ChunkerParams.from_average(64 * 1024)).close()
    mtime = time.time() - age
    for prefix in (layout.CHUNKS, layout.MANIFESTS):
        for i in range(256):
            (root / prefix / f"{i:02x}").mkdir(parents=True, exist_ok=True)

    rng = random.Random(0)
    orphan_count = int(chunks * orphans)
    referenced = chunks - orphan_count
    own = max(1, referenced // manifests)
    digests: list[bytes] = []
    started = time.monotonic()
    for i in range(chunks):
        digest = blake3.blake3(_raw(i)).digest()
        digests.append(digest)
        _write(str(root / layout.chunk_key(Digest(digest))), codec.encode(_raw(i)), mtime)
        if i % 100_000 == 0 and i:
            print(f"  {i} chunks ({time.monotonic() - started:.0f}s)", file=sys.stderr)

    keys = max(1, manifests // 10)
    deleted_count = 0
    for m in range(manifests):
        key, number = f"synthetic/k{m % keys:05d}", m // keys + 1
        start = m * own
        mine = list(range(start, min(start + own, referenced)))
        shared = list(range(max(0, start - SHARED), start))
        refs = tuple(ChunkRef(Digest(digests[i]), RAW_SIZE) for i in shared + mine)
        entry = Entry(
            path="model.bin",
            type="file",
            mode=0o644,
            size=RAW_SIZE * len(refs),
            digest=Digest(blake3.blake3(b"".join(_raw(i) for i in shared + mine)).digest()),
            chunks=refs,
        )
        created = "2024-01-01T00:00:00.000000Z"
        manifest = Manifest(key=key, kind="file", created=created, entries=(entry,))
        blob = manifest.to_bytes()
        manifest_id = Digest(blake3.blake3(blob).digest())
        _write(str(root / layout.manifest_key(manifest_id)), blob, mtime)
        ref = root / layout.version_key(key, number)
        ref.parent.mkdir(parents=True, exist_ok=True)
        gone = rng.random() < deleted
        deleted_count += gone
        body = {"manifest": None if gone else manifest_id.hex, "created": created}
        _write(str(ref), canonical_json(body), mtime)
    return {
        "chunks": chunks,
        "manifests": manifests,
        "orphan_chunks": orphan_count,
        "deleted_versions": deleted_count,
    }


def measure(root: Path, *extra: str) -> dict[str, object]:
    cas = Path(sys.executable).parent / "cas"
    argv = ["/usr/bin/time", "-f", "%e %M", str(cas), "--store", str(root), "gc", "--json", *extra]
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    seconds, rss_kib = proc.stderr.strip().splitlines()[-1].split()
    report = json.loads(proc.stdout)
    return {"wall_seconds": float(seconds), "peak_rss_mib": int(rss_kib) / 1024, "report": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--manifests", type=int, default=10_000)
    parser.add_argument("--deleted", type=float, default=0.1, help="share of versions deleted")
    parser.add_argument("--orphans", type=float, default=0.05, help="share of chunks unreferenced")
    parser.add_argument("--age", type=float, default=2 * 86400, help="seconds in the past")
    parser.add_argument("--measure", action="store_true", help="then time `cas gc` on it")
    parser.add_argument("--skip-build", action="store_true", help="measure an existing store")
    args = parser.parse_args()
    if not args.skip_build:
        began = time.monotonic()
        shape = build(args.path, args.chunks, args.manifests, args.deleted, args.orphans, args.age)
        print(json.dumps({**shape, "build_seconds": round(time.monotonic() - began, 1)}))
    if args.measure:
        for extra in (["--dry-run"], []):
            result = measure(args.path, *extra)
            report = result.pop("report")
            assert isinstance(report, dict)
            keep = ("scanned", "reachable", "deleted", "bytes_reclaimed", "mark_bytes", "seconds")
            print(json.dumps({"gc": extra or ["(real)"], **result, **{k: report[k] for k in keep}}))


if __name__ == "__main__":
    main()
