"""The one exception tree of cas.

Every error cas raises derives from :class:`CasError`. Each class carries the
exit code the CLI uses for it, so the CLI maps errors without a table of its
own. "Not found" errors are also :class:`FileNotFoundError` and "already
exists" errors are also :class:`FileExistsError`, so callers that only know
the builtins still catch them.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TypeVar

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTEGRITY = 3
EXIT_BACKEND = 4
EXIT_NO_SPACE = 5


_E = TypeVar("_E", bound="CasError")


class CasError(Exception):
    """Root of every error raised by cas.

    A message that names arguments of the call is made by :meth:`naming`, in
    the library's terms (``keep_last``, ``force=True``); a front end spells
    those arguments its own way with :meth:`worded` (the CLI: ``--keep-last``,
    ``--force``), so the library never speaks of flags it does not have.
    """

    exit_code: int = EXIT_FAILURE
    #: For an error made by :meth:`naming`: the ``str.format`` template of its message.
    template: str | None = None
    #: The template's fields: how the library names each argument, and the values quoted.
    words: Mapping[str, object] = MappingProxyType({})

    @classmethod
    def naming(cls: type[_E], template: str, /, **words: object) -> _E:
        """The error whose message is ``template`` filled with ``words``."""
        error = cls(template.format_map(words))
        error.template = template
        error.words = MappingProxyType(words)
        return error

    def worded(self, spelling: Mapping[str, str]) -> str:
        """The message, with each field that ``spelling`` names spelled its way.

        A spelling may quote the error's other fields (``"cas rm {label}"``).
        """
        if self.template is None:
            return str(self)
        own = {
            name: word.format_map(self.words)
            for name, word in spelling.items()
            if name in self.words
        }
        return self.template.format_map({**self.words, **own})


# --- bad input: the user can fix it by changing what they typed ---------------


class InvalidInputError(CasError, ValueError):
    """An argument is malformed: a key, a reference, a size, a path."""

    exit_code = EXIT_USAGE


class InvalidKeyError(InvalidInputError):
    """A logical key or a backend object key does not follow the rules."""


class InvalidRefError(InvalidInputError):
    """A reference is not of the form KEY, KEY@N or KEY:TAG."""


class UnsafePathError(InvalidInputError):
    """A path would escape its tree: absolute, containing '..', or a link out."""


class DestinationExistsError(InvalidInputError, FileExistsError):
    """The destination of a restore exists and overwriting was not asked for."""


class SourceError(InvalidInputError):
    """The path to store is missing, unreadable or of an unsupported kind."""


# --- not found -----------------------------------------------------------------


class NotFoundError(CasError, FileNotFoundError):
    """An object, key, version or tag does not exist."""

    exit_code = EXIT_USAGE


class RefNotFoundError(NotFoundError):
    """A key, a version or a tag named by a reference does not exist."""


# --- concurrency preconditions ---------------------------------------------------


class AlreadyExistsError(CasError, FileExistsError):
    """A create-only write found the key already present."""

    exit_code = EXIT_USAGE


class PreconditionFailedError(CasError):
    """A compare-and-swap write lost: the object changed since it was read."""


# --- the store itself --------------------------------------------------------------


class StoreError(CasError):
    """The store is not usable as it is."""

    exit_code = EXIT_USAGE


class NotAStoreError(StoreError):
    """The location exists and holds something that is not a cas store."""


class UnsupportedFormatError(StoreError):
    """The store was written in a format version this cas does not read."""


class BackgroundSaveError(CasError):
    """A save that ran in the background failed: the checkpoint it names was not stored.

    Raised by the next save, by ``wait()`` and at interpreter exit, chained to
    the error the upload met, so a failed upload is never silent.
    """


class ConcurrentCollectionError(CasError):
    """A garbage collection removed an object a put was reusing; nothing was committed.

    ``Store.put`` retries by itself; a caller that sees this error may run the
    same put again. Exit code 1: nothing the user typed is wrong.
    """


# --- integrity ---------------------------------------------------------------------


class IntegrityError(CasError):
    """Stored data does not match what its name or its manifest promises."""

    exit_code = EXIT_INTEGRITY


class CorruptObjectError(IntegrityError):
    """An object cannot be decoded, or its hash does not match its name."""


class MismatchedObjectError(CorruptObjectError):
    """A chunk and the manifest that lists it disagree (its length, its delta base).

    Either may be at fault: the chunk may be whole under its own name.
    """


class MissingObjectError(IntegrityError, FileNotFoundError):
    """An object that a manifest or a ref needs is missing from the store."""


# --- backends ----------------------------------------------------------------------


class BackendError(CasError):
    """The storage service failed. ``is_transient`` says whether a retry may help."""

    exit_code = EXIT_BACKEND

    def __init__(self, message: str, *, is_transient: bool = False) -> None:
        super().__init__(message)
        self.is_transient = is_transient


class NoSpaceLeftError(BackendError):
    """The device holding a local store is full (or the user's quota is used up).

    Not a service outage and not transient: space must be freed first. A
    store keeps a small reserve so that deleting versions and collecting
    garbage still work when it happens (see docs/gc.md).
    """

    exit_code = EXIT_NO_SPACE

    def __init__(self, message: str) -> None:
        super().__init__(message, is_transient=False)


class ConfigurationError(CasError):
    """The store location or its options are wrong (scheme, SDK, credentials)."""

    exit_code = EXIT_USAGE


# --- warnings: the command succeeded, but the user may not have meant it ------------


class CasWarning(UserWarning):
    """Root of the warnings cas gives (through :mod:`warnings`)."""


class KindChangeWarning(CasWarning):
    """A put made a single file the next version of a folder key, or the reverse."""


class CacheWarning(CasWarning):
    """The local chunk cache held a damaged entry, or cannot be written; the
    read went on from the store."""


class CatalogMismatchWarning(CasWarning):
    """The catalog of versions disagreed with the refs it summarises (damaged, or
    written by a hostile hand): it was rebuilt, and the query answered from the refs."""
