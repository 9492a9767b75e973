"""Key schema and the syntax of keys and references."""

from __future__ import annotations

import pytest

from cas.backends.base import check_key as check_object_key
from cas.digest import Digest
from cas.errors import InvalidInputError, InvalidKeyError, InvalidRefError
from cas.repository import _layout as layout
from cas.repository._layout import Reference, parse_ref

DIGEST = Digest.of(b"some chunk")


@pytest.mark.parametrize(
    "key",
    ["a", "runs/bert/ckpt", "A-b_c.d/0/x", "v1.2.3", "...", "a/.hidden", "x" * 200],
)
def test_valid_keys(key: str) -> None:
    assert layout.check_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/abs",
        "trailing/",
        "a//b",
        ".",
        "..",
        "a/../b",
        "a/./b",
        "with space",
        "semi;colon",
        "tag:inside",
        "at@inside",
        "ünïcode",
        "back\\slash",
        "new\nline",
        "star*",
    ],
)
def test_invalid_keys(key: str) -> None:
    with pytest.raises(InvalidKeyError):
        layout.check_key(key)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("runs/bert/ckpt", Reference("runs/bert/ckpt")),
        ("runs/bert/ckpt@1", Reference("runs/bert/ckpt", version=1)),
        ("k@42", Reference("k", version=42)),
        ("k@007", Reference("k", version=7)),
        ("runs/bert/ckpt:best", Reference("runs/bert/ckpt", tag="best")),
        ("k:v1.0-rc_2", Reference("k", tag="v1.0-rc_2")),
    ],
)
def test_parse_ref(text: str, expected: Reference) -> None:
    parsed = parse_ref(text)
    assert parsed == expected
    assert parse_ref(str(parsed)) == parsed


def test_reference_str() -> None:
    assert str(Reference("k")) == "k"
    assert str(Reference("k", version=3)) == "k@3"
    assert str(Reference("k", tag="best")) == "k:best"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "empty"),
        ("k@", "number"),
        ("k@0", "number >= 1"),
        ("k@-1", "number"),
        ("k@x", "number"),
        ("k@1.5", "number"),
        ("k@\u00b2", "number"),  # superscript two: str.isdigit() says yes, int() says no
        ("k@\uff11", "number"),  # fullwidth one: not an ASCII version number
        ("k@\u0663", "number"),  # Arabic-Indic three
        ("@3", "empty"),
        ("k:", "invalid tag"),
        ("k:123", "not only digits"),
        ("k:a/b", "invalid tag"),
        ("k:bad tag", "invalid tag"),
        (":tag", "empty"),
        ("k@1:tag", "not both"),
        ("k:tag@1", "not both"),
        ("bad key@1", "invalid reference"),
        ("a//b:tag", "invalid reference"),
        ("../x", "invalid reference"),
    ],
)
def test_parse_ref_rejects(text: str, words: str) -> None:
    with pytest.raises(InvalidRefError, match=words):
        parse_ref(text)


def test_ref_errors_are_usage_errors() -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_ref("k@zero")
    assert info.value.exit_code == 2
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("tag", ["best", "v1", "release-2024.01", "a_b"])
def test_valid_tags(tag: str) -> None:
    assert layout.check_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", "1", "42", ".", "..", "a/b", "a b", "a:b", "a@b"])
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(InvalidRefError):
        layout.check_tag(tag)


def test_object_keys() -> None:
    h = DIGEST.hex
    assert layout.chunk_key(DIGEST) == f"chunks/{h[:2]}/{h}"
    assert layout.manifest_key(DIGEST) == f"manifests/{h[:2]}/{h}"
    assert layout.version_key("runs/a", 7) == "refs/runs/a/@v/000000000007"
    assert layout.tag_key("runs/a", "best") == "refs/runs/a/@t/best"
    assert layout.versions_prefix("k") == "refs/k/@v/"
    assert layout.tags_prefix("k") == "refs/k/@t/"
    # Every key the layout produces is a valid backend key.
    for key in (
        layout.chunk_key(DIGEST),
        layout.manifest_key(DIGEST),
        layout.version_key("a/b", 1),
        layout.tag_key("a/b", "t"),
        layout.CONFIG_KEY,
    ):
        assert check_object_key(key) == key


def test_version_keys_sort_numerically() -> None:
    keys = [layout.version_key("k", n) for n in (1, 2, 10, 100, 99)]
    assert sorted(keys) == [layout.version_key("k", n) for n in (1, 2, 10, 99, 100)]


def test_digest_from_key() -> None:
    assert layout.digest_from_key(layout.chunk_key(DIGEST)) == DIGEST
    assert layout.digest_from_key(layout.manifest_key(DIGEST)) == DIGEST
    assert layout.digest_from_key("chunks/ab/not-a-digest") is None
    assert layout.digest_from_key("config") is None


def test_parse_ref_key() -> None:
    assert layout.parse_ref_key(layout.version_key("runs/a/b", 12)) == layout.RefObject(
        "runs/a/b", version=12
    )
    assert layout.parse_ref_key(layout.tag_key("runs/a", "best")) == layout.RefObject(
        "runs/a", tag="best"
    )
    # A key whose segments look like the layout's own directories is still parsed right.
    assert layout.parse_ref_key("refs/x/@v/000000000001") == layout.RefObject("x", version=1)
    assert layout.parse_ref_key("chunks/ab/cd") is None
    assert layout.parse_ref_key("refs/k") is None
    assert layout.parse_ref_key("refs/k/@x/1") is None
    assert layout.parse_ref_key("refs/k/@v/notanumber") is None


def test_keys_cannot_collide_with_layout_dirs() -> None:
    # '@' is not allowed in keys, so "refs/<key>/@v/..." is never ambiguous.
    with pytest.raises(InvalidKeyError):
        layout.check_key("a/@v/1")
    with pytest.raises(InvalidKeyError):
        layout.check_key("a/@t")
