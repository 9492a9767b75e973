"""Benchmark distributed checkpoints: cas's CasWriter/CasReader against DCP's own
FileSystemWriter/FileSystemReader, measured in the same run.

Two ranks (gloo on CPU) save and load a transformer-shaped model whose
parameters are DTensors sharded on their first dimension, as FSDP shards
them. Weights are drawn from N(0, 0.02), never random bytes. Run from the
repository root::

    .venv/bin/python scripts/bench_dcp.py                        # 512 MB, fp32 and bf16, 3 rounds
    .venv/bin/python scripts/bench_dcp.py --size-mb 64 --repeat 1  # a quick look
    .venv/bin/python scripts/bench_dcp.py --json bench-out/dcp.json

Each round, for each dtype, a fresh pair of rank processes does, in order:

1. ``first save``: FileSystemWriter to a new folder, then ``cas put`` of that
   folder into a new store (the way without CasWriter), against CasWriter
   into another new store; the two go first in turn from round to round;
2. ``10% changed``: every tenth tensor moves by a fine-tuning-sized step
   (N(0, 0.001)); FileSystemWriter writes it whole to a new folder, CasWriter
   saves it with the first version as parent;
3. ``full step``: every weight moves a little (1e-4 * N(0, 1), on fp32
   master weights, then cast); CasWriter saves it naming no parent, as a
   training loop does, so its deltas are of the key's latest version (the
   previous one), chosen by cas;
4. ``async``: two more 10% saves, one with ``dcp.save`` and one with
   ``dcp.async_save``; what is timed is how long the training loop is held.

Then two more fresh pairs load the first version, one through
FileSystemReader from the folder and one through CasReader from the store,
into zero-filled DTensors of the same sharding. Their peak RSS during the
load is the kernel's high-water mark (``VmHWM``, reset just before the
load), given beside the RSS they had just before it, which holds torch and
the destination shard. Times are wall time from a barrier to a barrier;
CPU times are the processes' own (user and system, every thread, both
ranks; a ``cas put`` subprocess counts with its rank), which the load of a
shared machine disturbs far less than wall time. Stored bytes are the
sizes of the objects under ``chunks/`` and ``manifests/``. Ratios are
computed within each round; the report gives medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.checkpoint.state_dict_saver import async_save, save
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cas.integrations.dcp import CasReader, CasWriter  # noqa: E402
from cas.store import Store  # noqa: E402

WORLD = 2
MB = 1_000_000
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HIDDEN, FFN = 1024, 4096
KEY = "bench/model"


# -- the model ---------------------------------------------------------------------------


def model_shapes(size_bytes: int, itemsize: int) -> list[tuple[str, tuple[int, ...]]]:
    """Transformer blocks (attention, MLP, norms) until the model holds ``size_bytes``."""
    block = [
        *[(f"self_attn.{m}_proj.weight", (HIDDEN, HIDDEN)) for m in "qkvo"],
        ("mlp.gate_proj.weight", (FFN, HIDDEN)),
        ("mlp.up_proj.weight", (FFN, HIDDEN)),
        ("mlp.down_proj.weight", (HIDDEN, FFN)),
        ("input_layernorm.weight", (HIDDEN,)),
        ("post_attention_layernorm.weight", (HIDDEN,)),
    ]
    per_block = sum(int(np.prod(shape)) for _, shape in block) * itemsize
    blocks = max(1, -(-size_bytes // per_block))
    return [(f"layers.{i}.{name}", shape) for i in range(blocks) for name, shape in block]


def local_rows(shape: tuple[int, ...], rank: int) -> slice:
    rows = shape[0] // WORLD
    return slice(rank * rows, (rank + 1) * rows)


def master_shard(index: int, shape: tuple[int, ...], rank: int, step: int) -> np.ndarray:
    """This rank's rows of an fp32 master weight after ``step`` full fine-tuning steps."""
    rows = local_rows(shape, rank)
    local = (rows.stop - rows.start, *shape[1:])
    base = np.random.default_rng([index, rank]).standard_normal(local, dtype=np.float32)
    base *= np.float32(0.02)
    if len(shape) == 1:
        base += np.float32(1.0)  # norm weights sit around 1
    for s in range(1, step + 1):
        noise = np.random.default_rng([index, rank, s]).standard_normal(local, dtype=np.float32)
        base += np.float32(1e-4) * noise
    return base


