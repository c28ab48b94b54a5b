"""glibc's heap in a long-running server: freed memory handed back (`malloc_trim`), one arena.

glibc keeps memory that a program frees in its heaps for later use. A long-running process whose
allocations change shape (the server's forward passes at batch 1, then 8, then 3 ...) can leave
that free memory scattered between live blocks, where the next pass of another shape cannot use
all of it, and its resident size creeps up. `malloc_trim(0)` returns the free pages of every
arena to the system; they cost a page fault each when reused, so call it when the shape of the
work changes, not on every step. Both functions do nothing outside glibc (musl, macOS, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
from typing import Any

__all__ = ["one_arena", "release_free_heap"]


_M_ARENA_MAX = -8  # mallopt parameter (malloc.h)


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def one_arena() -> bool:
    """Make every thread allocate from glibc's main heap (as `MALLOC_ARENA_MAX=1`), unless the
    environment sets MALLOC_ARENA_MAX itself; call it before other threads start. glibc gives
    threads heaps of their own ("arenas", made of 64 MB pieces): a thread running forward passes
    then holds more memory than the same passes in the main thread. False where it cannot."""
    libc = _libc()
    if libc is None or platform.libc_ver()[0] != "glibc" or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, 1))


@functools.cache
def _malloc_trim() -> Any:
    return getattr(_libc(), "malloc_trim", None)


def release_free_heap() -> bool:
    """Return the free pages of the C heap to the system; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
