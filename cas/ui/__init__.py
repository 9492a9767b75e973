"""A read-only web view of a store (``cas ui``) and self-contained HTML reports (``cas report``).

Built on the public API only (``cas.store`` and the ``cas.ml`` queries), with
the standard library's HTTP server and server-drawn SVG: no dependency, no
script library, nothing fetched at run time. docs/ui.md describes the pages.
"""

from ._report import render_report
from ._server import POLL_SECONDS, UiServer, is_loopback, new_token

__all__ = ["POLL_SECONDS", "UiServer", "is_loopback", "new_token", "render_report"]
