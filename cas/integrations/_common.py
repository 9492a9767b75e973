"""What the framework integrations share: opening a store, metrics, checking a stored copy."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..digest import StreamingHasher
from ..errors import IntegrityError, RefNotFoundError
from ..store import Store, Version

_READ = 1 << 20


def open_store(store: Store | str | os.PathLike[str]) -> Store:
    """A store given as itself or as a location (a path or a URI)."""
    return store if isinstance(store, Store) else Store.open(store)


class Chain:
    """Puts the versions of one key, each with the one before it as parent (so deltas apply).

    The first parent is the key's latest version in the store: a resumed run
    goes on along its chain. ``delta`` is :meth:`Store.put`'s: False stores
    every version whole.
    """

    def __init__(self, store: Store, key: str, *, delta: bool | None = None) -> None:
        self.store = store
        self.key = key
        self.delta = delta
        self.latest: str | None = None

    def parents(self) -> list[str]:
        if self.latest is None:
            try:
                self.latest = self.store.log(self.key)[0].ref
            except RefNotFoundError:
                return []
        return [self.latest]

    def put(self, source: Path, **fields: Any) -> Version:
        """``Store.put`` of ``source`` as the next version; ``fields`` are its keywords."""
        parents = self.parents()
        version = self.store.put(source, self.key, parents=parents, delta=self.delta, **fields)
        self.latest = version.ref
        return version


def finite_metrics(items: Iterable[tuple[str, object]]) -> dict[str, float]:
    """The real, finite numbers among ``items`` (0-d tensors included), as metrics."""
    out: dict[str, float] = {}
    for name, value in items:
        if isinstance(value, bool) or not name:
            continue
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            value = value.item()
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = value
    return out


def _file_digest(path: Path) -> str:
    hasher = StreamingHasher()
    with open(path, "rb") as stream:
        while block := stream.read(_READ):
            hasher.update(block)
    return hasher.digest().hex


def check_stored(store: Store, ref: str, path: Path) -> None:
    """Raise unless every file of ``path`` is in version ``ref`` with the same bytes.

    Run before a local copy is deleted: the files are hashed again and
    compared with what the version recorded, so a folder that changed while
    it was being stored is never removed.
    """
    recorded = {e.path: e for e in store.show(ref).entries if e.type == "file"}
    local = (
        {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
        if path.is_dir()
        else {next(iter(recorded), path.name): path}
    )
    if set(local) != set(recorded):
        raise IntegrityError(f"{ref} does not hold the files of {path}; the folder is kept")
    for name, file in local.items():
        entry = recorded[name]
        if entry.digest is None or entry.size != file.stat().st_size:
            raise IntegrityError(f"{ref}: {name} differs from {file}; the folder is kept")
        if entry.digest.hex != _file_digest(file):
            raise IntegrityError(f"{ref}: {name} differs from {file}; the folder is kept")
