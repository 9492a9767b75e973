"""``cas gc``: reclaim what no version needs, safely while others keep writing."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..units import counted, format_duration, format_size, parse_duration
from ._common import AddCommand, emit, open_store, repack_lines

if TYPE_CHECKING:
    from .. import GcReport


@contextmanager
def _object_progress(args: argparse.Namespace) -> Iterator[Callable[[int], None] | None]:
    """A count of objects swept, on stderr when it is a terminal."""
    if args.no_progress or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(unit=" objects", desc="gc", file=sys.stderr, leave=False) as bar:
        yield bar.update


def _when(seconds: float) -> str:
    from datetime import datetime, timezone  # here: every command loads this module

    stamp = datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")
    return stamp.replace("+00:00", "Z")


def _text(report: GcReport) -> str:
    verb = "would delete" if report.dry_run else "deleted"
    lines = [
        f"{'dry run: ' if report.dry_run else ''}grace {format_duration(report.grace)}: "
        f"unreferenced objects older than {_when(report.threshold)} (backend clock) go",
        f"marked:        {counted(report.versions, 'version')}, "
        f"{counted(report.manifests_marked, 'manifest')}, "
        f"{counted(report.chunks_marked, 'chunk')} ({format_size(report.mark_bytes)} of digests)",
        f"scanned:       {counted(report.scanned, 'object')} "
        f"({counted(report.scanned_chunks, 'chunk')}, "
        f"{counted(report.scanned_manifests, 'manifest')})",
        f"reachable:     {counted(report.reachable, 'object')}, "
        f"{format_size(report.reachable_bytes)}",
        f"{verb + ':':<14} {counted(report.deleted, 'object')} "
        f"({counted(report.deleted_chunks, 'chunk')}, "
        f"{counted(report.deleted_manifests, 'manifest')}), {format_size(report.bytes_reclaimed)} "
        f"{'reclaimable' if report.dry_run else 'reclaimed'}",
        f"kept by grace: {counted(report.kept_by_grace, 'object')}, "
        f"{format_size(report.bytes_kept_by_grace)} (unreferenced but recent)",
    ]
    lines += repack_lines(report.repack)
    if report.deferred:
        lines.append(f"deferred:      {counted(report.deferred, 'object')} (left for the next gc)")
    if report.leftovers_removed:
        what = counted(
            report.leftovers_removed,
            "temporary file or partial upload",
            "temporary files or partial uploads",
        )
        lines.append(
            f"{'leftovers:':<14} {what} of writers that died, "
            f"{format_size(report.leftover_bytes)} "
            f"{'would be removed' if report.dry_run else 'removed'}"
        )
    if report.markers_removed:
        lines.append(
            f"{'dead markers:':<14} {report.markers_removed} "
            f"{'would be removed' if report.dry_run else 'removed'} "
            "(puts or collections that stopped renewing their lease)"
        )
    if report.puts_in_flight:
        lines.append(f"puts running:  {report.puts_in_flight}")
    lines.append(f"took:          {format_duration(report.seconds)}")
    return "\n".join(lines)


def cmd_gc(args: argparse.Namespace) -> int:
    store = open_store(args, create=False)
    if args.set_grace is not None:
        settings = store.set_gc_grace(parse_duration(args.set_grace))
        emit(
            args,
            {"grace": settings.grace, "previous": settings.previous},
            f"writers now refresh against a grace of {format_duration(settings.grace)}; "
            f"cas gc uses it by default",
        )
        return 0
    if args.set_lease is not None:
        settings = store.set_gc_lease(parse_duration(args.set_lease))
        emit(
            args,
            {"lease": settings.lease},
            f"a marker not renewed for {format_duration(settings.lease)} now counts as a dead "
            f"put's or collection's (live ones renew theirs every "
            f"{format_duration(settings.lease / 6)})",
        )
        return 0
    grace = parse_duration(args.grace) if args.grace is not None else None
    if grace is None:
        grace = store.gc_settings().grace
    with _object_progress(args) as on_progress:
        report = store.gc(
            grace=grace, dry_run=args.dry_run, progress=on_progress, repack=not args.no_repack
        )
    if report.unsafe:
        print(f"cas: warning: {report.unsafe}", file=sys.stderr)
    emit(args, report.to_dict(), _text(report))
    return 0


def register(add: AddCommand) -> None:
    p = add(
        "gc",
        cmd_gc,
        "delete chunks and manifests that no version needs, once older than the grace period",
    )
    p.add_argument(
        "--grace",
        metavar="DURATION",
        help="keep unreferenced objects younger than this (e.g. 6h, 90m, 0); default: the "
        "store's setting, 6h unless changed. 0 is unsafe while anyone writes",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="write and delete nothing; report what would go"
    )
    p.add_argument(
        "--no-repack",
        action="store_true",
        help="do not first store again the chunks of live versions that are deltas of deleted"
        " versions' chunks (which then stay)",
    )
    p.add_argument(
        "--set-grace",
        metavar="DURATION",
        help="record the grace writers refresh against (and gc's default), then exit",
    )
    p.add_argument(
        "--set-lease",
        metavar="DURATION",
        help="record how long a put's or gc's marker may go unrenewed before others take it "
        "for dead (default 30s, at least 3s), then exit",
    )
