"""Freed memory kept for reuse on the CPU (main.py imports this; RPE_KEEP_FREED_MEMORY=0: not).

With glibc's defaults every allocation over 32 MiB is a fresh mapping, returned when freed: each
new (N, H, L, L) attention-sized tensor then costs some 14,000 page faults. keep_freed_memory()
sets mallopt M_MMAP_MAX = 0 and M_TRIM_THRESHOLD = 2 GiB, so large blocks come from the heap and
stay there for reuse (iRPE-on-k forward + backward at COCO size about twice as fast; resident
memory stays near its peak). Elsewhere than Linux / glibc it does nothing.
"""
import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Configure glibc's malloc as above; True if it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


if os.environ.get("RPE_KEEP_FREED_MEMORY", "1") != "0":
    keep_freed_memory()
