"""Decompression bombs: a chunk object that decodes to far more than its manifest says.

Anyone who can write to a store's bucket can put any bytes under a chunk's
name. A few kilobytes that decode to a gigabyte must cost every reader
nothing: each codec (zstd, byte grouping, delta, FSE) is bounded by the
length the manifest gives, before it allocates, on every read path. Each
case runs the real command in a child process and measures its peak memory.
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest
import zstandard
from helpers import PYTHON, ROOT, cas_env, ok, run_cas
from test_tensors import save, step, weights

from cas.chunks._codec import BASE, HEADER, MAGIC, Codec
from cas.digest import Digest
from cas.repository import _layout as layout
from cas.store import Store

GiB = 1 << 30
#: Peak resident memory a refused read may cost, whatever the bomb.
LIMIT_KIB = 200 * 1024

# Runs a command as a grandchild and reports the grandchild's peak RSS: measured
# from this small process, not from pytest, whose own high-water mark Linux would
# fold into a child's. The address-space limit keeps a regression from taking the
# machine down with it.
_MEASURED = textwrap.dedent(
    """
    import os, resource, sys
    pid = os.fork()
    if pid == 0:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
    _, status, usage = os.wait4(pid, 0)
    sys.stderr.write(f"\\npeak-rss-kib {usage.ru_maxrss}\\n")
    sys.exit(os.waitstatus_to_exitcode(status))
    """
)


def measured(*argv: str | os.PathLike[str]) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run ``python ARGV`` and return the process and its peak RSS in KiB."""
    proc = subprocess.run(
        [PYTHON, "-c", _MEASURED, *(os.fspath(a) for a in argv)],
        env=cas_env({"PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}),
        # Not the checkout: "python -m cas" would import the cas/ found there first.
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    stderr, _, peak = proc.stderr.rpartition("peak-rss-kib ")
    proc.stderr = stderr
    return proc, int(peak)


def zstd_frame(size: int, *, declared: bool) -> bytes:
    """One zstd frame of ``size`` zero bytes, made in bounded memory."""
    zeros = bytes(16 << 20)
    compressor = zstandard.ZstdCompressor(level=3, write_content_size=declared)
    stream = compressor.compressobj(size=size if declared else -1)
    parts = [stream.compress(zeros) for _ in range(size // len(zeros))]
    return b"".join([*parts, stream.flush()])


_FSE_FRAME = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from cas.chunks import _entropy
sys.stdout.buffer.write(_entropy.encode(np.zeros({size}, np.uint8)))
"""


@pytest.fixture(scope="module")
def frames() -> dict[str, bytes]:
    """Bomb payloads: zstd frames of 1 GiB, with and without a declared size; an
    FSE frame (OpenZL) of 512 MiB, made in a child so that this process stays small."""
    fse = subprocess.run(
        [PYTHON, "-c", _FSE_FRAME.format(root=str(ROOT), size=GiB // 2)],
        capture_output=True,
        check=True,
        timeout=300,
    ).stdout
    return {
        "declared": zstd_frame(GiB, declared=True),
        "undeclared": zstd_frame(GiB, declared=False),
        "fse": fse,
    }


def grouped(itemsize: int, layout_id: int, streams: list[tuple[int, bytes]]) -> bytes:
    """A byte-grouped payload: (method, stored bytes) per stream."""
    head = struct.pack("<BBB", itemsize, layout_id, len(streams))
    table = b"".join(struct.pack("<BI", method, len(body)) for method, body in streams)
    return head + table + b"".join(body for _, body in streams)


def bomb(kind: str, length: int, frames: dict[str, bytes], base: bytes = b"") -> bytes:
    """A chunk object of ``kind`` that the manifest says holds ``length`` bytes."""
    if kind == "zstd":  # the header agrees with the manifest, the frame does not
        return HEADER.pack(MAGIC, Codec.ZSTD, length) + frames["declared"]
    if kind == "zstd-header":  # the header claims the gigabyte too
        return HEADER.pack(MAGIC, Codec.ZSTD, GiB) + frames["undeclared"]
    if kind == "grouped":
        payload = grouped(1, 0, [(1, frames["declared"])])
        return HEADER.pack(MAGIC, Codec.GROUPED, length) + payload
    if kind == "delta":
        payload = grouped(1, 0, [(1, frames["declared"])])
        return HEADER.pack(MAGIC, Codec.DELTA, length) + BASE.pack(base) + payload
    assert kind == "fse"
    assert length % 2 == 0
    payload = grouped(2, 1, [(2, frames["fse"]), (0, bytes(length // 2))])
    return HEADER.pack(MAGIC, Codec.GROUPED, length) + payload


KINDS = ["zstd", "zstd-header", "grouped", "delta", "fse"]


def plant(store: Store, ref: str, kind: str, frames: dict[str, bytes], index: int = 0) -> str:
    """Replace chunk ``index`` of the only file of ``ref`` with a bomb; its hex name."""
    version = store.resolve(ref)
    assert version.manifest_id is not None
    (entry,) = [e for e in store.load_manifest(version.manifest_id).entries if e.type == "file"]
    chunk = entry.chunks[index]
    # A delta's base: any other chunk of the same length will do.
    other = store.resolve("base")
    assert other.manifest_id is not None
    (base,) = store.load_manifest(other.manifest_id).entries[0].chunks
    assert base.length == chunk.length
    key = layout.chunk_key(chunk.digest)
    store.backend.put(key, bomb(kind, chunk.length, frames, base.digest.raw))
    return chunk.digest.hex


def new_store(path: Path, kind: str) -> Store:
    return Store.init(path, entropy="fse" if kind == "fse" else "huffman")


@pytest.mark.parametrize("kind", KINDS)
def test_get_and_deep_verify_refuse_a_bomb_in_bounded_memory(
    tmp_path: Path, kind: str, frames: dict[str, bytes]
) -> None:
    store = new_store(tmp_path / "store", kind)
    (tmp_path / "hello.txt").write_bytes(b"hello\n")
    (tmp_path / "other.txt").write_bytes(b"world\n")
    store.put(tmp_path / "hello.txt", "small")
    store.put(tmp_path / "other.txt", "base")
    name = plant(store, "small@1", kind, frames)

    proc, peak = measured(
        "-m", "cas", "--store", tmp_path / "store", "get", "small", tmp_path / "out"
    )
    assert proc.returncode == 3, proc.stderr
    assert f"small@1: file 'hello.txt': chunk {name}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    assert peak < LIMIT_KIB, f"get of a {kind} bomb peaked at {peak // 1024} MiB"

    proc, peak = measured("-m", "cas", "--store", tmp_path / "store", "verify", "--deep")
    assert proc.returncode == 3, proc.stderr
    assert "DAMAGED small@1" in proc.stdout
    assert name in proc.stdout
    assert "DAMAGED base@1" not in proc.stdout
    assert peak < LIMIT_KIB, f"verify --deep of a {kind} bomb peaked at {peak // 1024} MiB"


_API_PATHS = """
import sys
import cas
from cas.errors import CasError
from cas.ml.diff import diff
from cas.ml.plain_storage import Storage

store = cas.open(sys.argv[1], create=False)
calls = {
    "read_tensor": lambda: store.read_tensor("model@2", None, "norm.weight"),
    "diff": lambda: diff(store, "model@1", "model@2"),
    "download_if_newer": lambda: Storage(store).download_if_newer("model", sys.argv[2]),
}
for name, call in calls.items():
    try:
        call()
    except CasError as err:
        print(name, type(err).__name__, err)
    else:
        print(name, "ok")
"""


@pytest.mark.parametrize("kind", KINDS)
def test_read_tensor_diff_and_download_refuse_a_bomb_in_bounded_memory(
    tmp_path: Path, kind: str, frames: dict[str, bytes]
) -> None:
    store = new_store(tmp_path / "store", kind)
    arrays = weights(1)
    first = save(tmp_path / "m1.safetensors", {"norm.weight": arrays["norm.weight"]})
    # New metadata: the second version's header is a chunk of its own.
    second = save(
        tmp_path / "m2.safetensors",
        step({"norm.weight": arrays["norm.weight"]}, 2),
        metadata={"step": "2"},
    )
    store.put(first, "model")
    store.put(second, "model")
    header = store.show("model@2").entries[0].chunks[0]
    (tmp_path / "base.bin").write_bytes(os.urandom(header.length))
    store.put(tmp_path / "base.bin", "base")
    name = plant(store, "model@2", kind, frames)  # the safetensors header's chunk
    local = tmp_path / "local.safetensors"
    local.write_bytes(first.read_bytes())

    proc, peak = measured("-c", _API_PATHS, tmp_path / "store", local)
    ok(proc)
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["read_tensor", "diff", "download_if_newer"]
    for line in lines:
        assert line.split()[1].endswith("Error"), line
        assert name in line, line
    assert local.read_bytes() == first.read_bytes(), "a refused download leaves the file alone"
    assert peak < LIMIT_KIB, f"reads of a {kind} bomb peaked at {peak // 1024} MiB"


def test_a_manifest_bomb_is_refused_before_it_is_decompressed(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store")
    (tmp_path / "f.txt").write_bytes(b"x")
    store.put(tmp_path / "f.txt", "k")
    # A manifest that declares 1 GiB of JSON, committed as version 2 of the key.
    blob = zstd_frame(GiB, declared=True)
    manifest_id = Digest.of(blob)
    store.backend.put(layout.manifest_key(manifest_id), blob)
    store.refs.create_next("k", manifest_id)
    for argv in (["get", "k", tmp_path / "out"], ["verify"], ["show", "k"]):
        proc, peak = measured("-m", "cas", "--store", tmp_path / "store", *argv)
        assert proc.returncode == 3, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert manifest_id.hex in proc.stderr + proc.stdout
        assert peak < LIMIT_KIB, f"{argv[0]} of a manifest bomb peaked at {peak // 1024} MiB"
    ok(run_cas("get", "k@1", tmp_path / "first", store=tmp_path / "store"))


def test_the_measurement_sees_memory(tmp_path: Path) -> None:
    # The bound above means something only if the measurement counts what a
    # command allocates.
    proc, peak = measured("-c", "b = bytearray(300 << 20)")
    ok(proc)
    assert peak > 300 * 1024
