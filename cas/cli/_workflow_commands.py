"""ML workflow commands: find, lineage, diff, prune; and the artifact flags of put."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError
from ..store import ARTIFACT_TYPES, ArtifactInfo
from ..units import counted, format_size
from ._common import AddCommand, emit, emit_versions, open_store, pairs, repack_lines

if TYPE_CHECKING:
    from ..ml.diff import DiffReport

# Each command imports its module when it runs: every command pays start-up
# time for what the parser module imports.

# -- put: typed artifact metadata ------------------------------------------------------

_META_FILE_EXTRAS = ("metadata", "message")
# Assigned by the store when the version is committed; accepted in a meta
# file (so an exported record can be fed back) but not used.
_ASSIGNED = ("created", "version")


def add_artifact_arguments(p: argparse.ArgumentParser) -> None:
    """The typed-metadata flags of ``put`` (called from the core put's registration)."""
    group = p.add_argument_group("artifact metadata")
    group.add_argument("--type", choices=ARTIFACT_TYPES, help="what the artifact is")
    group.add_argument("--job", metavar="NAME", help="the job or run that made it")
    group.add_argument("--algorithm", metavar="NAME", help="e.g. adamw, ppo, dpo")
    group.add_argument("--base-model", metavar="NAME", help="the model it was trained from")
    group.add_argument("--fine-tuning", metavar="METHOD", help="fine-tuning method, e.g. lora")
    group.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="free-form (repeatable)"
    )
    group.add_argument(
        "--meta-file",
        metavar="FILE.json",
        help="a JSON object with any of: "
        + ", ".join(f for f in ArtifactInfo().to_dict() if f not in _ASSIGNED)
        + ", metadata, message; flags given as well win",
    )


