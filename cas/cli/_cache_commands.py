"""The local chunk cache on the command line: the options every command takes
(``--cache DIR``, ``--no-cache``, ``--cache-size``) and ``cas cache stats|clear``."""

from __future__ import annotations

import argparse

from ..errors import InvalidInputError
from ..store import CachedStore, CacheReport, cache_report, clear_cache
from ..units import counted, format_size, parse_size
from ._common import AddCommand, cache_options, emit

#: Options before the command that take a value, and flags that do not;
#: cli.requested_command skips them to find the command's name.
VALUE_OPTIONS = ("--cache", "--cache-size")
FLAG_OPTIONS = ("--no-cache",)


def add_cache_options(parser: argparse.ArgumentParser) -> None:
    """The cache options, on the parser every command shares."""
    parser.add_argument(
        "--cache",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="local chunk cache folder (on for any store when given); "
        "default $CAS_CACHE, else ~/.cache/cas, used for s3://, gs://, az:// stores",
    )
    parser.add_argument(
        "--no-cache",
        action="store_true",
        default=argparse.SUPPRESS,
        help="read every chunk from the store, keeping none locally",
    )
    parser.add_argument(
        "--cache-size",
        default=argparse.SUPPRESS,
        type=_size,
        metavar="SIZE",
        help="size the cache folder is kept to, least recently used chunks "
        "going first (default $CAS_CACHE_SIZE, else 4GiB)",
    )


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except InvalidInputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def cmd_cache(args: argparse.Namespace) -> int:
    options = cache_options(args)
    choice = options["cache"]
    choice = True if choice in (None, False) else choice
    if args.action == "clear":
        report = clear_cache(choice)
        emit(
            args,
            {"cleared": report.to_dict()},
            f"cleared {report.root}: {_held(report)}, {format_size(report.size)}",
        )
        return 0
    report = cache_report(choice, options.get("cache_size"))
    emit(args, report.to_dict(), _stats_text(report))
    return 0


def _stats_text(report: CacheReport) -> str:
    lines = [
        f"cache folder: {report.root}",
        f"holds: {_held(report)}, {format_size(report.size)} of {format_size(report.limit)}",
    ]
    for store in report.stores:
        lines.append(f"  {store.store}: {_held(store)}, {format_size(store.size)}")
    return "\n".join(lines)


def _held(held: CacheReport | CachedStore) -> str:
    """``N chunks``, and ``M whole files`` when gets that link kept some."""
    text = counted(held.chunks, "chunk")
    return f"{text}, {counted(held.files, 'whole file')}" if held.files else text


def register(add: AddCommand) -> None:
    p = add("cache", cmd_cache, "show what the local chunk cache holds, or empty it")
    p.add_argument(
        "action",
        choices=("stats", "clear"),
        help="stats: the cache folder and what each store holds in it; clear: empty it",
    )
