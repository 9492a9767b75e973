"""Property: whatever a store's objects say, every command answers cleanly.

Hypothesis mutates a small store the way a hostile writer or a failing disk
would: chunk headers and payloads, manifests (rewritten under their new hash
and committed, or damaged in place), version refs and tags. Every command
must then either succeed with the bytes its manifest promises or fail with
a clear error and its exit code: never a traceback, never a write outside
DEST, never memory above a bound.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from helpers import SMALL_PARAMS, random_bytes, text_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tensors import save, step, weights

from cas.chunks._codec import HEADER
from cas.cli import main
from cas.digest import Digest
from cas.repository import _layout as layout
from cas.repository._manifest import canonical_json
from cas.store import Store

#: Growth of this process's peak resident memory one example may cause.
MEMORY_BOUND_KIB = 200 * 1024
EXIT_CODES = {1, 2, 3}


@pytest.fixture(scope="module")
def template() -> Iterator[Path]:
    """A store with a directory, a single file and a fine-tuned model (delta chunks)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = Store.init(root / "store", chunker=SMALL_PARAMS)
        tree = root / "tree"
        (tree / "sub").mkdir(parents=True)
        (tree / "weights.bin").write_bytes(random_bytes(70 * 1024, 1))
        (tree / "sub" / "notes.txt").write_bytes(text_bytes(30 * 1024, 2))
        (tree / "sub" / "empty").write_bytes(b"")
        (tree / "latest").symlink_to("weights.bin")
        store.put(tree, "data", tags=["best"])
        store.put(root / "tree" / "sub" / "notes.txt", "notes")
        arrays = {"w": weights(5)["embed.weight"]}
        store.put(save(root / "m1.safetensors", arrays), "model")
        store.put(save(root / "m2.safetensors", step(arrays, 6)), "model", parents=["model@1"])
        yield root / "store"


def chunk_keys(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in (root / "chunks").rglob("*")
        if p.is_file() and not p.name.startswith(".cas-tmp")
    )


def ref_keys(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / "refs").rglob("*") if p.is_file())


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.sampled_from([0, 1, -1, 6, 2**31, 2**40, 2**63])
    | st.sampled_from(["", "../x", "/abs", "a/../../b", "x\x00y", "..", "file", "symlink", "dir"])
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)

mutations = st.one_of(
    st.tuples(st.just("header"), st.integers(0, 999), st.integers(0, 11), st.integers(0, 255)),
    st.tuples(
        st.just("length"), st.integers(0, 999), st.sampled_from([0, 1, 6, 2**31, 2**40, 2**63])
    ),
    st.tuples(st.just("payload"), st.integers(0, 999), st.integers(0, 2**20), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 999), st.integers(0, 64)),
    st.tuples(st.just("base"), st.integers(0, 999), st.integers(0, 999)),
    st.tuples(st.just("manifest"), st.integers(0, 999), st.integers(0, 10_000), json_values),
    st.tuples(st.just("manifest-bytes"), st.integers(0, 999), st.integers(0, 2**16)),
    st.tuples(st.just("ref"), st.integers(0, 999), st.integers(0, 10_000), json_values),
    st.tuples(st.just("ref-text"), st.integers(0, 999), st.binary(max_size=40)),
    st.tuples(st.just("delete"), st.integers(0, 999)),
)


