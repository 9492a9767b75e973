"""The compact digest set that marks reachable chunks: exact, and a third of a Python set."""

from __future__ import annotations

import os
import tracemalloc

import pytest

from cas.gc._digestset import DigestSet


def test_exact_membership() -> None:
    members = [os.urandom(32) for _ in range(5000)]
    others = [os.urandom(32) for _ in range(5000)]
    marks = DigestSet()
    assert all(marks.add(d) for d in members)
    assert not any(marks.add(d) for d in members[:100]), "duplicates are not added twice"
    assert len(marks) == len(members)
    assert all(d in marks for d in members)
    assert not any(d in marks for d in others)
    marks.compact()
    assert all(d in marks for d in members)
    assert sorted(marks) == sorted(members)
    assert "not bytes" not in marks
    assert b"short" not in marks


def test_a_match_across_two_members_is_not_a_member() -> None:
    # Two members of one bucket whose suffixes, back to back, contain a third digest's suffix.
    a = b"\x00\x00" + b"A" * 15 + b"B" * 15
    b = b"\x00\x00" + b"C" * 15 + b"D" * 15
    straddling = b"\x00\x00" + b"B" * 15 + b"C" * 15
    marks = DigestSet([a, b])
    assert straddling not in marks
    assert marks.add(straddling)
    assert straddling in marks
    assert len(marks) == 3


def test_hex_and_bad_input() -> None:
    marks = DigestSet()
    digest = os.urandom(32)
    assert marks.add_hex(digest.hex())
    assert digest in marks
    with pytest.raises(ValueError, match="32 bytes"):
        marks.add(b"\x00" * 31)


def test_memory_is_a_fraction_of_a_set_of_bytes() -> None:
    count = 200_000
    digests = [os.urandom(32) for _ in range(count)]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        marks = DigestSet(digests)
        marks.compact()
        compact = tracemalloc.get_traced_memory()[0] - base
        del marks
        base = tracemalloc.get_traced_memory()[0]
        plain = {bytes(bytearray(d)) for d in digests}  # fresh objects, as parsing makes them
        as_set = tracemalloc.get_traced_memory()[0] - base
        del plain
    finally:
        tracemalloc.stop()
    per_member = compact / count
    # 30 bytes a member plus the fixed cost of 65,536 small buckets, spread thin.
    assert per_member < 60, f"{per_member:.1f} bytes per digest"
    # About a third of a set at a million members; at this size the fixed cost still shows.
    assert compact < as_set / 1.8, (compact, as_set)
