"""``cas catalog``: the catalog of versions that log, ls, find and lineage read."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..units import counted, format_size
from ._common import AddCommand, emit, open_store

if TYPE_CHECKING:
    from ..store import CatalogStatus

ACTIONS = {
    "status": "what the catalog holds (the default)",
    "compact": "fold the changes since the last compaction into a new checkpoint",
    "rebuild": "build the catalog again from every ref (after a disaster)",
    "check": "compare the catalog with every ref, and rebuild it if they disagree",
}


def _text(status: CatalogStatus) -> str:
    if status.checkpoint is None:
        return f"no catalog yet ({counted(status.pending, 'note')} of changes)"
    lines = [
        f"checkpoint: {status.checkpoint} ({format_size(status.checkpoint_bytes)}, "
        f"generation {status.generation})",
        f"versions:   {status.versions} live, {counted(status.tags, 'tag')}",
        f"since:      {counted(status.pending, 'change')} not compacted yet "
        "(a query reads one ref for each)",
    ]
    if status.problem is not None:
        lines.append(f"DAMAGED: {status.problem}; rebuilt from the refs")
    return "\n".join(lines)


def cmd_catalog(args: argparse.Namespace) -> int:
    store = open_store(args, create=False)
    if args.action == "compact":
        status = store.compact_catalog()
    elif args.action == "rebuild":
        status = store.compact_catalog(rebuild=True)
    else:
        status = store.catalog_status(check=args.action == "check")
    emit(args, status.to_dict(), _text(status))
    return 3 if status.problem is not None else 0


def register(add: AddCommand) -> None:
    p = add("catalog", cmd_catalog, "show, compact, check or rebuild the catalog of versions")
    p.add_argument(
        "action",
        nargs="?",
        default="status",
        choices=list(ACTIONS),
        help="; ".join(f"{name}: {text}" for name, text in ACTIONS.items()),
    )
