"""HTML building blocks: escaping, links, tables and the page shell.

Every value that comes from a store (keys, tags, file names, metadata,
messages) reaches the page through :func:`esc`; markup the pages build
themselves is a :class:`Html`, which :func:`esc` passes through unchanged.
Links are made here from references, never from stored text, so a stored
``javascript:`` URL can only ever be shown as text.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

from ..units import format_size


class Html(str):
    """Markup built by the pages: already safe, never escaped again."""

    __slots__ = ()


def esc(value: object) -> Html:
    """``value`` as text in HTML (quotes included, so it is safe in attributes too)."""
    if isinstance(value, Html):
        return value
    return Html(html.escape(str(value), quote=True))


def join(parts: Iterable[object], sep: str = "") -> Html:
    return Html(sep.join(esc(part) for part in parts))


def tag(element: str, /, *children: object, **attrs: object) -> Html:
    """``<element attrs>children</element>``; attribute values are escaped, ``cls`` is ``class``."""
    rendered = "".join(
        f' {_attribute_name(key)}="{esc(value)}"'
        for key, value in attrs.items()
        if value is not None and value is not False
    )
    if element in _VOID:
        return Html(f"<{element}{rendered}>")
    return Html(f"<{element}{rendered}>{join(children)}</{element}>")


#: Elements that have no content, and so no closing tag.
_VOID = frozenset({"input", "br", "img", "meta", "link"})


def _attribute_name(key: str) -> str:
    return "class" if key == "cls" else key.rstrip("_").replace("_", "-")


#: Makes the address of a page from its kind ("key", "version") and a name,
#: or None where the output has no such page (a report holds only some).
Linker = Callable[[str, str], "str | None"]


def server_link(kind: str, name: str) -> str:
    """Addresses of the served pages: ``/key/runs/a``, ``/version/runs/a@3``."""
    return f"/{kind}/{quote(name, safe='/@:')}"


def link(linker: Linker, kind: str, name: str, text: object | None = None) -> Html:
    href = linker(kind, name)
    label = name if text is None else text
    return tag("a", label, href=href) if href is not None else tag("span", label)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], **attrs: object) -> Html:
    head = tag("tr", *(tag("th", h) for h in headers))
    body = join(tag("tr", *(tag("td", cell) for cell in row)) for row in rows)
    return tag("table", tag("thead", head), tag("tbody", body), **attrs)


def rows_table(rows: Iterable[tuple[str, object]]) -> Html:
    """Two columns, name and value: a version's details."""
    return tag("table", *(tag("tr", tag("th", k), tag("td", v)) for k, v in rows), cls="facts")


#: What a figure shows while the manifests it needs are being read; a page that holds
#: it reloads itself once the server has read them (see :func:`page`).
COMPUTING = "computing…"


def computing() -> Html:
    return tag("span", COMPUTING, cls="computing")


def is_computing(body: str) -> bool:
    """Whether a page shows a figure still being computed (stored text is escaped, so
    only :func:`computing` can put that class attribute in a page)."""
    return 'class="computing"' in body


def size(n: int | float | None) -> str:
    return "-" if n is None else format_size(n)


def when(created: str | None) -> str:
    """An RFC 3339 time as ``2026-12-07 01:58:16`` (UTC)."""
    if not created:
        return "-"
    try:
        return datetime.fromisoformat(created.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return created


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def metrics_text(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={number(v)}" for k, v in sorted(metrics.items()))


def json_block(value: Any) -> Html:
    """Any JSON value shown as indented text (escaped: it is data, not markup)."""
    return tag("pre", json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))


def tags_html(tags: Iterable[str]) -> Html:
    return join(tag("span", t, cls="tag") for t in tags)


_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;align-items:center}
header a{color:#cfe0ff;text-decoration:none}header b{font-size:1.1em}
main{padding:1em 1.5em;max-width:1400px}
h1{font-size:1.35em;margin:.3em 0 .6em}h2{font-size:1.1em;margin:1.4em 0 .5em}
table{border-collapse:collapse;background:#fff;margin:.3em 0 1em}
th,td{border:1px solid #dde1e7;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}td.num,th.num{text-align:right}
table.facts th{width:9em;white-space:nowrap}
pre{margin:0;white-space:pre-wrap;word-break:break-word;font-size:13px}
.tag{background:#e3ecff;border-radius:3px;padding:0 .35em;margin-right:.3em;font-size:.92em}
.best td{background:#fff6d6}.muted{color:#6b7383}.error{color:#a11}.computing{color:#8a6d00}
svg text{font:11px system-ui,sans-serif}
svg .pt{fill:#2f6fdb}svg .pt.best{fill:#e0a100;stroke:#7a5800;stroke-width:1.5}
svg .line{fill:none;stroke:#9db8ec;stroke-width:1.5}svg .axis{stroke:#777}
svg .node rect{fill:#fff;stroke:#56607a;rx:4}svg .node.root rect{stroke:#1d2330;stroke-width:2.5}
svg .node.deleted rect{stroke-dasharray:4 3;fill:#f1f1f1}svg .edge{stroke:#8a93a6;fill:none}
svg a .node:hover rect{fill:#eef4ff}svg .bar{fill:#5b8def}
form.inline{display:flex;gap:.5em;align-items:center;margin:.3em 0}
svg.plot,svg.lineage{display:block;margin:.3em 0 1em;background:#fff;border:1px solid #dde1e7}
"""

#: Reloads the page when the store changes: the server answers /changes with a
#: fingerprint of every live version and its tags, then a line that says whether
#: figures are still being computed ("computing") or not ("ready"). A page that
#: shows "computing…" asks often and reloads once they are ready; a report has
#: no server and no poll.
_POLL = """
(function(){var seen=null,pending=%s;function poll(){fetch('/changes',{credentials:'same-origin'})
.then(function(r){return r.ok?r.text():null}).then(function(t){if(t===null)return;
var l=t.split('\\n');if(pending&&l[1]==='ready'){location.reload();return}
if(seen!==null&&l[0]!==seen){location.reload();return}seen=l[0]}).catch(function(){})
.finally(function(){setTimeout(poll,pending?%d:%d)})}poll()})();
"""
#: How often a page showing "computing…" asks whether its figures are ready.
PENDING_POLL_MS = 1000


def page(
    title: str,
    body: Html,
    *,
    nonce: str | None = None,
    poll_ms: int | None = None,
    nav: bool = True,
) -> str:
    """A whole document. ``nonce`` lets the one inline script run under the page's CSP."""
    script = ""
    if poll_ms is not None and nonce is not None:
        pending = "true" if is_computing(body) else "false"
        poll = _POLL % (pending, min(poll_ms, PENDING_POLL_MS), poll_ms)
        script = f'<script nonce="{esc(nonce)}">{poll}</script>'
    header = ""
    if nav:
        header = '<header><b>cas</b><a href="/">keys</a><a href="/store">store</a></header>'
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{esc(title)}</title>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<style>{_STYLE}</style></head><body>{header}<main>{body}</main>{script}</body></html>"
    )
