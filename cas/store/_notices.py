"""Warnings a command that succeeded may give: what the user may not have meant."""

from __future__ import annotations

import warnings

from ..errors import KindChangeWarning
from ..repository._refs import VersionRef


def warn_of_kind_change(
    ref: VersionRef, former: tuple[int, str] | None, kind: str, *, stacklevel: int
) -> None:
    """Warn when a put turned a folder key into a file one, or the reverse: a get of
    the key now gives the other kind, which a script that reads it may not expect.
    ``former`` is the number and kind of the key's latest version before the put;
    ``stacklevel`` counts the frames up to the caller of ``Store.put``, from here."""
    if former is not None and former[1] != kind:
        number, was = former
        warnings.warn(
            KindChangeWarning(
                f"{ref.key}@{ref.number} is a {_KIND_NAMES[kind]}, "
                f"where {ref.key}@{number} was a {_KIND_NAMES[was]}; "
                f"a get of {ref.key} now writes a {_KIND_NAMES[kind]}"
            ),
            stacklevel=stacklevel,
        )


_KIND_NAMES = {"file": "single file", "directory": "folder"}
