"""Versions in a cas store as a read-only fsspec filesystem, protocol ``cas``.

Any library that takes fsspec URLs (pandas, pyarrow, ``datasets``,
``torch.load`` of an opened file...) reads a stored version in place::

    import pandas as pd
    pd.read_parquet("cas://data/train@3/shard-0.parquet", storage_options={"store": "s3://b/p"})

A URL names a version and a path in it: ``cas://KEY@N/path``,
``cas://KEY:TAG/path``, ``cas://KEY@latest/path`` or ``cas://KEY/path``
(the latest version; the longest prefix that is a key with versions wins).
A single-file version is the file itself (``cas://KEY@N``). Above the
versions, ``cas://`` lists the first level of keys, a prefix of keys the next
level, and a key (``cas://KEY``) its versions by number, beside any keys under
it. The store is ``store=`` (a location, or a :class:`~cas.store.Store`), else
``$CAS_STORE``.

Reads fetch only the chunks that hold the bytes asked for, each verified
against its hash, through the store's local chunk cache (docs/cache.md).
Files opened here are never written: every write fails with
``PermissionError``. See docs/fsspec.md.
"""

from __future__ import annotations

import os
import posixpath
import threading
from typing import Any

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem, _Cached

from ..errors import CasError, ConfigurationError, RefNotFoundError
from ..store import Store

#: How deep a chain of links inside a version is followed.
_MAX_LINKS = 8
#: Decoded chunks an open file keeps.
_DECODED_CHUNKS = 8


