"""The ``cas`` command's entry point (``python -m cas`` and the ``cas`` script).

It loads the command line with the cyclic garbage collector paused: loading
creates tens of thousands of objects that all live as long as the process,
and the collector would otherwise walk them again and again while they are
made (a twelfth of the instructions of a small ``cas get``). Once loaded,
they are frozen out of later collections for the same reason.
"""

from __future__ import annotations

import gc
import sys


def main() -> int:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        from .cli import main as run
    finally:
        if was_enabled:
            gc.enable()
    gc.freeze()
    return run()


if __name__ == "__main__":
    sys.exit(main())
