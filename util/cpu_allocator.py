"""Huge pages for large CPU tensors, for the training and evaluation entry points.

PyTorch's CPU allocator gives allocations of 2 MiB and more transparent huge pages when the
environment variable THP_MEM_ALLOC_ENABLE is 1. It reads the variable once, at its first
allocation, so this module sets it (unless it is set already) and must be imported before torch.
Training allocates fresh tensors of tens of MB many times per step (the (N, H, L, L) attention
maps); with 4 KiB pages each costs thousands of page faults, with huge pages a handful, and
filling one becomes about twice as fast on the CPU. Set THP_MEM_ALLOC_ENABLE=0 to opt out.
"""
import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
