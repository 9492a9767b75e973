"""The ``cas`` command line. It talks only to :class:`cas.store.Store`.

Exit codes: 0 success, 1 other failure, 2 bad input (usage, unknown ref,
destination exists, not a store, unsafe path), 3 integrity failure (missing
or corrupt data), 4 storage service failure, 5 no space left on the device
of a local store, 130 interrupted.

Each command module exposes ``register(add)``; this module builds the parser
from them and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, TextIO, cast

from .. import __version__
from ..errors import CasError, CasWarning
from ..store import DEFAULT_STORE
from . import _cache_commands as cache_commands
from . import _catalog_commands as catalog_commands
from . import _commands as commands
from . import _gc_commands as gc_commands
from . import _process as process
from . import _ui_commands as ui_commands
from . import _workflow_commands as workflow_commands
from ._common import CLI_WORDS, Handler

COMMAND_MODULES = [
    commands,
    workflow_commands,
    gc_commands,
    ui_commands,
    cache_commands,
    catalog_commands,
]


class _Skipped:
    """Takes the argument definitions of a command this run does not parse.

    argparse checks every argument as it is added, a cost that over all
    commands showed in a small get's start-up; a run defines in full only the
    command it was given (what it saved: docs/performance.md, "What changed,
    and what each change measured").
    """

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_argument_group(self, *args: Any, **kwargs: Any) -> _Skipped:
        return self

    def add_mutually_exclusive_group(self, *args: Any, **kwargs: Any) -> _Skipped:
        return self


def requested_command(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` if the options before it are plainly the
    common ones; None when that is not certain (then every command is built)."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--store" or token in cache_commands.VALUE_OPTIONS:
            i += 2
        elif token in ("--json", "--no-progress", *cache_commands.FLAG_OPTIONS) or (
            token.startswith(("--store=", "--cache=", "--cache-size="))
        ):
            i += 1
        elif token.startswith("-"):
            return None  # --help, --version, an abbreviation: argparse decides
        else:
            return token
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of ``only`` alone when that names one."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        default=argparse.SUPPRESS,
        metavar="URI",
        help=f"store location (path, file://, s3://, gs://, az://); "
        f"default $CAS_STORE, else ./{DEFAULT_STORE}",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print machine-readable JSON"
    )
    common.add_argument(
        "--no-progress",
        action="store_true",
        default=argparse.SUPPRESS,
        help="never show progress bars",
    )
    cache_commands.add_cache_options(common)

    parser = argparse.ArgumentParser(
        prog="cas", parents=[common], description="Content-addressable artifact store for ML."
    )
    parser.add_argument("--version", action="version", version=f"cas {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    found = False

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        nonlocal found
        if only is not None and name != only:
            return cast(argparse.ArgumentParser, _Skipped())
        found = True
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    for module in COMMAND_MODULES:
        module.register(add)
    if only is not None and not found:
        return build_parser()  # not a command: the full parser says so, listing them
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    process.tune()
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(requested_command(argv))
    args = parser.parse_args(argv)
    for name in ("store", "json", "no_progress"):
        if not hasattr(args, name):
            setattr(args, name, None if name == "store" else False)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.handler(args))
    except CasError as err:
        print(f"cas: error: {err.worded(CLI_WORDS)}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("cas: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        print(f"cas: error: {err}", file=sys.stderr)
        return 1


_show_default = warnings.showwarning


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """cas's own warnings as ``cas: warning: ...`` on stderr; others as Python shows them."""
    if issubclass(category, CasWarning):
        print(f"cas: warning: {message}", file=sys.stderr)
    else:
        _show_default(message, category, filename, lineno, file, line)


if __name__ == "__main__":
    sys.exit(main())
