"""Typed artifact metadata, and the per-version summary that queries read.

:class:`ArtifactInfo` is what ML users say about a version: what it is
(checkpoint, model, dataset, config, other), which job and algorithm made
it, the base model and fine-tuning method, its metrics, lineage, tags and
free-form labels. Most of those already have a home in the manifest
(metrics, parents, tags, created); the rest -- type, job, algorithm,
base_model, fine_tuning, labels -- live in the manifest's optional
``artifact`` field (only the fields that differ from their defaults).

:class:`Summary` is a manifest without its file list. It is written into the
version ref itself (``refs/<key>/@v/<N>``, field ``summary``) by the same
create-only write that commits the version, so ``log``, ``find`` and
``lineage`` read small ref objects instead of manifests, and a summary can
never disagree with whether its version exists. Refs written without one
(older stores, or a summary over :data:`SUMMARY_LIMIT`) are read through
their manifest instead.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..errors import CorruptObjectError, InvalidInputError
from ._manifest import canonical_json

if TYPE_CHECKING:
    from ._manifest import Manifest
    from ._refs import VersionRef

ARTIFACT_TYPES = ("checkpoint", "model", "dataset", "config", "other")
DEFAULT_TYPE = "other"

#: The typed fields kept in the manifest's ``artifact`` field (the others
#: have their own manifest fields or come from the ref).
RECORD_FIELDS = ("type", "job", "algorithm", "base_model", "fine_tuning", "labels")
_TEXT_FIELDS = ("job", "algorithm", "base_model", "fine_tuning")
_ALL_FIELDS = (
    "type",
    "job",
    "algorithm",
    "base_model",
    "fine_tuning",
    "metrics",
    "created",
    "version",
    "parents",
    "tags",
    "labels",
)

#: A summary larger than this (canonical JSON bytes) is not put in the ref:
#: refs are read by the thousand, and a huge free-form metadata blob would
#: make every query pay for it. Such versions are read through their manifest.
SUMMARY_LIMIT = 16 * 1024


def check_type(value: object) -> str:
    if value not in ARTIFACT_TYPES:
        raise InvalidInputError(
            f"unknown artifact type {value!r}; use one of {', '.join(ARTIFACT_TYPES)}"
        )
    return str(value)


def check_metrics(value: object, what: str = "metrics") -> dict[str, float]:
    # Plain dicts of text -> float or int (every summary read back from JSON) take the
    # first branch, without the ABC check: catalogs check 100,000 of them at once.
    if type(value) is not dict and not isinstance(value, Mapping):
        raise InvalidInputError(f"{what} must be an object of name -> number, got {value!r}")
    out: dict[str, float] = {}
    for name, number in value.items():
        kind = type(number)
        if (
            type(name) is str
            and name
            and (kind is int or (kind is float and math.isfinite(number)))
        ):
            out[name] = number
            continue
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"{what}: metric names must be non-empty text, got {name!r}")
        if (
            isinstance(number, bool)
            or not isinstance(number, (int, float))
            or not math.isfinite(number)
        ):
            raise InvalidInputError(
                f"{what}: metric {name!r} must be a finite number, got {number!r}"
            )
        out[name] = number
    return out


def check_labels(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"labels must be an object of text -> text, got {value!r}")
    for name, text in value.items():
        if not isinstance(name, str) or not name or not isinstance(text, str):
            raise InvalidInputError(f"label {name!r}: names and values must be text, got {text!r}")
    return dict(value)


def _check_text(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f"{name} must be non-empty text, got {value!r}")
    return value


def _check_strings(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InvalidInputError(f"{name} must be a list of text, got {value!r}")
    if not all(isinstance(item, str) and item for item in value):
        raise InvalidInputError(f"{name} must be a list of non-empty text, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class ArtifactInfo:
    """What a version is, in ML terms. ``from_dict(info.to_dict()) == info``, exactly.

    ``created`` and ``version`` are assigned by the store when the version is
    committed; they are ``None`` on a record that is about to be written.
    ``parents`` are references (``KEY@N``, ``KEY:TAG`` or ``KEY``); the store
    records them as ``KEY@N``.
    """

    type: str = DEFAULT_TYPE
    job: str | None = None
    algorithm: str | None = None
    base_model: str | None = None
    fine_tuning: str | None = None  # e.g. "lora", "full", "qlora"
    metrics: Mapping[str, float] = field(default_factory=dict)
    created: str | None = None
    version: int | None = None
    parents: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Validate on construction, so a bad record fails where it is made,
        # not later inside a put.
        check_type(self.type)
        for name in _TEXT_FIELDS:
            _check_text(name, getattr(self, name))
        object.__setattr__(self, "metrics", check_metrics(self.metrics))
        object.__setattr__(self, "labels", check_labels(self.labels))
        object.__setattr__(self, "parents", _check_strings("parents", self.parents))
        object.__setattr__(self, "tags", _check_strings("tags", self.tags))
        if self.created is not None and not isinstance(self.created, str):
            raise InvalidInputError(f"created must be RFC 3339 text, got {self.created!r}")
        if self.version is not None and (
            isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1
        ):
            raise InvalidInputError(f"version must be a number >= 1, got {self.version!r}")

    def to_dict(self) -> dict[str, Any]:
        """Every field, always, in JSON types."""
        return {
            "type": self.type,
            "job": self.job,
            "algorithm": self.algorithm,
            "base_model": self.base_model,
            "fine_tuning": self.fine_tuning,
            "metrics": dict(self.metrics),
            "created": self.created,
            "version": self.version,
            "parents": list(self.parents),
            "tags": list(self.tags),
            "labels": dict(self.labels),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArtifactInfo:
        """Inverse of :meth:`to_dict`; missing fields take their defaults, unknown ones fail."""
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"artifact info must be a JSON object, got {data!r}")
        unknown = sorted(set(data) - set(_ALL_FIELDS))
        if unknown:
            raise InvalidInputError(
                f"unknown artifact field(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(_ALL_FIELDS)}"
            )
        return cls(
            type=data.get("type") or DEFAULT_TYPE,
            job=data.get("job"),
            algorithm=data.get("algorithm"),
            base_model=data.get("base_model"),
            fine_tuning=data.get("fine_tuning"),
            metrics=data.get("metrics") or {},
            created=data.get("created"),
            version=data.get("version"),
            parents=data.get("parents") or (),
            tags=data.get("tags") or (),
            labels=data.get("labels") or {},
        )

    def record(self) -> dict[str, Any]:
        """The part kept in the manifest's ``artifact`` field: typed fields that are set."""
        out: dict[str, Any] = {}
        if self.type != DEFAULT_TYPE:
            out["type"] = self.type
        for name in _TEXT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.labels:
            out["labels"] = dict(self.labels)
        return out

    @classmethod
    def from_record(
        cls,
        record: Mapping[str, Any],
        *,
        metrics: Mapping[str, float],
        created: str | None,
        version: int | None,
        parents: tuple[str, ...],
        tags: tuple[str, ...],
    ) -> ArtifactInfo:
        """Rebuild the whole record from a manifest's ``artifact`` field and the rest."""
        fields = {name: record[name] for name in RECORD_FIELDS if name in record}
        return cls.from_dict(
            {
                **fields,
                "metrics": dict(metrics),
                "created": created,
                "version": version,
                "parents": list(parents),
                "tags": list(tags),
            }
        )

    def matches(self, name: str, value: object) -> bool:
        """Whether typed field or label ``name`` equals ``value`` (for ``find --meta``)."""
        if name in RECORD_FIELDS and name != "labels":
            return bool(getattr(self, name) == value)
        return name in self.labels and self.labels[name] == value


