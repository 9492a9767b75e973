"""``cas report``: a key's or a version's pages as one self-contained HTML file.

Everything is inline (styles; the charts are SVG), the file runs no script and
its Content-Security-Policy forbids every fetch, so it opens from disk, from
an e-mail or a CI artifact the same way, with no network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

from ._data import StoreView
from ._html import esc, join, page, tag
from ._pages import key_page
from ._version import version_page

if TYPE_CHECKING:
    from ..store import Store

REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'none'"


def _anchor(kind: str, name: str) -> str:
    return f"{kind}-{quote(name, safe='')}"


def render_report(store: Store, ref_or_key: str) -> str:
    """The key page (every metric plotted) and one version's page, in one document.

    ``KEY`` reports the key and its latest version; ``KEY@N`` or ``KEY:TAG``
    that version and its key.
    """
    view = StoreView(store)
    target = store.resolve(ref_or_key)
    key, ref = target.key, target.label

    def linker(kind: str, name: str) -> str | None:
        if (kind, name) == ("version", ref) or (kind, name) == ("key", key):
            return "#" + _anchor(kind, name)
        return None

    _, key_body = key_page(view, key, linker, every_metric=True)
    title, version_body = version_page(view, ref, linker, forms=False)
    body = join(
        [
            tag("p", f"Report of {ref_or_key} from {store.uri}", cls="muted"),
            tag("section", version_body, id=_anchor("version", ref)),
            tag("section", key_body, id=_anchor("key", key)),
        ]
    )
    document = page(title, body, nav=False)
    csp = f'<meta http-equiv="Content-Security-Policy" content="{esc(REPORT_CSP)}">'
    return document.replace("<meta charset=utf-8>", "<meta charset=utf-8>" + csp, 1)


__all__ = ["render_report"]
