"""Deterministic synthetic ML artifacts for ``scripts/bench.py``.

Everything here is generated from fixed seeds with numpy and written to disk
streaming, one tensor (or one text shard) at a time, so the generator itself
never holds a whole file in memory.

The series (sizes at ``scale=1``; every tensor's first dimension and every
text shard are multiplied by ``scale``):

* ``ckpt-fp32/v1..v5``: a fine-tuning run. ``model.safetensors`` (~134 MB
  fp32: a 16384x512 embedding and 6 llama-style layers) where the embedding
  and layers 0-3 are frozen (identical bytes in every version) and layers 4-5
  and the final norm get new values each version; ``optimizer.safetensors``
  (Adam ``exp_avg``/``exp_avg_sq`` for the trainable tensors, ~67 MB, new
  values each version); small ``config.json`` and ``trainer_state.json``.
  From v4 on the safetensors header carries an extra ``__metadata__`` entry,
  so in v4 every tensor's data is shifted by a few kB against v3.
* ``ckpt-bf16/v1..v5``: another model stored as bf16 (~67 MB). The embedding
  is frozen; every version updates half of the layers (alternating) by a small
  step, so after rounding to bf16 only part of the values actually change.
* ``text/v1..v5``: a dataset directory of JSONL shards (~10 MB each) of
  Zipf-distributed pseudo-words; v1 has 4 shards and each version appends one.
* ``finetune-bf16/v1..v20`` and ``finetune-fp32/v1..v20``: a full
  fine-tuning run, every weight of a small model (a 4096x512 embedding and
  one llama-style layer, 6 M parameters) moving by ``1e-4 * N(0, 1)`` in
  fp32 at each version, then stored as fp32 (~25 MB) or cast to bf16
  (~12 MB): every byte of every version changes, which deduplication cannot
  use and deltas can.

Weights are drawn from N(0, 0.02) (norm weights around 1), never random bytes
and never zeros, so compressors see what they would see on real checkpoints:
compressible exponent bytes and noisy mantissas.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GENERATOR_VERSION = 4
N_VERSIONS = 5
N_FINETUNE_VERSIONS = 20

_HIDDEN = 512
_VOCAB = 16384
_FP32_LAYERS = 6
_FP32_TRAINABLE = (4, 5)
_BF16_LAYERS = 6
_HEADER_GROWS_AT = 4
_FINETUNE_VOCAB = 4096
_FINETUNE_STEP = 1e-4
_SHARD_BYTES = 10_000_000
_FIRST_SHARDS = 4

_DTYPE_SIZE = {"F32": 4, "BF16": 2, "I64": 8}


@dataclass(frozen=True)
class Tensor:
    """One tensor of a safetensors file: its layout and how to produce its data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        n = _DTYPE_SIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class FileInfo:
    size: int
    sha256: str


@dataclass(frozen=True)
class Version:
    """One version of one series: a directory put into a store as one artifact version."""

    series: str
    number: int
    path: Path
    files: dict[str, FileInfo]

    @property
    def logical_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


@dataclass(frozen=True)
class Dataset:
    root: Path
    scale: float
    versions: list[Version]

    @property
    def logical_bytes(self) -> int:
        return sum(v.logical_bytes for v in self.versions)


# --------------------------------------------------------------------------- safetensors


def write_safetensors(path: Path, tensors: list[Tensor], metadata: dict[str, str]) -> FileInfo:
    """Write a safetensors file tensor by tensor; return its size and SHA-256."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer pads the header to 8 bytes
    h = hashlib.sha256()
    size = 0
    with open(path, "wb") as f:
        for block in (struct.pack("<Q", len(raw)), raw):
            f.write(block)
            h.update(block)
            size += len(block)
        for t in tensors:
            arr = np.ascontiguousarray(t.make())
            if arr.nbytes != t.nbytes:
                raise ValueError(f"{t.name}: {arr.nbytes} bytes, header says {t.nbytes}")
            f.write(arr.data)
            h.update(arr.data)
            size += arr.nbytes
    return FileInfo(size, h.hexdigest())


def to_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), rounding to nearest even like torch does."""
    u: np.ndarray = x.astype(np.float32).view(np.uint32)
    u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    out: np.ndarray = (u >> np.uint32(16)).astype(np.uint16)
    return out


def _rng(*seed: int) -> np.random.Generator:
    return np.random.default_rng(list(seed))


def _normal(shape: tuple[int, ...], std: float, *seed: int) -> np.ndarray:
    a = _rng(*seed).standard_normal(shape, dtype=np.float32)
    a *= np.float32(std)
    return a