def check_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Check the shape of a stored ``artifact`` field: known names, text values, text labels.

    Cheaper than building an :class:`ArtifactInfo` (queries run this for
    every version they read); the values were fully validated when written.
    """
    if type(record) is not dict and not isinstance(record, Mapping):
        raise InvalidInputError(f"the artifact field must be an object, got {record!r}")
    for name, value in record.items():
        if type(value) is str and name in _TEXT_RECORD_FIELDS:
            continue
        if name == "labels":
            if not isinstance(value, dict):
                raise InvalidInputError(f"artifact labels must be an object, got {value!r}")
        elif name not in RECORD_FIELDS or not isinstance(value, str):
            raise InvalidInputError(f"bad artifact field in manifest: {name!r}={value!r}")
    return dict(record)


_TEXT_RECORD_FIELDS = frozenset(RECORD_FIELDS) - {"labels"}


@dataclass(frozen=True, slots=True)
class Summary:
    """What a version is, without its file list: the one description of a version.

    Made from a manifest (:meth:`of_manifest`), kept in the version ref
    (:meth:`for_ref`, :meth:`from_ref`), and extended by the public
    ``cas.store.Version`` with the version's name and current tags.
    Mappings are copied and wrapped read-only (a read-only view given is
    kept as it is), and left out of the hash.
    """

    kind: str
    size: int
    files: int
    parents: tuple[str, ...] = ()  # "KEY@N"
    tags: tuple[str, ...] = ()  # in a ref: tags given at creation (current tags live in refs)
    metrics: Mapping[str, float] = field(default_factory=dict, hash=False)
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
    message: str = ""
    artifact: Mapping[str, Any] = field(default_factory=dict, hash=False)  # typed fields set

    def __post_init__(self) -> None:
        for name in ("metrics", "metadata", "artifact"):
            value = getattr(self, name)
            # A read-only view is kept as it is: a Version made from a Summary
            # shares the summary's copy instead of copying once per version.
            if not isinstance(value, MappingProxyType):
                object.__setattr__(self, name, MappingProxyType(dict(value)))

    @classmethod
    def of_manifest(cls, manifest: Manifest) -> Summary:
        return cls(
            kind=manifest.kind,
            size=manifest.size,
            files=manifest.file_count,
            parents=tuple(f"{p.key}@{p.version}" for p in manifest.parents),
            tags=tuple(manifest.tags),
            metrics=manifest.metrics,
            metadata=manifest.metadata,
            message=manifest.message,
            artifact=manifest.artifact,
        )

    def described(self) -> dict[str, Any]:
        """The fields of the summary, by name, as they are (for building a subclass)."""
        return dict(zip(_SUMMARY_FIELDS, _summary_values(self), strict=True))

    def to_dict(self) -> dict[str, Any]:
        return {name: _plain(value) for name, value in self.described().items()}

    def for_ref(self) -> dict[str, Any] | None:
        """The dict to embed in a version ref, or None when it is too large to embed."""
        data = self.to_dict()
        return data if len(canonical_json(data)) <= SUMMARY_LIMIT else None

    @classmethod
    def from_ref(cls, data: Mapping[str, Any] | None) -> Summary | None:
        """Parse a ref's summary; None when absent or malformed (then the manifest is read).

        Refs are not content-addressed like manifests, so a summary that does
        not parse is not trusted, and the caller falls back to the manifest.
        """
        if data is None:
            return None
        try:
            return cls(**summary_fields(data))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


def summary_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a summary read back from its JSON form, each checked (KeyError,
    TypeError, ValueError or AttributeError when one is not what it must be).

    Text fields are read with ``str``, sizes with ``int``, lists of text with
    ``tuple(map(str, ...))``, metadata with ``dict``; text and integers, which
    JSON gives, are taken as they are (what those calls return for them)
    without a call per field: a catalog reads 100,000 summaries at once.
    """
    kind, size, files, message = data["kind"], data["size"], data["files"], data["message"]
    return {
        "kind": kind if type(kind) is str else str(kind),
        "size": size if type(size) is int else int(size),
        "files": files if type(files) is int else int(files),
        "parents": _texts(data["parents"]),
        "tags": _texts(data["tags"]),
        "metrics": check_metrics(data["metrics"]),
        "metadata": dict(data["metadata"]),
        "message": message if type(message) is str else str(message),
        "artifact": check_record(data["artifact"]),
    }


