"""A compact, exact set of 32-byte digests, for marking millions of chunks.

A Python ``set`` of raw digests costs about 114 bytes per member (a 65-byte
``bytes`` object rounded up by the allocator, plus the hash table); for the
million chunks of a large store that is over 100 MB. Here the members are
split by their first two bytes into 65,536 buckets, and each bucket is one
``bytearray`` of the remaining 30 bytes of its members, back to back: about
32 bytes per member, a third of the set. A bucket holds a few dozen members
even at millions of chunks (digests are uniform), so a lookup is one C-level
``find`` over a few hundred bytes.

The set is exact: no false positives, unlike a Bloom filter or a truncated
hash, so garbage collection keeps no garbage by accident and deletes no live
chunk by accident.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..digest import DIGEST_SIZE

_PREFIX = 2
_SUFFIX = DIGEST_SIZE - _PREFIX
_BUCKETS = 1 << (8 * _PREFIX)


class DigestSet:
    """Raw 32-byte digests; ``add`` and ``in`` are O(members / 65,536)."""

    __slots__ = ("_buckets", "_count")

    def __init__(self, digests: Iterable[bytes] = ()) -> None:
        self._buckets = [bytearray() for _ in range(_BUCKETS)]
        self._count = 0
        for digest in digests:
            self.add(digest)

    @staticmethod
    def _find(bucket: bytearray, suffix: bytes) -> int:
        # A match must start on a member boundary; a match straddling two
        # members is possible in principle and is skipped.
        index = bucket.find(suffix)
        while index != -1 and index % _SUFFIX:
            index = bucket.find(suffix, index + 1)
        return index

    def add(self, digest: bytes) -> bool:
        """Add ``digest``; True if it was not there yet."""
        if len(digest) != DIGEST_SIZE:
            raise ValueError(f"a digest has {DIGEST_SIZE} bytes, got {len(digest)}")
        bucket = self._buckets[(digest[0] << 8) | digest[1]]
        suffix = digest[_PREFIX:]
        if self._find(bucket, suffix) != -1:
            return False
        bucket += suffix
        self._count += 1
        return True

    def add_hex(self, text: str) -> bool:
        """Add a digest given as 64 hex characters (as manifests store them)."""
        digest = bytes.fromhex(text)
        return self.add(digest)

    def __contains__(self, digest: object) -> bool:
        if not isinstance(digest, (bytes, bytearray)) or len(digest) != DIGEST_SIZE:
            return False
        bucket = self._buckets[(digest[0] << 8) | digest[1]]
        return self._find(bucket, bytes(digest[_PREFIX:])) != -1

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[bytes]:
        for index, bucket in enumerate(self._buckets):
            prefix = index.to_bytes(_PREFIX, "big")
            for start in range(0, len(bucket), _SUFFIX):
                yield prefix + bytes(bucket[start : start + _SUFFIX])

    def compact(self) -> None:
        """Drop the slack a growing ``bytearray`` keeps (about 1/8) once adding is over."""
        # One bucket at a time, so the copy never doubles the whole set.
        for index, bucket in enumerate(self._buckets):
            self._buckets[index] = bytearray(bytes(bucket))

    @property
    def nbytes(self) -> int:
        """Bytes held by the members (not counting per-bucket object overhead)."""
        return self._count * _SUFFIX
