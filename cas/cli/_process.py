"""Settings of the ``cas`` process itself, made once before a command runs.

They suit a short-lived command that streams gigabytes through a few
threads; the library never makes them, since a program that imports cas
(a training job, say) has its own needs.
"""

from __future__ import annotations

import os
import sys

from ..store import IN_FLIGHT_BYTES

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap, where freed ones are reused.
#: It is above every buffer a put or get holds: 16 MiB read blocks, chunks
#: of at most 16 MiB and their encodings.
HEAP_BLOCKS_UP_TO = 64 << 20
#: Free heap memory kept for reuse rather than handed back to the kernel:
#: what the in-flight bound of a pipeline holds, and their encodings.
KEEP_FREE_UP_TO = 2 * IN_FLIGHT_BYTES


def tune() -> None:
    """Apply the settings below; each one only where the user has not chosen."""
    # numpy's bundled OpenBLAS starts a pool of threads when numpy is
    # imported, and they spin waiting for matrix work a cas command never
    # has, on the cores the put and get pipelines need (docs/performance.md,
    # "What changed, and what each change measured").
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    _keep_large_blocks_on_the_heap()


def _keep_large_blocks_on_the_heap() -> None:
    """Stop glibc from mapping and unmapping memory for every chunk.

    By default glibc serves each block above 128 KiB to 32 MiB (its
    threshold moves) with a fresh mmap, whose pages fault in zeroed on first
    touch, and unmaps it on free; and it trims the heap as soon as 2x that
    threshold lies free at its top. A put or get allocates and frees a few
    MiB per chunk on several threads, so it paid for that over and over
    (what this saves: docs/performance.md, "What changed, and what each
    change measured").
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return  # not glibc: nothing of this to tune
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # glibc's own variables for these, read at start-up, take precedence.
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCKS_UP_TO)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_UP_TO)
