"""The garbage-collection settings of a store, ``gc/settings``: the grace and the lease.

Writers and collections must agree on the grace, so it is stored, and
changed with compare-and-swap; without the object it is
:data:`DEFAULT_GRACE`. The lease (how long a marker may go without renewal
before others take its owner for dead, see :mod:`cas.gc._lease`) is stored
beside it; without a value it is :data:`~cas.gc._lease.DEFAULT_LEASE`.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass

from ..backends.base import Backend
from ..errors import CasError, InvalidInputError, NotFoundError, PreconditionFailedError
from ..repository import _layout as layout
from ..repository._manifest import canonical_json
from ..repository._refs import utc_now
from ._lease import DEFAULT_LEASE, MIN_LEASE, PUTS

#: Default grace period: long enough for any put to finish many times over.
DEFAULT_GRACE = 6 * 3600.0
SETTINGS_KEY = f"{layout.GC}settings"


@dataclass(frozen=True, slots=True)
class GcSettings:
    """The grace writers refresh against, the one before its last change, and the lease."""

    grace: float = DEFAULT_GRACE
    previous: float | None = None
    #: Backend time of the last change (the settings object's mtime), if known.
    changed: float | None = None
    lease: float = DEFAULT_LEASE

    def safe_grace(self, now: float) -> float:
        """The shortest grace a collection starting at ``now`` may use while puts run.

        Puts read the setting when they start and again every grace/4, so for
        a while after the grace was lowered some of them still work with the
        old one; until half the old grace has passed, the old one is the floor.
        """
        recent = (
            self.previous is not None
            and self.changed is not None
            and now - self.changed < self.previous / 2
        )
        return max(self.grace, self.previous or 0.0) if recent else self.grace


def _parse_settings(blob: bytes) -> GcSettings:
    try:
        data = json.loads(blob)
        previous = data.get("previous")
        return GcSettings(
            grace=float(data["grace"]),
            previous=None if previous is None else float(previous),
            lease=float(data.get("lease", DEFAULT_LEASE)),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CasError(f"{SETTINGS_KEY} is malformed ({err})") from None


def read_settings(backend: Backend, *, with_time: bool = False) -> GcSettings:
    """The store's settings (defaults when never set); ``with_time`` also reads their mtime."""
    try:
        blob = backend.get(SETTINGS_KEY)
        changed = backend.stat(SETTINGS_KEY).mtime if with_time else None
    except NotFoundError:
        return GcSettings()
    settings = _parse_settings(blob)
    return GcSettings(settings.grace, settings.previous, changed, settings.lease)


def _settings_body(grace: float, previous: float | None, lease: float) -> bytes:
    fields: dict[str, object] = {"grace": grace, "previous": previous, "set": utc_now()}
    if lease != DEFAULT_LEASE:
        fields["lease"] = lease
    return canonical_json(fields)


def _check(grace: float | None, lease: float | None) -> None:
    if grace is not None and (not math.isfinite(grace) or grace <= 0):
        raise InvalidInputError.naming(
            "the store's grace must be more than 0 seconds; "
            "for one collection without writers use {grace_zero}",
            grace_zero="gc(grace=0)",
        )
    if lease is not None and (not math.isfinite(lease) or lease < MIN_LEASE):
        raise InvalidInputError(f"the lease must be at least {MIN_LEASE:g} seconds, not {lease:g}")


def write_settings(
    backend: Backend, grace: float | None = None, *, lease: float | None = None
) -> GcSettings:
    """Set the grace writers use and/or the lease; compare-and-swap so no change is lost."""
    _check(grace, lease)
    while True:
        try:
            blob, token = backend.get_versioned(SETTINGS_KEY)
        except NotFoundError:
            blob, token = b"", None
        old = _parse_settings(blob) if token else GcSettings()
        new_grace, previous = old.grace, old.previous
        if grace is not None:
            # Keep the larger of the older values: collections use it as a floor
            # until it can no longer matter (see GcSettings.safe_grace).
            new_grace, previous = grace, max(old.grace, old.previous or 0.0)
        new_lease = old.lease if lease is None else lease
        body = _settings_body(new_grace, previous, new_lease)
        try:
            if token is None:
                backend.put(SETTINGS_KEY, body, if_absent=True)
            else:
                backend.put(SETTINGS_KEY, body, if_match=token)
        except (PreconditionFailedError, FileExistsError):
            continue  # someone else changed it meanwhile: apply ours on top
        backend.flush()
        break
    # A put writes its marker before it reads the setting, so if no marker
    # exists now, no put can still be working with the old value: the floor
    # is not needed (a put starting from here on reads the new one).
    if grace is not None and next(iter(backend.list_objects(PUTS)), None) is None:
        with contextlib.suppress(PreconditionFailedError, NotFoundError):
            _, token = backend.get_versioned(SETTINGS_KEY)
            backend.put(SETTINGS_KEY, _settings_body(grace, None, new_lease), if_match=token)
    return read_settings(backend, with_time=True)
