"""The store's ``config`` object: format version, chunker, codec.

Written once, create-only, when a store is initialised; every later open
reads it and refuses a format it does not know.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import TEMP_PREFIX, Backend
from ..chunks import _codec as codec
from ..chunks._chunking import ChunkerParams
from ..errors import (
    AlreadyExistsError,
    InvalidInputError,
    NotAStoreError,
    NotFoundError,
    StoreError,
    UnsupportedFormatError,
)
from ..repository import _layout as layout
from ..repository._manifest import MAX_CHAIN, canonical_json
from ..repository._refs import utc_now

#: Entropy coders of the exponent streams of tensor chunks, the default first.
ENTROPY_CODERS = ("huffman", "fse")
#: How writers code a delta chunk, the default of new stores first: the
#: zigzag-coded integer difference of the elements, from the base's fp32
#: elements times a factor where one codes smaller (codec 5, format 4), from
#: the base's elements alone (codec 4, format 3), or their XOR (codec 3, any
#: format).
DELTA_METHODS = ("scaled", "difference", "xor")
_DELTA_CODECS = {
    "scaled": codec.Codec.SCALED,
    "difference": codec.Codec.DIFFERENCE,
    "xor": codec.Codec.DELTA,
}
#: The oldest store format that holds the chunks of each delta method.
_DELTA_FORMATS = {
    "scaled": layout.SCALED_FORMAT,
    "difference": layout.DIFFERENCE_FORMAT,
    "xor": layout.FORMAT_VERSION,
}


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """A store's fixed settings, as its ``config`` object records them."""

    chunker: ChunkerParams = field(default_factory=ChunkerParams)
    zstd_level: int = codec.DEFAULT_LEVEL
    store_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: str = field(default_factory=utc_now)
    format: int = layout.FORMAT_VERSION
    #: Longest delta chain writers make: reads to rebuild a chunk (1: no deltas).
    max_delta_reads: int = codec.DEFAULT_DELTA_READS
    #: Entropy coder of the exponent streams of tensor chunks: "huffman"
    #: (zstd, fastest to decode) or "fse" (smaller; needs format 2).
    entropy: str = "huffman"
    #: How delta chunks are coded: "xor" (what a config without the field
    #: means), "difference" (smaller; needs format 3) or "scaled" (smaller
    #: still on decaying fp32 state; needs format 4).
    delta_method: str = "xor"
    #: Whether a put that names no parent may store tensor chunks as deltas
    #: of the key's latest version (a put can still turn it off for itself).
    auto_delta: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.max_delta_reads <= MAX_CHAIN:
            raise InvalidInputError(
                f"delta chains of {self.max_delta_reads} reads: choose 1 (no deltas) to {MAX_CHAIN}"
            )
        if self.entropy not in ENTROPY_CODERS:
            raise InvalidInputError(
                f"entropy coder {self.entropy!r}: choose one of {', '.join(ENTROPY_CODERS)}"
            )
        if self.holds_fse and self.format < layout.FSE_FORMAT:
            raise InvalidInputError(f"entropy coder 'fse' needs store format {layout.FSE_FORMAT}")
        if self.delta_method not in DELTA_METHODS:
            raise InvalidInputError(
                f"delta method {self.delta_method!r}: choose one of {', '.join(DELTA_METHODS)}"
            )
        needs = _DELTA_FORMATS[self.delta_method]
        if self.format < needs:
            raise InvalidInputError(
                f"delta method {self.delta_method!r} needs store format {needs}"
            )

    @classmethod
    def create(
        cls,
        *,
        entropy: str = "huffman",
        delta_method: str = DELTA_METHODS[0],
        auto_delta: bool = True,
        chunker: ChunkerParams | None = None,
    ) -> StoreConfig:
        """The config of a new store: the oldest format that holds what it asks for."""
        version = layout.FORMAT_VERSION
        if entropy == "fse":
            version = layout.FSE_FORMAT
        if delta_method in _DELTA_FORMATS:
            version = max(version, _DELTA_FORMATS[delta_method])
        return cls(
            chunker=chunker or ChunkerParams(),
            entropy=entropy,
            delta_method=delta_method,
            auto_delta=auto_delta,
            format=version,
        )

    @property
    def holds_fse(self) -> bool:
        """Whether writers code the exponent streams of tensor chunks with FSE."""
        return self.entropy == "fse"

    @property
    def delta_codec(self) -> codec.Codec:
        """The codec of the delta chunks writers make."""
        return _DELTA_CODECS[self.delta_method]

    def to_bytes(self) -> bytes:
        data: dict[str, Any] = {
            "format": self.format,
            "id": self.store_id,
            "created": self.created,
            "chunker": self.chunker.to_dict(),
            "codec": {"name": "zstd", "level": self.zstd_level},
        }
        if self.holds_fse:
            data["codec"]["entropy"] = self.entropy
        # Written only when set, so a default config stays as it always was.
        delta: dict[str, Any] = {}
        if self.max_delta_reads != codec.DEFAULT_DELTA_READS:
            delta["max_reads"] = self.max_delta_reads
        if self.delta_method != "xor":
            delta["method"] = self.delta_method
        if not self.auto_delta:
            delta["auto"] = False
        if delta:
            data["delta"] = delta
        return canonical_json(data)

    @classmethod
    def from_bytes(cls, blob: bytes, where: str) -> StoreConfig:
        try:
            data: dict[str, Any] = json.loads(blob)
            version = data["format"]
        except (ValueError, KeyError, TypeError):
            raise NotAStoreError(f"{where} has a config that is not a cas store config") from None
        if version not in layout.READABLE_FORMATS or isinstance(version, bool):
            *older, newest = map(str, layout.READABLE_FORMATS)
            known = f"{', '.join(older)} and {newest}" if older else newest
            raise UnsupportedFormatError(
                f"{where} is a cas store of format {version!r}; this cas reads formats "
                f"{known} only (upgrade cas)"
            )
        try:
            delta = data.get("delta") or {}
            auto = delta.get("auto", True)
            if not isinstance(auto, bool):
                raise ValueError(f"delta.auto is {auto!r}, not true or false")
            return cls(
                chunker=ChunkerParams.from_dict(data["chunker"]),
                zstd_level=int(data["codec"]["level"]),
                store_id=str(data["id"]),
                created=str(data["created"]),
                format=version,
                max_delta_reads=int(delta.get("max_reads", codec.DEFAULT_DELTA_READS)),
                entropy=str(data["codec"].get("entropy", "huffman")),
                delta_method=str(delta.get("method", "xor")),
                auto_delta=auto,
            )
        except (InvalidInputError, ValueError, KeyError, TypeError) as err:
            raise NotAStoreError(f"{where} has a malformed config ({err})") from None


