"""The page of one version: details, files, tensors, lineage graph and a diff."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import CasError
from ..ml.diff import TENSOR_SUFFIXES, DiffReport, diff, read_tensor_header
from ..ml.lineage import Lineage, lineage
from ._charts import GraphNode, lineage_graph
from ._data import StoreView
from ._html import (
    Html,
    Linker,
    join,
    json_block,
    link,
    metrics_text,
    number,
    rows_table,
    size,
    table,
    tag,
    tags_html,
    when,
)

if TYPE_CHECKING:
    from ..store import Details

#: Generations of ancestors and of descendants the graph shows.
LINEAGE_DEPTH = 3
#: Boxes per generation; a version with hundreds of children lists the first ones.
GRAPH_COLUMN = 30
#: Tensor files whose tensors are listed, and tensors listed per file.
TENSOR_FILES, TENSORS_PER_FILE = 16, 400


def version_page(
    view: StoreView, ref: str, linker: Linker, *, against: str | None = None, forms: bool = True
) -> tuple[str, Html]:
    """``forms``: offer the form that picks another version to diff against (not in a report)."""
    store = view.store
    details = store.show(ref)
    version = details.version
    graph = lineage(store, version.ref, depth=LINEAGE_DEPTH)
    parts = [
        tag("h1", "Version ", tag("code", version.ref)),
        tag("div", _facts(details, linker), id="facts"),
        tag("h2", "Lineage"),
        tag("div", _graph(graph, linker), id="lineage"),
        tag("h2", "Files"),
        _files(details),
        tag("h2", "Tensors"),
        tag("div", _tensors(view, details), id="tensors"),
        tag("h2", "Diff"),
        tag("div", _diff_section(view, details, graph, against, linker, forms), id="diff"),
    ]
    return f"cas: {version.ref}", join(parts)


def _facts(details: Details, linker: Linker) -> Html:
    v = details.version
    artifact = {k: val for k, val in v.artifact.items() if k != "labels"}
    labels = v.artifact.get("labels") or {}
    rows: list[tuple[str, object]] = [
        ("key", link(linker, "key", v.key)),
        ("manifest", tag("code", v.manifest_id)),
        ("created", f"{when(v.created)} UTC"),
        ("kind", f"{v.kind}, {v.files} file(s), {size(v.size)}"),
        ("artifact", " ".join(f"{k}={val}" for k, val in sorted(artifact.items())) or "-"),
        ("labels", " ".join(f"{k}={val}" for k, val in sorted(labels.items())) or "-"),
        ("tags", tags_html(v.tags) or "-"),
        ("parents", join((link(linker, "version", p) for p in v.parents), ", ") or "-"),
        ("metrics", metrics_text(v.metrics) or "-"),
        ("metadata", json_block(dict(v.metadata)) if v.metadata else "-"),
        ("message", v.message or "-"),
    ]
    return rows_table(rows)


def _graph(graph: Lineage, linker: Linker) -> Html:
    levels = {graph.root: 0}
    for links, step in ((graph.parents, -1), (graph.children, 1)):
        frontier = [graph.root]
        while frontier:
            following = []
            for ref in frontier:
                for other in links.get(ref, ()):
                    if other not in levels:
                        levels[other] = levels[ref] + step
                        following.append(other)
            frontier = following
    columns: dict[int, list[str]] = {}
    for ref in sorted(levels):
        columns.setdefault(levels[ref], []).append(ref)
    nodes, hidden = [], 0
    for level, refs in columns.items():
        hidden += max(0, len(refs) - GRAPH_COLUMN)
        for ref in refs[:GRAPH_COLUMN] if level else refs:
            node = graph.nodes[ref]
            caption = "deleted" if node.deleted else f"{node.type} {metrics_text(node.metrics)}"
            nodes.append(GraphNode(ref, level, caption, node.deleted))
    svg = lineage_graph(graph.root, nodes, graph.edges, linker)
    note = f"{hidden} more versions not drawn; cas lineage lists them all." if hidden else ""
    if len(nodes) == 1:
        note = "No parents and no descendants."
    return join([svg, tag("p", note, cls="muted") if note else ""])


def _files(details: Details) -> Html:
    rows = []
    for entry in details.entries:
        deltas = sum(1 for c in entry.chunks if c.bases)
        kind = entry.type + (f" -> {entry.target}" if entry.target else "")
        rows.append(
            (entry.path, kind, f"{entry.mode:o}", size(entry.size), len(entry.chunks), deltas)
        )
    headers = ["path", "type", "mode", "size", "chunks", "delta chunks"]
    return table(headers, rows, id="files")


def _tensors(view: StoreView, details: Details) -> Html:
    files = [e for e in details.entries if e.type == "file" and e.path.endswith(TENSOR_SUFFIXES)]
    if not files:
        return tag("p", "No tensor files in this version.", cls="muted")
    parts = []
    for entry in files[:TENSOR_FILES]:
        parts.append(tag("h3", entry.path))
        try:
            reader = view.store.open_file(entry, label=details.version.ref)
            tensors, _ = read_tensor_header(reader)
        except (ValueError, KeyError, TypeError) as err:
            parts.append(tag("p", f"not read as a tensor file: {err}", cls="muted"))
            continue
        parts.append(_tensor_table(entry, list(tensors.values())))
    if len(files) > TENSOR_FILES:
        parts.append(tag("p", f"{len(files) - TENSOR_FILES} more tensor files.", cls="muted"))
    return join(parts)


def _tensor_table(entry: Any, tensors: Sequence[Any]) -> Html:
    """Each tensor: dtype, shape, the chunks that hold it, and how they are stored.

    ``raw``: chunks of its own; ``grouped``: a chunk it shares with other small
    tensors; ``delta``: stored as the difference from the parent's chunk.
    """
    bounds, offset = [], 0
    for chunk in entry.chunks:
        bounds.append((offset, offset + chunk.length, bool(chunk.bases)))
        offset += chunk.length
    ordered = sorted(tensors, key=lambda t: t.start)
    starts = [start for start, _, _ in bounds]
    covering = [
        range(max(0, bisect_right(starts, t.start) - 1), bisect_left(starts, t.end))
        for t in ordered
    ]
    users: dict[int, int] = {}
    for chunks in covering:
        for i in chunks:
            users[i] = users.get(i, 0) + 1
    rows = []
    for t, chunks in list(zip(ordered, covering, strict=True))[:TENSORS_PER_FILE]:
        if any(bounds[i][2] for i in chunks):
            how = "delta"
        elif any(users[i] > 1 for i in chunks):
            how = "grouped"
        else:
            how = "raw"
        shape = "[" + ", ".join(map(str, t.shape)) + "]"
        rows.append((t.name, t.dtype, shape, size(t.end - t.start), len(chunks), how))
    note = ""
    if len(ordered) > TENSORS_PER_FILE:
        note = f"{len(ordered) - TENSORS_PER_FILE} more tensors."
    headers = ["tensor", "dtype", "shape", "bytes", "chunks", "stored as"]
    return join([table(headers, rows, cls="tensors"), tag("p", note, cls="muted") if note else ""])


def _diff_section(
    view: StoreView,
    details: Details,
    graph: Lineage,
    against: str | None,
    linker: Linker,
    forms: bool,
) -> Html:
    version = details.version
    live_parents = [p for p in version.parents if p in graph.nodes and not graph.nodes[p].deleted]
    old = against or (live_parents[0] if live_parents else None)
    choices = sorted(r for r, n in graph.nodes.items() if not n.deleted and r != version.ref)
    form = (
        tag(
            "form",
            tag(
                "label", "compare with ", tag("input", name="against", value=old or "", list="refs")
            ),
            tag("datalist", join(tag("option", value=r) for r in choices), id="refs"),
            tag("button", "diff", type="submit"),
            method="get",
            cls="inline",
        )
        if forms
        else Html("")
    )
    if old is None:
        return join([tag("p", "No parent to compare with; choose a version.", cls="muted"), form])
    try:
        report = diff(view.store, old, version.ref)
    except CasError as err:
        return join([tag("p", f"cannot compare with {old}: {err}", cls="error"), form])
    return join([form, _diff_report(report, linker)])


def _diff_report(report: DiffReport, linker: Linker) -> Html:
    rows = []
    for change in report.changes:
        t = change.tensors
        tensors = ""
        if t is not None:
            tensors = t.error or join(
                [
                    f"{len(t.changed)} of {len(t.changed) + t.unchanged} changed",
                    join(tag("div", f"~ {n}", cls="changed-tensor") for n in t.changed),
                    join(tag("div", f"+ {n}") for n in t.added),
                    join(tag("div", f"- {n}") for n in t.removed),
                ]
            )
        sizes = f"{size(change.old_size)} -> {size(change.new_size)}"
        rows.append((change.status, change.path, sizes, tensors))
    metric_rows = [
        (name, number(old), number(new))
        for name, (old, new) in sorted(report.metrics.items())
        if old != new
    ]
    summary = (
        f"{len(report.changes)} files changed, {report.unchanged} unchanged; "
        f"{size(report.shared_bytes)} shared, {size(report.new_bytes)} new"
    )
    return join(
        [
            tag(
                "p",
                link(linker, "version", report.old),
                " → ",
                link(linker, "version", report.new),
                ": ",
                summary,
            ),
            table(["status", "path", "size", "tensors"], rows, cls="diff") if rows else "",
            table(["metric", "old", "new"], metric_rows) if metric_rows else "",
        ]
    )