def tweak(tensor: torch.Tensor, index: int, rank: int, round_: int) -> None:
    """A fine-tuning-sized step on one tensor (N(0, 0.001))."""
    rng = np.random.default_rng([index, rank, 1000 + round_])
    noise = torch.from_numpy(rng.standard_normal(tuple(tensor.shape), dtype=np.float32))
    tensor.add_((noise * 1e-3).to(tensor.dtype))


class Model:
    """The state dict of one rank: DTensors whose local shards this rank made."""

    def __init__(self, size_bytes: int, dtype: torch.dtype, rank: int) -> None:
        self.dtype = dtype
        self.rank = rank
        self.mesh = init_device_mesh("cpu", (WORLD,))
        self.shapes = model_shapes(size_bytes, torch.empty(0, dtype=dtype).element_size())
        self.local: dict[str, torch.Tensor] = {}
        self.set_step(0)

    def set_step(self, step: int) -> None:
        for index, (name, shape) in enumerate(self.shapes):
            shard = torch.from_numpy(master_shard(index, shape, self.rank, step)).to(self.dtype)
            self.local[name] = shard

    def state(self) -> dict[str, Any]:
        tensors = {
            name: DTensor.from_local(self.local[name], self.mesh, [Shard(0)], run_check=False)
            for name, _ in self.shapes
        }
        return {"model": tensors}

    def empty_state(self) -> dict[str, Any]:
        tensors = {
            name: DTensor.from_local(torch.zeros_like(self.local[name]), self.mesh, [Shard(0)])
            for name, _ in self.shapes
        }
        return {"model": tensors}

    def change_tenth(self, round_: int) -> None:
        for index, (name, _) in enumerate(self.shapes):
            if index % 10 == round_ % 10:
                tweak(self.local[name], index, self.rank, round_)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.local.values()) * WORLD


# -- measuring ------------------------------------------------------------------------------


def timed(action: Callable[[], Any], cpu: dict[str, float] | None = None, name: str = "") -> float:
    """Wall time of ``action`` from a barrier to a barrier; its CPU time into ``cpu[name]``."""
    dist.barrier()
    started, used = time.perf_counter(), time.process_time()
    action()
    if cpu is not None:
        cpu[name] = time.process_time() - used
    dist.barrier()
    return time.perf_counter() - started


def stored_bytes(store: Path) -> int:
    total = 0
    for prefix in ("chunks", "manifests"):
        for folder, _, files in os.walk(store / prefix):
            total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cas_put(folder: Path, store: Path) -> tuple[float, float]:
    """Wall and CPU time of ``cas put`` of a folder, in a process of its own."""
    command = [sys.executable, "-m", "cas", "--store", str(store), "put", str(folder), KEY]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


# -- the jobs, run by both ranks ----------------------------------------------------------------


def save_job(rank: int, work: Path, size: int, dtype: torch.dtype, round_: int) -> dict[str, Any]:
    """Every save of one round; wall times on both ranks, CPU times (``cpu_*``) per rank."""
    model = Model(size, dtype, rank)
    out: dict[str, Any] = {"size": model.nbytes}
    cpu: dict[str, float] = {}
    fs1, fs2 = work / "fs-v1", work / "fs-v2"
    store, put_store = work / "store", work / "put-store"

    def timed_save(name: str, writer: Any) -> None:
        out[name] = timed(lambda: save(model.state(), storage_writer=writer), cpu, name)

    def fs_first() -> None:
        timed_save("fs_save", FileSystemWriter(fs1))
        out["cas_put"], cpu["cas_put"] = cas_put(fs1, put_store) if rank == 0 else (0.0, 0.0)
        dist.barrier()

    def cas_first() -> None:
        timed_save("cas_save", CasWriter(store, KEY))

    for step in (fs_first, cas_first) if round_ % 2 == 0 else (cas_first, fs_first):
        step()
    out["cas_stored_1"] = stored_bytes(store)
    out["put_stored"] = stored_bytes(put_store)

    model.change_tenth(round_)
    timed_save("fs_save_10", FileSystemWriter(fs2))
    timed_save("cas_save_10", CasWriter(store, KEY, parents=[f"{KEY}@1"]))
    out["cas_stored_2"] = stored_bytes(store)

    model.set_step(1)  # every weight moves: a full fine-tuning step from version 1
    timed_save("cas_save_full", CasWriter(store, KEY))  # no parent: cas takes the latest, @2
    out["cas_stored_3"] = stored_bytes(store)
    if rank == 0:
        storage = Store.open(store).show(f"{KEY}@3").storage
        assert storage.delta_base == f"{KEY}@2", storage  # a delta base, not a parent

    model.change_tenth(round_ + 1)
    timed_save("sync_blocked", CasWriter(store, KEY, parents=[f"{KEY}@3"]))
    model.change_tenth(round_ + 2)
    writer = CasWriter(store, KEY, parents=[f"{KEY}@4"])
    dist.barrier()
    started = time.perf_counter()
    future = async_save(model.state(), storage_writer=writer)
    assert isinstance(future, Future)  # a plain future unless staging in the background
    out["async_blocked"] = time.perf_counter() - started
    future.result()
    out["async_total"] = time.perf_counter() - started
    out.update({f"cpu_{name}": seconds for name, seconds in cpu.items()})
    return out


