"""An opt-in, process-wide setting of the C allocator that makes NumPy's large temporaries cheaper."""
from __future__ import annotations

import ctypes
import sys


def tune_host_allocator() -> bool:
    """Let freed large arrays stay in the process's heap for the next ones (glibc on Linux); True if applied.

    A training step creates and frees hundreds of temporaries of several MB. By default glibc gives each
    block above 128 KB its own fresh memory map and returns it to the operating system when freed, so every
    new temporary starts with thousands of page faults, a noticeable share of a step. Raising the map
    threshold and the trim threshold keeps that memory for reuse (the process keeps its peak memory instead of
    shrinking).

    A process-wide setting, so the library never makes it by itself: the ``minilora`` command and the
    benchmark opt in (``MINILORA_TUNE_MALLOC=0`` keeps them from doing so); a notebook or script may call it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3          # glibc's malloc.h parameter numbers
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):                        # not glibc (musl, ...): leave malloc alone
        return False
