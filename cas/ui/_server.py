"""The read-only web server of ``cas ui``: the standard library's threading HTTP server.

Only GET and HEAD are answered, and no request writes to the store. Pages
are rendered from the store for each request; nothing is served from the
file system. Every response carries a Content-Security-Policy that lets
only the page's own inline script (by nonce) run, so even markup that
slipped past escaping could not execute. A server bound to a loopback
address also checks the Host header, so that a web page cannot reach it
through a DNS name that resolves to 127.0.0.1; one bound to any other
address asks for an access token.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import secrets
import sys
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from ..errors import CasError, InvalidInputError
from ._data import StoreView
from ._html import Html, esc, page, server_link, tag
from ._pages import key_page, keys_page, store_page
from ._version import version_page

if TYPE_CHECKING:
    from ..store import Store

#: Cookies are kept per host, not per port: each server names its own after its port.
TOKEN_COOKIE = "cas_ui_token_{port}"
#: How often an open page asks whether the store changed.
POLL_SECONDS = 10.0
#: How long a page waits for the manifests its figures need before it shows
#: "computing…" in their place (and fills them in once they are read).
FIGURES_WAIT = 0.25

Render = Callable[[StoreView, dict[str, str]], "tuple[str, Html]"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class UiServer(ThreadingHTTPServer):
    """Serves the pages of one store; ``token`` is required of every request when set."""

    daemon_threads = True

    def __init__(
        self,
        store: Store,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        poll_seconds: float = POLL_SECONDS,
        figures_wait: float | None = FIGURES_WAIT,
    ) -> None:
        """``figures_wait``: seconds a page waits for the manifests its figures need
        (None: until they are read, so a page never shows "computing…")."""
        if not is_loopback(host) and not token:
            raise InvalidInputError(
                f"serving on {host} (not a loopback address) needs an access token"
            )
        super().__init__((host, port), _Handler)
        self.view = StoreView(store, wait=figures_wait)
        self.token = token
        self.poll_seconds = poll_seconds
        self.loopback = is_loopback(host)

    def prepare(self) -> None:
        """Open the catalog now, and start reading every live version's manifest on the
        figures' thread, so that the first page a user opens finds them read or under way."""
        self.view.figures.read_soon({v.manifest_id for v in self.view.store.catalog()})

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), self.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        query = f"/?{urlencode({'token': self.token})}" if self.token else "/"
        return f"http://{shown}:{port}{query}"

    def start(self) -> threading.Thread:
        """Serve in a background thread (for tests and embedding); ``shutdown()`` stops it."""
        thread = threading.Thread(target=self.serve_forever, name="cas-ui", daemon=True)
        thread.start()
        return thread


def new_token() -> str:
    return secrets.token_urlsafe(24)


class _Handler(BaseHTTPRequestHandler):
    server: UiServer
    server_version = "cas-ui"
    sys_version = ""

    def log_message(self, format: str, *args: object) -> None:
        pass  # a page view is not worth a line on the terminal; failures are reported

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        nonce = secrets.token_urlsafe(16)
        try:
            self._serve(nonce)
        except Exception as err:  # a failed page is an error page, not a traceback
            self._fail(err, nonce)

    def _refuse_method(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, _message("Read-only", "Only GET is served."))

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    # -- routing ----------------------------------------------------------------------

    def _serve(self, nonce: str) -> None:
        if not self._host_allowed():
            self._send(HTTPStatus.FORBIDDEN, _message("Forbidden", "Unknown Host header."))
            return
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if not self._authorised(parts.path, query):
            return
        path = unquote(parts.path)
        if path == "/changes":
            view = self.server.view
            state = "computing" if view.figures.busy else "ready"
            body = f"{view.fingerprint(self.server.poll_seconds / 2)}\n{state}".encode()
            self._send(HTTPStatus.OK, body, content_type="text/plain; charset=utf-8")
            return
        render = _route(path)
        if render is None:
            self._send(HTTPStatus.NOT_FOUND, _message("Not found", f"No page at {path}."))
            return
        title, body_html = render(self.server.view, query)
        poll = int(self.server.poll_seconds * 1000)
        self._send(HTTPStatus.OK, page(title, body_html, nonce=nonce, poll_ms=poll), nonce)

    def _host_allowed(self) -> bool:
        if not self.server.loopback:
            return True  # the token guards it
        hosts = self.headers.get_all("Host") or []
        return len(hosts) == 1 and is_loopback(hosts[0].rsplit(":", 1)[0])

    def _authorised(self, path: str, query: dict[str, str]) -> bool:
        expected = self.server.token
        if expected is None:
            return True
        given = query.get("token")
        if given is not None and hmac.compare_digest(given.encode(), expected.encode()):
            # Trade the token in the address for a cookie, and drop it from the address.
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Location", path or "/")
            self.send_header(
                "Set-Cookie", f"{self._cookie_name()}={expected}; HttpOnly; SameSite=Strict; Path=/"
            )
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False
        cookie = SimpleCookie(self.headers.get("Cookie") or "").get(self._cookie_name())
        if cookie is not None and hmac.compare_digest(cookie.value.encode(), expected.encode()):
            return True
        self._send(
            HTTPStatus.UNAUTHORIZED,
            _message("Access token needed", "Open the address cas ui printed, token included."),
        )
        return False

    def _cookie_name(self) -> str:
        return TOKEN_COOKIE.format(port=self.server.server_address[1])

    # -- responses --------------------------------------------------------------------

    def _fail(self, err: Exception, nonce: str) -> None:
        if isinstance(err, FileNotFoundError):
            status, title = HTTPStatus.NOT_FOUND, "Not found"
        elif isinstance(err, InvalidInputError):
            status, title = HTTPStatus.BAD_REQUEST, "Bad request"
        elif isinstance(err, CasError | OSError):
            status, title = HTTPStatus.BAD_GATEWAY, "The store failed"
        else:
            status, title = HTTPStatus.INTERNAL_SERVER_ERROR, "Internal error"
            print(f"cas ui: {self.path}: {type(err).__name__}: {err}", file=sys.stderr)
        text = str(err) if status != HTTPStatus.INTERNAL_SERVER_ERROR else type(err).__name__
        with contextlib.suppress(OSError):  # the browser went away
            self._send(status, _message(title, text), nonce)

    def _send(
        self,
        status: HTTPStatus,
        body: str | bytes,
        nonce: str | None = None,
        *,
        content_type: str = "text/html; charset=utf-8",
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        script = f"'nonce-{nonce}'" if nonce else "'none'"
        self.send_header(
            "Content-Security-Policy",
            f"default-src 'none'; script-src {script}; style-src 'unsafe-inline'; "
            "img-src data:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
            "frame-ancestors 'none'",
        )
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _message(title: str, text: str) -> str:
    body = Html(
        tag("h1", title) + tag("p", text, cls="error") + tag("p", tag("a", "keys", href="/"))
    )
    return page(f"cas: {title}", body)


def _route(path: str) -> Render | None:
    """The page for an address. Keys and references go to the store, which checks them."""
    if path == "/":
        return lambda view, q: keys_page(view, server_link, q.get("prefix", ""))
    if path == "/store":
        return lambda view, q: store_page(view, server_link)
    for prefix in ("/key/", "/version/"):
        if path.startswith(prefix) and len(path) > len(prefix):
            name = path[len(prefix) :]
            if prefix == "/key/":
                return lambda view, q: key_page(
                    view, name, server_link, metric=q.get("metric"), best=q.get("best")
                )
            return lambda view, q: version_page(view, name, server_link, against=q.get("against"))
    return None


__all__ = ["UiServer", "esc", "is_loopback", "new_token"]