def read_meta_file(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(artifact fields, extras: metadata and message) from a ``--meta-file``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInputError(f"--meta-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"--meta-file {path}: cannot read it ({err})") from None
    except ValueError as err:
        raise InvalidInputError(f"--meta-file {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"--meta-file {path}: must hold a JSON object")
    extras = {k: data.pop(k) for k in _META_FILE_EXTRAS if k in data}
    for name in _ASSIGNED:
        data.pop(name, None)
    if "metadata" in extras and not isinstance(extras["metadata"], dict):
        raise InvalidInputError(f"--meta-file {path}: 'metadata' must be a JSON object")
    if "message" in extras and not isinstance(extras["message"], str):
        raise InvalidInputError(f"--meta-file {path}: 'message' must be text")
    try:
        ArtifactInfo.from_dict(data)
    except InvalidInputError as err:
        raise InvalidInputError(f"--meta-file {path}: {err}") from None
    return data, extras


def artifact_from_args(args: argparse.Namespace) -> tuple[ArtifactInfo, dict[str, Any], str]:
    """The record of ``put``'s flags merged over ``--meta-file``: (info, metadata, message).

    Metrics, parents and tags given as flags are passed to put separately;
    it merges them with the record's.
    """
    fields: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    if getattr(args, "meta_file", None):
        fields, extras = read_meta_file(args.meta_file)
    for name in ("type", "job", "algorithm", "base_model", "fine_tuning"):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    labels = dict(pairs(getattr(args, "label", []), "--label"))
    if labels:
        fields["labels"] = {**(fields.get("labels") or {}), **labels}
    return (
        ArtifactInfo.from_dict(fields),
        dict(extras.get("metadata") or {}),
        extras.get("message", ""),
    )


# -- commands -------------------------------------------------------------------------


def cmd_find(args: argparse.Namespace) -> int:
    from ..ml.query import Condition, Query, find

    store = open_store(args, create=False)
    query = Query(
        prefix=args.prefix or "",
        type=args.type,
        tags=tuple(args.tag),
        meta=tuple(pairs(args.meta, "--meta")),
        where=tuple(Condition.parse(text) for text in args.where),
        sort=args.sort,
        descending=args.desc,
        limit=args.limit,
        latest_only=args.latest,
    )
    hits = find(store, query)
    emit_versions(args, hits)
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from ..ml.lineage import lineage

    graph = lineage(open_store(args, create=False), args.ref, depth=args.depth)
    for option, render in (("dot", graph.to_dot), ("mermaid", graph.to_mermaid)):
        target = getattr(args, option)
        if target is None:
            continue
        text = render() + "\n"
        if target == "-":
            sys.stdout.write(text)
        else:
            Path(target).write_text(text, encoding="utf-8")
            print(f"wrote {target} ({counted(len(graph.nodes), 'version')})", file=sys.stderr)
        return 0
    emit(args, graph.to_dict(), graph.to_text())
    return 0


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def diff_text(report: DiffReport) -> str:
    lines = [f"--- {report.old}", f"+++ {report.new}"]
    marks = {"added": "A", "removed": "D", "changed": "M"}
    for change in report.changes:
        if change.status == "added":
            size = format_size(change.new_size or 0)
        elif change.status == "removed":
            size = format_size(change.old_size or 0)
        else:
            size = f"{format_size(change.old_size or 0)} -> {format_size(change.new_size or 0)}"
        was = f" (was {change.old_path})" if change.old_path else ""
        lines.append(f"{marks[change.status]}  {change.path}{was}  {size}")
        t = change.tensors
        if t is None:
            continue
        if t.error:
            lines.append(f"     tensors: {t.error}")
            continue
        total = len(t.changed) + t.unchanged
        lines.append(f"     tensors changed: {len(t.changed)} of {total}")
        lines.extend(f"       ~ {name}" for name in t.changed)
        lines.extend(f"       + {name}" for name in t.added)
        lines.extend(f"       - {name}" for name in t.removed)
        if t.metadata_changed:
            lines.append("       header __metadata__ changed")
    for name, (old, new) in sorted(report.metrics.items()):
        if old != new:
            lines.append(f"metric {name}: {_number(old)} -> {_number(new)}")
    counts = ", ".join(f"{len(report.of_status(s))} {s}" for s in ("added", "removed", "changed"))
    lines.append(f"files: {counts}, {report.unchanged} unchanged")
    lines.append(
        f"bytes: {format_size(report.shared_bytes)} shared, {format_size(report.new_bytes)} new"
        f" ({format_size(report.dropped_bytes)} of {report.old} not in {report.new})"
    )
    return "\n".join(lines)


def cmd_diff(args: argparse.Namespace) -> int:
    from ..ml.diff import diff

    report = diff(open_store(args, create=False), args.old, args.new)
    emit(args, report.to_dict(), diff_text(report))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from ..ml.prune import Policy, prune

    if "@" in args.key or ":" in args.key:
        raise InvalidInputError(f"prune takes a KEY, not a version or tag: {args.key!r}")
    policy = Policy(
        keep_last=args.keep_last,
        keep_best=args.keep_best,
        metric=args.metric,
        direction=args.direction,
        keep_tagged=args.keep_tagged,
        keep_ancestors_of=tuple(args.keep_ancestors_of),
    )
    report = prune(open_store(args, create=False), args.key, policy, dry_run=args.dry_run)
    verb = "would delete" if report.dry_run else "deleted"
    lines = [f"keep          {v.ref}  ({'; '.join(report.reasons[v.ref])})" for v in report.kept]
    lines += [f"{verb:<13} {v.ref}" for v in report.deleted]
    lines += [f"keep          {ref}  (tagged meanwhile)" for ref in report.skipped]
    lines.append(
        f"{len(report.kept) + len(report.skipped)} kept, {len(report.deleted)} "
        + ("to delete" if report.dry_run else "deleted")
        + "; the next gc "
        + ("would reclaim" if report.dry_run else "can reclaim")
        + f" {format_size(report.reclaimable_bytes)} "
        f"({counted(report.reclaimable_chunks, 'chunk')}, "
        f"{format_size(report.reclaimable_stored_bytes)} stored) once its grace period has passed"
    )
    lines += repack_lines(report.repack, planned=True)
    emit(args, report.to_dict(), "\n".join(lines))
    return 0


def register(add: AddCommand) -> None:
    """Add the workflow commands to the parser through ``add(name, handler, help)``."""
    p = add("find", cmd_find, "find versions by type, tag, metadata and metrics")
    p.add_argument("prefix", nargs="?", metavar="PREFIX", help="only keys starting with this")
    p.add_argument("--type", choices=ARTIFACT_TYPES)
    p.add_argument("--tag", action="append", default=[], metavar="TAG", help="repeatable")
    p.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="K=V",
        help="a typed field (job, algorithm, base_model, fine_tuning), a label or a metadata "
        "key (dotted for nested) equals V (repeatable)",
    )
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="EXPR",
        help="a metric condition such as 'loss<0.3' (repeatable; all must hold)",
    )
    p.add_argument("--sort", metavar="METRIC", help="order by a metric, lowest first")
    p.add_argument("--desc", action="store_true", help="with --sort: highest first")
    p.add_argument("--limit", type=int, metavar="N")
    p.add_argument("--latest", action="store_true", help="only the latest version of each key")

    p = add("lineage", cmd_lineage, "show what REF derives from and what derives from it")
    p.add_argument("ref", metavar="REF")
    graph_format = p.add_mutually_exclusive_group()
    graph_format.add_argument(
        "--dot",
        nargs="?",
        const="-",
        metavar="FILE",
        help="write a Graphviz graph (to stdout, or FILE)",
    )
    graph_format.add_argument(
        "--mermaid",
        nargs="?",
        const="-",
        metavar="FILE",
        help="write a Mermaid flowchart (to stdout, or FILE)",
    )
    p.add_argument("--depth", type=int, metavar="N", help="at most N levels each way")

    p = add("diff", cmd_diff, "files, tensors and bytes that changed from OLD to NEW")
    p.add_argument("old", metavar="OLD")
    p.add_argument("new", metavar="NEW")

    p = add("prune", cmd_prune, "delete the versions of KEY that no retention rule keeps")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--keep-last", type=int, metavar="N", help="keep the N newest versions")
    p.add_argument("--keep-best", type=int, metavar="N", help="keep the N best by --metric")
    p.add_argument("--metric", metavar="NAME", help="the metric of --keep-best")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--min", dest="direction", action="store_const", const="min")
    order.add_argument("--max", dest="direction", action="store_const", const="max")
    p.add_argument("--keep-tagged", action="store_true", help="keep every tagged version")
    p.add_argument(
        "--keep-ancestors-of",
        action="append",
        default=[],
        metavar="REF",
        help="keep REF and every version it derives from (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="report only, delete nothing")
