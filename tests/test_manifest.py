"""Manifests: canonical bytes, round trips, and the path checks that guard restores."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from cas.digest import Digest
from cas.errors import CorruptObjectError, InvalidInputError, UnsafePathError
from cas.repository._manifest import (
    SCHEMA_VERSION,
    ChunkRef,
    Entry,
    Manifest,
    Parent,
    canonical_json,
    check_entries,
    check_link_target,
    check_metric,
    check_relative_path,
    live_chunk_names,
)

D1 = Digest.of(b"one")
D2 = Digest.of(b"two")
D3 = Digest.of(b"three")


def file_entry(path: str, mode: int = 0o644) -> Entry:
    return Entry(path, "file", mode, size=7, digest=D3, chunks=(ChunkRef(D1, 3), ChunkRef(D2, 4)))


def sample(**overrides: Any) -> Manifest:
    fields: dict[str, Any] = {
        "key": "runs/bert/ckpt",
        "kind": "directory",
        "created": "2025-01-02T03:04:05.000006Z",
        "entries": (
            Entry("sub", "dir", 0o755),
            file_entry("sub/weights.bin"),
            Entry("empty", "file", 0o600, size=0, digest=Digest.of(b""), chunks=()),
            Entry("latest", "symlink", 0o777, target="sub/weights.bin"),
            file_entry("ünïcødé ✓.txt", 0o755),
        ),
        "parents": (Parent("runs/bert/ckpt", 1, D1),),
        "tags": ("best",),
        "metrics": {"loss": 0.31, "step": 100, "acc": 1e-300},
        "metadata": {"lr": 0.001, "tags": ["a", "b"], "nested": {"z": 1, "a": None}},
        "message": "first run — ok",
    }
    fields.update(overrides)
    return Manifest(**fields)


# -- canonical form ------------------------------------------------------------------


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": "é"}]}) == (
        '{"a":[1,{"c":"é","d":2}],"b":1}'.encode()
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_canonical_json_refuses_non_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        canonical_json({"x": bad})


def test_canonical_bytes_do_not_depend_on_insertion_order() -> None:
    a = sample()
    b = sample(
        metrics={"acc": 1e-300, "step": 100, "loss": 0.31},
        metadata={"nested": {"a": None, "z": 1}, "tags": ["a", "b"], "lr": 0.001},
    )
    assert a.to_bytes() == b.to_bytes()
    assert Digest.of(a.to_bytes()) == Digest.of(b.to_bytes())
    # ... and any change of content changes them.
    assert sample(message="other").to_bytes() != a.to_bytes()
    assert sample(metrics={"loss": 0.32}).to_bytes() != sample(metrics={"loss": 0.31}).to_bytes()


def test_canonical_json_of_a_manifest_is_pinned() -> None:
    # Manifest ids are hashes of these bytes: a change of the format changes every id.
    m = Manifest(
        key="k",
        kind="file",
        created="2025-01-01T00:00:00.000000Z",
        entries=(Entry("w.bin", "file", 0o644, size=3, digest=D1, chunks=(ChunkRef(D2, 3),)),),
        metrics={"loss": 0.5},
    )
    expected = (
        '{"created":"2025-01-01T00:00:00.000000Z",'
        f'"entries":[{{"blake3":"{D1.hex}","chunks":[["{D2.hex}",3]],"mode":420,'
        '"path":"w.bin","size":3,"type":"file"}],'
        '"key":"k","kind":"file","message":"","metadata":{},"metrics":{"loss":0.5},'
        '"parents":[],"schema":1,"tags":[]}'
    ).encode()
    assert canonical_json(m.to_dict()) == expected
    # The stored form is that JSON in a zstd frame.
    assert zstandard.ZstdDecompressor().decompress(m.to_bytes()) == expected


def test_stored_form_is_zstd_framed_json() -> None:
    m = sample()
    data = json.loads(zstandard.ZstdDecompressor().decompress(m.to_bytes()))
    assert data["schema"] == SCHEMA_VERSION
    assert data["key"] == "runs/bert/ckpt"
    assert data["parents"] == [{"key": "runs/bert/ckpt", "version": 1, "manifest": D1.hex}]
    files = {e["path"]: e for e in data["entries"]}
    assert files["sub/weights.bin"]["chunks"] == [[D1.hex, 3], [D2.hex, 4]]
    assert files["sub/weights.bin"]["blake3"] == D3.hex
    assert files["latest"] == {"path": "latest", "type": "symlink", "mode": 0o777,
                               "target": "sub/weights.bin"}  # fmt: skip
    assert files["sub"] == {"path": "sub", "type": "dir", "mode": 0o755}


# -- round trip ----------------------------------------------------------------------


def test_round_trip() -> None:
    m = sample()
    back = Manifest.from_bytes(m.to_bytes())
    assert back == m
    assert back.to_bytes() == m.to_bytes()
    assert back.entries[1].chunks == (ChunkRef(D1, 3), ChunkRef(D2, 4))
    assert back.parents[0].manifest_id == D1
    assert back.metrics["step"] == 100
    assert isinstance(back.metrics["step"], int)


def test_manifests_load_and_store_from_many_threads_at_once() -> None:
    # Prune, GC and queries load manifests on thread pools; a zstd context
    # shared between threads corrupts what it decodes.
    entries = tuple(file_entry(f"shard-{i:05d}.bin") for i in range(400))
    manifests = [sample(entries=entries, message=f"m{n}") for n in range(4)]
    blobs = [m.to_bytes() for m in manifests]

    def work(index: int) -> bool:
        m = manifests[index % 4]
        return all(
            Manifest.from_bytes(blobs[index % 4]) == m and m.to_bytes() == blobs[index % 4]
            for _ in range(10)
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(work, range(16)))


def test_round_trip_minimal_file_manifest() -> None:
    m = Manifest(key="a", kind="file", created="t", entries=(file_entry("a.bin"),))
    assert Manifest.from_bytes(m.to_bytes()) == m


def test_size_and_file_count() -> None:
    m = sample()
    assert m.size == 7 + 0 + 7
    assert m.file_count == 3


def test_manifest_is_frozen() -> None:
    m = sample()
    with pytest.raises(AttributeError):
        m.key = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        m.entries[0].path = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"not zstd at all",
        zstandard.ZstdCompressor().compress(b"not json"),
        zstandard.ZstdCompressor().compress(b"[1, 2]"),
        zstandard.ZstdCompressor().compress(b'{"schema": 99}'),
        zstandard.ZstdCompressor().compress(b'{"schema": 1, "key": "k"}'),
    ],
)
def test_from_bytes_rejects_garbage(blob: bytes) -> None:
    with pytest.raises(CorruptObjectError, match="manifest xyz"):
        Manifest.from_bytes(blob, name="manifest xyz")
    with pytest.raises(CorruptObjectError, match="manifest xyz"):
        live_chunk_names(blob, name="manifest xyz")


# -- what a manifest keeps alive -----------------------------------------------------

digests = st.binary(min_size=32, max_size=32).map(Digest)
chunk_refs = st.builds(
    ChunkRef, digests, st.integers(0, 1 << 30), st.lists(digests, max_size=3).map(tuple)
)


@given(st.lists(st.lists(chunk_refs, max_size=6), max_size=4))
def test_live_chunks_are_the_chunks_and_their_bases(files: list[list[ChunkRef]]) -> None:
    entries = tuple(
        Entry(f"f{i}", "file", 0o644, size=sum(c.length for c in chunks), digest=D3,
              chunks=tuple(chunks))
        for i, chunks in enumerate(files)
    )  # fmt: skip
    manifest = Manifest(key="k", kind="directory", created="t", entries=entries)
    live = list(manifest.live_chunks())
    expected = [
        (entry, digest, chunk.length)
        for entry in entries
        for chunk in entry.chunks
        for digest in (chunk.digest, *chunk.bases)
    ]
    assert live == expected
    # The light parse of the stored bytes (what garbage collection marks) agrees.
    assert live_chunk_names(manifest.to_bytes()) == [digest.raw for _, digest, _ in live]


@pytest.mark.parametrize(
    "spelling", [str.upper, lambda text: text[:-2], lambda text: "zz" + text[2:]]
)
def test_chunk_names_must_be_canonical_digests(spelling: Callable[[str], str]) -> None:
    data = sample().to_dict()
    data["entries"][1]["chunks"][0][0] = spelling(D1.hex)
    blob = zstandard.ZstdCompressor().compress(canonical_json(data))
    with pytest.raises(CorruptObjectError, match="not a BLAKE3 hex digest"):
        Manifest.from_bytes(blob)
    with pytest.raises(CorruptObjectError, match="not a BLAKE3 hex digest"):
        live_chunk_names(blob)


def test_from_dict_rejects_bad_entries() -> None:
    data = sample().to_dict()
    data["entries"] = [{"path": "x", "type": "fifo", "mode": 0}]
    with pytest.raises(CorruptObjectError):
        Manifest.from_dict(data)
    data["entries"] = [{"path": "x", "type": "file", "mode": 0, "size": 1, "blake3": "zz",
                        "chunks": []}]  # fmt: skip
    with pytest.raises(CorruptObjectError):
        Manifest.from_dict(data)


# -- path checks ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["a", "a/b/c", "ünï/cødé ✓", "..a", "a..", ".hidden", "a b"])
def test_safe_relative_paths(path: str) -> None:
    assert check_relative_path(path) == path


@pytest.mark.parametrize(
    "path",
    ["", "/etc/passwd", "/", "..", "../x", "a/../../x", "a/..", "./a", "a/./b", "a//b", "a/",
     "nul\x00", "..\\evil"],
)  # fmt: skip
def test_unsafe_relative_paths(path: str) -> None:
    with pytest.raises(UnsafePathError):
        check_relative_path(path)


@pytest.mark.parametrize(
    ("path", "target"),
    [("l", "x"), ("a/l", "../x"), ("a/b/l", "../../x"), ("l", "./x"), ("a/l", "b/../c"),
     ("l", "."), ("a/l", "..")],
)  # fmt: skip
def test_links_within_the_tree(path: str, target: str) -> None:
    assert check_link_target(path, target) == target


@pytest.mark.parametrize(
    ("path", "target"),
    [("l", ""), ("l", "/etc/passwd"), ("l", ".."), ("l", "../x"), ("a/l", "../../x"),
     ("a/l", "b/../../../x"), ("l", "a/../../x")],
)  # fmt: skip
def test_links_out_of_the_tree(path: str, target: str) -> None:
    with pytest.raises(UnsafePathError, match="outside"):
        check_link_target(path, target)


def test_check_entries_refuses_duplicates() -> None:
    with pytest.raises(UnsafePathError, match="twice"):
        check_entries((file_entry("a"), file_entry("a")))


def test_check_entries_refuses_paths_below_a_link() -> None:
    # Each link alone stays inside, but writing through one would follow it.
    entries = (
        Entry("d", "dir", 0o755),
        Entry("d/up", "symlink", 0o777, target=".."),
        file_entry("d/up/x"),
    )
    with pytest.raises(UnsafePathError, match="below a symlink"):
        check_entries(entries)


def test_check_entries_refuses_unsafe_paths_and_links() -> None:
    with pytest.raises(UnsafePathError):
        check_entries((file_entry("../evil"),))
    with pytest.raises(UnsafePathError):
        check_entries((Entry("l", "symlink", 0o777, target="/etc"),))
    check_entries(sample().entries)  # the sample itself is fine


def test_unsafe_path_error_is_a_usage_error() -> None:
    with pytest.raises(InvalidInputError) as info:
        check_relative_path("/abs")
    assert info.value.exit_code == 2


@pytest.mark.parametrize("value", [math.nan, math.inf, True, "1.0", None])
def test_metric_values_must_be_finite_numbers(value: object) -> None:
    with pytest.raises(ValueError, match="finite number"):
        check_metric("loss", value)  # type: ignore[arg-type]


def test_metric_values_accepted() -> None:
    assert check_metric("loss", 0.5) == 0.5
    assert check_metric("step", 3) == 3
