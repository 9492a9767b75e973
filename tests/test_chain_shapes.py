"""The shape of delta chains: how deep each version's chunks go, and roots that renew.

Each tensor range cycles through chain shapes (cas.tensors._writer): a root
stored whole, deltas of it, chains that grow up to the store's read limit,
and a new root every RENEWAL versions, staggered over the file, so that a
long run neither reads more than the limit nor drifts away from its roots.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from test_tensors import PARAMS, entry_chunks, save, step, weights

from cas.errors import CorruptObjectError
from cas.repository import _layout as layout
from cas.store import Store
from cas.tensors._writer import FRONT, RENEWAL, chain_level


@pytest.mark.parametrize("max_reads", [2, 3, 4, 8])
def test_chain_levels_cycle_within_the_read_limit(max_reads: int) -> None:
    levels = [chain_level(phase, max_reads) for phase in range(3 * RENEWAL)]
    assert max(levels) == min(max_reads - 1, RENEWAL - FRONT)
    assert [p for p, level in enumerate(levels) if level == 0] == [0, RENEWAL, 2 * RENEWAL]
    # Right after a root, chunks are deltas of the root itself: two reads.
    assert levels[1 : FRONT + 1] == [1] * FRONT


def long_series(store: Store, tmp_path: Path, versions: int) -> list[Path]:
    """A fine-tuning run put without parents: every weight moves a little each version."""
    arrays = weights(3)
    paths = []
    for number in range(1, versions + 1):
        path = save(tmp_path / f"v{number}.safetensors", arrays)
        store.put(path, "run")
        paths.append(path)
        arrays = step(arrays, seed=1000 + number)
    return paths


def deltas_of(chunks: dict[int, bool]) -> int:
    return sum(1 for has_bases in chunks.values() if has_bases)


@pytest.mark.parametrize("max_reads", [3, 4])
def test_a_long_series_renews_its_roots_and_reads_within_the_limit(
    tmp_path: Path, max_reads: int
) -> None:
    store = Store.init(tmp_path / "store", chunker=PARAMS, max_delta_reads=max_reads)
    versions = 3 * RENEWAL + 5
    paths = long_series(store, tmp_path, versions)
    born: dict[bytes, int] = {}  # chunk -> the first version that names it
    renewed: Counter[int] = Counter()  # version -> chunks stored whole again
    previous: dict[int, bool] = {}
    for number in range(1, versions + 1):
        chunks = entry_chunks(store, f"run@{number}")
        for index, chunk in enumerate(chunks):
            born.setdefault(chunk.digest.raw, number)
            assert len(chunk.bases) + 1 <= max_reads
            was_delta = previous.get(index, False)
            if was_delta and not chunk.bases and born[chunk.digest.raw] == number:
                renewed[number] += 1
        previous = {i: bool(c.bases) for i, c in enumerate(chunks)}
    # Roots move forward, staggered: never every chunk in one version.
    assert sum(renewed.values()) >= deltas_of(previous)
    assert max(renewed.values()) < deltas_of(previous)
    # Every chain of the last version starts from a root of the last two cycles.
    last = entry_chunks(store, f"run@{versions}")
    roots = {c.bases[-1].raw for c in last if c.bases}
    assert min(born[root] for root in roots) > versions - 2 * RENEWAL
    for number in (RENEWAL, 2 * RENEWAL + 1, versions):
        store.get(f"run@{number}", tmp_path / f"out{number}")
        assert (tmp_path / f"out{number}").read_bytes() == paths[number - 1].read_bytes()
    assert store.verify(deep=True).ok


def test_a_damaged_link_is_named_and_a_good_chain_rebuilds_bit_exact(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store", chunker=PARAMS, max_delta_reads=3)
    paths = long_series(store, tmp_path, 6)
    chunk = next(c for c in entry_chunks(store, "run@6") if len(c.bases) == 2)
    # Damage the middle link: the read names it, and nothing half-built is returned.
    key = layout.chunk_key(chunk.bases[0])
    good = store.backend.get(key)
    (tmp_path / "store" / key).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert not store.verify(deep=True).ok
    with pytest.raises(CorruptObjectError, match=f"delta base {chunk.bases[0].hex}"):
        store.get("run@6", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "store" / key).write_bytes(good)
    store.get("run@6", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == paths[-1].read_bytes()
