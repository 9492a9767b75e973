"""Screenshots of every page of ``cas ui`` and of a report, for docs/ui.md.

    python scripts/ui_screenshots.py [--out docs/images]

Builds the demo store of scripts/ui_demo.py in a temporary directory, serves
it, and photographs the pages with the system's headless Chromium (Debian's
``chromium`` package) driven by Playwright.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ui_demo

from cas.ui import UiServer, render_report

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAGES = {
    "keys": "/",
    "key": "/key/runs/demo/ckpt",
    "version": "/version/runs/demo/ckpt@3",
    "store": "/store",
}


def launch(playwright: Any) -> Any:
    """The system's Chromium, headless; Playwright downloads no browser of its own."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        store = ui_demo.build(Path(scratch) / "store")
        report = Path(scratch) / "report.html"
        report.write_text(render_report(store, "runs/demo/ckpt"), encoding="utf-8")
        server = UiServer(store)
        server.start()
        base = server.url.rstrip("/")
        try:
            with sync_playwright() as playwright:
                browser = launch(playwright)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                for name, path in PAGES.items():
                    page.goto(base + path)
                    page.screenshot(path=str(args.out / f"ui-{name}.png"), full_page=True)
                    print(f"wrote {args.out / f'ui-{name}.png'}")
                page.goto(report.as_uri())
                page.screenshot(path=str(args.out / "ui-report.png"), full_page=False)
                print(f"wrote {args.out / 'ui-report.png'}")
                browser.close()
        finally:
            server.shutdown()
            server.server_close()


if __name__ == "__main__":
    main()
