"""The familiar storage API: upload, download, list, exists, delete -- over a cas store.

Code written against a plain storage layer (one object per remote key, last
write wins) moves over unchanged::

    from cas.compat import get_storage_backend
    storage = get_storage_backend("s3", bucket="ml-artifacts", prefix="team-a")
    storage.upload("model.pt", "models/bert/model.pt")
    storage.download("models/bert/model.pt", "/tmp/model.pt")

and gains what cas does underneath: each upload is a new version of its key
(older ones stay until deleted or pruned), identical chunks are stored once,
every download is verified. A remote key is a cas key, so its segments are
letters, digits, ``.``, ``_`` and ``-``.

:meth:`Storage.download_if_newer` decides by content, not by timestamps: the
local file is cut into chunks as a put of it would cut it (at tensor
boundaries for a safetensors file, else by FastCDC), and only the stored
chunks it does not already hold are fetched.
"""

from __future__ import annotations

import builtins
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..digest import Digest, StreamingHasher
from ..errors import (
    ConfigurationError,
    NotFoundError,
    RefNotFoundError,
)
from ..repository._manifest import Entry
from ..store import DEFAULT_STORE, Restored, Store, Version
from ._retry import save_with_retries

log = logging.getLogger("cas.compat")

BACKENDS = ("local", "s3", "gcs", "azure")
_SCHEMES = {"s3": "s3", "gcs": "gs", "azure": "az"}
_BLOCK = 16 * 1024 * 1024
# The option each cloud backend takes for a custom endpoint (an emulator, MinIO...).
_ENDPOINT_OPTION = {"s3": "endpoint_url", "gcs": "endpoint_url", "azure": "account_url"}


@dataclass(frozen=True, slots=True)
class Transfer:
    """What a download moved: chunk bytes fetched from the store, and reused from disk."""

    fetched_bytes: int = 0
    fetched_chunks: int = 0
    reused_bytes: int = 0
    reused_chunks: int = 0


class Storage:
    """A plain-storage view of a :class:`~cas.store.Store` (``.store`` gives the rest)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        #: What the last download or download_if_newer moved.
        self.last_transfer: Transfer | None = None

    @property
    def uri(self) -> str:
        return self.store.uri

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the plain API ---------------------------------------------------------------

    def upload(self, local_path: str | os.PathLike[str], remote_key: str) -> Version:
        """Store a file (or a directory) as the new content of ``remote_key``.

        A transient failure of the service is retried as the same upload: a
        retry never adds a second version.
        """
        path = Path(local_path)
        if not path.exists():
            raise NotFoundError(f"local file to upload does not exist: {path}")
        return save_with_retries(
            lambda token: self.store.put(path, remote_key, idempotency_token=token)
        )

    def download(self, remote_key: str, local_path: str | os.PathLike[str]) -> None:
        """Write the latest content of ``remote_key`` to ``local_path``, replacing it."""
        version = self.store.get(remote_key, local_path, force=True)
        self.last_transfer = Transfer(fetched_bytes=version.size)

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Remote keys under ``prefix`` (a plain string prefix), sorted."""
        return [summary.key for summary in self.store.list_keys(prefix)]

    def exists(self, remote_key: str) -> bool:
        try:
            self.store.resolve(remote_key)
        except RefNotFoundError:
            return False
        return True

    def delete(self, remote_key: str) -> None:
        """Delete every version of ``remote_key`` (space returns at the next gc)."""
        self.store.delete_all(remote_key, force=True)

    def download_if_newer(self, remote_key: str, local_path: str | os.PathLike[str]) -> bool:
        """Bring ``local_path`` to the latest content of ``remote_key``; False if it already was.

        Decided by content: the local file's BLAKE3 against the stored one.
        When they differ, chunks that the local file already holds are copied
        from it and only the others are fetched; :attr:`last_transfer` (and
        the ``cas.compat`` logger) say how many bytes moved.
        """
        ref = self.store.resolve(remote_key)
        manifest = self.store.manifest(ref)
        local = Path(local_path)
        if manifest.kind != "file":
            return self._directory_if_newer(ref.label, manifest.entries, local)
        # An update cuts the local file as a put of it would (at tensor
        # boundaries for a safetensors file), finds the stored chunks in it,
        # and fetches only the others.
        restored = self.store.restore(ref.label, local, update=True)
        return self._moved(remote_key, local, restored)

    # -- helpers -----------------------------------------------------------------------

    def _moved(self, remote_key: str, local: Path, restored: Restored) -> bool:
        """Record what an update moved; True if it wrote anything."""
        self.last_transfer = Transfer(
            restored.missing_bytes,
            restored.missing_chunks,
            restored.reused_bytes,
            restored.reused_chunks,
        )
        if restored.files_written == 0 and restored.files_removed == 0:
            log.info("%s: %s is up to date, nothing moved", remote_key, local)
            return False
        log.info(
            "%s -> %s: fetched %d bytes in %d chunks, reused %d bytes from the local copy",
            remote_key,
            local,
            restored.missing_bytes,
            restored.missing_chunks,
            restored.reused_bytes,
        )
        return True

    def _directory_if_newer(self, label: str, entries: tuple[Entry, ...], local: Path) -> bool:
        # A directory is compared file by file; when anything differs it is
        # updated to the version (files it does not hold removed), reusing
        # what the local copy holds: as a plain storage layer's download does.
        same = local.is_dir()
        wanted = {e.path for e in entries}
        if same:
            same = {p.relative_to(local).as_posix() for p in local.rglob("*")} == wanted
        for entry in entries:
            if not same:
                break
            if entry.type == "file":
                same = _file_digest(local / entry.path) == entry.digest
        if same:
            self.last_transfer = Transfer(reused_bytes=sum(e.size for e in entries))
            return False
        restored = self.store.restore(label, local, update=True, delete=True)
        self._moved(label, local, restored)
        return True


