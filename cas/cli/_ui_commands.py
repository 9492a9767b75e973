"""``cas ui`` (a read-only web view of the store) and ``cas report`` (the same as one HTML file)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from ..errors import InvalidInputError
from ._common import AddCommand, emit, open_store


def cmd_ui(args: argparse.Namespace) -> int:
    from ..ui import UiServer, is_loopback, new_token

    if not is_loopback(args.host) and not args.token:
        args.token = new_token()
    store = open_store(args, create=False)
    try:
        server = UiServer(store, args.host, args.port, token=args.token)
    except OSError as err:
        raise InvalidInputError(f"cannot listen on {args.host}:{args.port}: {err}") from None
    server.prepare()  # the catalog opened and the manifests read before the first page asks
    emit(args, {"url": server.url, "store": store.uri}, f"cas ui: serving {store.uri}")
    if not args.json:
        print(server.url, flush=True)
        if args.token:
            print(f"access token: {args.token} (anyone with it can read this store)", flush=True)
        print("press Ctrl-C to stop", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if args.open:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..ui import render_report

    document = render_report(open_store(args, create=False), args.ref).encode("utf-8")
    out = Path(args.output)
    # Whole or not at all: a report is written beside its place and renamed into it.
    fd, temporary = tempfile.mkstemp(prefix=".cas-tmp-", dir=out.parent if str(out.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(document)
        os.chmod(temporary, 0o644)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    emit(args, {"path": str(out), "bytes": len(document)}, f"wrote {out}")
    return 0


def register(add: AddCommand) -> None:
    p = add("ui", cmd_ui, "serve a read-only web view of the store")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    p.add_argument(
        "--token",
        default=os.environ.get("CAS_UI_TOKEN") or None,
        help="access token to require (made up and printed when --host is not loopback; "
        "default $CAS_UI_TOKEN)",
    )

    p = add("report", cmd_report, "write a key's or a version's pages as one HTML file")
    p.add_argument("ref", metavar="REF_OR_KEY")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the HTML file to write")
