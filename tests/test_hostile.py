"""Hostile or damaged manifests and refs: believed by nothing, refused by get, flagged by verify.

Anyone with write access to a bucket can commit a version whose manifest
says anything, under a valid hash. A manifest must agree with itself before
it is used; get must refuse one that does not, or that would write outside
its destination, naming the version, the file and the field; verify
must flag every version get would refuse, and repair must not hide them.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from helpers import run_cas

from cas.digest import Digest
from cas.errors import CorruptObjectError, IntegrityError, UnsafePathError
from cas.repository import _layout as layout
from cas.repository._manifest import MAX_CHAIN, canonical_json
from cas.store import Store

KiB = 1024
Mutation = Callable[[dict[str, Any]], None]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A store holding ``runs/a@1``: a directory of two files, one of several chunks."""
    from helpers import small_store, text_bytes

    store = small_store(tmp_path / "store")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "six.txt").write_bytes(b"hello\n")
    (tree / "sub" / "big.bin").write_bytes(text_bytes(200 * KiB, 3))
    store.put(tree, "runs/a")
    return store


def manifest_data(store: Store, ref: str) -> dict[str, Any]:
    version = store.resolve(ref)
    assert version.manifest_id is not None
    blob = store.backend.get(layout.manifest_key(version.manifest_id))
    data: dict[str, Any] = json.loads(zstandard.ZstdDecompressor().decompress(blob))
    return data


def commit(
    store: Store,
    data: dict[str, Any],
    *,
    key: str = "runs/a",
    summary: dict[str, Any] | None = None,
) -> str:
    """Commit ``data`` as it is, as the next version of ``key``: what a hostile writer can do."""
    blob = zstandard.ZstdCompressor().compress(canonical_json(data))
    manifest_id = Digest.of(blob)
    store.backend.put(layout.manifest_key(manifest_id), blob)
    ref = store.refs.create_next(key, manifest_id, summary=summary)
    return f"{ref.key}@{ref.number}"


def entry(data: dict[str, Any], path: str) -> dict[str, Any]:
    found: dict[str, Any] = next(e for e in data["entries"] if e["path"] == path)
    return found


def big_size(data: dict[str, Any]) -> None:
    entry(data, "six.txt")["size"] = 10**15


def negative_chunk(data: dict[str, Any]) -> None:
    chunks = entry(data, "sub/big.bin")["chunks"]
    chunks[0][1], chunks[1][1] = -1000, chunks[1][1] + chunks[0][1] + 1000


def huge_chunk(data: dict[str, Any]) -> None:
    six = entry(data, "six.txt")
    six["chunks"][0][1] = six["size"] = 2**40


def string_size(data: dict[str, Any]) -> None:
    entry(data, "six.txt")["size"] = "6"


def wrong_whole_hash(data: dict[str, Any]) -> None:
    entry(data, "six.txt")["blake3"] = Digest.of(b"not hello").hex


def bases_in_schema_1(data: dict[str, Any]) -> None:
    chunk = entry(data, "sub/big.bin")["chunks"][0]
    chunk.append([Digest.of(b"base").hex])


def chain_too_long(data: dict[str, Any]) -> None:
    data["schema"] = 2
    chunk = entry(data, "sub/big.bin")["chunks"][0]
    chunk.append([Digest.of(b"%d" % i).hex for i in range(MAX_CHAIN)])


def chain_in_a_circle(data: dict[str, Any]) -> None:
    data["schema"] = 2
    chunk = entry(data, "sub/big.bin")["chunks"][0]
    chunk.append([Digest.of(b"base").hex, chunk[0]])


def empty_chain(data: dict[str, Any]) -> None:
    data["schema"] = 2
    entry(data, "sub/big.bin")["chunks"][0].append([])


def same_path_twice(data: dict[str, Any]) -> None:
    data["entries"].append(copy.deepcopy(entry(data, "six.txt")))


def one_file_with_two(data: dict[str, Any]) -> None:
    data["kind"] = "file"


def below_a_file(data: dict[str, Any]) -> None:
    below = copy.deepcopy(entry(data, "six.txt"))
    below["path"] = "six.txt/inside"
    data["entries"].append(below)


def mode_too_large(data: dict[str, Any]) -> None:
    entry(data, "six.txt")["mode"] = 0o100644


def escape(data: dict[str, Any]) -> None:
    entry(data, "six.txt")["path"] = "../escape.txt"


def absolute(data: dict[str, Any]) -> None:
    entry(data, "six.txt")["path"] = "/tmp/absolute.txt"


def link_up(data: dict[str, Any]) -> None:
    data["entries"].append({"path": "up", "type": "symlink", "mode": 0o777, "target": "../.."})