def _file_digest(path: Path) -> Digest | None:
    """BLAKE3 of a local file, or None when it is not a regular file."""
    if not path.is_file():
        return None
    hasher = StreamingHasher()
    with open(path, "rb") as stream:
        while block := stream.read(_BLOCK):
            hasher.update(block)
    return hasher.digest()


# -- factories ---------------------------------------------------------------------------


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def get_storage_backend(
    backend: str | None = None,
    *,
    bucket: str | None = None,
    prefix: str | None = None,
    base_path: str | os.PathLike[str] | None = None,
    region: str | None = None,
    endpoint_url: str | None = None,
    **options: Any,
) -> Storage:
    """Open a store by parts. Anything not given comes from the environment:

    ``STORAGE_BACKEND`` (local, s3, gcs or azure; default local),
    ``STORAGE_BUCKET`` (bucket or container; required for the cloud),
    ``STORAGE_PREFIX``, ``STORAGE_BASE_PATH`` (local; default ``./.cas``),
    ``STORAGE_REGION`` and ``STORAGE_ENDPOINT_URL``. ``options`` go to the
    backend as they are (e.g. ``profile`` for S3).
    """
    kind = (backend or _env("STORAGE_BACKEND") or "local").lower()
    if kind not in BACKENDS:
        raise ConfigurationError(
            f"unknown storage backend {kind!r}; use one of {', '.join(BACKENDS)}"
        )
    bucket = bucket or _env("STORAGE_BUCKET")
    prefix = (prefix if prefix is not None else _env("STORAGE_PREFIX") or "").strip("/")
    region = region or _env("STORAGE_REGION")
    endpoint_url = endpoint_url or _env("STORAGE_ENDPOINT_URL")
    if kind == "local":
        root = Path(base_path or _env("STORAGE_BASE_PATH") or DEFAULT_STORE)
        return Storage(Store.open(root / prefix if prefix else root, **options))
    if not bucket:
        raise ConfigurationError(
            f"the {kind} storage backend needs a bucket: pass bucket=... or set STORAGE_BUCKET"
        )
    if region and kind == "s3":
        options.setdefault("region", region)
    if endpoint_url:
        options.setdefault(_ENDPOINT_OPTION[kind], endpoint_url)
    uri = f"{_SCHEMES[kind]}://{bucket}" + (f"/{prefix}" if prefix else "")
    return Storage(Store.open(uri, **options))


def get_storage_from_uri(uri: str | os.PathLike[str], **options: Any) -> Storage:
    """Open ``s3://bucket/prefix``, ``gs://...``, ``az://...``, ``file:///...`` or a path."""
    return Storage(Store.open(uri, **options))


_default: Storage | None = None
_default_lock = threading.Lock()


def get_default_storage() -> Storage:
    """The process-wide storage, opened from the environment on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = get_storage_backend()
        return _default


def set_default_storage(storage: Storage | None) -> None:
    """Replace the process-wide storage (``None``: reopen from the environment next time)."""
    global _default
    with _default_lock:
        _default = storage