def load_job(rank: int, work: Path, size: int, dtype: torch.dtype, reader: str) -> dict[str, Any]:
    model = Model(size, dtype, rank)
    target = model.empty_state()
    model.local.clear()  # only the destination stays in memory
    source: Any = (
        FileSystemReader(work / "fs-v1")
        if reader == "fs"
        else CasReader(work / "store", f"{KEY}@1")
    )
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts from here
    cpu = time.process_time()
    seconds = timed(lambda: load(target, storage_reader=source))
    cpu = time.process_time() - cpu
    peak = rss_kib("VmHWM")
    return {
        "load": seconds,
        "cpu": cpu,
        "rss_before_mib": before / 1024,
        "rss_peak_mib": peak / 1024,
    }


def _rank(rank: int, port: int, job: str, args: tuple[Any, ...], results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=timedelta(minutes=30),
    )  # fmt: skip
    try:
        value = (save_job if job == "save" else load_job)(rank, *args)
        results.put((rank, value))
    finally:
        dist.destroy_process_group()


def run_pair(job: str, *args: Any) -> list[dict[str, Any]]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=_rank, args=(rank, port, job, args, results))
        for rank in range(WORLD)
    ]
    for process in processes:
        process.start()
    got = dict(results.get(timeout=3600) for _ in range(WORLD))
    for process in processes:
        process.join()
        if process.exitcode:
            raise RuntimeError(f"a rank of the {job} job failed ({process.exitcode})")
    return [got[rank] for rank in range(WORLD)]


# -- the report -----------------------------------------------------------------------------------


def one_round(work: Path, size: int, dtype_name: str, round_: int) -> dict[str, float]:
    dtype = DTYPES[dtype_name]
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ranks = run_pair("save", work, size, dtype, round_)
    saved = ranks[0]
    cpu = {k[4:]: sum(r[k] for r in ranks) for k in saved if k.startswith("cpu_")}
    fs_load, cas_load = (run_pair("load", work, size, dtype, r) for r in ("fs", "cas"))
    raw = saved["size"]
    shard_mib = raw / WORLD / 2**20
    return {
        "size_mb": raw / MB,
        "first_save_s": saved["cas_save"],
        "fs_then_put_s": saved["fs_save"] + saved["cas_put"],
        "fs_save_s": saved["fs_save"],
        "first_save_vs_fs_then_put": (saved["fs_save"] + saved["cas_put"]) / saved["cas_save"],
        "first_save_cpu_s": cpu["cas_save"],
        "fs_then_put_cpu_s": cpu["fs_save"] + cpu["cas_put"],
        "first_stored_ratio": saved["cas_stored_1"] / raw,
        "put_stored_ratio": saved["put_stored"] / raw,
        "save_10_s": saved["cas_save_10"],
        "fs_save_10_s": saved["fs_save_10"],
        "save_10_speedup": saved["fs_save_10"] / saved["cas_save_10"],
        "save_10_cpu_s": cpu["cas_save_10"],
        "fs_save_10_cpu_s": cpu["fs_save_10"],
        "save_10_stored_ratio": (saved["cas_stored_2"] - saved["cas_stored_1"]) / raw,
        "full_step_s": saved["cas_save_full"],
        "full_step_stored_ratio": (saved["cas_stored_3"] - saved["cas_stored_2"]) / raw,
        "load_s": cas_load[0]["load"],
        "fs_load_s": fs_load[0]["load"],
        "load_vs_fs": cas_load[0]["load"] / fs_load[0]["load"],
        "load_cpu_s": sum(r["cpu"] for r in cas_load),
        "fs_load_cpu_s": sum(r["cpu"] for r in fs_load),
        "shard_mib": shard_mib,
        "load_rss_before_mib": max(r["rss_before_mib"] for r in cas_load),
        "load_rss_peak_mib": max(r["rss_peak_mib"] for r in cas_load),
        "load_rss_added_mib": max(r["rss_peak_mib"] - r["rss_before_mib"] for r in cas_load),
        "fs_load_rss_added_mib": max(r["rss_peak_mib"] - r["rss_before_mib"] for r in fs_load),
        "sync_blocked_s": saved["sync_blocked"],
        "async_blocked_s": saved["async_blocked"],
        "async_total_s": saved["async_total"],
    }


