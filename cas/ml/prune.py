"""Retention by policy: keep the versions a rule asks for, delete the rest of a key.

Rules add up: a version is kept when any rule keeps it (the last N, the N
best by a metric, the tagged ones, the ancestors of a ref). Deleting goes
through :meth:`Store.delete`, which writes tombstones; prune never touches
chunks or manifests -- garbage collection reclaims them later, after its
grace period.

The bytes reported are those the next GC can reclaim because of this prune
(:meth:`Store.reclaimable`): chunks the deleted versions keep alive and no
version that stays does, anywhere in the store, delta bases included (not the
deleted versions' logical size, which dedup makes meaningless). Their
manifests are counted too when nothing else uses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..errors import InvalidInputError, NotFoundError
from .lineage import lineage

if TYPE_CHECKING:
    from ..gc._repack import RepackReport
    from ..store import Store, Version


@dataclass(frozen=True)
class Policy:
    keep_last: int | None = None
    keep_best: int | None = None
    metric: str | None = None
    direction: Literal["min", "max"] | None = None
    keep_tagged: bool = False
    keep_ancestors_of: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise InvalidInputError.naming(
                "{keep_last} must be at least 1, got {got}",
                keep_last="keep_last",
                got=self.keep_last,
            )
        if self.keep_best is not None:
            if self.keep_best < 1:
                raise InvalidInputError.naming(
                    "{keep_best} must be at least 1, got {got}",
                    keep_best="keep_best",
                    got=self.keep_best,
                )
            if not self.metric:
                raise InvalidInputError.naming(
                    "{keep_best} needs {metric_name}", keep_best="keep_best", metric_name="a metric"
                )
            if self.direction not in ("min", "max"):
                raise InvalidInputError.naming(
                    "{keep_best} needs {min} (lower is better) or {max} (higher is better)",
                    keep_best="keep_best",
                    min="direction 'min'",
                    max="'max'",
                )
        elif self.metric or self.direction:
            raise InvalidInputError.naming(
                "{metric_and_direction} go with {keep_best_n}",
                metric_and_direction="metric and direction",
                keep_best_n="keep_best",
            )
        if not (self.keep_last or self.keep_best or self.keep_tagged or self.keep_ancestors_of):
            raise InvalidInputError.naming(
                "no retention rule given: pass {rules} (prune refuses to delete every version "
                "of a key; use {delete_all} for that)",
                rules="keep_last, keep_best, keep_tagged or keep_ancestors_of",
                delete_all="Store.delete_all",
            )


@dataclass(frozen=True)
class PruneReport:
    key: str
    kept: tuple[Version, ...]
    reasons: dict[str, tuple[str, ...]]  # ref -> why it is kept
    deleted: tuple[Version, ...]
    reclaimable_bytes: int  # raw bytes of chunks only the deleted versions need
    reclaimable_stored_bytes: int  # what those chunks and manifests occupy in the store
    reclaimable_chunks: int
    dry_run: bool
    skipped: tuple[str, ...] = field(default=())  # became tagged meanwhile, so kept
    #: What the next gc's repack does once these versions are gone: the chunks
    #: of kept versions that are deltas of theirs, stored again, so that their
    #: chunks go too (see :meth:`Store.repack_estimate`).
    repack: RepackReport | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "dry_run": self.dry_run,
            "kept": [{"ref": v.ref, "reasons": list(self.reasons[v.ref])} for v in self.kept],
            "deleted": [v.ref for v in self.deleted],
            "skipped": list(self.skipped),
            "reclaimable_bytes": self.reclaimable_bytes,
            "reclaimable_stored_bytes": self.reclaimable_stored_bytes,
            "reclaimable_chunks": self.reclaimable_chunks,
            "repack": self.repack.to_dict() if self.repack is not None else None,
        }


def select(store: Store, versions: Sequence[Version], policy: Policy) -> dict[str, list[str]]:
    """Ref -> reasons, for every version of ``versions`` (newest first) that a rule keeps."""
    reasons: dict[str, list[str]] = {}

    def keep(version: Version, why: str) -> None:
        reasons.setdefault(version.ref, []).append(why)

    if policy.keep_last:
        for version in versions[: policy.keep_last]:
            keep(version, f"last {policy.keep_last}")
    if policy.keep_best and policy.metric:
        metric = policy.metric
        ranked = [v for v in versions if metric in v.metrics]
        ranked.sort(key=lambda v: v.metrics[metric], reverse=policy.direction == "max")
        for version in ranked[: policy.keep_best]:
            keep(version, f"best {policy.keep_best} by {policy.direction} {metric}")
    if policy.keep_tagged:
        for version in versions:
            if version.tags:
                keep(version, "tagged " + ", ".join(version.tags))
    for ref in policy.keep_ancestors_of:
        graph = lineage(store, ref)
        wanted = {graph.root, *graph.ancestors}
        for version in versions:
            if version.ref in wanted:
                keep(version, f"ancestor of {graph.root}" if version.ref != graph.root else "named")
    return reasons


def prune(store: Store, key: str, policy: Policy, *, dry_run: bool = False) -> PruneReport:
    versions = store.log(key)  # newest first; RefNotFoundError if none
    reasons = select(store, versions, policy)
    kept = tuple(v for v in versions if v.ref in reasons)
    doomed = tuple(v for v in versions if v.ref not in reasons)
    freed = store.reclaimable(doomed)
    repack = store.repack_estimate(deleting=[v.ref for v in doomed]) if doomed else None
    skipped: list[str] = []
    deleted: list[Version] = []
    if not dry_run:
        for version in doomed:
            try:
                # With --keep-tagged, a version tagged since we looked is kept:
                # delete refuses it without force.
                deleted.append(store.delete(version.ref, force=not policy.keep_tagged))
            except InvalidInputError:
                skipped.append(version.ref)
            except NotFoundError:
                continue  # deleted meanwhile by someone else
    return PruneReport(
        key=key,
        kept=kept,
        reasons={ref: tuple(why) for ref, why in reasons.items()},
        deleted=doomed if dry_run else tuple(deleted),
        reclaimable_bytes=freed.raw_bytes,
        reclaimable_stored_bytes=freed.stored_bytes,
        reclaimable_chunks=freed.chunks,
        dry_run=dry_run,
        skipped=tuple(skipped),
        repack=repack,
    )
