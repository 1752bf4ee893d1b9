"""Bucket lookup and bucket sum operators for contextual iRPE (see docs/rpe_ops.md).

    rpe_index(input, index)[b, h, i, j] = input[b, h, i, index[i, j]]
    rpe_index_backward(grad_output, index, num_buckets)[b, h, i, k]
        = sum over j with index[i, j] == k of grad_output[b, h, i, j]

input (B, H, Lq, num_buckets), index (Lq, Lk). Each is the other's gradient. They are the
operators torch.ops.rpe_ops.*, and work under torch.compile and TorchScript; under torch.export
they are written as torch.gather / scatter_add, so that exported programs need only standard
operators. They run on the compiled extension (rpe_ops._C) if it loads, else on the pure-PyTorch
fallback with a one-time warning. Autocast casts nothing for them (a lookup loses no precision;
the kernels accumulate float16 / bfloat16 sums in float32). In deterministic mode the CUDA bucket
sum (atomics) runs as scatter_add. The CPU kernels keep freed large results for reuse
(cpu_cache_stats, empty_cpu_cache).

Environment variables: RPE_OPS_FALLBACK=1 (read at import) uses the fallback even if the
extension is built; RPE_OPS_CPU_CACHE_MB=N keeps at most N MB of freed results (default 1024;
0: no cache); RPE_OPS_CHECK_INDEX=1 validates index values on CUDA too (a synchronisation).
"""
import glob
import importlib.machinery
import os
import sys
import warnings

import torch

from . import _fallback

__all__ = ["rpe_index", "rpe_index_backward", "backend", "bucket_sum_implementation",
           "cpu_cache_stats", "empty_cpu_cache", "EXTENSION_AVAILABLE", "EXTENSION_PATH"]

_BUILD_COMMANDS = ("`pip install --no-build-isolation ./rpe_ops` or "
                   "`cd rpe_ops && python setup.py build_ext --inplace` (from the repository root)")
# The same schemas as TORCH_LIBRARY(rpe_ops, ...) in csrc/rpe_index.cpp.
_SCHEMAS = (
    "rpe_index(Tensor input, Tensor index) -> Tensor",
    "rpe_index_backward(Tensor grad_output, Tensor index, int num_buckets) -> Tensor",
)


def _library_candidates():
    """Compiled libraries rpe_ops/_C<ext-suffix>: this package's folder first, then an rpe_ops
    folder under every sys.path entry (an installed copy that the source folder shadows)."""
    here = os.path.dirname(os.path.abspath(__file__))
    folders = [here] + [os.path.join(p or os.getcwd(), "rpe_ops") for p in sys.path if isinstance(p, str)]
    for folder in dict.fromkeys(os.path.realpath(f) for f in folders):
        if os.path.isdir(folder):
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                yield from sorted(glob.glob(os.path.join(glob.escape(folder), "_C" + suffix)))


def _load_extension():
    """Returns (path of the loaded library or None, reason it was not loaded)."""
    if os.environ.get("RPE_OPS_FALLBACK", "") not in ("", "0"):
        return None, "RPE_OPS_FALLBACK is set"
    errors = []
    for path in _library_candidates():
        try:
            torch.ops.load_library(path)
            return path, None
        except OSError as exc:  # e.g. built against another PyTorch version
            errors.append(f"{path}: {exc}")
    return None, "; ".join(errors) or "rpe_ops._C not found"


EXTENSION_PATH, _LOAD_ERROR = _load_extension()
#: True when the compiled extension is loaded.
EXTENSION_AVAILABLE = EXTENSION_PATH is not None

_lib = torch.library.Library("rpe_ops", "FRAGMENT")
_OPS = ("rpe_index", "rpe_index_backward")
_warning_message = None  # set when the fallback is used without being asked for
_warned = False


def _warning_fallback(op):
    """The fallback of operator `op`, warning once per process (see _warning_message)."""
    def kernel(*args):
        global _warned
        if _warning_message is not None and not _warned:
            _warned = True
            warnings.warn(_warning_message, RuntimeWarning, stacklevel=1)
        return getattr(_fallback, op)(*args)
    return kernel


def _has_kernel(op, dispatch_key):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"rpe_ops::{op}", dispatch_key)
    except RuntimeError:  # no such operator (an extension built from older sources)
        return False


if EXTENSION_AVAILABLE:
    _EXTENSION_CUDA = _has_kernel("rpe_index", "CUDA")
    if not _EXTENSION_CUDA and torch.cuda.is_available():
        # CPU-only build on a machine with a GPU: CUDA tensors take the fallback.
        for _op in _OPS:
            _lib.impl(_op, _warning_fallback(_op), "CUDA")
        _warning_message = (f"rpe_ops: the extension {EXTENSION_PATH} has no CUDA kernels; CUDA tensors use "
                            "the slower pure-PyTorch fallback. Rebuild it where a CUDA toolkit is found: "
                            f"{_BUILD_COMMANDS}.")
else:
    _EXTENSION_CUDA = False
    for _schema, _op in zip(_SCHEMAS, _OPS):
        _lib.define(_schema)
        _lib.impl(_op, _warning_fallback(_op), "CompositeExplicitAutograd")
    if _LOAD_ERROR != "RPE_OPS_FALLBACK is set":
        _warning_message = (f"rpe_ops: compiled extension not available ({_LOAD_ERROR}); using the slower "
                            f"pure-PyTorch fallback. Build it with {_BUILD_COMMANDS}. Set RPE_OPS_FALLBACK=1 to silence "
                            "this warning.")