INCONSISTENT: dict[str, tuple[Mutation, str]] = {
    "size": (big_size, "file 'six.txt': field 'size' is 1000000000000000"),
    "negative-length": (negative_chunk, "has length -1000"),
    "huge-length": (huge_chunk, "has length 1099511627776"),
    "size-not-a-number": (string_size, "size of 'six.txt' must be a whole number"),
    "whole-hash": (wrong_whole_hash, "file 'six.txt': field 'blake3'"),
    "bases-in-schema-1": (bases_in_schema_1, "lists delta bases in a manifest of schema 1"),
    "chain-too-long": (chain_too_long, f"has {MAX_CHAIN} delta bases"),
    "chain-in-a-circle": (chain_in_a_circle, "runs in a circle"),
    "empty-chain": (empty_chain, "empty list of delta bases"),
    "one-file-of-two": (one_file_with_two, "a one-file version holds 3 entries"),
    "mode": (mode_too_large, "field 'mode' is 33188"),
}
UNSAFE: dict[str, tuple[Mutation, str]] = {
    "escape": (escape, "'../escape.txt'"),
    "absolute": (absolute, "'/tmp/absolute.txt'"),
    "link-up": (link_up, "symlink 'up' points outside"),
    "duplicate": (same_path_twice, "path appears twice in artifact: 'six.txt'"),
    "below-a-file": (below_a_file, "'six.txt/inside' lies below the file 'six.txt'"),
}


REFUSED: dict[str, tuple[Mutation, str, type[Exception]]] = {
    **{case: (*how, CorruptObjectError) for case, how in INCONSISTENT.items()},
    **{case: (*how, UnsafePathError) for case, how in UNSAFE.items()},
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_get_refuses_a_manifest_that_disagrees_with_itself_or_would_write_outside(
    store: Store, tmp_path: Path, case: str
) -> None:
    mutate, field, error = REFUSED[case]
    data = manifest_data(store, "runs/a@1")
    mutate(data)
    ref = commit(store, data)
    with pytest.raises(error) as info:
        store.get(ref, tmp_path / "out")
    assert str(info.value).startswith(f"{ref}: manifest "), info.value
    assert field in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "tree"], "nothing written"


def test_the_cli_says_so_with_an_exit_code_and_no_traceback(store: Store, tmp_path: Path) -> None:
    data = manifest_data(store, "runs/a@1")
    big_size(data)
    ref = commit(store, data)
    proc = run_cas("get", ref, tmp_path / "out", store=store.backend.local_root)
    assert proc.returncode == 3
    assert "909.5 TiB" not in proc.stdout + proc.stderr
    assert f"cas: error: {ref}: manifest " in proc.stderr
    assert "field 'size'" in proc.stderr
    assert "Traceback" not in proc.stderr
    data = manifest_data(store, "runs/a@1")
    escape(data)
    proc = run_cas("get", commit(store, data), tmp_path / "out", store=store.backend.local_root)
    assert proc.returncode == 2
    assert "'../escape.txt'" in proc.stderr


def test_a_ref_whose_summary_disagrees_with_its_manifest_is_refused(
    store: Store, tmp_path: Path
) -> None:
    data = manifest_data(store, "runs/a@1")
    summary = dict(store.resolve("runs/a@1").summary or {})
    assert summary, "puts write a summary into the ref"
    ref = commit(store, data, summary={**summary, "size": 10**15})
    # log answers from refs alone; get, show and verify read the manifest too.
    with pytest.raises(CorruptObjectError, match=f"{ref}: .*its ref says size 1000000000000000"):
        store.get(ref, tmp_path / "out")
    with pytest.raises(CorruptObjectError, match="its ref says size"):
        store.show(ref)
    report = store.verify()
    assert [d.ref for d in report.damaged] == [ref]
    assert "its ref says size" in report.damaged[0].problem


def test_a_manifest_of_another_key_is_refused(store: Store, tmp_path: Path) -> None:
    data = manifest_data(store, "runs/a@1")
    ref = commit(store, data, key="runs/b")
    with pytest.raises(CorruptObjectError, match="its manifest is of key 'runs/a'"):
        store.get(ref, tmp_path / "out")


@pytest.mark.parametrize("deep", [False, True])
def test_verify_flags_every_version_get_refuses_and_repair_hides_none(
    store: Store, tmp_path: Path, deep: bool
) -> None:
    refused: dict[str, str] = {}
    for mutate, field in [*INCONSISTENT.values(), *UNSAFE.values()]:
        data = manifest_data(store, "runs/a@1")
        mutate(data)
        refused[commit(store, data)] = field
    for ref in refused:
        with pytest.raises((IntegrityError, UnsafePathError)):
            store.get(ref, tmp_path / "never")
    store.get("runs/a@1", tmp_path / "fine")

    for repair in (False, True) if deep else (False,):
        report = store.verify(deep=deep, repair=repair)
        problems = {d.ref: d.problem for d in report.damaged}
        assert set(problems) == set(refused), repair
        for ref, field in refused.items():
            assert field in problems[ref], (ref, problems[ref])
        assert report.quarantined == ()
        assert report.reput == ()

    argv = ["verify", "--deep", "--repair"] if deep else ["verify"]
    proc = run_cas(*argv, store=store.backend.local_root)
    assert proc.returncode == 3
    for ref in refused:
        assert f"DAMAGED {ref}: " in proc.stdout
    assert proc.stdout.rstrip().endswith(f"{len(refused)} damaged versions")