class _StoreFromEnvironment(_Cached):  # type: ignore[misc]
    """fsspec keeps one filesystem per set of arguments: ``$CAS_STORE`` is read
    when the filesystem is asked for, so that a changed one is a new store."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if not args and kwargs.get("store") is None:
            kwargs["store"] = os.environ.get("CAS_STORE")
        return super().__call__(*args, **kwargs)


class _Version:
    """One version's manifest as a tree: path -> entry, and each folder's children."""

    def __init__(self, label: str, manifest: Any) -> None:
        self.label = label
        self.kind: str = manifest.kind
        self.entries = {e.path: e for e in manifest.entries}
        self.children: dict[str, list[str]] = {"": []}
        for path in sorted(self.entries):
            parent = posixpath.dirname(path)
            while parent not in self.children:  # folders a manifest lists only by their files
                self.children[parent] = []
                grand = posixpath.dirname(parent)
                self.children.setdefault(grand, []).append(parent)
                parent = grand
            self.children[parent].append(path)
            if self.entries[path].type == "dir":
                self.children.setdefault(path, [])


class CasFileSystem(AbstractFileSystem, metaclass=_StoreFromEnvironment):  # type: ignore[misc]
    """A read-only view of the versions in one store."""

    protocol = "cas"
    root_marker = ""

    def __init__(
        self,
        store: Store | str | os.PathLike[str] | None = None,
        *,
        cache: bool | str | os.PathLike[str] | None = None,
        cache_size: int | str | None = None,
        **storage_options: Any,
    ) -> None:
        super().__init__(store=store, cache=cache, cache_size=cache_size, **storage_options)
        if store is None:
            raise ConfigurationError(
                "cas:// URLs need a store: pass store=LOCATION (storage_options) or set CAS_STORE"
            )
        if isinstance(store, Store):
            self.store = store
        else:
            self.store = Store.open(store, create=False, cache=cache, cache_size=cache_size)
        self._versions: dict[str, _Version] = {}
        self._lock = threading.Lock()

    # -- addressing ------------------------------------------------------------------

    def _version(self, path: str) -> tuple[_Version, str]:
        """The version a path names, and the path inside it."""
        found = self._locate(path)
        if isinstance(found, _Keys):
            raise IsADirectoryError(
                f"cas://{found.url}: {found.what}, not a file; name a version (KEY@N, KEY:TAG, "
                "KEY@latest)"
            )
        return found

    def _locate(self, path: str) -> tuple[_Version, str] | _Keys:
        """What a path names: a place in a version, or a folder of keys (the root,
        a key's versions, a prefix of keys)."""
        path = self._strip_protocol(path)
        parts = path.split("/")
        for i, part in enumerate(parts):
            if "@" in part or ":" in part:
                ref = "/".join(parts[: i + 1])
                ref = ref.removesuffix("@latest")
                return self._load(ref, path), "/".join(parts[i + 1 :])
        keys = self._keys(path)
        if keys is not None:
            return keys
        for i in range(len(parts), 0, -1):  # a path in a key's latest version: the longest wins
            try:
                return self._load("/".join(parts[:i]), path), "/".join(parts[i:])
            except FileNotFoundError:
                continue
        raise FileNotFoundError(f"cas://{path}: no key with versions in this path")

    def _keys(self, url: str) -> _Keys | None:
        """The keys at or under ``url`` (None if there are none, nor is it the root)."""
        try:
            listed = self.store.list_keys(url)
        except CasError as err:
            raise FileNotFoundError(f"cas://{url}: {err}") from None
        under = [k for k in listed if not url or k.key == url or k.key.startswith(url + "/")]
        if url and not under:
            return None
        return _Keys(url, under)

    def _load(self, ref: str, url: str) -> _Version:
        try:
            version_ref = self.store.resolve(ref)
        except RefNotFoundError as err:
            raise FileNotFoundError(f"cas://{url}: {err}") from None
        except CasError as err:
            raise FileNotFoundError(f"cas://{url}: {err}") from None
        label = version_ref.label
        with self._lock:
            found = self._versions.get(label)
        if found is None:
            # A version never changes: its manifest is read once per filesystem.
            found = _Version(label, self.store.manifest(version_ref))
            with self._lock:
                self._versions[label] = found
        return found

    def _entry_info(
        self, version: _Version, inner: str, url: str, depth: int = 0
    ) -> dict[str, Any]:
        if version.kind == "file" and inner in ("", *version.entries):
            (entry,) = version.entries.values()
            return self._file_info(version.label, entry)
        name = f"{version.label}/{inner}" if inner else version.label
        entry = version.entries.get(inner)
        if entry is None:
            if inner in version.children:
                return {"name": name, "size": 0, "type": "directory"}
            raise FileNotFoundError(f"cas://{url}: no such file in {version.label}")
        if entry.type == "symlink":
            target = posixpath.normpath(
                posixpath.join(posixpath.dirname(inner), entry.target or "")
            )
            if depth >= _MAX_LINKS or target.startswith("../") or target == "..":
                raise FileNotFoundError(f"cas://{url}: a link that leads out of {version.label}")
            found = self._entry_info(version, "" if target == "." else target, url, depth + 1)
            return {**found, "name": name}
        if entry.type == "dir":
            return {"name": name, "size": 0, "type": "directory"}
        return {**self._file_info(version.label, entry), "name": name}

    @staticmethod
    def _file_info(label: str, entry: Any) -> dict[str, Any]:
        return {
            "name": label,
            "size": entry.size,
            "type": "file",
            "blake3": entry.digest.hex if entry.digest is not None else None,
            "mode": entry.mode,
            "entry": entry,
            "label": f"{label}: file {entry.path!r}",
        }

    # -- the fsspec interface --------------------------------------------------------

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        found = self._locate(path)
        if isinstance(found, _Keys):
            return found.info()
        version, inner = found
        info = self._entry_info(version, inner, self._strip_protocol(path))
        return _public(info)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        found = self._locate(path)
        if isinstance(found, _Keys):
            listed = self._list_keys(found)
        else:
            version, inner = found
            url = self._strip_protocol(path)
            info = self._entry_info(version, inner, url)
            if info["type"] == "file":
                entries = [info]
            else:
                folder = inner if inner in version.children else _link_target(version, inner)
                children = version.children.get(folder, [])
                entries = [self._entry_info(version, c, url) for c in children]
            listed = [_public(i) for i in entries]
        return listed if detail else [item["name"] for item in listed]

    def _list_keys(self, found: _Keys) -> list[dict[str, Any]]:
        """A key's versions (by number: tags and ``latest`` name them again, so they are
        not listed, and a walk sees each version once) and the next level of keys under it."""
        listed: dict[str, dict[str, Any]] = {}
        if found.key is not None:
            try:
                versions = self.store.log(found.key.key)
            except RefNotFoundError:
                versions = []  # its last version deleted since the listing
            for version in sorted(versions, key=lambda v: v.number):
                listed[version.ref] = {
                    "name": version.ref,
                    "size": version.size if version.kind == "file" else 0,
                    "type": "file" if version.kind == "file" else "directory",
                    "version": version.number,
                    "tags": list(version.tags),
                    "created": version.created,
                }
        start = len(found.url) + 1 if found.url else 0
        for key in found.keys:
            if key.key != found.url:
                name = key.key[: start + len(key.key[start:].split("/")[0])]
                listed.setdefault(
                    name, _Keys(name, [k for k in found.keys if k.key == name]).info()
                )
        return list(listed.values())

    def ukey(self, path: str) -> str:
        """A file's BLAKE3: what fsspec's caches key a file's content by."""
        return str(self.info(path).get("blake3") or self._strip_protocol(path))

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | str | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> CasFile:
        if mode != "rb":
            raise PermissionError(f"cas://{self._strip_protocol(path)}: cas:// files are read-only")
        version, inner = self._version(path)
        info = self._entry_info(version, inner, self._strip_protocol(path))
        if info["type"] != "file":
            raise IsADirectoryError(f"cas://{self._strip_protocol(path)} is a folder")
        # The chunks a file read last stay decoded: a library's small reads
        # (a parquet footer, a CSV parser's blocks) mostly fall in them.
        stored = self.store.open_file(info["entry"], label=info["label"], cache=_DECODED_CHUNKS)
        return CasFile(self, path, stored, info["size"], block_size=block_size)

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        with self._open(path) as stream:
            size = stream.size
            begin = 0 if start is None else (start if start >= 0 else max(0, size + start))
            stop = size if end is None else (end if end >= 0 else size + end)
            data: bytes = stream.stored.read(begin, max(0, min(stop, size) - begin))
            return data

    # Everything that would change the store is refused, plainly.
    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise PermissionError("cas:// is a read-only view of stored versions; use cas put")

    mkdir = makedirs = rm = rm_file = rmdir = mv = cp_file = touch = put_file = pipe_file = (
        _read_only
    )


class _Keys:
    """A folder of keys: the root, a key (its versions), or a prefix of keys."""

    def __init__(self, url: str, keys: list[Any]) -> None:
        self.url = url
        self.keys = keys  # KeySummary of each key at or under url
        self.key = next((k for k in keys if k.key == url), None)
        self.what = "a key's versions" if self.key is not None else "a folder of keys"

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"name": self.url, "size": 0, "type": "directory"}
        if self.key is not None:
            info.update(versions=self.key.versions, latest=self.key.latest.number)
        return info


def _public(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in ("entry", "label")}


def _link_target(version: _Version, inner: str) -> str:
    """The folder a link inside a version leads to (followed to the end)."""
    for _ in range(_MAX_LINKS):
        entry = version.entries.get(inner)
        if entry is None or entry.type != "symlink":
            return inner
        inner = _resolved(inner, entry.target or "")
    return inner


def _resolved(link: str, target: str) -> str:
    return posixpath.normpath(posixpath.join(posixpath.dirname(link), target))


class CasFile(AbstractBufferedFile):  # type: ignore[misc]
    """An open stored file: each read fetches and verifies only the chunks it needs."""

    def __init__(
        self,
        fs: CasFileSystem,
        path: str,
        stored: Any,
        size: int,
        *,
        block_size: int | str | None = None,
    ) -> None:
        self.stored = stored
        # No byte cache of fsspec's: a read asks for just its bytes, and the
        # stored file keeps the chunks it decoded last.
        super().__init__(
            fs, path, mode="rb", block_size=block_size or "default", cache_type="none", size=size
        )

    def _fetch_range(self, start: int, end: int) -> bytes:
        end = min(end, self.size)
        if end <= start:
            return b""
        data: bytes = self.stored.read(start, end - start)
        return data