def _rows(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def _param_shapes(scale: float, layers: int) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, layer index or -1) of a small decoder-only transformer."""
    d, ff = _HIDDEN, 4 * _HIDDEN
    out: list[tuple[str, tuple[int, ...], int]] = [
        ("model.embed_tokens.weight", (_rows(_VOCAB, scale), d), -1)
    ]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (d,), i),
            (p + "mlp.down_proj.weight", (_rows(d, scale), ff), i),
            (p + "mlp.gate_proj.weight", (_rows(ff, scale), d), i),
            (p + "mlp.up_proj.weight", (_rows(ff, scale), d), i),
            (p + "post_attention_layernorm.weight", (d,), i),
        ]
        out += [(p + f"self_attn.{m}_proj.weight", (_rows(d, scale), d), i) for m in "kvqo"]
    out.append(("model.norm.weight", (d,), layers))
    return out


def _weight(name: str, shape: tuple[int, ...], seed: int, step: int) -> np.ndarray:
    """Weights at training step ``step`` (0 = pretrained): base + growing drift."""
    tid = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    base = _normal(shape, 0.02, seed, tid)
    if name.endswith("norm.weight"):
        base += np.float32(1.0)
    if step:
        base += _normal(shape, 0.002 * step**0.5, seed, tid, step)
    return base


# --------------------------------------------------------------------------- series


def _fp32_version(d: Path, v: int, scale: float) -> dict[str, FileInfo]:
    seed = 1
    params = _param_shapes(scale, _FP32_LAYERS)
    trainable = [(n, s) for n, s, i in params if i in _FP32_TRAINABLE or i == _FP32_LAYERS]

    def w(name: str, shape: tuple[int, ...], layer: int) -> Tensor:
        step = v - 1 if layer in _FP32_TRAINABLE or layer == _FP32_LAYERS else 0
        return Tensor(name, "F32", shape, lambda: _weight(name, shape, seed, step))

    meta = {"format": "pt", "step": str(1000 * v)}
    if v >= _HEADER_GROWS_AT:
        args = {f"arg_{i:03d}": f"value-{i * 7919 % 1000:04d}" for i in range(150)}
        meta["training_args"] = json.dumps(args, sort_keys=True)
    files = {
        "model.safetensors": write_safetensors(
            d / "model.safetensors", [w(n, s, i) for n, s, i in sorted(params)], meta
        )
    }

    def moment(name: str, shape: tuple[int, ...], kind: int) -> Tensor:
        def make() -> np.ndarray:
            tid = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
            g = _normal(shape, 1e-3, seed, 99, tid, kind, v)
            return g if kind == 0 else g * g

        key = name.removesuffix(".weight")
        return Tensor(f"state.{key}.{('exp_avg', 'exp_avg_sq')[kind]}", "F32", shape, make)

    opt = [moment(n, s, k) for n, s in trainable for k in (0, 1)]
    opt.append(Tensor("state.step", "I64", (1,), lambda: np.array([1000 * v], np.int64)))
    opt.sort(key=lambda t: t.name)
    lr = {"lr": "2e-05", "betas": "[0.9, 0.999]", "eps": "1e-08"}
    files["optimizer.safetensors"] = write_safetensors(d / "optimizer.safetensors", opt, lr)
    config = {"hidden_size": _HIDDEN, "num_hidden_layers": _FP32_LAYERS, "vocab_size": _VOCAB}
    state = {"global_step": 1000 * v, "epoch": v, "log_history": [{"loss": 3.1 / v}]}
    files["config.json"] = _write_json(d / "config.json", config)
    files["trainer_state.json"] = _write_json(d / "trainer_state.json", state)
    return files


def _bf16_version(d: Path, v: int, scale: float) -> dict[str, FileInfo]:
    seed = 2
    tensors = []
    for name, shape, layer in sorted(_param_shapes(scale, _BF16_LAYERS)):
        # each layer moves in every other version; the embedding never moves
        step = 0 if layer < 0 else (v - 1 + (layer % 2)) // 2

        def make(name: str = name, shape: tuple[int, ...] = shape, step: int = step) -> np.ndarray:
            return to_bf16(_weight(name, shape, seed, step))

        tensors.append(Tensor(name, "BF16", shape, make))
    files = {
        "model.safetensors": write_safetensors(
            d / "model.safetensors", tensors, {"format": "pt", "step": str(500 * v)}
        )
    }
    files["config.json"] = _write_json(d / "config.json", {"torch_dtype": "bfloat16", "v": v})
    return files


def _walked(name: str, shape: tuple[int, ...], version: int) -> np.ndarray:
    """A weight after ``version - 1`` steps of ``w + 1e-4 * N(0, 1)`` in fp32.

    Each step's noise is drawn from a seed of its own, so a version is made
    from scratch, one tensor at a time, without holding the one before.
    """
    tid = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    weight = _normal(shape, 0.02, 4, tid)
    if name.endswith("norm.weight"):
        weight += np.float32(1.0)
    for step in range(1, version):
        weight += _normal(shape, _FINETUNE_STEP, 4, tid, step)
    return weight


def _finetune_version(d: Path, v: int, scale: float, dtype: str) -> dict[str, FileInfo]:
    shapes = _param_shapes(scale, 1)
    shapes[0] = ("model.embed_tokens.weight", (_rows(_FINETUNE_VOCAB, scale), _HIDDEN), -1)
    tensors = []
    for name, shape, _ in sorted(shapes):

        def make(name: str = name, shape: tuple[int, ...] = shape) -> np.ndarray:
            weight = _walked(name, shape, v)
            return to_bf16(weight) if dtype == "BF16" else weight

        tensors.append(Tensor(name, dtype, shape, make))
    meta = {"format": "pt", "step": str(100 * v)}
    return {"model.safetensors": write_safetensors(d / "model.safetensors", tensors, meta)}


def _vocabulary(n: int = 30000) -> list[bytes]:
    rng = _rng(3)
    syll = [c + w for c in "bcdfghklmnprstvwz" for w in ("a", "e", "i", "o", "u", "ou", "ea")]
    words: dict[str, None] = {}
    while len(words) < n:
        k = int(rng.integers(1, 5))
        words["".join(syll[j] for j in rng.integers(0, len(syll), k))] = None
    return [w.encode() for w in words]


def text_shard(k: int, nbytes: int, vocab: list[bytes]) -> bytes:
    """Shard ``k``: JSONL documents of Zipf-distributed pseudo-words, ~``nbytes`` long."""
    rng = _rng(4, k)
    ranks = np.arange(1, len(vocab) + 1, dtype=np.float64)
    p = 1.0 / (ranks + 2.7) ** 1.07
    p /= p.sum()
    words = vocab + [w + b"." for w in vocab] + [w + b"," for w in vocab]
    out: list[bytes] = []
    size, doc = 0, 0
    while size < nbytes:
        n = int(rng.integers(80, 600))
        idx = rng.choice(len(vocab), size=n, p=p)
        punct = rng.choice(3, size=n, p=[0.85, 0.09, 0.06]) * len(vocab)
        body = b" ".join(words[i] for i in (idx + punct).tolist())
        line = b'{"id":"%05d-%06d","text":"%s"}\n' % (k, doc, body)
        out.append(line)
        size += len(line)
        doc += 1
    return b"".join(out)


def _write_json(path: Path, obj: object) -> FileInfo:
    raw = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    path.write_bytes(raw)
    return FileInfo(len(raw), hashlib.sha256(raw).hexdigest())


def _text_series(root: Path, scale: float) -> dict[int, dict[str, FileInfo]]:
    vocab = _vocabulary()
    out: dict[int, dict[str, FileInfo]] = {v: {} for v in range(1, N_VERSIONS + 1)}
    for v in out:
        (root / f"v{v}" / "shards").mkdir(parents=True, exist_ok=True)
    for k in range(_FIRST_SHARDS + N_VERSIONS - 1):
        data = text_shard(k, _rows(_SHARD_BYTES, scale), vocab)
        info = FileInfo(len(data), hashlib.sha256(data).hexdigest())
        rel = f"shards/shard-{k:05d}.jsonl"
        for v in out:
            if k < _FIRST_SHARDS + v - 1:
                (root / f"v{v}" / rel).write_bytes(data)
                out[v][rel] = info
    for v, files in out.items():
        index = {"shards": sorted(files), "bytes": sum(f.size for f in files.values())}
        files["index.json"] = _write_json(root / f"v{v}" / "index.json", index)
    return out


# --------------------------------------------------------------------------- dataset


def _manifest_key(scale: float) -> dict[str, object]:
    return {
        "generator": GENERATOR_VERSION,
        "scale": scale,
        "versions": N_VERSIONS,
        "finetune_versions": N_FINETUNE_VERSIONS,
    }


def load_dataset(root: Path, scale: float) -> Dataset | None:
    """The dataset at ``root`` if it was generated with these parameters and is intact."""
    try:
        doc = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if doc.get("key") != _manifest_key(scale):
        return None
    versions = []
    for v in doc["versions"]:
        files = {rel: FileInfo(f["size"], f["sha256"]) for rel, f in v["files"].items()}
        path = root / v["series"] / f"v{v['number']}"
        for rel, f in files.items():
            if not (path / rel).is_file() or (path / rel).stat().st_size != f.size:
                return None
        versions.append(Version(v["series"], v["number"], path, files))
    return Dataset(root, scale, versions)


def generate_dataset(root: Path, scale: float, log: Callable[[str], None] = print) -> Dataset:
    """Generate (or reuse) the whole series under ``root``."""
    found = load_dataset(root, scale)
    if found is not None:
        return found
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    per_series: dict[str, dict[int, dict[str, FileInfo]]] = {}
    for series, fn in (("ckpt-fp32", _fp32_version), ("ckpt-bf16", _bf16_version)):
        per_series[series] = {}
        for v in range(1, N_VERSIONS + 1):
            d = root / series / f"v{v}"
            d.mkdir(parents=True)
            log(f"  generating {series}/v{v}")
            per_series[series][v] = fn(d, v, scale)
    log("  generating text shards")
    per_series["text"] = _text_series(root / "text", scale)
    for series, dtype in (("finetune-bf16", "BF16"), ("finetune-fp32", "F32")):
        per_series[series] = {}
        for v in range(1, N_FINETUNE_VERSIONS + 1):
            d = root / series / f"v{v}"
            d.mkdir(parents=True)
            log(f"  generating {series}/v{v}")
            per_series[series][v] = _finetune_version(d, v, scale, dtype)
    versions = [
        Version(s, v, root / s / f"v{v}", per_series[s][v])
        for v in range(1, N_FINETUNE_VERSIONS + 1)
        for s in per_series
        if v in per_series[s]
    ]
    doc = {
        "key": _manifest_key(scale),
        "versions": [
            {
                "series": x.series,
                "number": x.number,
                "files": {r: {"size": f.size, "sha256": f.sha256} for r, f in x.files.items()},
            }
            for x in versions
        ],
    }
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, root / "manifest.json")
    return Dataset(root, scale, versions)


# --------------------------------------------------------------------------- big files


def big_file_tensors(total: int, seed: int = 5) -> Iterator[Tensor]:
    """fp32 weight-like tensors of 64 MiB (the last one shorter) adding up to ``total`` bytes."""
    cols = 4096
    rows_per = (64 << 20) // (4 * cols)
    rows_total = max(1, total // (4 * cols))
    i = 0
    while rows_total > 0:
        rows = min(rows_per, rows_total)
        shape = (rows, cols)

        def make(s: tuple[int, ...] = shape, i: int = i) -> np.ndarray:
            return _normal(s, 0.02, seed, i)

        yield Tensor(f"blocks.{i:04d}.weight", "F32", shape, make)
        rows_total -= rows
        i += 1


def write_big_file(path: Path, total: int) -> FileInfo:
    """A safetensors file of about ``total`` bytes, written streaming; cached beside it."""
    info_path = path.with_suffix(".info.json")
    key = {"generator": GENERATOR_VERSION, "total": total}
    try:
        doc = json.loads(info_path.read_text())
        if doc["key"] == key and path.stat().st_size == doc["size"]:
            return FileInfo(doc["size"], doc["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    info = write_safetensors(path, list(big_file_tensors(total)), {"format": "pt"})
    info_path.write_text(json.dumps({"key": key, "size": info.size, "sha256": info.sha256}))
    return info


def hash_tree(root: Path) -> dict[str, FileInfo]:
    """SHA-256 and size of every regular file under ``root``, by POSIX relative path."""
    out: dict[str, FileInfo] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
            out[p.relative_to(root).as_posix()] = FileInfo(p.stat().st_size, h.hexdigest())
    return out


# --------------------------------------------------------------------------- file trees


class ToolError(RuntimeError):
    """A tool failed, or what it restored differs from what it was given."""


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def tree_bytes(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of every file under ``path``."""
    apparent = allocated = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def verify(got: dict[str, FileInfo], want: dict[str, FileInfo], what: str) -> None:
    if got != want:
        missing = sorted(set(want) - set(got))[:5]
        extra = sorted(set(got) - set(want))[:5]
        bad = sorted(k for k in set(got) & set(want) if got[k] != want[k])[:5]
        raise ToolError(f"{what}: restored files differ: missing={missing} extra={extra} bad={bad}")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
