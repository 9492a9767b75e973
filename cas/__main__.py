"""The ``cas`` command's entry point (``python -m cas`` and the ``cas`` script).

It loads the command line with the cyclic garbage collector paused: loading
creates tens of thousands of objects that all live as long as the process,
and the collector would otherwise walk them again and again while they are
made. Once loaded, they are frozen out of later collections for the same
reason.

When the command is done, the process ends without the interpreter's
teardown (:func:`run`): it would free, one by one, every object and module
the command loaded, which is work for nobody when the process is about to
go. What both saved is in docs/performance.md, "What changed, and what each
change measured".
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from typing import NoReturn

#: Python's own exit status when it cannot flush standard output at exit.
FLUSH_FAILED = 120


def main() -> int:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        from .cli import main as run_command
    finally:
        if was_enabled:
            gc.enable()
    gc.freeze()
    return run_command()


def run() -> NoReturn:
    """Run :func:`main`, flush what it printed, and end the process at once.

    Everything a command writes is closed by then: files through ``with``
    blocks, pools shut down, the local backend's sync thread joined by its
    flush. What is left is the interpreter's own buffers, flushed here. An
    exception from ``main`` (argparse's exit for ``--help`` or a usage error,
    or a crash's traceback) leaves through the normal teardown instead.
    """
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass  # the reader went away, as the command itself treats it
    except OSError:
        code = code or FLUSH_FAILED
    with contextlib.suppress(OSError):  # nowhere left to report it
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
