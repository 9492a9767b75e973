"""The input files of the examples in docs/, made the same on every machine.

    python scripts/doc_fixtures.py checkpoint DIR [--step N]
    python scripts/doc_fixtures.py adapter DIR
    python scripts/doc_fixtures.py quickstart-checkpoints
    python scripts/doc_fixtures.py bf16-model DIR [--step N]
    python scripts/doc_fixtures.py code-block DOC FIRST-LINE FILE
    python scripts/doc_fixtures.py hostile-version STORE REF PATH

scripts/update_doc_transcripts.py runs these from the docs' hidden setup
steps; the chunk hashes and sizes the docs show follow from them.

``checkpoint`` writes DIR/model.safetensors, 4.5 MiB of float32 tensors
``embed``, ``layer0``, ``layer1`` and ``head``, and DIR/state.json; the
tensor ``layer1`` and the state differ with ``--step``, as after a training
step that updated one layer. Their values come from numpy's legacy
generator (``RandomState``), whose streams numpy keeps unchanged across
releases. ``adapter`` writes DIR/adapter_model.bin, 200,000 bytes of adapter
weights. ``quickstart-checkpoints`` makes checkpoints/step-100 and step-200
as the commands of docs/quickstart.md do. ``bf16-model`` writes
DIR/model.safetensors, one bf16 tensor of 30,000 weights, moved by a
fine-tuning step for each ``--step`` past the first. ``code-block`` writes
the fenced code block of DOC that starts with FIRST-LINE to FILE, so that a
program a doc prints is the program its transcript runs.
``hostile-version`` commits to the local store STORE, as the next version
of REF's key, REF's manifest with the size of its file PATH set to 10^15:
what anyone with write access to a bucket can do.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path
from typing import Any

#: (name, shape) of the checkpoint's tensors, in file order: 4.5 MiB of float32.
TENSORS = [
    ("embed", (1024, 384)),
    ("layer0", (384, 1024)),
    ("layer1", (384, 768)),
    ("head", (384, 256)),
]
#: The tensor a training step changes.
TRAINED = "layer1"


def _generator(seed: int) -> Any:
    import numpy as np  # here: the quickstart's checkpoints need none of it

    return np.random.RandomState(seed)


def checkpoint(directory: Path, step: int) -> None:
    from cas.checkpoint import write_safetensors

    directory.mkdir(parents=True, exist_ok=True)
    tensors = []
    for index, (name, shape) in enumerate(TENSORS):
        seed = index + (100 * step if name == TRAINED else 0)
        values = _generator(seed).standard_normal(shape) * 0.02
        tensors.append((name, "F32", shape, values.astype("<f4").tobytes()))
    with open(directory / "model.safetensors", "wb") as f:
        write_safetensors(f, tensors)
    (directory / "state.json").write_text(json.dumps({"step": 1000 * step}) + "\n")


def adapter(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_model.bin").write_bytes(_generator(7).bytes(200_000))


def quickstart_checkpoints() -> None:
    """The quickstart's two checkpoints, made as its commands make them."""
    first, second = Path("checkpoints/step-100"), Path("checkpoints/step-200")
    first.mkdir(parents=True)
    for name, seed, size in (("model.bin", 1, 8 << 20), ("optimizer.pt", 2, 4 << 20)):
        random.seed(seed)
        (first / name).write_bytes(random.randbytes(size))
    (first / "trainer_state.json").write_text('{"step": 100, "lr": 0.0003}\n')
    shutil.copytree(first, second)
    random.seed(3)
    (second / "optimizer.pt").write_bytes(random.randbytes(4 << 20))
    with open(second / "model.bin", "r+b") as f:
        f.seek(3 << 20)
        f.write(bytes(4096))
    (second / "trainer_state.json").write_text('{"step": 200, "lr": 0.0003}\n')


def bf16_model(directory: Path, step: int) -> None:
    from cas.checkpoint import write_safetensors

    directory.mkdir(parents=True, exist_ok=True)
    weights = _generator(11).standard_normal(30_000) * 0.02
    for later in range(2, step + 1):
        weights += _generator(11 + later).standard_normal(30_000) * 1e-4
    bits = weights.astype("<f4").view("<u4").astype("<u8")
    bf16 = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even
    with open(directory / "model.safetensors", "wb") as f:
        write_safetensors(f, [("w", "BF16", (30_000,), bf16.astype("<u2").tobytes())])


def code_block(doc: Path, first_line: str, out: Path) -> None:
    lines = doc.read_text(encoding="utf-8").split("\n")
    begin = next(
        i for i, line in enumerate(lines) if line == first_line and lines[i - 1].startswith("```")
    )
    out.write_text("\n".join(lines[begin : lines.index("```", begin)]) + "\n")


def hostile_version(store: Path, ref: str, path: str) -> None:
    import zstandard

    import cas
    from cas.digest import Digest
    from cas.repository import _layout as layout
    from cas.repository._manifest import canonical_json

    opened = cas.open(store, create=False)
    version = opened.resolve(ref)
    assert version.manifest_id is not None
    blob = opened.backend.get(layout.manifest_key(version.manifest_id))
    data = json.loads(zstandard.ZstdDecompressor().decompress(blob))
    next(e for e in data["entries"] if e["path"] == path)["size"] = 10**15
    blob = zstandard.ZstdCompressor().compress(canonical_json(data))
    opened.backend.put(layout.manifest_key(Digest.of(blob)), blob)
    opened.refs.create_next(version.key, Digest.of(blob))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name, make in (("checkpoint", checkpoint), ("bf16-model", bf16_model)):
        p = sub.add_parser(name)
        p.add_argument("directory", type=Path)
        p.add_argument("--step", type=int, default=1)
        p.set_defaults(run=lambda a, make=make: make(a.directory, a.step))
    p = sub.add_parser("adapter")
    p.add_argument("directory", type=Path)
    p.set_defaults(run=lambda a: adapter(a.directory))
    sub.add_parser("quickstart-checkpoints").set_defaults(run=lambda a: quickstart_checkpoints())
    p = sub.add_parser("code-block")
    p.add_argument("doc", type=Path)
    p.add_argument("first_line")
    p.add_argument("out", type=Path)
    p.set_defaults(run=lambda a: code_block(a.doc, a.first_line, a.out))
    p = sub.add_parser("hostile-version")
    p.add_argument("store", type=Path)
    p.add_argument("ref")
    p.add_argument("path")
    p.set_defaults(run=lambda a: hostile_version(a.store, a.ref, a.path))
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
