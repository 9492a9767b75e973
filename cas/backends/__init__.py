"""Backends and the factory that opens one from a URI.

Cloud backends are imported only when their scheme is used, so a missing SDK
costs nothing until then and is reported as the extra to install.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from ..errors import ConfigurationError
from ._cloud import OBJECT_STORE_CONCURRENCY
from ._delegating import DelegatingBackend
from .base import Backend, BytesLike, ObjectInfo, check_key
from .local import LocalBackend

if TYPE_CHECKING:
    from .memory import MemoryBackend

__all__ = [
    "OBJECT_STORE_CONCURRENCY",
    "Backend",
    "BytesLike",
    "DelegatingBackend",
    "LocalBackend",
    "MemoryBackend",
    "ObjectInfo",
    "check_key",
    "open_backend",
]


# scheme -> (module, factory function name, pip extra)
_CLOUD: dict[str, tuple[str, str, str]] = {
    "s3": ("cas.backends.s3", "from_uri", "s3"),
    "gs": ("cas.backends.gcs", "from_uri", "gcs"),
    "az": ("cas.backends.azure", "from_uri", "azure"),
}

# memory:// stores live as long as the process, shared by name, so that two
# opens of one URI see the same objects (as two opens of a folder do).
_memory_stores: dict[str, MemoryBackend] = {}
_memory_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    # The in-memory backend (for tests) loads on first use: every command
    # would otherwise pay for it.
    if name == "MemoryBackend":
        from .memory import MemoryBackend

        return MemoryBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_backend(uri: str | os.PathLike[str], **options: object) -> Backend:
    """Open the backend a URI names: a plain path, ``file://``, ``s3://``, ``gs://``,
    ``az://`` or ``memory://``."""
    text = os.fspath(uri)
    scheme = urlsplit(text).scheme if "://" in text else ""
    if scheme == "":
        return LocalBackend(text, **options)  # type: ignore[arg-type]
    if scheme == "file":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise ConfigurationError(f"file URI with a host is not supported: {text!r}")
        return LocalBackend(unquote(parts.path), **options)  # type: ignore[arg-type]
    if scheme == "memory":
        name = text[len("memory://") :]
        from .memory import MemoryBackend

        with _memory_lock:
            if name not in _memory_stores:
                _memory_stores[name] = MemoryBackend(name=name)
            return _memory_stores[name]
    if scheme in _CLOUD:
        module_name, func_name, extra = _CLOUD[scheme]
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ConfigurationError(
                f"{scheme}:// stores need an SDK that is not installed ({err.name}); "
                f"install it with: pip install 'cas-store[{extra}]'"
            ) from err
        factory: Callable[..., Backend] = getattr(module, func_name)
        return factory(text, **options)
    raise ConfigurationError(
        f"unknown store scheme {scheme!r} in {text!r}; use a path, file://, s3://, gs:// or az://"
    )
