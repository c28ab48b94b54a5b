"""glibc's heap: freed memory handed back (`malloc_trim`), one arena, or freed memory kept.

glibc keeps memory that a program frees in its heaps for later use. A long-running process whose
allocations change shape (the server's forward passes at batch 1, then 8, then 3 ...) can leave
that free memory scattered between live blocks, where the next pass of another shape cannot use
all of it, and its resident size creeps up. `malloc_trim(0)` returns the free pages of every
arena to the system; they cost a page fault each when reused, so call it when the shape of the
work changes, not on every step.

The opposite trade suits a command that runs the same work again and again (`offseg predict`,
`offseg eval`, `offseg train`): by default glibc hands the top of its heap back whenever more than
a few tens of MB there are free, which happens at the end of every forward or step, and the next
one faults the same pages in again (per OffSeg-T 512x512 forward 9 300 page faults and 15-20 ms of
kernel time on this project's VM; per training step at batch 2, 194 000 and 300 ms).
`keep_freed_heap` keeps them: the memory stays resident between forwards, and the peak grows a
little (+18-21 MB for those forwards, +86 MB for those steps). The functions do nothing outside glibc
(musl, macOS, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
from typing import Any

__all__ = ["keep_freed_heap", "one_arena", "release_free_heap"]


# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

# Blocks from this size up are mapped on their own (and unmapped when freed): the largest value
# glibc accepts, which is also where its own adaptive threshold stops growing.
_MMAP_THRESHOLD = 32 << 20
_NEVER_TRIM = 2**31 - 1


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


def keep_freed_heap() -> bool:
    """Keep freed heap memory for reuse instead of handing the heap's top back to the system (as
    `MALLOC_TRIM_THRESHOLD_` = 2 GB and `MALLOC_MMAP_THRESHOLD_` = 32 MB do), unless the
    environment sets either itself. Blocks of 32 MB and more are still mapped and unmapped one by
    one. False where it cannot."""
    libc = _libc()
    if libc is None or platform.libc_ver()[0] != "glibc":
        return False
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    # Either call switches glibc's adaptive thresholds off, so both are set.
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


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
