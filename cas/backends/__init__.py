"""Backends and the factory that opens one from a URI.

Cloud backends are imported only when their scheme is used, so a missing SDK
costs nothing until then and is reported as the extra to install.
"""

from __future__ import annotations

import importlib
import os
import re
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


# scheme -> (module, factory function name, pip extra, the SDK that extra installs)
_CLOUD: dict[str, tuple[str, str, str, str]] = {
    "s3": ("cas.backends.s3", "from_uri", "s3", "the AWS SDK (boto3)"),
    "gs": ("cas.backends.gcs", "from_uri", "gcs", "the Google Cloud SDK (google-cloud-storage)"),
    "az": ("cas.backends.azure", "from_uri", "azure", "the Azure SDK (azure-storage-blob)"),
}

#: The form of a location of each scheme, for messages.
EXPECTED_FORMS = {
    "s3": "s3://bucket/prefix",
    "gs": "gs://bucket/prefix",
    "az": "az://container/prefix",
    "file": "file:///absolute/path",
    "memory": "memory://name",
}

# A scheme cas knows, then anything but "//": "s3:/bucket", "s3:bucket/x", "gs:b".
_MISTYPED = re.compile(rf"^({'|'.join(EXPECTED_FORMS)}):(?!//)", re.IGNORECASE)

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
        _refuse_mistyped_uri(text)
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
        module_name, func_name, extra, sdk = _CLOUD[scheme]
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ConfigurationError(
                f"{scheme}:// stores need {sdk}, which is not installed "
                f"(no module named {err.name!r}); install it with: pip install 'cas-store[{extra}]'"
            ) from err
        factory: Callable[..., Backend] = getattr(module, func_name)
        return factory(text, **options)
    raise ConfigurationError(
        f"unknown store scheme {scheme!r} in {text!r}; use a path, file://, s3://, gs:// or az://"
    )


def _refuse_mistyped_uri(text: str) -> None:
    """A location that starts like a URI of a known scheme but is not one is a typo,
    not a local folder: the user meant the bucket, and would find the data on disk."""
    match = _MISTYPED.match(text)
    if match is None:
        return
    scheme = match.group(1).lower()
    raise ConfigurationError(
        f"{text!r} is not a valid {scheme} location: write {EXPECTED_FORMS[scheme]}"
        f" (a local folder of that name is written ./{text}, or as a file:// URI)"
    )