def json_slots(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON value that a mutation may replace."""
    yield path
    if isinstance(value, dict):
        for key in sorted(value):
            yield from json_slots(value[key], (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from json_slots(item, (*path, index))


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[head] = replaced(value[head], rest, new)
    return copy


def mutate(root: Path, mutation: tuple[Any, ...]) -> None:
    chunks, refs = chunk_keys(root), ref_keys(root)
    versions = [r for r in refs if "/@v/" in r]
    if not (chunks and versions):
        return  # an earlier mutation deleted what this one would change
    if mutation[0] in ("manifest", "manifest-bytes"):
        mutate_manifest(root, versions, mutation)
    elif mutation[0] in ("ref", "ref-text"):
        mutate_ref(root, refs, mutation)
    else:
        mutate_chunk(root, chunks, refs, mutation)


def mutate_chunk(root: Path, chunks: list[str], refs: list[str], mutation: tuple[Any, ...]) -> None:
    kind, pick = mutation[0], mutation[1]
    pool = chunks if kind != "delete" else chunks + refs
    key = pool[pick % len(pool)]
    if kind == "delete":
        (root / key).unlink()
        return
    stored = bytearray((root / key).read_bytes())
    if kind == "header":
        stored[mutation[2] % len(stored)] = mutation[3]
    elif kind == "length":
        struct.pack_into("<Q", stored, 4, mutation[2] % 2**64)
    elif kind == "payload" and len(stored) > HEADER.size:
        at = HEADER.size + mutation[2] % (len(stored) - HEADER.size)
        stored[at] ^= mutation[3]
    elif kind == "truncate":
        del stored[max(0, len(stored) - mutation[2]) :]
    elif kind == "base" and len(stored) >= HEADER.size + 32:
        other = chunks[mutation[2] % len(chunks)].rpartition("/")[2]
        stored[HEADER.size : HEADER.size + 32] = bytes.fromhex(other)
    overwrite(root / key, bytes(stored))


def mutate_manifest(root: Path, versions: list[str], mutation: tuple[Any, ...]) -> None:
    """Damage a version's manifest in place, or rewrite it and commit it under its new hash."""
    ref_path = root / versions[mutation[1] % len(versions)]
    try:  # an earlier mutation may have left no manifest to change
        ref = json.loads(ref_path.read_bytes())
        old = root / layout.manifest_key(Digest.parse(ref["manifest"]))
        blob = old.read_bytes()
        data = json.loads(zstandard.ZstdDecompressor().decompress(blob))
    except (ValueError, TypeError, KeyError, OSError, zstandard.ZstdError):
        return
    if mutation[0] == "manifest-bytes":
        damaged = bytearray(blob)
        damaged[mutation[2] % len(damaged)] ^= 0x20
        overwrite(old, bytes(damaged))
        return
    slots = list(json_slots(data))
    data = replaced(data, slots[mutation[2] % len(slots)], mutation[3])
    try:
        blob = zstandard.ZstdCompressor().compress(canonical_json(data))
    except ValueError:
        return
    new_id = Digest.of(blob)
    target = root / layout.manifest_key(new_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    overwrite(target, blob)
    overwrite(ref_path, canonical_json({**ref, "manifest": new_id.hex}))


def mutate_ref(root: Path, refs: list[str], mutation: tuple[Any, ...]) -> None:
    ref_path = root / refs[mutation[1] % len(refs)]
    if mutation[0] == "ref-text":
        overwrite(ref_path, mutation[2])
        return
    try:
        data = json.loads(ref_path.read_bytes())
    except ValueError:
        return
    slots = list(json_slots(data))
    with contextlib.suppress(ValueError):
        changed = replaced(data, slots[mutation[2] % len(slots)], mutation[3])
        overwrite(ref_path, canonical_json(changed))


def overwrite(path: Path, data: bytes) -> None:
    """Replace an object's bytes in place, as a writer with access to the bucket can."""
    if path.exists():
        path.chmod(0o644)
    path.write_bytes(data)


COMMANDS: list[list[str]] = [
    ["get", "data", "{dest}"],
    ["get", "data:best", "{dest}"],
    ["get", "notes", "{dest}"],
    ["get", "model", "{dest}"],
    ["show", "data"],
    ["log", "model"],
    ["ls"],
    ["diff", "model@1", "model@2"],
    ["verify", "--deep"],
    ["stats"],
    ["gc", "--dry-run"],
]


def peak_kib() -> int:
    match = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())
    assert match is not None
    return int(match.group(1))


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return False
    return True


def run(store: Path, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--store", str(store), "--no-progress", *argv])
    return code, out.getvalue(), err.getvalue()


def check_restore(store: Path, ref: str, sandbox: Path, code: int) -> None:
    """A get wrote DEST only, whole and as its manifest says, or nothing at all."""
    dest = sandbox / "dest"
    assert sorted(p.name for p in sandbox.iterdir()) == (["dest"] if code == 0 else [])
    if code != 0:
        return
    entries = Store.open(store, create=False).show(ref).entries
    for entry in entries:
        path = dest if dest.is_file() else dest / entry.path
        if entry.type == "file":
            assert not path.is_symlink()
            assert entry.digest is not None
            assert Digest.of(path.read_bytes()) == entry.digest
        elif entry.type == "symlink":
            resolved = os.path.normpath(os.path.join(path.parent, os.readlink(path)))
            assert resolved == str(dest) or resolved.startswith(f"{dest}/"), resolved
    shutil.rmtree(dest) if dest.is_dir() and not dest.is_symlink() else dest.unlink()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(changes=st.lists(mutations, min_size=1, max_size=3))
def test_every_command_answers_cleanly_whatever_the_store_holds(
    template: Path, changes: list[tuple[Any, ...]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        shutil.copytree(template, store, symlinks=True)
        for change in changes:
            mutate(store, change)
        sandbox = Path(tmp) / "sandbox"
        sandbox.mkdir()
        for argv in COMMANDS:
            argv = [a.format(dest=sandbox / "dest") for a in argv]
            measured = reset_peak()
            before = _rss_kib()
            code, out, err = run(store, argv)
            if argv[0] == "verify" and code == 3 and not err:
                assert "DAMAGED " in out, out  # the report names the damage
            elif code != 0:
                assert code in EXIT_CODES, (argv, code, err)
                assert err.startswith("cas: error: "), (argv, err)
            if argv[0] == "get":
                check_restore(store, argv[1], sandbox, code)
            if measured:
                assert peak_kib() - before < MEMORY_BOUND_KIB, (argv, changes)


def _rss_kib() -> int:
    match = re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())
    assert match is not None
    return int(match.group(1))