def _is_empty(backend: Backend) -> bool:
    root = backend.local_root
    if root is not None:
        if root.exists() and not root.is_dir():
            raise NotAStoreError(f"{root} is a file, not a cas store")
        # Another process's config on its way in is a temporary file here.
        return not root.exists() or all(p.name.startswith(TEMP_PREFIX) for p in root.iterdir())
    return next(iter(backend.list_objects("")), None) is None


def default_chunker(backend: Backend) -> ChunkerParams:
    """Chunk sizes for a new store on ``backend`` when none are asked for."""
    return ChunkerParams.for_object_store() if backend.remote else ChunkerParams()


def load_config(backend: Backend, *, create: bool) -> StoreConfig:
    """Read the config; when ``create`` and the location is empty, write a default one."""
    try:
        return StoreConfig.from_bytes(backend.get(layout.CONFIG_KEY), backend.uri)
    except NotFoundError:
        pass
    if not _is_empty(backend):
        # Another process may have created the store since we looked (every
        # rank of a distributed job opens it at once): its config wins.
        try:
            return StoreConfig.from_bytes(backend.get(layout.CONFIG_KEY), backend.uri)
        except NotFoundError:
            pass
        raise NotAStoreError(
            f"{backend.uri} is not a cas store: it holds other files and no 'config'"
        )
    if not create:
        raise NotAStoreError(f"{backend.uri} is not a cas store (no 'config'); run `cas init`")
    config = StoreConfig.create(chunker=default_chunker(backend))
    return write_config(backend, config, exist_ok=True)


def write_config(backend: Backend, config: StoreConfig, *, exist_ok: bool) -> StoreConfig:
    """Create the config object; a concurrent creator's config wins if ``exist_ok``."""
    if not _is_empty(backend) and not backend.exists(layout.CONFIG_KEY):
        raise NotAStoreError(
            f"cannot initialise {backend.uri}: it holds other files; use an empty location"
        )
    body = config.to_bytes()
    try:
        backend.put(layout.CONFIG_KEY, body, if_absent=True)
    except AlreadyExistsError:
        existing = backend.get(layout.CONFIG_KEY)
        # A retried request whose first attempt succeeded finds its own config
        # (its store id is new): that is this creation, not an earlier one.
        if existing != body:
            if not exist_ok:
                raise StoreError(f"{backend.uri} is already a cas store") from None
            return StoreConfig.from_bytes(existing, backend.uri)
    backend.flush()
    return config
