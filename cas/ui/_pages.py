"""The keys, key and store pages, as (title, body) for the server or a report."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ._charts import Point, byte_bars, metric_plot
from ._data import KeyRow, StoreView
from ._html import (
    Html,
    Linker,
    computing,
    join,
    link,
    number,
    rows_table,
    size,
    table,
    tag,
    tags_html,
    when,
)

if TYPE_CHECKING:
    from ..store import LastRun, Stats, Version

#: Rows of a key's table shown at once (newest first); the plot always has every version.
TABLE_ROWS = 500
#: Metrics read as "higher is better" when the page is not told which way is best.
_HIGHER_IS_BETTER = ("acc", "f1", "score", "precision", "recall", "auc", "bleu", "reward", "rouge")


def keys_page(view: StoreView, linker: Linker, prefix: str = "") -> tuple[str, Html]:
    """Every key (under ``prefix``) with its latest version, tags and costs."""
    rows = view.key_rows(prefix)
    cells = [
        (
            link(linker, "key", row.key),
            row.versions,
            link(linker, "version", row.latest.ref, f"@{row.latest.number}"),
            when(row.latest.created),
            size(row.latest.size),
            tags_html(row.tags),
            computing() if row.cost is None else size(row.cost.stored),
            computing() if row.cost is None else size(row.cost.stored - row.cost.shared),
        )
        for row in rows
    ]
    headers = ["key", "versions", "latest", "created", "size", "tags", "stored", "own"]
    explain = tag(
        "p",
        "stored: what the key's live versions need in the store, after deduplication, "
        "compression and deltas (delta bases included); own: the part no other key needs, "
        "about what deleting the key would free.",
        cls="muted",
    )
    search = tag(
        "form",
        tag("label", "keys starting with ", tag("input", name="prefix", value=prefix)),
        tag("button", "list", type="submit"),
        method="get",
        cls="inline",
    )
    if not rows:
        empty = f"No key starts with {prefix}." if prefix else "The store holds no versions."
        return "cas: keys", join([tag("h1", "Keys"), search, tag("p", empty)])
    heading = tag("h1", f"Keys ({len(rows)})")
    note = _computing_note("stored and own") if rows[0].cost is None else ""
    body = join([heading, search, note, table(headers, cells, id="keys"), explain])
    return "cas: keys", body


def _computing_note(what: str) -> Html:
    return tag(
        "p",
        f"The server is reading the manifests that {what} need; this page fills them in "
        "as soon as they are read.",
        cls="muted",
        id="computing-note",
    )


@dataclass(frozen=True)
class Choice:
    """The metric a key page plots and ranks by, and which way is best."""

    metric: str | None
    best: str  # "min" or "max"
    chosen: bool = False  # whether ``best`` was asked for, rather than guessed from the name

    @classmethod
    def of(cls, metrics: Sequence[str], metric: str | None, best: str | None) -> Choice:
        if metric not in metrics:
            metric = "loss" if "loss" in metrics else (metrics[0] if metrics else None)
        if best in ("min", "max"):
            return cls(metric, best, chosen=True)
        higher = metric is not None and any(w in metric.lower() for w in _HIGHER_IS_BETTER)
        return cls(metric, "max" if higher else "min")

    def best_of(self, versions: Sequence[Version]) -> str | None:
        name = self.metric
        scored = [v for v in versions if name is not None and name in v.metrics]
        if name is None or not scored:
            return None
        pick = min if self.best == "min" else max
        return pick(scored, key=lambda v: (v.metrics[name], -v.number)).ref


def key_page(
    view: StoreView,
    key: str,
    linker: Linker,
    *,
    metric: str | None = None,
    best: str | None = None,
    every_metric: bool = False,
) -> tuple[str, Html]:
    """A key's versions in a table, a metric plotted across them, the best one marked.

    ``every_metric`` plots each metric in turn (a report cannot ask for one).
    """
    versions = view.store.log(key)  # newest first
    names = sorted({name for v in versions for name in v.metrics})
    choice = Choice.of(names, metric, best)
    best_ref = choice.best_of(versions)
    shown = versions[:TABLE_ROWS]
    added = view.added_bytes(versions)
    parts = [tag("h1", "Key ", tag("code", key)), _summary(versions, choice, best_ref, linker)]
    if names and not every_metric:
        parts += [_metric_form(names, choice), _plot(versions, choice.metric, best_ref, linker)]
    for name in names if every_metric else ():
        pick = Choice.of(names, name, None)
        parts += [tag("h2", f"{name} ({pick.best} is best)")]
        parts.append(_plot(versions, name, pick.best_of(versions), linker))
    parts.append(tag("h2", "Versions"))
    if added is None:
        parts.append(_computing_note("the added bytes"))
    if len(versions) > len(shown):
        parts.append(tag("p", f"The newest {len(shown)} of {len(versions)}.", cls="muted"))
    parts.append(_versions_table(shown, names, best_ref, added, linker))
    return f"cas: {key}", join(parts)


def _summary(
    versions: Sequence[Version], choice: Choice, best_ref: str | None, linker: Linker
) -> Html:
    facts: list[tuple[str, object]] = [
        ("versions", len(versions)),
        ("latest", link(linker, "version", versions[0].ref)),
    ]
    if best_ref is not None:
        facts.append((f"best {choice.metric}", join([link(linker, "version", best_ref), " ★"])))
    return rows_table(facts)


def _metric_form(names: Sequence[str], choice: Choice) -> Html:
    options = join(
        tag("option", name, value=name, selected=name == choice.metric or None) for name in names
    )
    picked = choice.best if choice.chosen else ""
    ways = join(
        tag("option", label, value=way, selected=way == picked or None)
        for way, label in (
            ("", "best: by its name"),
            ("min", "lowest is best"),
            ("max", "highest is best"),
        )
    )
    return tag(
        "form",
        tag("label", "metric ", tag("select", options, name="metric", id="metric")),
        tag("select", ways, name="best", id="best"),
        tag("button", "show", type="submit"),
        method="get",
        cls="inline",
    )


def _plot(versions: Sequence[Version], name: str | None, best: str | None, linker: Linker) -> Html:
    if name is None:
        return Html("")
    points = [Point(v.number, v.ref, v.metrics[name]) for v in versions if name in v.metrics]
    return metric_plot(name, points, best, linker)


def _versions_table(
    versions: Sequence[Version],
    names: Sequence[str],
    best_ref: str | None,
    added: Mapping[str, int] | None,
    linker: Linker,
) -> Html:
    headers = ["version", "created", "tags", *names, "type", "job", "algorithm"]
    headers += ["base model", "fine-tuning", "kind", "size", "added", "parents", "message"]
    rows = []
    for v in versions:
        a = v.artifact
        mark = " ★" if v.ref == best_ref else ""
        cells: list[object] = [
            join([link(linker, "version", v.ref, f"@{v.number}"), mark]),
            when(v.created),
            tags_html(v.tags),
            *(number(v.metrics.get(name)) for name in names),
            a.get("type", "other"),
            a.get("job", ""),
            a.get("algorithm", ""),
            a.get("base_model", ""),
            a.get("fine_tuning", ""),
            v.kind,
            size(v.size),
            computing() if added is None else size(added.get(v.ref)),
            join((link(linker, "version", p) for p in v.parents), ", "),
            v.message,
        ]
        cls = "best" if v.ref == best_ref else None
        rows.append(tag("tr", *(tag("td", c) for c in cells), cls=cls, data_ref=v.ref))
    head = tag("tr", *(tag("th", h) for h in headers))
    return tag("table", tag("thead", head), tag("tbody", join(rows)), id="versions")


def store_page(view: StoreView, linker: Linker) -> tuple[str, Html]:
    """Sizes and ratios, stored bytes by key, and what garbage collection would do.

    Until the server has read the manifests of every live version, only what
    the catalog says is shown, and "computing…" for the rest.
    """
    from ..units import format_duration

    store = view.store
    versions = store.catalog()  # one read of the catalog, for the figures and the chart
    rows = view.key_rows(versions=versions)
    ready = all(row.cost is not None for row in rows)
    stats = store.stats(versions=versions) if ready else None
    settings = store.gc_settings()
    garbage = None if stats is None else size(max(0, stats.stored_bytes - stats.live_bytes))
    gc_facts = rows_table(
        [
            ("grace period", format_duration(settings.grace)),
            ("last collection", _last_gc(store.last_gc())),
            (
                "would reclaim",
                computing() if garbage is None else f"{garbage} once older than the grace period",
            ),
        ]
    )
    chart = (
        byte_bars({row.key: row.cost.stored for row in rows if row.cost is not None}, linker)
        if ready
        else tag("p", computing())
    )
    body = join(
        [
            tag("h1", "Store"),
            "" if ready else _computing_note("these figures"),
            tag("div", _store_facts(store.uri, rows, versions, stats), id="stats"),
            tag("h2", "Stored bytes by key"),
            chart,
            tag("h2", "Garbage collection"),
            tag("div", gc_facts, id="gc"),
        ]
    )
    return "cas: store", body


def _store_facts(
    uri: str, rows: Sequence[KeyRow], versions: Sequence[Version], stats: Stats | None
) -> Html:
    """The figures of ``cas stats``; those that need manifests are "computing…" without it."""

    def shown(figure: Callable[[Stats], object]) -> object:
        return computing() if stats is None else figure(stats)

    return rows_table(
        [
            ("location", uri),
            ("keys", len(rows) if stats is None else stats.keys),
            ("versions", len(versions) if stats is None else stats.versions),
            ("logical bytes", shown(lambda s: size(s.logical_bytes))),
            ("unique bytes", shown(lambda s: size(s.unique_bytes))),
            ("stored bytes", shown(lambda s: size(s.stored_bytes))),
            ("needed by live versions", shown(lambda s: size(s.live_bytes))),
            ("delta bases", shown(lambda s: size(s.delta_base_bytes))),
            ("chunks", shown(lambda s: f"{s.chunks} ({s.referenced_chunks} referenced)")),
            ("dedup ratio", shown(lambda s: f"{s.dedup_ratio:.2f}x")),
            ("compression ratio", shown(lambda s: f"{s.compression_ratio:.2f}x")),
            ("overall", shown(lambda s: f"{s.total_ratio:.2f}x")),
        ]
    )


def _last_gc(run: LastRun | None) -> str:
    if run is None:
        return "none recorded"
    finished = datetime.fromtimestamp(run.finished, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"finished {finished} UTC: deleted {run.deleted_chunks} chunks and "
        f"{run.deleted_manifests} manifests ({size(run.bytes_reclaimed)}); "
        f"{run.kept_by_grace} objects ({size(run.bytes_kept_by_grace)}) kept by the grace period"
    )


__all__ = ["Choice", "key_page", "keys_page", "store_page"]
