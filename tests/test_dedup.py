"""Dedup: identical data is stored once, and a small edit stores only the chunks it touched."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import MiB, chunk_files, digests, random_bytes, small_store, text_bytes

from cas.chunks._chunking import follow_chunks
from cas.digest import Digest
from cas.store import Store

BIG = 64 * MiB


@pytest.fixture(scope="module")
def big_data() -> bytes:
    return random_bytes(BIG, seed=64)


@pytest.fixture
def default_store(tmp_path: Path) -> Store:
    # Default params: 256 KiB / 1 MiB / 4 MiB.
    return Store.init(tmp_path / "store")


def new_chunks(store_root: Path, before: set[str]) -> set[str]:
    return chunk_files(store_root) - before


def test_same_file_twice_adds_no_chunk(tmp_path: Path) -> None:
    store = small_store(tmp_path / "store")
    src = tmp_path / "w.bin"
    src.write_bytes(random_bytes(3 * MiB, 1) + text_bytes(1 * MiB, 1))
    store.put(src, "k")
    first = chunk_files(tmp_path / "store")
    assert len(first) > 10
    store.put(src, "k")
    store.put(src, "another/key")
    assert chunk_files(tmp_path / "store") == first
    assert [v.number for v in store.log("k")] == [2, 1]
    stats = store.stats()
    assert stats.logical_bytes == 3 * src.stat().st_size
    assert stats.unique_bytes == src.stat().st_size
    assert stats.dedup_ratio == pytest.approx(3.0)


def test_same_file_twice_via_cli_adds_no_chunk(tmp_path: Path) -> None:
    from helpers import ok, run_cas

    store = tmp_path / "store"
    ok(run_cas("init", "--chunk-avg", "64K", store=store))
    src = tmp_path / "d"
    src.mkdir()
    (src / "a.bin").write_bytes(random_bytes(2 * MiB, 2))
    ok(run_cas("put", src, "k", store=store))
    first = chunk_files(store)
    ok(run_cas("put", src, "k", store=store))
    assert chunk_files(store) == first


def test_duplicate_files_in_one_tree_are_stored_once(tmp_path: Path) -> None:
    store = small_store(tmp_path / "store")
    src = tmp_path / "tree"
    (src / "a").mkdir(parents=True)
    data = random_bytes(1 * MiB, 3)
    (src / "one.bin").write_bytes(data)
    (src / "a" / "two.bin").write_bytes(data)
    store.put(src, "k")
    once = tmp_path / "once"
    once.mkdir()
    (once / "one.bin").write_bytes(data)
    other = small_store(tmp_path / "other")
    other.put(once, "k")
    assert chunk_files(tmp_path / "store") == chunk_files(tmp_path / "other")


def test_one_byte_insertion_in_64_mib_adds_at_most_two_chunks(
    tmp_path: Path, default_store: Store, big_data: bytes
) -> None:
    root = tmp_path / "store"
    src = tmp_path / "ckpt.bin"
    src.write_bytes(big_data)
    default_store.put(src, "ckpt")
    before = chunk_files(root)
    assert 32 <= len(before) <= 256, f"{len(before)} chunks for 64 MiB with 1 MiB average"

    edited = big_data[:1000] + b"\x42" + big_data[1000:]
    src.write_bytes(edited)
    v2 = default_store.put(src, "ckpt")
    added = new_chunks(root, before)
    assert 1 <= len(added) <= 2, f"a 1-byte insertion added {len(added)} chunks"

    # The new version restores to the edited bytes, the old one to the original.
    out = tmp_path / "out.bin"
    default_store.get(v2.ref, out)
    assert Digest.of(out.read_bytes()) == Digest.of(edited)
    out.unlink()
    default_store.get("ckpt@1", out)
    assert Digest.of(out.read_bytes()) == Digest.of(big_data)


@pytest.mark.parametrize("edit", ["overwrite-middle", "append", "truncate-end", "prepend"])
def test_local_edits_add_few_chunks(tmp_path: Path, default_store: Store, edit: str) -> None:
    root = tmp_path / "store"
    base = random_bytes(16 * MiB, seed=16)
    src = tmp_path / "f.bin"
    src.write_bytes(base)
    default_store.put(src, "k")
    before = chunk_files(root)
    middle = len(base) // 2
    edited = {
        "overwrite-middle": base[:middle] + b"\xff" * 100 + base[middle + 100 :],
        "append": base + random_bytes(100_000, 99),
        "truncate-end": base[: len(base) - 100_000],
        "prepend": b"header!" + base,
    }[edit]
    src.write_bytes(edited)
    default_store.put(src, "k")
    added = new_chunks(root, before)
    assert 1 <= len(added) <= 2, f"{edit}: {len(added)} new chunks"


def test_changed_file_in_a_tree_leaves_the_others_shared(tmp_path: Path) -> None:
    store = small_store(tmp_path / "store")
    src = tmp_path / "tree"
    src.mkdir()
    for i in range(5):
        (src / f"layer{i}.bin").write_bytes(random_bytes(512 * 1024, i))
    store.put(src, "model")
    before = chunk_files(tmp_path / "store")
    (src / "layer3.bin").write_bytes(random_bytes(512 * 1024, 33))
    store.put(src, "model")
    added = chunk_files(tmp_path / "store") - before
    per_file = len(before) / 5
    assert 0 < len(added) <= per_file * 1.5
    # Both versions restore exactly.
    for n in (1, 2):
        out = tmp_path / f"v{n}"
        store.get(f"model@{n}", out)
        if n == 2:
            assert digests(out) == digests(src)
        shutil.rmtree(out)


def test_dedup_does_not_depend_on_the_codec(tmp_path: Path) -> None:
    # Chunk names are hashes of raw bytes: the same data compressed or not is one object.
    store = small_store(tmp_path / "store")
    data = text_bytes(400 * 1024, 5)
    src = tmp_path / "t.txt"
    src.write_bytes(data)
    store.put(src, "k")
    names = chunk_files(tmp_path / "store")
    entry = store.show("k").entries[0]
    assert {c.digest.hex for c in entry.chunks} == names
    offset = 0
    for chunk in entry.chunks:
        raw = data[offset : offset + chunk.length]
        assert Digest.of(raw) == chunk.digest
        assert store.chunks.get(chunk) == raw
        offset += chunk.length
    assert offset == len(data)


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each chunk a put gives through follow_chunks was taken at a former cut."""
    record: list[bool] = []

    def recording(*args: Any, **kwargs: Any) -> Iterator[tuple[memoryview, bytes | None]]:
        for view, digest in follow_chunks(*args, **kwargs):
            record.append(digest is not None)
            yield view, digest

    monkeypatch.setattr("cas.tensors._cutting.follow_chunks", recording)
    return record


