"""Handing freed memory back to the operating system (glibc's `malloc_trim`).

glibc keeps memory that a program frees in its heaps for later use. A long-running process whose
allocations change shape (the server's forward passes at batch 1, then 8, then 3 ...) can leave
that free memory scattered between live blocks, where the next pass of another shape cannot use
all of it, and its resident size creeps up. `malloc_trim(0)` returns the free pages of every
arena to the system; they cost a page fault each when reused, so call it when the shape of the
work changes, not on every step. Elsewhere (musl, macOS, Windows) it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

__all__ = ["release_free_heap"]


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Return the free pages of the C heap to the system; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
