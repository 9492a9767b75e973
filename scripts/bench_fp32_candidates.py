"""Where the bytes of a training run's fp32 state go, and what other codings would save.

Measures, on the checkpoints of the training run of ``scripts/bench_formats.py``
(a small GPT-2 trained for real with AdamW, 20 steps between checkpoints),
in 1 MiB chunks, stored or estimated bytes over raw bytes, summed over
every pair of consecutive checkpoints:

* **layouts** of whole chunks: today's fp32 layout against the exponent
  byte kept exact (the sign moved next to the top mantissa bits);
* **deltas** of the weights (difference) and of ``exp_avg_sq`` (scaled
  difference) as cas codes them, against estimates: the order-0 entropy
  of their byte streams (what an ideal order-0 coder such as FSE would
  reach), the same entropy given the exponent of the base element, and
  zstd on four classes of elements split by the base's exponent;
* **re-basing**: differences from the checkpoint before, and from two and
  three before (what a chunk re-based on its chain's root costs);
* **Adam's first moment** (``exp_avg``): its exponent byte coded alone,
  as a residual against half the exponent of ``exp_avg_sq`` of the same
  element (|m| is bounded by about sqrt(v)), its entropy given that
  exponent, and how often its sign is the opposite of the weight's change.

Entropies are estimates (what a coder would need, without its tables), not
stored bytes.

    python scripts/bench_fp32_candidates.py [--run DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_formats import (  # noqa: E402
    log,
    run_model,
    sorted_checkpoints,
    state_bytes,
    training_run,
)

from cas.chunks import _codec as codec  # noqa: E402
from cas.chunks import _floatcodec as floatcodec  # noqa: E402
from cas.chunks import _scaled as scaled  # noqa: E402
from cas.chunks._floatcodec import Layout  # noqa: E402

ELEMENTS = 1 << 18  # fp32 elements in 1 MiB
DECAY = float(np.float32(0.999**20))  # exp_avg_sq's factor over 20 steps


def zstd(stream: Any) -> int:
    data = np.ascontiguousarray(stream, dtype=np.uint8)
    return min(len(floatcodec._compressor().compress(data.data)), len(data))


def entropy(counts: Any) -> float:
    """Bits to code the symbols counted, at their order-0 entropy."""
    counts = counts[counts > 0].astype(np.float64)
    return float(-(counts * np.log2(counts / counts.sum())).sum())


def conditional(symbols: Any, context: Any) -> float:
    """Bits to code ``symbols`` (bytes) given ``context`` (small integers), ideally."""
    joint = context.astype(np.int64) * 256 + symbols
    return entropy(np.bincount(joint)) - entropy(np.bincount(context.astype(np.int64)))


def byte_streams(words: Any) -> list[Any]:
    return [((words >> (8 * i)) & 0xFF).astype(np.uint8) for i in range(4)]


def chunks(new: Any, old: Any) -> Any:
    for at in range(0, len(new), ELEMENTS):
        yield new[at : at + ELEMENTS], old[at : at + ELEMENTS]


def layouts(new: Any) -> dict[str, float]:
    exact = 0
    for words, _ in chunks(new, new):
        sign, mantissa = words >> 31, words & 0x7FFFFF
        exact += zstd((words >> 23) & 0xFF) + zstd((sign << 7) | (mantissa >> 16))
        exact += zstd((mantissa >> 8) & 0xFF) + zstd(mantissa & 0xFF)
    today = sum(len(codec.encode_grouped(w.tobytes(), 4, Layout.FP32)) for w, _ in chunks(new, new))
    return {"fp32_layout": today, "exact_exponent_byte": exact}


def deltas(new: Any, old: Any, factor: float) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for words, base in chunks(new, old):
        if factor == 1.0:
            delta = floatcodec.difference(words.tobytes(), base.tobytes(), 4)
        else:
            delta = scaled.difference(words.tobytes(), base.tobytes(), factor)
        coded = np.frombuffer(delta, "<u4")
        out["coded"] += len(floatcodec.encode(delta, 4, Layout.PLAIN))
        exponent = (base >> 23) & 0xFF
        classes = np.searchsorted(np.percentile(exponent, [25, 50, 75]), exponent, side="right")
        for stream in byte_streams(coded):
            out["order0_entropy"] += entropy(np.bincount(stream, minlength=256)) / 8
            out["entropy_given_base_exponent"] += conditional(stream, exponent) / 8
            out["zstd_4_classes_of_base_exponent"] += sum(
                zstd(stream[classes == c]) for c in range(4)
            )
    return out


def first_moment(directories: list[Path]) -> dict[str, float]:
    """Adam's first moment against its second and against the weights' change, element by
    element: the optimizer's state is in parameter order, so the weights are read in it too."""
    from safetensors.torch import load_file

    names = [name for name, _ in run_model().named_parameters()]
    out: dict[str, float] = defaultdict(float)
    previous = None
    for directory in directories:
        weights = load_file(str(directory / "model.safetensors"))
        state = torch.load(directory / "optimizer.pt", weights_only=True)["state"]
        w = np.concatenate([weights[n].numpy().ravel() for n in names])
        m = np.concatenate([state[i]["exp_avg"].numpy().ravel() for i in range(len(names))])
        v = np.concatenate([state[i]["exp_avg_sq"].numpy().ravel() for i in range(len(names))])
        if previous is not None:
            out["raw"] += m.nbytes
            words, squares = m.view(np.uint32), v.view(np.uint32)
            for chunk, square in chunks(words, squares):
                exponent = ((chunk >> 23) & 0xFF).astype(np.int64)
                half = (((square >> 23) & 0xFF).astype(np.int64) + 127) >> 1
                residual = ((exponent - half) & 0xFF).astype(np.uint8)
                out["exponent_byte"] += zstd(exponent.astype(np.uint8))
                out["exponent_residual_vs_half_exp_avg_sq_exponent"] += zstd(residual)
                out["exponent_entropy"] += entropy(np.bincount(exponent)) / 8
                out["exponent_entropy_given_exp_avg_sq_exponent"] += conditional(exponent, half) / 8
            out["pairs"] += 1
            out["sign_opposite_to_weight_change"] += float(np.mean((m < 0) == (w > previous)))
        previous = w
    return {
        "sign_opposite_to_weight_change": out["sign_opposite_to_weight_change"] / out["pairs"],
    } | {
        k: v / out["raw"]
        for k, v in out.items()
        if k not in ("raw", "pairs", "sign_opposite_to_weight_change")
    }