def test_a_new_version_follows_the_former_cuts_and_chunks_as_a_fresh_store_would(
    tmp_path: Path, taken: list[bool]
) -> None:
    shards = tmp_path / "v1"
    shards.mkdir()
    for i in range(4):
        (shards / f"shard-{i}.jsonl").write_bytes(text_bytes(700_000, seed=i))
    (shards / "notes.txt").write_bytes(text_bytes(300_000, seed=9))
    v2 = tmp_path / "v2"
    shutil.copytree(shards, v2)
    (v2 / "shard-4.jsonl").write_bytes(text_bytes(700_000, seed=4))  # appended shard
    notes = (v2 / "notes.txt").read_bytes()
    (v2 / "notes.txt").write_bytes(notes[:1000] + b"an edit" + notes[1000:])
    with (v2 / "shard-3.jsonl").open("ab") as f:
        f.write(b"one more line\n")

    led = small_store(tmp_path / "led")
    led.put(shards, "data")
    assert taken == []  # no former version yet
    led.put(v2, "data")
    fresh = small_store(tmp_path / "fresh")
    fresh.put(v2, "data")

    def files(store: Store) -> dict[str, tuple[object, ...]]:
        entries = store.show("data").entries
        return {e.path: (e.digest, e.chunks) for e in entries if e.type == "file"}

    assert files(led) == files(fresh)
    # The unchanged shards, and the parts before each edit, were taken as cut before.
    assert sum(taken) > len(taken) // 2
    assert not all(taken)
    led.get("data", tmp_path / "out")
    assert digests(tmp_path / "out") == digests(v2)


def test_a_renamed_single_file_follows_its_former_version(
    tmp_path: Path, taken: list[bool]
) -> None:
    """A checkpoint saved under a new name each step is still cut along the former one."""
    data = text_bytes(3_000_000, seed=11)
    first = tmp_path / "step-1000.bin"
    first.write_bytes(data)
    second = tmp_path / "step-2000.bin"
    second.write_bytes(data[:2_000_000] + b"a few more bytes" + data[2_000_000:])

    led = small_store(tmp_path / "led")
    led.put(first, "ckpt")
    led.put(second, "ckpt")
    fresh = small_store(tmp_path / "fresh")
    fresh.put(second, "ckpt")
    assert led.show("ckpt").entries == fresh.show("ckpt").entries
    # The chunks before the edit were taken as cut before, then FastCDC cut the rest.
    assert taken[0]
    assert not all(taken)
    led.get("ckpt", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == second.read_bytes()
