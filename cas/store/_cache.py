"""Which local chunk cache a store reads through, and what a cache folder holds.

On by default for stores on S3, GCS and Azure, where every chunk costs a
request; off for folders, which are as near as the cache would be. The
folder is ``cache=`` (a path), else ``$CAS_CACHE``, else
``$XDG_CACHE_HOME/cas`` or ``~/.cache/cas``; ``cache=False`` or
``CAS_CACHE=off`` turns it off. See docs/cache.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..backends import Backend
from ..chunks._cache import DEFAULT_LIMIT, LocalCache, clear, default_cache_root, usage
from ..errors import InvalidInputError
from ..units import parse_size

#: What ``CAS_CACHE`` may say to turn the cache off.
OFF_WORDS = ("off", "none", "0", "false", "no")
_REMOTE_SCHEMES = ("s3://", "gs://", "az://")

#: ``cache=`` of :func:`cas.open`: None (the default rule), False (off),
#: True (on, in the default folder) or a folder.
CacheChoice = bool | str | os.PathLike[str] | None


@dataclass(frozen=True, slots=True)
class CachedStore:
    """The entries one store holds in a cache folder."""

    store: str
    folder: str
    entries: int
    size: int
    #: Of the entries, whole files kept by gets that link (``cas get --link``).
    files: int = 0

    @property
    def chunks(self) -> int:
        return self.entries - self.files

    def to_dict(self) -> dict[str, object]:
        return {
            "store": self.store,
            "folder": self.folder,
            "entries": self.entries,
            "files": self.files,
            "size": self.size,
        }


@dataclass(frozen=True, slots=True)
class CacheReport:
    """A cache folder: where it is, its limit, and what each store holds in it."""

    root: str
    limit: int
    stores: tuple[CachedStore, ...]

    @property
    def entries(self) -> int:
        return sum(s.entries for s in self.stores)

    @property
    def files(self) -> int:
        return sum(s.files for s in self.stores)

    @property
    def chunks(self) -> int:
        return self.entries - self.files

    @property
    def size(self) -> int:
        return sum(s.size for s in self.stores)

    def to_dict(self) -> dict[str, object]:
        return {
            "root": self.root,
            "limit": self.limit,
            "entries": self.entries,
            "files": self.files,
            "size": self.size,
            "stores": [s.to_dict() for s in self.stores],
        }


def cache_root(cache: CacheChoice = None) -> Path | None:
    """The cache folder ``cache`` names (None when it says off)."""
    if cache is False:
        return None
    if cache is None or cache is True:
        env = os.environ.get("CAS_CACHE", "").strip()
        if env.lower() in OFF_WORDS:
            return None if cache is None else default_cache_root()
        return Path(env).expanduser().absolute() if env else default_cache_root()
    return Path(os.fspath(cache)).expanduser().absolute()


def cache_limit(cache_size: int | str | None = None) -> int:
    """The size limit: ``cache_size``, else ``$CAS_CACHE_SIZE``, else the default."""
    if cache_size is None:
        env = os.environ.get("CAS_CACHE_SIZE", "").strip()
        if not env:
            return DEFAULT_LIMIT
        cache_size = env
    limit = parse_size(cache_size) if isinstance(cache_size, str) else cache_size
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise InvalidInputError.naming(
            "{cache_size} must be a size of 0 bytes or more, not {got!r}",
            cache_size="cache_size",
            got=cache_size,
        )
    return limit


def cache_for(
    backend: Backend, cache: CacheChoice, cache_size: int | str | None
) -> LocalCache | None:
    """The cache a store on ``backend`` reads through, or None."""
    limit = cache_limit(cache_size)
    if cache is None and not backend.uri.startswith(_REMOTE_SCHEMES):
        return None
    root = cache_root(cache)
    if root is None or limit == 0:
        return None
    return LocalCache(root, backend.uri, limit=limit)


def cache_report(cache: CacheChoice = True, cache_size: int | str | None = None) -> CacheReport:
    """What the cache folder holds, store by store (``cache`` as :func:`cas.open` takes it)."""
    root = cache_root(cache) or default_cache_root()
    stores = tuple(
        CachedStore(u.store, str(u.folder), u.entries, u.size, u.files) for u in usage(root)
    )
    return CacheReport(str(root), cache_limit(cache_size), stores)


def clear_cache(cache: CacheChoice = True) -> CacheReport:
    """Empty the cache folder; returns what it held. Safe while others read it."""
    report = cache_report(cache)
    clear(Path(report.root))
    return report