def test_a_refused_version_can_be_deleted(store: Store, tmp_path: Path) -> None:
    data = manifest_data(store, "runs/a@1")
    escape(data)
    ref = commit(store, data)
    big = manifest_data(store, "runs/a@1")
    big_size(big)
    other = commit(store, big)
    assert not store.verify().ok
    for each in (ref, other):
        assert run_cas("rm", each, store=store.backend.local_root).returncode == 0
    assert store.verify(deep=True).ok


def test_a_refused_latest_version_blocks_no_put(store: Store, tmp_path: Path) -> None:
    # A put reads the key's latest manifest to cut along it; one it refuses
    # is no help, and must not stop new versions of the key.
    data = manifest_data(store, "runs/a@1")
    big_size(data)
    commit(store, data)
    version = store.put(tmp_path / "tree", "runs/a")
    assert version.number == 3
    store.get("runs/a", tmp_path / "out")
    assert (tmp_path / "out" / "six.txt").read_bytes() == b"hello\n"


def test_a_chunk_that_disagrees_with_its_manifest_is_not_quarantined(
    store: Store, tmp_path: Path
) -> None:
    # A manifest that gives a chunk of six.txt another length than it has:
    # the chunk is whole, the manifest is wrong, and repair must keep the chunk.
    data = manifest_data(store, "runs/a@1")
    six = entry(data, "six.txt")
    six["chunks"][0][1] = six["size"] = 7
    six["blake3"] = six["chunks"][0][0]
    ref = commit(store, data)
    with pytest.raises(CorruptObjectError, match="its header says 6 bytes, the manifest 7"):
        store.get(ref, tmp_path / "out")
    report = store.verify(deep=True, repair=True)
    assert [d.ref for d in report.damaged] == [ref]
    assert "disagrees with the manifest" in report.damaged[0].problem
    assert report.mismatched_chunks == (six["chunks"][0][0],)
    assert (report.quarantined, report.reput) == ((), ())
    store.get("runs/a@1", tmp_path / "fine")
    assert (tmp_path / "fine" / "six.txt").read_bytes() == b"hello\n"


def test_deep_verify_flags_a_file_of_several_chunks_whose_hash_is_wrong(
    store: Store, tmp_path: Path
) -> None:
    data = manifest_data(store, "runs/a@1")
    big = entry(data, "sub/big.bin")
    assert len(big["chunks"]) > 1
    big["blake3"] = Digest.of(b"something else").hex
    ref = commit(store, data)
    with pytest.raises(CorruptObjectError, match="does not match its recorded BLAKE3"):
        store.get(ref, tmp_path / "out")
    assert store.verify().ok, "only reading the file shows it"
    report = store.verify(deep=True, repair=True)
    assert [(d.ref, d.files) for d in report.damaged] == [(ref, ("sub/big.bin",))]
    assert "file 'sub/big.bin' does not match its recorded BLAKE3" in report.damaged[0].problem
    assert report.mismatched_files == ("sub/big.bin",)
    assert (report.quarantined, report.reput, report.corrupt_chunks) == ((), (), ())


def test_malformed_refs_and_tags_fail_cleanly(store: Store, tmp_path: Path) -> None:
    bad = {
        layout.version_key("runs/a", 2): b'{"manifest": 5, "created": "x"}',
        layout.version_key("runs/a", 3): b"[" * 100_000,
        layout.tag_key("runs/a", "neg"): b'{"version": -1}',
        layout.tag_key("runs/a", "float"): b'{"version": 1.5}',
    }
    for key, body in bad.items():
        store.backend.put(key, body)
    for ref in ("runs/a@2", "runs/a@3", "runs/a:neg", "runs/a:float"):
        proc = run_cas("get", ref, tmp_path / "out", store=store.backend.local_root)
        assert proc.returncode == 3, (ref, proc.stderr)
        assert "is malformed" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "out")
    # A malformed tag names no version: the versions of its key are as they were.
    store.get("runs/a@1", tmp_path / "out")
    assert store.show("runs/a@1").version.tags == ()
    damaged = {d.ref for d in store.verify().damaged}
    assert damaged == {"runs/a@2", "runs/a@3", "runs/a:neg", "runs/a:float"}
