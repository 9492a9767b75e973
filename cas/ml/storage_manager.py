"""The storage API of RLHF training stacks, over cas stores.

Training stacks often carry a small storage layer of their own: a
``StorageManager`` that uploads a checkpoint folder to a URI with an
``ArtifactMetadata`` record beside it, lists what a bucket holds and
downloads it again. Code written against that API moves to cas by changing
its import::

    from cas import ArtifactMetadata, get_storage_manager

    storage = get_storage_manager()
    uri = storage.upload("out/step_1000", "s3://ml-artifacts/experiments/dpo/step_1000",
                         metadata=ArtifactMetadata(...))
    storage.download(uri, "restored/step_1000")

A URI names a store and a key in it: ``s3://bucket/experiments/dpo/step_1000``
is key ``experiments/dpo/step_1000`` of the store at ``s3://bucket`` (also
``gs://``, ``gcs://``, ``az://`` and ``azure://``). A ``file://`` URI or a
plain path names a key of the store kept at ``$RLHF_STORAGE_PATH`` (default
``./rlhf_storage``): the part of the path under that folder, or the whole
path when it is relative and not under it. A URI may end in ``@N`` or
``:TAG`` to name one version; without, it means the latest.

Each upload is a new version of its key, deduplicated against everything
in the store, and every download is verified. The metadata record maps onto
cas's typed fields (:class:`~cas.store.ArtifactInfo`), so ``cas find``,
``cas log`` and ``cas lineage`` see it too.
"""

from __future__ import annotations

import builtins
import functools
import os
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ..errors import InvalidInputError, InvalidRefError, NotFoundError, RefNotFoundError
from ..repository._metadata import ArtifactInfo
from ..store import Store, Version

#: The environment variable naming the folder of the local store.
ROOT_VARIABLE = "RLHF_STORAGE_PATH"
DEFAULT_ROOT = "./rlhf_storage"
#: The version string the replaced layer gave every artifact unless told otherwise.
DEFAULT_VERSION = "1.0.0"
# URI scheme -> the scheme cas spells it with.
_CLOUD_SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs", "az": "az", "azure": "az"}
# Fields of the record that cas has no typed field for: kept in the version's metadata.
_EXTRA_FIELDS = {"artifact_id": "artifact_id", "version": "artifact_version"}


@dataclass
class ArtifactMetadata:
    """What is known of a stored artifact: the record of the replaced storage layer.

    On upload it becomes the version's typed fields: ``artifact_type`` ->
    type, ``job_name`` -> job, ``algorithm``, ``base_model``,
    ``peft_method`` -> fine_tuning, ``final_loss`` -> metric ``loss``,
    ``total_steps`` -> metric ``step``, ``tags`` -> labels; ``artifact_id``
    and ``version`` go to the version's metadata, and a
    ``parent_artifact_id`` that names a stored version (a URI or ``KEY@N``)
    becomes its parent. Read back, ``created_at``, ``size_bytes`` and
    ``storage_path`` (a URI ending in ``@N``) are the store's.
    """

    artifact_id: str
    artifact_type: str  # checkpoint, model, dataset, config or other
    job_name: str
    algorithm: str
    created_at: datetime
    size_bytes: int
    storage_path: str
    base_model: str | None = None
    peft_method: str | None = None
    final_loss: float | None = None
    total_steps: int | None = None
    version: str = DEFAULT_VERSION
    parent_artifact_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tags = dict(self.tags or {})  # None was the replaced layer's default

    def to_dict(self) -> dict[str, Any]:
        """Every field, ``created_at`` as ISO 8601 text."""
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArtifactMetadata:
        """Inverse of :meth:`to_dict`; unknown fields fail, naming them."""
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidInputError(
                f"unknown artifact metadata field(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(names))}"
            )
        values = dict(data)
        created = values.get("created_at")
        if isinstance(created, str):
            values["created_at"] = _parse_time(created)
        try:
            return cls(**values)
        except TypeError as err:
            raise InvalidInputError(f"artifact metadata: {err}") from None

    def to_info(self) -> ArtifactInfo:
        """The typed record cas keeps for this artifact."""
        metrics: dict[str, float] = {}
        if self.final_loss is not None:
            metrics["loss"] = self.final_loss
        if self.total_steps is not None:
            metrics["step"] = self.total_steps
        return ArtifactInfo(
            type=self.artifact_type,
            job=self.job_name or None,
            algorithm=self.algorithm or None,
            base_model=self.base_model or None,
            fine_tuning=self.peft_method or None,
            metrics=metrics,
            labels=dict(self.tags),
        )

    @classmethod
    def from_version(cls, version: Version, storage_path: str) -> ArtifactMetadata:
        """The record of a stored version (``storage_path``: the URI that names it)."""
        info = version.info
        extra = version.metadata
        step = info.metrics.get("step")
        parent = extra.get("parent_artifact_id") or (info.parents[0] if info.parents else None)
        return cls(
            artifact_id=str(extra.get("artifact_id") or version.ref),
            artifact_type=info.type,
            job_name=info.job or "",
            algorithm=info.algorithm or "",
            created_at=_parse_time(version.created),
            size_bytes=version.size,
            storage_path=storage_path,
            base_model=info.base_model,
            peft_method=info.fine_tuning,
            final_loss=info.metrics.get("loss"),
            total_steps=int(step) if step is not None else None,
            version=str(extra.get("artifact_version") or version.number),
            parent_artifact_id=parent,
            tags=dict(info.labels),
        )