LINES = [
    ("checkpoint size", "size_mb", "{:.0f} MB", None),
    ("first save: CasWriter", "first_save_s", "{:.2f} s", None),
    ("first save: FileSystemWriter + cas put", "fs_then_put_s", "{:.2f} s", None),
    ("  ratio (above 1: CasWriter faster)", "first_save_vs_fs_then_put", "{:.2f}x", ">= 1"),
    ("  CPU time of both ranks, CasWriter", "first_save_cpu_s", "{:.2f} s", None),
    ("  CPU time, FileSystemWriter + cas put", "fs_then_put_cpu_s", "{:.2f} s", None),
    ("first save: stored / raw", "first_stored_ratio", "{:.4f}", "<= 0.85 fp32, 0.70 bf16"),
    ("  (cas put of the folder: stored / raw)", "put_stored_ratio", "{:.4f}", None),
    ("10% changed: CasWriter", "save_10_s", "{:.2f} s", None),
    ("10% changed: FileSystemWriter", "fs_save_10_s", "{:.2f} s", None),
    ("  speed-up", "save_10_speedup", "{:.2f}x", ">= 3"),
    ("  CPU time of both ranks, CasWriter", "save_10_cpu_s", "{:.2f} s", None),
    ("  CPU time of both ranks, FileSystemWriter", "fs_save_10_cpu_s", "{:.2f} s", None),
    ("  stored / checkpoint", "save_10_stored_ratio", "{:.4f}", "<= 0.15"),
    ("full step: CasWriter", "full_step_s", "{:.2f} s", None),
    ("  stored / checkpoint", "full_step_stored_ratio", "{:.4f}", "<= 0.30 (bf16)"),
    ("load: CasReader", "load_s", "{:.2f} s", None),
    ("load: FileSystemReader", "fs_load_s", "{:.2f} s", None),
    ("  ratio (below 1: CasReader faster)", "load_vs_fs", "{:.2f}x", "<= 1.5"),
    ("  CPU time of both ranks, CasReader", "load_cpu_s", "{:.2f} s", None),
    ("  CPU time of both ranks, FileSystemReader", "fs_load_cpu_s", "{:.2f} s", None),
    ("  shard per rank", "shard_mib", "{:.0f} MiB", None),
    ("  peak RSS per rank (torch and the shard included)", "load_rss_peak_mib", "{:.0f} MiB", None),
    ("  RSS added by the load, CasReader", "load_rss_added_mib", "{:.0f} MiB", "<= 200"),
    ("  RSS added by the load, FileSystemReader", "fs_load_rss_added_mib", "{:.0f} MiB", None),
    ("sync save (10% changed): loop held", "sync_blocked_s", "{:.2f} s", None),
    ("async save (10% changed): loop held", "async_blocked_s", "{:.2f} s", None),
    ("  async save done after", "async_total_s", "{:.2f} s", None),
]


def report(medians: dict[str, dict[str, float]]) -> str:
    names = list(medians)
    out = ["| | " + " | ".join(names) + " | target |", "|---|" + "---|" * (len(names) + 1)]
    for label, key, form, target in LINES:
        cells = [form.format(medians[name][key]) for name in names]
        out.append(f"| {label} | " + " | ".join(cells) + f" | {target or ''} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=512, help="checkpoint size (default 512)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cas-bench-dcp"))
    parser.add_argument("--json", type=Path, help="write every round's figures here")
    args = parser.parse_args(argv)
    rounds: dict[str, list[dict[str, float]]] = {}
    for round_ in range(args.repeat):
        for name in args.dtypes.split(","):
            row = one_round(args.workdir / name, args.size_mb * MB, name, round_)
            rounds.setdefault(name, []).append(row)
            print(
                f"round {round_ + 1} {name}: "
                + json.dumps({k: round(v, 4) for k, v in row.items()}),
                flush=True,
            )
    shutil.rmtree(args.workdir, ignore_errors=True)
    medians = {
        name: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        for name, rows in rounds.items()
    }
    print(f"\nmedians of {args.repeat} round(s), {WORLD} ranks:\n")
    print(report(medians))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rounds": rounds, "medians": medians}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