def rebased(states: list[dict[str, Any]], index: int, kind: str) -> dict[str, float]:
    """The delta of checkpoint ``index`` coded against the one before and two and three before."""
    new = states[index][kind]
    out: dict[str, float] = {}
    for back in (1, 2, 3):
        out[f"rebase_{back}_back"] = sum(
            len(codec.encode_delta(w.tobytes(), b.tobytes(), bytes(32), 4, codec.Codec.SCALED))
            for w, b in chunks(new, states[index - back][kind])
        )
    return out


def measure(directories: list[Path]) -> dict[str, Any]:
    states = [{k: np.frombuffer(v, "<u4") for k, v in state_bytes(d).items()} for d in directories]
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for index in range(1, len(states)):
        for kind, new in states[index].items():
            raw = totals[kind]
            raw["raw"] += new.nbytes
            for name, size in layouts(new).items():
                raw[f"whole_{name}"] += size
            if kind != "exp_avg":
                factor = DECAY if kind == "exp_avg_sq" else 1.0
                for name, size in deltas(new, states[index - 1][kind], factor).items():
                    raw[f"delta_{name}"] += size
            if index >= 3:
                raw["raw_rebase"] += new.nbytes
                for name, size in rebased(states, index, kind).items():
                    raw[name] += size
        log(f"  checkpoint {index + 1} measured")
    result: dict[str, Any] = {kind: ratios(raw) for kind, raw in totals.items()}
    result["exp_avg_against_exp_avg_sq_and_weights"] = first_moment(directories)
    return result


def ratios(raw: dict[str, float]) -> dict[str, float]:
    return {
        name: size / (raw["raw_rebase"] if name.startswith("rebase") else raw["raw"])
        for name, size in raw.items()
        if not name.startswith("raw")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", type=Path, help="a run's checkpoint-N folders (default: train one)"
    )
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--every", type=int, default=20, help="training steps per checkpoint")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.run is None:
            training_run(Path(tmp) / "run", args.checkpoints, args.every)
            directories = sorted_checkpoints(Path(tmp))
        else:
            directories = sorted(
                args.run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
            )
        results = measure(directories)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
