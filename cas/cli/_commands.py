"""The core commands: init, put, get, ls, log, show, tag, rm, stats, verify."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping

from ..errors import InvalidInputError
from ..store import (
    DEFAULT_DELTA_READS,
    DEFAULT_STORE,
    DELTA_METHODS,
    ENTROPY_CODERS,
    FOLDER_WORKERS,
    OBJECT_STORE_WORKERS,
    ChunkerParams,
    Stats,
    Store,
)
from ..units import counted, format_size, parse_size
from ._common import (
    AddCommand,
    emit,
    emit_versions,
    open_store,
    parse_metadata,
    parse_metrics,
    progress,
    tree_size,
    warnings_noted,
)
from ._workflow_commands import add_artifact_arguments, artifact_from_args

# -- commands -------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    location = args.store or os.environ.get("CAS_STORE") or DEFAULT_STORE
    chunker = ChunkerParams.from_average(parse_size(args.chunk_avg)) if args.chunk_avg else None
    store = Store.init(
        location,
        chunker=chunker,
        create_bucket=args.create_bucket,
        max_delta_reads=args.max_delta_reads,
        entropy=args.entropy,
        delta_method=args.delta_method,
        auto_delta=not args.no_auto_delta,
    )
    params = store.config.chunker
    coder = ", FSE exponents" if store.config.holds_fse else ""
    coder += f", format {store.config.format}"
    emit(
        args,
        {"store": store.uri, "config": json.loads(store.config.to_bytes())},
        f"initialised cas store at {store.uri} (chunks {format_size(params.min_size)}"
        f" / {format_size(params.avg_size)} / {format_size(params.max_size)}{coder})",
    )
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    store = open_store(args)
    info, file_metadata, file_message = artifact_from_args(args)
    metrics, metadata = parse_metrics(args.metric), parse_metadata(args.meta)
    metadata = {**file_metadata, **metadata}
    total = tree_size(args.path) if sys.stderr.isatty() and os.path.exists(args.path) else None
    with warnings_noted() as noted, progress(args, total, "put") as on_progress:
        version = store.put(
            args.path,
            args.key,
            parents=args.parent,
            tags=args.tag,
            metrics=metrics,
            metadata=metadata,
            message=args.message or file_message,
            progress=on_progress,
            info=info,
            workers=args.jobs,
            if_changed=args.if_changed,
            idempotency_token=args.idempotency_token,
            follow_symlinks=args.follow_symlinks,
            delta=False if args.no_delta else None,
        )
    emit(args, {**version.to_dict(), "warnings": noted}, version.ref)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    store = open_store(args, create=False)
    total = store.show(args.ref).version.size if sys.stderr.isatty() else None
    with progress(args, total, "get") as on_progress, warnings_noted() as noted:
        restored = store.restore(
            args.ref,
            args.dest,
            force=args.force,
            update=args.update,
            delete=args.delete,
            progress=on_progress,
            workers=args.jobs,
            link=args.link,
        )
    version = restored.version
    text = f"{version.ref} -> {args.dest} ({format_size(version.size)}, verified)"
    if args.link:
        text += (
            f"\n{counted(restored.linked_files, 'file')} "
            f"({format_size(restored.linked_bytes)}) linked from the cache"
        )
    if args.update:
        text += (
            f"\n{counted(restored.files_kept, 'file')} unchanged, "
            f"{restored.files_written} rewritten, {restored.files_removed} removed; "
            f"reused {format_size(restored.reused_bytes)}, "
            f"fetched {format_size(restored.fetched_bytes)}"
        )
    emit(args, {**restored.to_dict(), "warnings": noted}, text)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    store = open_store(args, create=False)
    keys = store.list_keys(args.prefix or "")
    rows = [{"key": k.key, "versions": k.versions, "latest": k.latest.to_dict()} for k in keys]
    text = "\n".join(
        f"{k.key:<40} {k.versions:>4} version{'s' if k.versions != 1 else ' '}  "
        f"latest @{k.latest.number}  {format_size(k.latest.size):>10}"
        for k in keys
    )
    emit(args, rows, text)
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    versions = open_store(args, create=False).log(args.key)
    emit_versions(args, versions)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    details = open_store(args, create=False).show(args.ref)
    v = details.version
    entries = [
        {
            "path": e.path,
            "type": e.type,
            "mode": oct(e.mode),
            "size": e.size,
            **({"blake3": e.digest.hex, "chunks": len(e.chunks)} if e.digest else {}),
            **({"target": e.target} if e.target else {}),
        }
        for e in details.entries
    ]
    lines = [
        f"ref:      {v.ref}",
        f"manifest: {v.manifest_id}",
        f"created:  {v.created}",
        f"kind:     {v.kind}, {counted(v.files, 'file')}, {format_size(v.size)}",
    ]
    storage = details.storage
    if storage.delta_chunks:
        of = f" of {storage.delta_base}" if storage.delta_base else ""
        lines.append(
            f"storage:  {storage.delta_chunks} of {storage.chunks} chunks are deltas{of}"
            f" (rebuilt from at most {storage.max_reads} chunk reads)"
        )
    # The typed fields set at put (--type, --job...): scalars on one line, type first.
    fields = sorted(v.artifact.items(), key=lambda item: item[0] != "type")
    scalars = [f"{name}={value}" for name, value in fields if not isinstance(value, Mapping)]
    if scalars:
        lines.append("artifact: " + " ".join(scalars))
    for name, value in fields:
        if isinstance(value, Mapping) and value:
            pairs = " ".join(f"{k}={x}" for k, x in sorted(value.items()))
            lines.append(f"{name + ':':<9} {pairs}")
    if v.parents:
        lines.append(f"parents:  {', '.join(v.parents)}")
    if v.tags:
        lines.append(f"tags:     {', '.join(v.tags)}")
    if v.metrics:
        lines.append("metrics:  " + " ".join(f"{k}={x:g}" for k, x in sorted(v.metrics.items())))
    if v.metadata:
        lines.append("metadata: " + json.dumps(dict(v.metadata), sort_keys=True))
    if v.message:
        lines.append(f"message:  {v.message}")
    lines.append("")
    for e in details.entries:
        suffix = {"dir": "/", "symlink": f" -> {e.target}"}.get(e.type, "")
        size = format_size(e.size) if e.type == "file" else ""
        lines.append(f"  {oct(e.mode)[2:]:>4} {size:>10}  {e.path}{suffix}")
    shown = {**v.to_dict(), "storage": storage.to_dict(), "entries": entries}
    emit(args, shown, "\n".join(lines))
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    store = open_store(args, create=False)
    if args.delete:
        key = args.ref.partition("@")[0].partition(":")[0]
        store.untag(key, args.tag)
        emit(args, {"key": key, "tag": args.tag, "deleted": True}, f"removed tag {key}:{args.tag}")
        return 0
    version = store.tag(args.ref, args.tag)
    emit(args, version.to_dict(), f"{version.key}:{args.tag} -> {version.ref}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = open_store(args, create=False)
    if args.all:
        if "@" in args.ref or ":" in args.ref:
            raise InvalidInputError("--all takes a KEY, not KEY@N or KEY:TAG")
        removed = store.delete_all(args.ref, force=args.force)
    else:
        removed = [store.delete(args.ref, force=args.force)]
    emit(
        args,
        [v.ref for v in removed],
        "\n".join(f"deleted {v.ref}" for v in removed)
        + "\n(space is reclaimed by `cas gc` once the grace period has passed)",
    )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    s = open_store(args, create=False).stats()
    text = "\n".join(
        [
            f"keys:              {s.keys}",
            f"versions:          {s.versions}",
            f"logical bytes:     {format_size(s.logical_bytes)}",
            f"unique bytes:      {format_size(s.unique_bytes)}",
            f"stored bytes:      {format_size(s.stored_bytes)}"
            f" ({format_size(s.live_bytes)} needed by live versions)",
            *_delta_base_lines(s),
            f"chunks:            {s.chunks} ({s.referenced_chunks} referenced)",
            *_delta_lines(s),
            f"dedup ratio:       {s.dedup_ratio:.2f}x",
            f"compression ratio: {s.compression_ratio:.2f}x",
            f"overall:           {s.total_ratio:.2f}x",
        ]
    )
    emit(args, s.to_dict(), text)
    return 0


def _delta_lines(s: Stats) -> list[str]:
    """How many chunks are stored as deltas, when any are, and of how many others."""
    if not s.delta_chunks:
        return []
    return [
        f"deltas:            {counted(s.delta_chunks, 'chunk')}, {format_size(s.delta_bytes)}"
        f" stored, coded against {counted(s.base_chunks, 'chunk')}"
    ]


def _delta_base_lines(s: Stats) -> list[str]:
    """What live versions need splits in two once the versions their deltas are based on
    are deleted: say which part is theirs, and what only their bases keep."""
    if not s.delta_base_bytes:
        return []
    return [
        f"  own chunks:      {format_size(s.version_bytes)} (of live versions, manifests included)",
        f"  delta bases:     {format_size(s.delta_base_bytes)} (of deleted versions; "
        "live versions are deltas of them)",
        f"  repacking:       would free about {format_size(s.repack_frees_bytes)}; "
        "`cas gc` repacks",
    ]


def cmd_verify(args: argparse.Namespace) -> int:
    store = open_store(args, create=False)
    with progress(args, None, "verify") as on_progress:
        report = store.verify(
            deep=args.deep, sample=args.sample, repair=args.repair, progress=on_progress
        )
    lines = [
        f"checked {counted(report.versions, 'version')}, "
        f"{counted(report.chunks_referenced, 'chunk')}"
        + (f" ({report.chunks_read} read and rehashed)" if report.deep else " (existence)")
    ]
    for damage in report.damaged:
        files = ", ".join(damage.files)
        lines.append(
            f"DAMAGED {damage.ref}: {damage.problem}" + (f" (files: {files})" if files else "")
        )
    for chunk, moved_to in report.quarantined:
        lines.append(f"quarantined corrupt chunk {chunk} -> {moved_to}")
    if report.catalog_problem is not None:
        lines.append(f"DAMAGED catalog: {report.catalog_problem}; rebuilt from the refs")
    if report.reput:
        lines.append(
            "to heal, put the content of the damaged files again (any key will do): "
            + ", ".join(report.reput)
        )
    count = len(report.damaged)
    lines.append("ok" if report.ok else counted(count, "damaged version") if count else "damaged")
    emit(args, report.to_dict(), "\n".join(lines))
    return 0 if report.ok else 3


def _jobs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return value


def add_jobs_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--jobs",
        "-j",
        type=_jobs,
        metavar="N",
        help=f"{what} in parallel (default: {OBJECT_STORE_WORKERS} on S3, GCS and Azure;"
        f" on a folder one per core, {FOLDER_WORKERS[0]} to {FOLDER_WORKERS[1]})",
    )


def register(add: AddCommand) -> None:
    """Add the core commands to the parser through ``add(name, handler, help)``."""
    _register_init(add)
    _register_put(add)
    _register_reads(add)
    _register_changes(add)
    _register_checks(add)


def _register_init(add: AddCommand) -> None:
    p = add("init", cmd_init, "create a store")
    folder, object_store = ChunkerParams(), ChunkerParams.for_object_store()
    p.add_argument(
        "--chunk-avg",
        metavar="SIZE",
        help=f"average chunk size (default {format_size(folder.avg_size)} on a folder, "
        f"{format_size(object_store.avg_size)} on S3, GCS and Azure; "
        "min = avg/4, max = avg*4)",
    )
    p.add_argument(
        "--create-bucket",
        action="store_true",
        help="create the bucket or container of an s3://, gs:// or az:// store first",
    )
    p.add_argument(
        "--max-delta-reads",
        type=int,
        metavar="N",
        help="longest delta chain, in chunk reads to rebuild a chunk"
        f" (default {DEFAULT_DELTA_READS}; 1: no deltas)",
    )
    p.add_argument(
        "--entropy",
        choices=ENTROPY_CODERS,
        default=ENTROPY_CODERS[0],
        help="coder of tensor exponents: huffman (default, fastest to decode) or fse"
        " (bf16 0.25%% smaller, a quarter slower to decode; store format 2)",
    )
    p.add_argument(
        "--delta-method",
        choices=DELTA_METHODS,
        default=DELTA_METHODS[0],
        help="how tensor deltas are coded: scaled (default: integer difference of the"
        " elements from the base's, fp32 ones times a factor where that is smaller; store"
        " format 4), difference (from the base's alone; format 3) or xor (a store cas"
        " before format 3 reads)",
    )
    p.add_argument(
        "--no-auto-delta",
        action="store_true",
        help="store tensors as deltas of a former version only when put names a --parent"
        " (default: of the key's latest version too)",
    )


def _register_put(add: AddCommand) -> None:
    p = add("put", cmd_put, "store a file or directory as the next version of KEY")
    p.add_argument("path", metavar="PATH")
    p.add_argument("key", metavar="KEY")
    p.add_argument(
        "--parent",
        action="append",
        default=[],
        metavar="REF",
        help="a version this one derives from (repeatable)",
    )
    p.add_argument("--tag", action="append", default=[], metavar="TAG", help="repeatable")
    p.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a number, e.g. loss=0.31 (repeatable)",
    )
    p.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="metadata; JSON values keep their type (repeatable)",
    )
    p.add_argument("--message", "-m", metavar="TEXT")
    p.add_argument(
        "--if-changed",
        "--skip-if-unchanged",
        dest="if_changed",
        action="store_true",
        help="commit nothing if the content and metadata equal KEY's latest version; "
        "print that version's ref instead (a retry then never duplicates)",
    )
    p.add_argument(
        "--idempotency-token",
        metavar="TOKEN",
        help="name this save: a retry with the same TOKEN prints the version the first "
        "attempt committed instead of storing again",
    )
    p.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="store what every symlink points to; by default a link that stays inside PATH "
        "is stored as a link, and one that leads out of it as what it points to",
    )
    p.add_argument(
        "--no-delta",
        action="store_true",
        help="store every chunk whole, none as a delta of a former version"
        " (the parent's, else the key's latest)",
    )
    add_jobs_argument(p, "chunks hashed, compressed and uploaded")
    add_artifact_arguments(p)


def _register_reads(add: AddCommand) -> None:
    p = add("get", cmd_get, "restore REF (KEY, KEY@N or KEY:TAG) to DEST, verified")
    p.add_argument("ref", metavar="REF")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--force", action="store_true", help="replace DEST if it exists")
    p.add_argument(
        "--update",
        action="store_true",
        help="bring an existing DEST to REF, reusing the files and chunks it holds",
    )
    p.add_argument(
        "--delete",
        action="store_true",
        help="with --update: remove files in DEST that REF does not hold",
    )
    p.add_argument(
        "--link",
        action="store_true",
        help="hard-link files the cache holds whole instead of writing them, and keep "
        "the files written there; linked files are read-only (docs/cache.md)",
    )
    add_jobs_argument(p, "chunks downloaded and checked")

    p = add("ls", cmd_ls, "list keys")
    p.add_argument("prefix", nargs="?", metavar="PREFIX")

    p = add("log", cmd_log, "list the versions of KEY, newest first")
    p.add_argument("key", metavar="KEY")

    p = add("show", cmd_show, "show one version and its files")
    p.add_argument("ref", metavar="REF")


def _register_changes(add: AddCommand) -> None:
    p = add("tag", cmd_tag, "point TAG of the ref's key at REF (or --delete it)")
    p.add_argument("ref", metavar="REF")
    p.add_argument("tag", metavar="TAG")
    p.add_argument("--delete", action="store_true", help="remove the tag instead")

    p = add("rm", cmd_rm, "delete a version (space returns at the next gc)")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--force", action="store_true", help="also delete tagged versions and tags")
    p.add_argument("--all", action="store_true", help="delete every version of KEY")


def _register_checks(add: AddCommand) -> None:
    add("stats", cmd_stats, "sizes, chunk counts, dedup and compression ratios")

    p = add("verify", cmd_verify, "check that every version's data is present (and intact)")
    p.add_argument("--deep", action="store_true", help="read and rehash every chunk")
    p.add_argument(
        "--sample",
        type=float,
        metavar="PERCENT",
        help="read and rehash a random PERCENT of the chunks (implies reading)",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="with --deep or --sample: move corrupt chunks to quarantine/ so a new put heals them",
    )
