"""Helpers shared by the command modules: output, progress bars, argument parsing."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..errors import CasWarning, InvalidInputError
from ..store import DEFAULT_STORE, Store, Version
from ..units import counted, format_size

if TYPE_CHECKING:
    from .. import RepackReport

Handler = Callable[[argparse.Namespace], int]
#: ``add(name, handler, help)``: defines a command and returns its parser.
AddCommand = Callable[[str, Handler, str], argparse.ArgumentParser]

#: How the command line words what the library's errors name in API terms
#: (see :meth:`cas.errors.CasError.naming`): by its flags and commands.
CLI_WORDS = {
    "workers": "--jobs",
    "force": "pass --force",
    "keep_last": "--keep-last",
    "keep_best": "--keep-best",
    "keep_best_n": "--keep-best N",
    "metric_name": "--metric NAME",
    "min": "--min",
    "max": "--max",
    "metric_and_direction": "--metric, --min and --max",
    "rules": "--keep-last, --keep-best, --keep-tagged or --keep-ancestors-of",
    "delete_all": "`cas rm --all KEY`",
    "condition": "--where",
    "limit": "--limit",
    "sample": "--sample",
    "repair": "--repair",
    "deep": "--deep",
    "grace_zero": "`cas gc --grace 0`",
    "create_bucket": "run `cas init --create-bucket`",
    "verify": "Run `cas verify`",
    "delete_version": "`cas rm {label}`",
    "delete": "--delete",
    "update": "--update",
    "force_or_update": "--force or --update",
    "cache_size": "--cache-size",
    "link": "--link",
    "cache": "--cache DIR",
}


# -- output helpers -----------------------------------------------------------------


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False))
    elif text:
        print(text)


@contextmanager
def warnings_noted() -> Iterator[list[str]]:
    """Collect the warnings cas gives inside the block; each is printed to stderr as
    ``cas: warning: ...`` when it ends, and the list is there for the --json output."""
    noted: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CasWarning)
        yield noted
    for warning in caught:
        if issubclass(warning.category, CasWarning):
            noted.append(str(warning.message))
            print(f"cas: warning: {warning.message}", file=sys.stderr)
        else:  # not ours: shown as it would have been
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )


@contextmanager
def progress(args: argparse.Namespace, total: int | None, label: str) -> Iterator[Any]:
    """A tqdm bar on stderr when it is a terminal; a no-op callback otherwise."""
    if args.no_progress or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=label,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    ) as bar:
        yield bar.update


def tree_size(path: str) -> int:
    """About the bytes a put of ``path`` reads, for its progress bar."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    inside = os.path.realpath(path) + os.sep
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            # A link to a file outside is stored as that file; one inside as a link.
            if os.path.islink(full) and os.path.realpath(full).startswith(inside):
                continue
            if os.path.isfile(full):
                total += os.path.getsize(full)
    return total


def emit_versions(args: argparse.Namespace, versions: Sequence[Version]) -> None:
    """Print versions as JSON or as lines; only the form asked for is built, since
    a store-wide ``find`` may list 100,000 versions."""
    if args.json:
        emit(args, [v.to_dict() for v in versions], "")
    else:
        emit(args, None, "\n".join(version_line(v) for v in versions))


def version_line(v: Version) -> str:
    extras = []
    if v.artifact.get("type"):
        extras.append(f"[{v.artifact['type']}]")
    if v.tags:
        extras.append("tags: " + ", ".join(v.tags))
    if v.metrics:
        extras.append(" ".join(f"{k}={val:g}" for k, val in sorted(v.metrics.items())))
    if v.message:
        extras.append(v.message)
    tail = f"  {'  '.join(extras)}" if extras else ""
    when = v.created[:19].replace("T", " ")
    line = f"{v.ref:<28} {when}  {format_size(v.size):>10}  {v.kind:<9}{tail}"
    return line.rstrip()


def pairs(values: Sequence[str], what: str) -> list[tuple[str, str]]:
    out = []
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InvalidInputError(f"{what} must look like NAME=VALUE, got {item!r}")
        out.append((name, value))
    return out


def parse_metrics(values: Sequence[str]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, value in pairs(values, "--metric"):
        try:
            number = float(value)
        except ValueError:
            raise InvalidInputError(f"--metric {name}: {value!r} is not a number") from None
        metrics[name] = int(number) if number.is_integer() and "." not in value else number
    return metrics


def parse_metadata(values: Sequence[str]) -> dict[str, Any]:
    # A value that parses as JSON keeps its type (numbers, lists, true); anything else is text.
    meta: dict[str, Any] = {}
    for name, value in pairs(values, "--meta"):
        try:
            meta[name] = json.loads(value)
        except ValueError:
            meta[name] = value
    return meta


def _open(args: argparse.Namespace, *, create: bool = True) -> Store:
    return open_store(args, create=create)


def open_store(args: argparse.Namespace, *, create: bool = True) -> Store:
    location = args.store or os.environ.get("CAS_STORE") or DEFAULT_STORE
    return Store.open(location, create=create, **cache_options(args))


def cache_options(args: argparse.Namespace) -> dict[str, Any]:
    """What the cache options given (``--cache``, ``--no-cache``, ``--cache-size``)
    ask of :meth:`Store.open`."""
    if getattr(args, "no_cache", False):
        return {"cache": False}
    return {"cache": getattr(args, "cache", None), "cache_size": getattr(args, "cache_size", None)}


def repack_lines(report: RepackReport | None, *, planned: bool = False) -> list[str]:
    """What a gc's repack did, would do (a dry run), or will do (``planned``: a prune's
    report of the next gc), when it concerns any chunk."""
    if report is None or not (report.chunks or report.frees_bytes):
        return []
    cost = report.cost_bytes
    size = ("about " if report.dry_run else "") + ("+" if cost >= 0 else "-")
    size += format_size(abs(cost))
    whole = f", {report.whole} of them whole" if report.whole else ""
    what = f"{counted(report.chunks, 'chunk')} of {counted(report.versions, 'kept version')}"
    bases = f"{format_size(report.frees_bytes)} of delta bases only deleted versions used"
    if planned:
        text = f"the next gc stores {what} again{whole} ({size}); then {bases} can go"
    elif report.dry_run:
        text = f"would store {what} again{whole} ({size}); then {bases} could go"
    else:
        text = f"stored {what} again{whole} ({size}); {bases} can go"
    lines = [f"repack:        {text} once older than the grace period"]
    if report.skipped:
        lines.append(
            f"               {counted(report.skipped, 'chunk')} could not be read and stayed;"
            " run `cas verify`"
        )
    return lines
