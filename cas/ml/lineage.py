"""Lineage: what a version is made from (ancestors) and what was made from it (descendants).

Parents are recorded in each manifest (and in the ref's summary) as
``KEY@N``. Ancestors follow those links upwards; descendants need the
reverse links, so one catalog of the whole store (refs only, see
:meth:`Store.catalog <cas.store.Store.catalog>`) is read and inverted. A
parent that has been deleted still appears, marked deleted: the link is a
fact of history, only its data is gone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..repository._metadata import DEFAULT_TYPE

if TYPE_CHECKING:
    from ..store import Store, Version


@dataclass(frozen=True)
class Node:
    """One version in a lineage graph; ``deleted`` when only the link to it remains."""

    ref: str
    deleted: bool = False
    type: str = DEFAULT_TYPE
    created: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: tuple[str, ...] = ()

    @classmethod
    def of(cls, version: Version) -> Node:
        return cls(
            ref=version.ref,
            type=str(version.artifact.get("type", DEFAULT_TYPE)),
            created=version.created,
            metrics=dict(version.metrics),
            tags=version.tags,
        )

    def to_dict(self) -> dict[str, Any]:
        key, _, number = self.ref.rpartition("@")
        return {
            "ref": self.ref,
            "key": key,
            "version": int(number),
            "deleted": self.deleted,
            "type": self.type,
            "created": self.created,
            "metrics": dict(self.metrics),
            "tags": list(self.tags),
        }

    def label(self) -> str:
        if self.deleted:
            return f"{self.ref}  (deleted)"
        parts = [self.ref, self.type]
        if self.metrics:
            parts.append(" ".join(f"{k}={v:g}" for k, v in sorted(self.metrics.items())))
        if self.tags:
            parts.append("[" + ", ".join(self.tags) + "]")
        return "  ".join(parts)


@dataclass(frozen=True)
class Lineage:
    """The ancestors and descendants of ``root``, as nodes and parent -> child edges."""

    root: str
    nodes: Mapping[str, Node]
    parents: Mapping[str, tuple[str, ...]]  # child -> its parents (within the graph)
    children: Mapping[str, tuple[str, ...]]  # parent -> its children (within the graph)

    @property
    def edges(self) -> list[tuple[str, str]]:
        up = {(p, c) for c, ps in self.parents.items() for p in ps}
        down = {(p, c) for p, cs in self.children.items() for c in cs}
        return sorted(up | down)

    @property
    def ancestors(self) -> list[str]:
        return _reachable(self.root, self.parents)

    @property
    def descendants(self) -> list[str]:
        return _reachable(self.root, self.children)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "nodes": [self.nodes[ref].to_dict() for ref in sorted(self.nodes)],
            "edges": [{"parent": p, "child": c} for p, c in self.edges],
            "ancestors": self.ancestors,
            "descendants": self.descendants,
        }

    def to_text(self) -> str:
        """The root, then its ancestors as a tree (parents below children), then descendants."""
        lines = [self.nodes[self.root].label()]
        lines.append("ancestors:" if self.parents.get(self.root) else "ancestors: none")
        _tree(self.root, self.parents, self.nodes, lines)
        lines.append("descendants:" if self.children.get(self.root) else "descendants: none")
        _tree(self.root, self.children, self.nodes, lines)
        return "\n".join(lines)

    def to_dot(self) -> str:
        """Graphviz: one box per version, arrows from parent to child, the root in bold."""
        out = ["digraph lineage {", "  rankdir=LR;", '  node [shape=box, fontname="monospace"];']
        for ref in sorted(self.nodes):
            node = self.nodes[ref]
            label = node.ref if node.deleted else f"{node.ref}\\n{node.type}"
            if node.metrics and not node.deleted:
                label += "\\n" + " ".join(f"{k}={v:g}" for k, v in sorted(node.metrics.items()))
            attrs = [f"label={_quote(label)}"]
            if ref == self.root:
                attrs.append("style=bold")
            if node.deleted:
                attrs.append("style=dashed")
            out.append(f"  {_quote(ref)} [{', '.join(attrs)}];")
        out.extend(f"  {_quote(p)} -> {_quote(c)};" for p, c in self.edges)
        out.append("}")
        return "\n".join(out)

    def to_mermaid(self) -> str:
        """A Mermaid flowchart: one box per version, arrows from parent to child.

        Mermaid ids allow few characters, so each version is ``n0``, ``n1``...
        with its reference as the quoted label; the root is styled bold and
        deleted versions dashed, as in :meth:`to_dot`.
        """
        ids = {ref: f"n{i}" for i, ref in enumerate(sorted(self.nodes))}
        out = ["flowchart LR"]
        for ref, name in ids.items():
            node = self.nodes[ref]
            lines = [node.ref] if node.deleted else [node.ref, node.type]
            if node.metrics and not node.deleted:
                lines.append(" ".join(f"{k}={v:g}" for k, v in sorted(node.metrics.items())))
            out.append(f'  {name}["{_mermaid_text("<br/>".join(lines))}"]')
        out.extend(f"  {ids[p]} --> {ids[c]}" for p, c in self.edges)
        out.append("  classDef root stroke-width:3px;")
        out.append("  classDef deleted stroke-dasharray:4 3;")
        out.append(f"  class {ids[self.root]} root;")
        deleted = [ids[ref] for ref, node in sorted(self.nodes.items()) if node.deleted]
        if deleted:
            out.append(f"  class {','.join(deleted)} deleted;")
        return "\n".join(out)


def _mermaid_text(text: str) -> str:
    # Inside a quoted Mermaid label only the double quote needs an entity.
    return text.replace('"', "#quot;")


def _quote(text: str) -> str:
    # DOT strings: double quotes; labels above already hold escaped newlines.
    return '"' + text.replace('"', '\\"') + '"'


def _reachable(start: str, links: Mapping[str, Iterable[str]]) -> list[str]:
    seen: dict[str, None] = {}
    queue = deque(links.get(start, ()))
    while queue:
        ref = queue.popleft()
        if ref in seen or ref == start:
            continue
        seen[ref] = None
        queue.extend(links.get(ref, ()))
    return list(seen)


def _tree(
    ref: str,
    links: Mapping[str, tuple[str, ...]],
    nodes: Mapping[str, Node],
    lines: list[str],
    prefix: str = "",
    path: frozenset[str] = frozenset(),
    shown: set[str] | None = None,
) -> None:
    # A lineage is a DAG: a version reached twice is printed once in full,
    # then by name only, so a diamond does not repeat a whole subtree.
    shown = set() if shown is None else shown
    below = links.get(ref, ())
    for index, child in enumerate(below):
        last = index == len(below) - 1
        branch, indent = ("└── ", "    ") if last else ("├── ", "│   ")
        if child in shown or child in path:
            lines.append(f"{prefix}{branch}{child}  (see above)")
            continue
        shown.add(child)
        lines.append(f"{prefix}{branch}{nodes[child].label()}")
        _tree(child, links, nodes, lines, prefix + indent, path | {ref}, shown)


def lineage(store: Store, ref: str, *, depth: int | None = None) -> Lineage:
    """Ancestors and descendants of ``ref`` (KEY, KEY@N or KEY:TAG), up to ``depth`` levels."""
    root = store.resolve(ref).label
    versions = {v.ref: v for v in store.catalog()}
    all_children: dict[str, list[str]] = {}
    for version in versions.values():
        for parent in version.parents:
            all_children.setdefault(parent, []).append(version.ref)

    nodes: dict[str, Node] = {}
    parents: dict[str, tuple[str, ...]] = {}
    children: dict[str, tuple[str, ...]] = {}

    def node(name: str) -> Node:
        if name not in nodes:
            version = versions.get(name)
            nodes[name] = Node.of(version) if version is not None else Node(name, deleted=True)
        return nodes[name]

    node(root)
    for links, step in ((parents, _parents_of(versions)), (children, all_children)):
        frontier, level = [root], 0
        visited = {root}
        while frontier and (depth is None or level < depth):
            following = []
            for name in frontier:
                linked = tuple(sorted(set(step.get(name, ()))))
                if not linked:
                    continue
                links[name] = linked
                for other in linked:
                    node(other)
                    if other not in visited:
                        visited.add(other)
                        following.append(other)
            frontier, level = following, level + 1
    return Lineage(root, nodes, parents, children)


def _parents_of(versions: Mapping[str, Version]) -> dict[str, tuple[str, ...]]:
    return {ref: v.parents for ref, v in versions.items() if v.parents}
