"""Version a real checkpoint on the default local store and get it back, verified.

    python scripts/demo.py [--workdir DIR]

Writes a small safetensors checkpoint (about 24 MiB of weight-like fp32),
stores it with `cas put`, changes one layer and stores the result as a second
version with lineage, restores both with `cas get`, compares them byte for
byte and prints `cas stats`: the second version costs only the changed layer.
Everything goes through the `cas` command line, on the store ./.cas inside the
work directory. Needs nothing but cas itself (no numpy).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import random
import shlex
import struct
import subprocess
import sys
import tempfile
from array import array
from pathlib import Path

LAYERS = 6
LAYER_SHAPE = (512, 1024)  # 2 MiB of fp32 per layer


def weights(seed: int, count: int) -> bytes:
    """Weight-like fp32: small normal values (a few distinct ones, as trained nets quantise)."""
    rng = random.Random(seed)
    table = array("f", (rng.gauss(0.0, 0.02) for _ in range(4096)))
    picks = array("H", rng.randbytes(count * 2))
    return array("f", (table[i & 4095] for i in picks)).tobytes()


def write_safetensors(path: Path, tensors: dict[str, bytes], shape: tuple[int, int]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, data in tensors.items():
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for data in tensors.values():
            f.write(data)


def make_checkpoint(directory: Path, step: int, changed_layer: int | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    count = math.prod(LAYER_SHAPE)
    tensors = {}
    for layer in range(LAYERS):
        seed = layer + (1000 * step if layer == changed_layer else 0)
        tensors[f"layers.{layer}.weight"] = weights(seed, count)
    write_safetensors(directory / "model.safetensors", tensors, LAYER_SHAPE)
    (directory / "config.json").write_text(json.dumps({"layers": LAYERS, "step": step}))


def cas(*args: str) -> str:
    command = [sys.executable, "-m", "cas", *args]
    print(f"$ cas {shlex.join(args)}", flush=True)
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    print(result.stdout, end="", flush=True)
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cas-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    print(f"working in {workdir}")

    make_checkpoint(Path("ckpt-100"), step=100, changed_layer=None)
    make_checkpoint(Path("ckpt-200"), step=200, changed_layer=3)
    first = cas(
        "put",
        "ckpt-100",
        "runs/demo/ckpt",
        "--metric",
        "loss=0.42",
        "--tag",
        "first",
        "--message",
        "step 100",
    ).strip()
    second = cas(
        "put",
        "ckpt-200",
        "runs/demo/ckpt",
        "--parent",
        first,
        "--metric",
        "loss=0.35",
        "--message",
        "step 200",
    ).strip()
    cas("log", "runs/demo/ckpt")
    cas("get", first, "restored-100")
    cas("get", second, "restored-200")
    for original, restored in (("ckpt-100", "restored-100"), ("ckpt-200", "restored-200")):
        diff = filecmp.dircmp(original, restored)
        same = not (diff.left_only or diff.right_only or diff.diff_files) and all(
            filecmp.cmp(Path(original, f), Path(restored, f), shallow=False)
            for f in diff.common_files
        )
        if not same:
            sys.exit(f"demo: {restored} differs from {original}")
    print("both versions restored byte for byte")
    cas("stats")
    cas("verify", "--deep")


if __name__ == "__main__":
    main()
