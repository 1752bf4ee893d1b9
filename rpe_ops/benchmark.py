"""Timings of the rpe_ops bucket lookup (forward) and bucket sum (backward).

    python -m rpe_ops.benchmark            # or: python rpe_ops/benchmark.py
    python -m rpe_ops.benchmark --repeat 50 --device cuda

At DETR's size (B 2, H 8, L 950, 81 buckets) and a ViT's (B 64, H 6, L 197, 50 buckets): advanced
indexing, the pure-PyTorch fallback (gather / scatter_add) and the compiled kernels, each against
the memory-bandwidth bound. On the CPU a second pass keeps freed memory for reuse (--no_reuse
skips it).
"""
import argparse
import ctypes
import math
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import rpe_ops  # noqa: E402
from rpe_ops import _fallback  # noqa: E402


# --------------------------------------------------------------------------
# Index tables resembling those of 2-D product-mode iRPE.

def _axis_buckets(d, half):
    """Quantised relative distance on one axis: exact up to half / 2,
    logarithmic further out, clipped to [-half, half]."""
    exact = max(1, half // 2)
    a = d.abs().double().clamp(min=1)
    far = exact + torch.log(a / exact) / math.log(8.0) * (half - exact)
    far = torch.round(far).clamp(max=half).long()
    mag = torch.where(d.abs() <= exact, d.abs(), far)
    return torch.sign(d) * mag


def product_index(height, width, side):
    """(L, L) index with side * side buckets for an height x width grid."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    half = side // 2
    by = _axis_buckets(ys[:, None] - ys[None, :], half) + half
    bx = _axis_buckets(xs[:, None] - xs[None, :], half) + half
    return by * side + bx


def vit_index(grid, side):
    """Index for grid x grid patches plus a leading class token, which gets a
    bucket of its own (side * side buckets + 1)."""
    inner = product_index(grid, grid, side)
    n = grid * grid + 1
    index = torch.full((n, n), side * side, dtype=torch.long)
    index[1:, 1:] = inner
    return index


# --------------------------------------------------------------------------
# The three implementations, as (forward, backward) pairs.

def index_put_forward(input, index):
    batch, heads, lq, nb = input.shape
    flat = (torch.arange(lq, device=index.device)[:, None] * nb + index).flatten()
    return input.flatten(2)[:, :, flat].view(batch, heads, lq, index.shape[1])


def index_put_backward(grad_output, index, num_buckets):
    batch, heads, lq, lk = grad_output.shape
    flat = (torch.arange(lq, device=index.device)[:, None] * num_buckets + index).flatten()
    grad_input = grad_output.new_zeros(batch, heads, lq * num_buckets)
    torch.ops.aten.index_put_(grad_input, [None, None, flat], grad_output.reshape(batch, heads, -1), True)
    return grad_input.view(batch, heads, lq, num_buckets)


def implementations():
    impls = {
        "index_put": (index_put_forward, index_put_backward),
        "gather": (_fallback.rpe_index, _fallback.rpe_index_backward),
    }
    if rpe_ops.EXTENSION_AVAILABLE:
        impls["extension"] = (torch.ops.rpe_ops.rpe_index, torch.ops.rpe_ops.rpe_index_backward)
    return impls


# --------------------------------------------------------------------------
# Timing.

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, repeat, warmup=3):
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device, megabytes=256, repeat=10):
    """GB/s of a large tensor copy, counting bytes read plus bytes written."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeat)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def run_case(name, batch, heads, index, num_buckets, device, bandwidth, repeat):
    lq, lk = index.shape
    index = index.to(device)
    x = torch.randn(batch, heads, lq, num_buckets, device=device)
    g = torch.randn(batch, heads, lq, lk, device=device)
    item = x.element_size()
    fwd_bytes = x.numel() * item + index.numel() * index.element_size() + g.numel() * item
    bwd_bytes = fwd_bytes  # reads grad (B, H, Lq, Lk) + index, writes (B, H, Lq, num_buckets)
    bound_ms = (fwd_bytes + bwd_bytes) / (bandwidth * 1e9) * 1e3
    # Allocating the two results and writing them once: what any
    # implementation pays for fresh outputs, page faults included.
    fresh_ms = time_ms(lambda: (torch.empty_like(g).fill_(0), torch.empty_like(x).fill_(0)), device, repeat)
    print(f"\n{device.type}  {name}: B={batch} H={heads} Lq={lq} Lk={lk} buckets={num_buckets}, "
          f"index {str(index.dtype).replace('torch.', '')}")
    print(f"  fwd+bwd move {(fwd_bytes + bwd_bytes) / 1e6:.0f} MB: bandwidth bound {bound_ms:.2f} ms; "
          f"allocating + filling the two outputs alone takes {fresh_ms:.2f} ms")
    print(f"  {'method':<10} {'fwd ms':>8} {'bwd ms':>8} {'total ms':>9} {'fwd GB/s':>9} {'bwd GB/s':>9} "
          f"{'x bound':>8} {'speedup vs index_put':>21}")
    results = {}
    for method, (forward, backward) in implementations().items():
        fwd = time_ms(lambda: forward(x, index), device, repeat)
        bwd = time_ms(lambda: backward(g, index, num_buckets), device, repeat)
        results[method] = fwd + bwd
        print(f"  {method:<10} {fwd:8.2f} {bwd:8.2f} {fwd + bwd:9.2f} {fwd_bytes / fwd / 1e6:9.1f} "
              f"{bwd_bytes / bwd / 1e6:9.1f} {(fwd + bwd) / bound_ms:8.2f} "
              f"{results['index_put'] / (fwd + bwd):20.1f}x")
    return results


def _reuse_freed_memory():
    """Ask glibc to serve large blocks from the heap and keep freed memory (no munmap, no trim).

    Returns False where that is not possible (not glibc). Affects the rest of the process."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per measurement (median)")
    parser.add_argument("--no_reuse", action="store_true",
                        help="skip the second CPU pass that keeps freed memory for reuse")
    args = parser.parse_args(argv)

    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))

    print(f"rpe_ops benchmark: torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"extension {'loaded from ' + rpe_ops.EXTENSION_PATH if rpe_ops.EXTENSION_AVAILABLE else 'not available'}")
    cases = [
        ("DETR", 2, 8, product_index(25, 38, 9), 81),
        ("ViT", 64, 6, vit_index(14, 7), 50),
    ]
    for device in devices:
        bandwidth = copy_bandwidth(device)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"\n{label}: memory bandwidth (copy of a 256 MiB tensor, read + write) {bandwidth:.1f} GB/s")
        for name, batch, heads, index, num_buckets in cases:
            run_case(name, batch, heads, index, num_buckets, device, bandwidth, args.repeat)
        if device.type == "cpu" and not args.no_reuse and _reuse_freed_memory():
            print("\nCPU again, with freed memory kept for reuse (glibc mallopt: M_MMAP_MAX 0, M_TRIM_THRESHOLD max).\n"
                  "By default every fresh output of tens of MB is mapped anew and page-faulted in on first write;\n"
                  "a training loop that reuses its memory (or GLIBC_TUNABLES=glibc.malloc.mmap_max=0, or\n"
                  "THP_MEM_ALLOC_ENABLE=1) does not pay that cost.")
            for name, batch, heads, index, num_buckets in cases:
                run_case(name, batch, heads, index, num_buckets, device, bandwidth, args.repeat)

if __name__ == "__main__":
    main()
