"""Freed memory kept for reuse on the CPU (main.py imports this; RPE_KEEP_FREED_MEMORY=0: not).

glibc maps each allocation over 32 MiB afresh and unmaps it when freed: each new attention-sized
tensor costs some 14,000 page faults. mallopt M_MMAP_MAX = 0 and M_TRIM_THRESHOLD = 2 GiB keep
such blocks in the heap for reuse (iRPE-on-k at COCO size about twice as fast). Linux / glibc only.
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
