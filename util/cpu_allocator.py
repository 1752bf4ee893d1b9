"""Freed memory kept for reuse on the CPU, for the training and evaluation entry points.

With glibc's default settings every allocation of more than 32 MiB is a fresh memory mapping,
returned to the system when freed: each new (N, H, L, L) attention-sized tensor (58 MB at COCO size)
then costs some 14,000 page faults, and its first write costs more than the work done on it. Training
allocates such tensors many times per step. keep_freed_memory() tells glibc's malloc to take large
blocks from its heap and to keep freed memory there (mallopt M_MMAP_MAX = 0, M_TRIM_THRESHOLD =
2 GiB), so that after the first step they are reused without faults (the iRPE-on-k module's forward +
backward at COCO size runs about twice as fast). The process's resident memory then stays near its
peak instead of shrinking between steps. main.py calls it at import, unless the environment variable
RPE_KEEP_FREED_MEMORY is 0; elsewhere (not Linux / glibc) it does nothing.
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
