"""Charts drawn as inline SVG on the server: no script, no library, nothing fetched.

A metric across versions (one point per version, the best one marked), bars
of bytes by key, and a lineage graph whose boxes link to their versions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ._html import Html, Linker, esc, join, number, size, tag


@dataclass(frozen=True)
class Point:
    version: int
    ref: str
    value: float


@dataclass(frozen=True)
class _Frame:
    """The plot's area and the ranges it shows: where a point goes, and the axes."""

    width: int
    x0: float
    x1: float
    y0: float
    y1: float
    height: int = 260
    left: int = 64
    right: int = 16
    top: int = 14
    bottom: int = 34

    @classmethod
    def around(cls, points: Sequence[Point], width: int) -> _Frame:
        x0, x1 = min(p.version for p in points), max(p.version for p in points)
        y0, y1 = min(p.value for p in points), max(p.value for p in points)
        if x0 == x1:
            x0, x1 = x0 - 1, x1 + 1
        if y0 == y1:
            y0, y1 = y0 - abs(y0 or 1) * 0.1, y1 + abs(y1 or 1) * 0.1
        return cls(width, x0, x1, y0, y1)

    def at(self, p: Point) -> tuple[float, float]:
        x = self.left + (p.version - self.x0) / (self.x1 - self.x0) * (
            self.width - self.left - self.right
        )
        y = self.top + (self.y1 - p.value) / (self.y1 - self.y0) * (
            self.height - self.top - self.bottom
        )
        return round(x, 1), round(y, 1)

    def axes(self, name: str) -> Html:
        base, right = self.height - self.bottom, self.width - self.right
        lines = Html(
            f'<line class="axis" x1="{self.left}" y1="{base}" x2="{right}" y2="{base}"/>'
            f'<line class="axis" x1="{self.left}" y1="{self.top}" x2="{self.left}" y2="{base}"/>'
        )
        labels = [
            tag("text", number(self.y1), x=4, y=self.top + 8),
            tag("text", number(self.y0), x=4, y=base),
            tag("text", f"v{self.x0:g}", x=self.left, y=self.height - 14),
            tag("text", f"v{self.x1:g}", x=right - 30, y=self.height - 14),
            tag("text", f"{name} by version", x=self.width / 2 - 40, y=self.height - 2),
        ]
        return join([lines, *labels])


def metric_plot(
    name: str, points: Sequence[Point], best: str | None, linker: Linker, *, width: int = 760
) -> Html:
    """``name`` against version number: a line through every point, each point a link."""
    if not points:
        return tag("p", f"No version has the metric {name}.", cls="muted")
    frame = _Frame.around(points, width)
    ordered = sorted(points, key=lambda p: p.version)
    path = " ".join(f"{x},{y}" for x, y in map(frame.at, ordered))
    # Plain formatting, not tag(): a key may have tens of thousands of points.
    marks = []
    for p in ordered:
        x, y = frame.at(p)
        best_point = p.ref == best
        circle = (
            f'<circle cx="{x}" cy="{y}" r="{6 if best_point else 3.5}" '
            f'class="{"pt best" if best_point else "pt"}" data-ref="{esc(p.ref)}">'
            f"<title>{esc(p.ref)}: {esc(name)}={number(p.value)}</title></circle>"
        )
        href = linker("version", p.ref)
        marks.append(f'<a href="{esc(href)}">{circle}</a>' if href is not None else circle)
    return tag(
        "svg",
        frame.axes(name),
        tag("polyline", points=path, cls="line"),
        Html("".join(marks)),
        width=width,
        height=frame.height,
        viewBox=f"0 0 {width} {frame.height}",
        cls="plot",
        role="img",
        aria_label=f"{name} across {len(points)} versions",
        data_metric=name,
    )


def byte_bars(values: Mapping[str, int], linker: Linker, *, limit: int = 40) -> Html:
    """Horizontal bars, largest first; at most ``limit`` of them."""
    ranked = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    if not ranked:
        return tag("p", "Nothing stored.", cls="muted")
    most = max(v for _, v in ranked) or 1
    row, label_w, bar_w = 20, 300, 380
    bars = []
    for i, (key, value) in enumerate(ranked):
        y = i * row
        text = tag("text", key, x=0, y=y + 14)
        href = linker("key", key)
        bars.append(tag("a", text, href=href) if href is not None else text)
        bars.append(
            tag(
                "rect",
                tag("title", f"{key}: {size(value)}"),
                x=label_w,
                y=y + 3,
                height=row - 6,
                width=max(1.0, round(value / most * bar_w, 1)),
                cls="bar",
            )
        )
        bars.append(tag("text", size(value), x=label_w + bar_w + 8, y=y + 14))
    width, height = label_w + bar_w + 90, row * len(ranked)
    return tag("svg", join(bars), width=width, height=height, viewBox=f"0 0 {width} {height}")


@dataclass(frozen=True)
class GraphNode:
    ref: str
    level: int  # negative: ancestors, 0: the version shown, positive: descendants
    caption: str
    deleted: bool = False


def lineage_graph(
    root: str, nodes: Sequence[GraphNode], edges: Sequence[tuple[str, str]], linker: Linker
) -> Html:
    """Columns by generation (ancestors left, descendants right), arrows parent -> child."""
    box_w, box_h, gap_x, gap_y, pad = 220, 44, 60, 14, 10
    columns: dict[int, list[GraphNode]] = {}
    for node in sorted(nodes, key=lambda n: n.ref):
        columns.setdefault(node.level, []).append(node)
    levels = sorted(columns)
    where: dict[str, tuple[float, float]] = {}
    for col, level in enumerate(levels):
        for row, node in enumerate(columns[level]):
            where[node.ref] = (pad + col * (box_w + gap_x), pad + row * (box_h + gap_y))
    lines = []
    for parent, child in edges:
        if parent in where and child in where:
            (px, py), (cx, cy) = where[parent], where[child]
            lines.append(
                Html(
                    f'<path class="edge" marker-end="url(#arrow)" d="M{px + box_w},{py + box_h / 2}'
                    f" C{px + box_w + gap_x / 2},{py + box_h / 2} {cx - gap_x / 2},{cy + box_h / 2}"
                    f' {cx},{cy + box_h / 2}"/>'
                )
            )
    boxes = [_box(node, where[node.ref], box_w, box_h, root, linker) for node in nodes]
    rows = max(len(c) for c in columns.values())
    width = pad * 2 + len(levels) * box_w + (len(levels) - 1) * gap_x
    height = pad * 2 + rows * box_h + (rows - 1) * gap_y
    arrow = Html(
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#8a93a6"/>'
        "</marker></defs>"
    )
    return tag(
        "svg",
        arrow,
        join(lines),
        join(boxes),
        width=width,
        height=height,
        viewBox=f"0 0 {width} {height}",
        cls="lineage",
    )


def _box(
    node: GraphNode, at: tuple[float, float], w: int, h: int, root: str, linker: Linker
) -> Html:
    x, y = at
    classes = "node" + (" root" if node.ref == root else "") + (" deleted" if node.deleted else "")
    shown = node.ref if len(node.ref) <= 34 else "…" + node.ref[-33:]
    group = tag(
        "g",
        tag("title", node.ref),
        tag("rect", x=x, y=y, width=w, height=h),
        tag("text", shown, x=x + 8, y=y + 17),
        tag("text", node.caption[:40], x=x + 8, y=y + 34, cls="muted"),
        cls=classes,
        data_ref=node.ref,
    )
    href = None if node.deleted else linker("version", node.ref)
    return tag("a", group, href=href) if href is not None else esc(group)