@torch.library.register_fake("rpe_ops::rpe_index")
def _rpe_index_fake(input, index):
    _fallback.check_rpe_index_args(input, index)
    return input.new_empty((*input.shape[:3], index.shape[1]))


@torch.library.register_fake("rpe_ops::rpe_index_backward")
def _rpe_index_backward_fake(grad_output, index, num_buckets):
    _fallback.check_rpe_index_backward_args(grad_output, index, num_buckets)
    return grad_output.new_empty((*grad_output.shape[:3], num_buckets))


def _rpe_index_setup_context(ctx, inputs, output):
    input, index = inputs
    ctx.save_for_backward(index)
    ctx.num_buckets = input.shape[-1]


def _rpe_index_grad(ctx, grad):
    (index,) = ctx.saved_tensors
    return rpe_index_backward(grad, index, ctx.num_buckets), None


def _rpe_index_backward_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _rpe_index_backward_grad(ctx, grad):
    (index,) = ctx.saved_tensors
    return torch.ops.rpe_ops.rpe_index(grad, index), None, None


# Autocast policy (module docstring): no cast, the operators run in their input's dtype.
for _op in _OPS:
    for _key in ("AutocastCPU", "AutocastCUDA"):
        _lib.impl(_op, torch.library.fallthrough_kernel, _key)

torch.library.register_autograd("rpe_ops::rpe_index", _rpe_index_grad,
                                setup_context=_rpe_index_setup_context)
torch.library.register_autograd("rpe_ops::rpe_index_backward", _rpe_index_backward_grad,
                                setup_context=_rpe_index_backward_setup_context)

# Devices whose compiled bucket sum adds with atomics (its float rounding varies from run to run)
_ATOMIC_BUCKET_SUM_DEVICES = ("cuda",)


@torch.jit.unused  # eager and traced only: scripted code keeps the operator
def bucket_sum_implementation(device: torch.device) -> str:
    """Which bucket sum runs for tensors on `device`: "scatter_add" when PyTorch's deterministic
    mode is on (torch.use_deterministic_algorithms(True)) and the kernel there adds with atomics,
    else "operator" (torch.ops.rpe_ops.rpe_index_backward)."""
    if torch.device(device).type in _ATOMIC_BUCKET_SUM_DEVICES and torch.are_deterministic_algorithms_enabled():
        return "scatter_add"
    return "operator"


# Under torch.export (and ONNX) the operators are written as the fallback's standard ops, so that
# an exported program needs neither this package nor a custom ONNX domain.
@torch.jit.unused
def _exporting() -> bool:
    return torch.compiler.is_exporting()


def rpe_index(input: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Bucket lookup: out[b, h, i, j] = input[b, h, i, index[i, j]].

    input (B, H, Lq, num_buckets) float32 / float64 / float16 / bfloat16, any strides; index
    (Lq, Lk) int32 or int64, values in [0, num_buckets), same device. Returns a contiguous
    (B, H, Lq, Lk) tensor of input's dtype, differentiable with respect to input.
    """
    if not torch.jit.is_scripting() and _exporting():
        return _fallback.lookup(input, index)
    return torch.ops.rpe_ops.rpe_index(input, index)


def rpe_index_backward(grad_output: torch.Tensor, index: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket sum, the transpose of rpe_index: out[b, h, i, k] = sum of grad_output[b, h, i, j]
    over j with index[i, j] == k. grad_output (B, H, Lq, Lk), index as for rpe_index. Returns a
    contiguous (B, H, Lq, num_buckets) tensor of grad_output's dtype, differentiable.
    """
    if not torch.jit.is_scripting() and _exporting():
        return _fallback.bucket_sum(grad_output, index, num_buckets)
    if not torch.jit.is_scripting() and bucket_sum_implementation(grad_output.device) == "scatter_add":
        # scatter_add_ has a deterministic CUDA implementation: the same sums up to float rounding
        return _fallback.rpe_index_backward(grad_output, index, num_buckets)
    return torch.ops.rpe_ops.rpe_index_backward(grad_output, index, num_buckets)


def backend(device="cpu") -> str:
    """"extension" if tensors on `device` run on compiled kernels, else "fallback"."""
    kind = torch.device(device).type
    if EXTENSION_AVAILABLE and (kind == "cpu" or (kind == "cuda" and _EXTENSION_CUDA)):
        return "extension"
    return "fallback"


def cpu_cache_stats() -> dict:
    """Bytes of the CPU results' cache: "live" (held by tensors alive now) and "kept" (freed,
    kept for reuse); zeros without the extension."""
    if not (EXTENSION_AVAILABLE and hasattr(torch.ops.rpe_ops, "cpu_cache_stats")):
        return {"live": 0, "kept": 0}
    live, kept = torch.ops.rpe_ops.cpu_cache_stats()
    return {"live": live, "kept": kept}


def empty_cpu_cache() -> None:
    """Return the memory the CPU results' cache keeps to the system (live tensors stay)."""
    if EXTENSION_AVAILABLE and hasattr(torch.ops.rpe_ops, "cpu_cache_clear"):
        torch.ops.rpe_ops.cpu_cache_clear()