def _texts(value: Any) -> tuple[str, ...]:
    return tuple(map(str, value))


_SUMMARY_FIELDS = tuple(f.name for f in fields(Summary))
# One C-level call for all of them: catalogs build a Version per version listed.
_summary_values = operator.attrgetter(*_SUMMARY_FIELDS)


def _plain(value: Any) -> Any:
    """A field value in JSON types: tuples as lists, mappings as dicts."""
    kind = type(value)
    if kind is str or kind is int or kind is float:
        return value  # most fields: spared the abstract-class check below
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def check_ref(ref: VersionRef, manifest: Manifest, *, name: str) -> None:
    """Refuse a version whose ref disagrees with its manifest, naming the field.

    A ref is not covered by any hash, and ``log`` and ``find`` show its
    summary without reading the manifest, so where both are read they must
    agree: the key, and every field of the summary. A summary that does not
    parse is not one (it is ignored, as everywhere).
    """
    if manifest.key != ref.key:
        raise CorruptObjectError(f"{name}: its manifest is of key {manifest.key!r}")
    summary = Summary.from_ref(ref.summary)
    if summary is None:
        return
    actual = Summary.of_manifest(manifest).to_dict()
    for field_name, value in summary.to_dict().items():
        if value != actual[field_name]:
            raise CorruptObjectError(
                f"{name}: its ref says {field_name} {value!r}, its manifest {actual[field_name]!r}"
            )