def _parse_time(text: str) -> datetime:
    # Python 3.10's fromisoformat does not take the "Z" the store writes.
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInputError(f"created_at must be an ISO 8601 time, got {text!r}") from None


@dataclass(frozen=True)
class _Location:
    store_uri: str  # as cas opens it
    uri_prefix: str  # what a key is appended to, to make a URI of this store
    ref: str  # a key, KEY@N or KEY:TAG; empty for the whole store


class StorageManager:
    """Upload, download, list and delete artifacts by URI, on whichever stores they name.

    Stores are opened on first use and kept open. ``root`` is the local
    store's folder (default ``$RLHF_STORAGE_PATH``, else ``./rlhf_storage``);
    ``options`` go to every cloud store opened (e.g. ``endpoint_url``).
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, **options: Any) -> None:
        self.root = Path(root or os.environ.get(ROOT_VARIABLE) or DEFAULT_ROOT)
        self._options = options
        self._stores: dict[str, Store] = {}
        self._lock = threading.Lock()

    # -- the API -------------------------------------------------------------------

    def upload(
        self,
        local_path: str | os.PathLike[str],
        remote_uri: str,
        metadata: ArtifactMetadata | None = None,
    ) -> str:
        """Store a file or folder as the next version of the URI's key; its URI with ``@N``."""
        path = Path(local_path)
        if not path.exists():
            raise NotFoundError(f"local file to upload does not exist: {path}")
        where = self._locate(remote_uri, need_ref=True)
        store = self._store(where)
        info = metadata.to_info() if metadata is not None else None
        extra: dict[str, Any] = {}
        parents: list[str] = []
        if metadata is not None:
            for name, stored_as in _EXTRA_FIELDS.items():
                extra[stored_as] = getattr(metadata, name)
            if metadata.parent_artifact_id:
                extra["parent_artifact_id"] = metadata.parent_artifact_id
                parents = self._parent(store, where, metadata.parent_artifact_id)
        version = store.put(path, where.ref, parents=parents, metadata=extra, info=info)
        return f"{where.uri_prefix}{version.ref}"

    def download(self, remote_uri: str, local_path: str | os.PathLike[str]) -> str:
        """Restore what the URI names to ``local_path`` (replaced if it exists, verified)."""
        where = self._locate(remote_uri, need_ref=True)
        self._store(where).get(where.ref, local_path, force=True)
        return os.fspath(local_path)

    def delete(self, remote_uri: str) -> None:
        """Delete the version the URI names, or every version of its key; nothing if none.

        Space comes back at the next ``cas gc``.
        """
        where = self._locate(remote_uri, need_ref=True)
        store = self._store(where)
        try:
            if "@" in where.ref or ":" in where.ref:
                store.delete(where.ref, force=True)
            else:
                store.delete_all(where.ref, force=True)
        except RefNotFoundError:
            pass

    def list(
        self, base_uri: str, prefix: str | None = None, artifact_type: str | None = None
    ) -> builtins.list[ArtifactMetadata]:
        """The latest version of each key under ``base_uri`` (and ``prefix``), newest first."""
        where = self._locate(base_uri, need_ref=False)
        key_prefix = "/".join(part for part in (where.ref, prefix or "") if part)
        out = []
        for summary in self._store(where).list_keys(key_prefix):
            latest = summary.latest
            if artifact_type is not None and latest.info.type != artifact_type:
                continue
            out.append(ArtifactMetadata.from_version(latest, f"{where.uri_prefix}{latest.ref}"))
        out.sort(key=lambda m: m.created_at, reverse=True)
        return out

    def get_metadata(self, remote_uri: str) -> ArtifactMetadata:
        """The record of the version the URI names."""
        where = self._locate(remote_uri, need_ref=True)
        version = self._store(where).show(where.ref).version
        return ArtifactMetadata.from_version(version, f"{where.uri_prefix}{version.ref}")

    def close(self) -> None:
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for store in stores:
            store.close()

    # -- helpers -------------------------------------------------------------------

    def _locate(self, uri: str | os.PathLike[str], *, need_ref: bool) -> _Location:
        text = os.fspath(uri)
        scheme, sep, rest = text.partition("://")
        if sep and scheme.lower() in _CLOUD_SCHEMES:
            bucket, _, ref = rest.partition("/")
            if not bucket:
                raise InvalidInputError(f"{text!r} names no bucket")
            store_uri = f"{_CLOUD_SCHEMES[scheme.lower()]}://{bucket}"
            where = _Location(store_uri, f"{store_uri}/", ref.strip("/"))
        elif sep and scheme.lower() != "file":
            raise InvalidInputError(
                f"unsupported storage scheme {scheme!r} in {text!r}; use s3://, gs://, az://, "
                "file:// or a path"
            )
        else:
            where = self._local(text, unquote(rest) if sep else text)
        if need_ref and not where.ref:
            raise InvalidInputError(f"{text!r} names a whole store, not an artifact in it")
        return where

    def _local(self, text: str, path: str) -> _Location:
        root = Path(os.path.abspath(self.root))
        target = Path(os.path.abspath(path))
        if target == root or root in target.parents:
            ref = target.relative_to(root).as_posix() if target != root else ""
        elif not Path(path).is_absolute():
            ref = Path(path).as_posix().strip("/")  # a key of the local store, as the old layer had
        else:
            raise InvalidInputError(
                f"{text!r} is outside the local store at {root} "
                f"(set {ROOT_VARIABLE} to the folder that holds it)"
            )
        return _Location(os.fspath(root), f"file://{root.as_posix()}/", "" if ref == "." else ref)

    def _store(self, where: _Location) -> Store:
        with self._lock:
            store = self._stores.get(where.store_uri)
            if store is None:
                local = not where.store_uri.partition("://")[1]
                options = {} if local else self._options
                store = self._stores[where.store_uri] = Store.open(where.store_uri, **options)
            return store

    def _parent(self, store: Store, where: _Location, parent_id: str) -> builtins.list[str]:
        """The parent a ``parent_artifact_id`` names, when it names a version of this store."""
        try:
            parent = self._locate(parent_id, need_ref=True) if "://" in parent_id else None
        except InvalidInputError:
            return []
        if parent is not None and parent.store_uri != where.store_uri:
            return []  # lineage is recorded within one store
        ref = parent.ref if parent is not None else parent_id
        try:
            store.resolve(ref)
        except (InvalidRefError, InvalidInputError, RefNotFoundError):
            return []  # an id of the old layer's own: kept as metadata only
        return [ref]


@functools.cache
def get_storage_manager() -> StorageManager:
    """The process-wide manager, made on first use."""
    return StorageManager()
