"""cas against boto3's own transfers, on a local S3 server (moto), in one run.

Run from the repository root (the virtualenv has boto3, moto and numpy)::

    .venv/bin/python scripts/bench_s3.py                  # 1 GB checkpoint, 3 repeats
    .venv/bin/python scripts/bench_s3.py --size 256M --repeat 1   # quick
    .venv/bin/python scripts/bench_s3.py --cli            # time the cas command instead of the API
    .venv/bin/python scripts/bench_s3.py --json out.json

What is timed, per repeat, against one moto_server process on 127.0.0.1:

1. ``upload_file`` of v1 (boto3's transfer manager: 8 MiB parts, 10 threads);
2. ``cas put`` of v1 into a fresh store, then of v2 (the same checkpoint
   with 10% of its tensors changed, as fine-tuning changes them) under the
   same key;
3. ``download_file`` of v1 (8 MiB ranged GETs, 10 threads), and ``cas get``
   of v1; the restored file is checked against v1's SHA-256 (untimed).

The checkpoint is safetensors-like: fp32 tensors of N(0, 0.02) values, not
random bytes, so compression sees what it would see on real weights. cas is
timed through its Python API (``Store.put`` / ``Store.get``), on the same
footing as boto3's calls in this process; ``--cli`` times the ``cas``
command instead, interpreter start-up included. Medians over the repeats are
reported, with the targets: the first put no slower than ``upload_file``, the
second at least 5 times faster, ``cas get`` no slower than ``download_file``.

moto keeps objects in memory and answers a ranged GET by copying the whole
object first, so ``download_file`` of one large object is far slower on moto
than on S3. ``get_object`` (one streamed GET) is timed too, as a baseline
that does not suffer from it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # servers.py: start and stop moto_server
sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers  # noqa: E402
from bench_data import Tensor, write_safetensors  # noqa: E402

MB = 1_000_000
MiB = 1 << 20
COLS = 4096
STEPS = ("upload_file", "cas put v1", "cas put v2", "download_file", "cas get", "get_object")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


# -- data -------------------------------------------------------------------------------------


def tensors(total: int, tensor_bytes: int, changed: set[int]) -> list[Tensor]:
    """fp32 weight-like tensors; those in ``changed`` get a fine-tuning-sized update."""
    rows = max(1, tensor_bytes // (4 * COLS))
    count = max(1, total // (rows * 4 * COLS))

    def make(i: int) -> Callable[[], np.ndarray]:
        def weights() -> np.ndarray:
            rng = np.random.default_rng([7, i])
            shape = (rows, COLS)
            values: np.ndarray = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            if i in changed:
                step = np.random.default_rng([8, i]).standard_normal(shape, np.float32)
                values += step * np.float32(1e-3)
            return values

        return weights

    return [Tensor(f"layers.{i:04d}.weight", "F32", (rows, COLS), make(i)) for i in range(count)]


def checkpoint(workdir: Path, total: int, tensor_bytes: int, fraction: float) -> dict[str, Any]:
    """v1 and v2 under ``workdir``, generated once and reused while the parameters match."""
    key = {"total": total, "tensor_bytes": tensor_bytes, "fraction": fraction, "generator": 1}
    info_path = workdir / "checkpoint.json"
    try:
        info: dict[str, Any] = json.loads(info_path.read_text())
        if info["key"] == key and all(Path(p).exists() for p in info["paths"].values()):
            return info
    except (OSError, ValueError, KeyError):
        pass
    workdir.mkdir(parents=True, exist_ok=True)
    count = len(tensors(total, tensor_bytes, set()))
    every = max(1, round(1 / fraction)) if fraction > 0 else count + 1
    changed = set(range(every // 2, count, every))
    info = {"key": key, "tensors": count, "changed": len(changed), "paths": {}, "sha256": {}}
    for name, which in (("v1", set()), ("v2", changed)):
        path = workdir / f"{name}.safetensors"
        print(f"writing {path} ...", file=sys.stderr, flush=True)
        written = write_safetensors(path, tensors(total, tensor_bytes, which), {"format": "pt"})
        info["paths"][name] = str(path)
        info["sha256"][name] = written.sha256
        info["size"] = written.size
    info_path.write_text(json.dumps(info))
    return info


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(16 * MiB):
            digest.update(block)
    return digest.hexdigest()


# -- the runs ---------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cas_cli(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "cas", *argv], check=True, stdout=subprocess.DEVNULL)


def one_repeat(
    repeat: int, args: argparse.Namespace, info: dict[str, Any], client: Any, scratch: Path
) -> dict[str, float]:
    from boto3.s3.transfer import TransferConfig

    from cas.chunks._chunking import ChunkerParams
    from cas.store import Store

    v1, v2 = Path(info["paths"]["v1"]), Path(info["paths"]["v2"])
    key = f"r{repeat}/model.safetensors"
    uri = f"s3://cas-bench/r{repeat}"
    out: dict[str, float] = {}
    config = TransferConfig()  # boto3's defaults, as most code uses them
    out["upload_file"] = timed(lambda: client.upload_file(str(v1), "baseline", key, Config=config))
    dest = scratch / "restored.safetensors"
    chunking = ["--chunk-avg", args.chunk_avg] if args.chunk_avg else []
    if args.cli:
        cas_cli("--store", uri, "init", "--create-bucket", *chunking)
        jobs = ["--jobs", str(args.jobs)] if args.jobs else []
        out["cas put v1"] = timed(lambda: cas_cli("--store", uri, "put", str(v1), "ckpt", *jobs))
        out["cas put v2"] = timed(lambda: cas_cli("--store", uri, "put", str(v2), "ckpt", *jobs))
        out["cas get"] = timed(lambda: cas_cli("--store", uri, "get", "ckpt@1", str(dest), *jobs))
        store = Store.open(uri, create=False)
    else:
        chunker = ChunkerParams.from_average(parse_size(args.chunk_avg)) if args.chunk_avg else None
        store = Store.init(uri, create_bucket=True, chunker=chunker)
        out["cas put v1"] = timed(lambda: store.put(v1, "ckpt", workers=args.jobs))
        out["cas put v2"] = timed(lambda: store.put(v2, "ckpt", workers=args.jobs))
        out["cas get"] = timed(lambda: store.get("ckpt@1", dest, workers=args.jobs))
    if repeat == 0:
        assert sha256(dest) == info["sha256"]["v1"], "cas get restored different bytes"
        stats = store.stats()
        out["stored MB"] = stats.stored_bytes / MB
        out["v2 new chunks"] = stats.chunks - len(store.show("ckpt@1").entries[0].chunks)
    dest.unlink()
    fetched = scratch / "downloaded.safetensors"
    out["download_file"] = timed(
        lambda: client.download_file("baseline", key, str(fetched), Config=config)
    )
    fetched.unlink()
    out["get_object"] = timed(lambda: client.get_object(Bucket="baseline", Key=key)["Body"].read())
    # moto holds everything in memory: free this repeat's objects.
    client.delete_object(Bucket="baseline", Key=key)
    store.backend.delete([i.key for i in store.backend.list_objects()])
    store.close()
    return out


def report(info: dict[str, Any], runs: list[dict[str, float]]) -> dict[str, Any]:
    size = info["size"]
    medians = {step: statistics.median(r[step] for r in runs) for step in STEPS}
    print(
        f"\ncheckpoint: {size / MB:,.0f} MB, {info['tensors']} fp32 tensors, "
        f"{info['changed']} changed in v2; {len(runs)} repeat(s), medians\n"
    )
    print(f"{'step':<15} {'median s':>9} {'min s':>8} {'max s':>8} {'MB/s':>8}")
    for step in STEPS:
        values = [r[step] for r in runs]
        print(
            f"{step:<15} {medians[step]:>9.2f} {min(values):>8.2f} {max(values):>8.2f} "
            f"{size / MB / medians[step]:>8.0f}"
        )
    ratios = {
        "put v1: upload_file / cas": medians["upload_file"] / medians["cas put v1"],
        "put v2: upload_file / cas": medians["upload_file"] / medians["cas put v2"],
        "get: download_file / cas": medians["download_file"] / medians["cas get"],
        "get: get_object / cas": medians["get_object"] / medians["cas get"],
    }
    targets = {
        "put v1: upload_file / cas": 1.0,
        "put v2: upload_file / cas": 5.0,
        "get: download_file / cas": 1.0,
    }
    print()
    for name, ratio in ratios.items():
        target = targets.get(name)
        verdict = "" if target is None else (" ok" if ratio >= target else f" MISSED (>= {target})")
        goal = f"target >= {target:g}" if target is not None else "(context)"
        print(f"{name:<28} {ratio:>6.2f}x  {goal}{verdict}")
    first = runs[0]
    print(
        f"\nstored after both puts: {first['stored MB']:,.0f} MB; "
        f"v2 added {first['v2 new chunks']:.0f} chunks"
    )
    return {"checkpoint": info, "runs": runs, "medians": medians, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="checkpoint size (default 1G)")
    parser.add_argument("--tensor-size", default="8M", help="bytes per tensor (default 8M)")
    parser.add_argument("--changed", type=float, default=0.10, help="fraction of tensors changed")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=None, help="cas workers (default: backend's)")
    parser.add_argument("--cli", action="store_true", help="time the cas command, not the API")
    parser.add_argument("--chunk-avg", help="average chunk size of the cas store (default: cas's)")
    default_workdir = Path(tempfile.gettempdir()) / "cas-bench-s3"
    parser.add_argument("--workdir", type=Path, default=default_workdir)
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)

    size, tensor_size = parse_size(args.size), parse_size(args.tensor_size)
    info = checkpoint(args.workdir, size, tensor_size, args.changed)
    for path in info["paths"].values():
        sha256(Path(path))  # warm the page cache: every tool reads from memory

    import boto3
    from botocore.config import Config

    server = servers.start_moto()
    os.environ.update(server.env)
    runs = []
    try:
        client = boto3.client(
            "s3",
            endpoint_url=server.endpoint,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )
        client.create_bucket(Bucket="baseline")
        scratch = args.workdir / "scratch"
        scratch.mkdir(exist_ok=True)
        for repeat in range(args.repeat):
            print(f"repeat {repeat + 1}/{args.repeat} ...", file=sys.stderr, flush=True)
            runs.append(one_repeat(repeat, args, info, client, scratch))
    finally:
        server.stop()
    result = report(info, runs)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
