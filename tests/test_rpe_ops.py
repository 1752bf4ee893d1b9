"""Tests of rpe_ops: the bucket lookup rpe_index and the bucket sum rpe_index_backward.

The compiled extension (when built) and the pure-PyTorch fallback are compared
with a slow pure-Python reference.  Tests that need the extension are skipped
when it is not built, or fail when RPE_OPS_REQUIRE_EXTENSION=1 (set this in CI
after building it).  CUDA tests run only where CUDA is available.
"""
import os
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import rpe_ops
from rpe_ops import _fallback
from rpe_ops import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRE_EXTENSION = os.environ.get("RPE_OPS_REQUIRE_EXTENSION", "") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available on this machine")

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INDEX_DTYPES = [torch.int32, torch.int64]
# Tolerances of the bucket sum against a float64 reference computed from the same inputs
# (one final rounding after a float32 / float64 accumulation).
SUM_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def require_extension():
    if rpe_ops.EXTENSION_AVAILABLE:
        return
    message = (f"rpe_ops extension not built ({rpe_ops._LOAD_ERROR}); "
               "build it with: cd rpe_ops && python setup.py build_ext --inplace")
    if REQUIRE_EXTENSION:
        pytest.fail(message)
    pytest.skip(message)


# Implementations under test: (lookup, bucket sum).
def _extension_ops():
    require_extension()
    return torch.ops.rpe_ops.rpe_index, torch.ops.rpe_ops.rpe_index_backward


IMPLEMENTATIONS = {
    "fallback": lambda: (_fallback.rpe_index, _fallback.rpe_index_backward),
    "extension": _extension_ops,
}


@pytest.fixture(params=list(IMPLEMENTATIONS))
def impl(request):
    return IMPLEMENTATIONS[request.param]()


# ----------------------------------------------------------------------------------------------
# Slow reference: plain Python loops over lists, float64 results.

def reference_lookup(input, index):
    x, idx = input.double().tolist(), index.tolist()
    out = [[[[x[b][h][i][idx[i][j]] for j in range(len(idx[i]))] for i in range(len(idx))]
            for h in range(len(x[b]))] for b in range(len(x))]
    return torch.tensor(out, dtype=torch.float64).reshape(*input.shape[:3], index.shape[1])


def reference_bucket_sum(grad_output, index, num_buckets):
    g, idx = grad_output.double().tolist(), index.tolist()
    batch, heads, lq, lk = grad_output.shape
    out = [[[[0.0] * num_buckets for _ in range(lq)] for _ in range(heads)] for _ in range(batch)]
    for b in range(batch):
        for h in range(heads):
            for i in range(lq):
                row, acc = g[b][h][i], out[b][h][i]
                for j in range(lk):
                    acc[idx[i][j]] += row[j]
    return torch.tensor(out, dtype=torch.float64).reshape(batch, heads, lq, num_buckets)


def random_shapes(count, seed=0):
    """(B, H, Lq, Lk, num_buckets): fixed corner cases, then random ones."""
    shapes = [
        (1, 1, 1, 1, 1),
        (1, 1, 3, 5, 2),        # Lq != Lk
        (2, 8, 6, 6, 81),       # full blocks of rows
        (3, 1, 4, 9, 3),        # B * H not a multiple of the row blocks
        (1, 7, 5, 4, 6),
        (1, 3, 10, 4100, 7),    # index rows larger than a cache tile: several tiles
        (4, 5, 33, 17, 5),
    ]
    rng = random.Random(seed)
    while len(shapes) < count:
        shapes.append((rng.randint(1, 4), rng.randint(1, 6), rng.randint(1, 24),
                       rng.randint(1, 24), rng.randint(1, 40)))
    return shapes


SHAPES = random_shapes(20)


def make_index(lq, lk, num_buckets, dtype=torch.int64, generator=None):
    return torch.randint(0, num_buckets, (lq, lk), generator=generator).to(dtype)


# ----------------------------------------------------------------------------------------------
# Values

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_against_reference(impl, shape):
    lookup, bucket_sum = impl
    batch, heads, lq, lk, nb = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(batch, heads, lq, nb, generator=gen, dtype=torch.float64)
    g = torch.randn(batch, heads, lq, lk, generator=gen, dtype=torch.float64)
    index = make_index(lq, lk, nb, generator=gen)
    out = lookup(x, index)
    assert out.shape == (batch, heads, lq, lk) and out.is_contiguous()
    torch.testing.assert_close(out, reference_lookup(x, index), rtol=0, atol=0)
    grad = bucket_sum(g, index, nb)
    assert grad.shape == (batch, heads, lq, nb) and grad.is_contiguous()
    torch.testing.assert_close(grad, reference_bucket_sum(g, index, nb), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
def test_dtypes(impl, dtype, index_dtype):
    lookup, bucket_sum = impl
    gen = torch.Generator().manual_seed(1)
    batch, heads, lq, lk, nb = 2, 5, 7, 11, 6
    x = torch.randn(batch, heads, lq, nb, generator=gen).to(dtype)
    g = torch.randn(batch, heads, lq, lk, generator=gen).to(dtype)
    index = make_index(lq, lk, nb, index_dtype, gen)
    out = lookup(x, index)
    assert out.dtype == dtype
    # The lookup copies values: exact in every dtype.
    torch.testing.assert_close(out.double(), reference_lookup(x, index), rtol=0, atol=0)
    grad = bucket_sum(g, index, nb)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), reference_bucket_sum(g, index, nb), **SUM_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_sums_accumulate_in_float32(impl, dtype):
    # 4096 ones in one bucket: exact in float16 and bfloat16, but a running sum kept in
    # those types would stop growing at 2048 (float16) or 256 (bfloat16).
    _, bucket_sum = impl
    g = torch.ones(1, 2, 3, 4096, dtype=dtype)
    grad = bucket_sum(g, torch.zeros(3, 4096, dtype=torch.long), 2)
    expected = torch.zeros(1, 2, 3, 2, dtype=dtype)
    expected[..., 0] = 4096
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_non_contiguous_arguments(impl):
    lookup, bucket_sum = impl
    gen = torch.Generator().manual_seed(2)
    batch, heads, lq, lk, nb = 2, 3, 5, 9, 4
    x = torch.randn(batch, nb, lq, heads, generator=gen).permute(0, 3, 2, 1)   # (B, H, Lq, nb)
    g = torch.randn(batch, heads, lq, 2 * lk, generator=gen)[..., ::2]          # (B, H, Lq, Lk)
    index = make_index(lk, lq, nb, generator=gen).t()                          # (Lq, Lk)
    assert not (x.is_contiguous() or g.is_contiguous() or index.is_contiguous())
    out = lookup(x, index)
    assert out.is_contiguous()
    torch.testing.assert_close(out.double(), reference_lookup(x, index), rtol=0, atol=0)
    grad = bucket_sum(g, index, nb)
    assert grad.is_contiguous()
    torch.testing.assert_close(grad.double(), reference_bucket_sum(g, index, nb), **SUM_TOL[torch.float32])


def test_duplicate_indices(impl):
    lookup, bucket_sum = impl
    gen = torch.Generator().manual_seed(3)
    batch, heads, lq, lk, nb = 2, 9, 6, 50, 5
    x = torch.randn(batch, heads, lq, nb, generator=gen, dtype=torch.float64)
    g = torch.randn(batch, heads, lq, lk, generator=gen, dtype=torch.float64)
    for index in (torch.zeros(lq, lk, dtype=torch.long),                        # one bucket only
                  torch.full((lq, lk), nb - 1, dtype=torch.long),
                  torch.arange(lk).remainder(2).expand(lq, lk)):                 # two buckets, stride 0
        torch.testing.assert_close(lookup(x, index), reference_lookup(x, index), rtol=0, atol=0)
        torch.testing.assert_close(bucket_sum(g, index, nb), reference_bucket_sum(g, index, nb))


def test_empty_tensors(impl):
    lookup, bucket_sum = impl
    index = torch.zeros(3, 4, dtype=torch.long)
    assert lookup(torch.randn(0, 2, 3, 5), index).shape == (0, 2, 3, 4)
    assert bucket_sum(torch.randn(0, 2, 3, 4), index, 5).shape == (0, 2, 3, 5)
    empty_keys = torch.zeros(3, 0, dtype=torch.long)
    assert lookup(torch.randn(1, 2, 3, 5), empty_keys).shape == (1, 2, 3, 0)
    grad = bucket_sum(torch.randn(1, 2, 3, 0), empty_keys, 5)
    assert grad.shape == (1, 2, 3, 5) and not grad.any()


def test_extension_matches_fallback_at_detr_size():
    require_extension()
    gen = torch.Generator().manual_seed(4)
    index = benchmark.product_index(25, 38, 9)
    x = torch.randn(2, 8, 950, 81, generator=gen)
    g = torch.randn(2, 8, 950, 950, generator=gen)
    torch.testing.assert_close(torch.ops.rpe_ops.rpe_index(x, index), _fallback.rpe_index(x, index),
                               rtol=0, atol=0)
    torch.testing.assert_close(torch.ops.rpe_ops.rpe_index_backward(g, index, 81),
                               _fallback.rpe_index_backward(g, index, 81))


@pytest.mark.parametrize("threads", [1, 3, 5])
def test_extension_work_split_across_threads(threads):
    # the CPU kernels split (b, h) blocks and index tiles between threads; every split covers
    # each output element exactly once
    require_extension()
    gen = torch.Generator().manual_seed(6)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch, heads, length, buckets in [(1, 1, 1, 1), (2, 3, 17, 5), (3, 5, 300, 81), (64, 6, 197, 50)]:
            index = torch.randint(0, buckets, (length, length), generator=gen)
            x = torch.randn(batch, heads, length, buckets, generator=gen)
            g = torch.randn(batch, heads, length, length, generator=gen)
            torch.testing.assert_close(torch.ops.rpe_ops.rpe_index(x, index), _fallback.rpe_index(x, index),
                                       rtol=0, atol=0)
            torch.testing.assert_close(torch.ops.rpe_ops.rpe_index_backward(g, index, buckets),
                                       _fallback.rpe_index_backward(g, index, buckets))
    finally:
        torch.set_num_threads(before)


def test_benchmark_index_put_formulation_matches_reference():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 6, 4, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 3, 6, 7, generator=gen, dtype=torch.float64)
    index = make_index(6, 7, 4, generator=gen)
    torch.testing.assert_close(benchmark.index_put_forward(x, index), reference_lookup(x, index))
    torch.testing.assert_close(benchmark.index_put_backward(g, index, 4), reference_bucket_sum(g, index, 4))
    vit = benchmark.vit_index(14, 7)
    assert vit.shape == (197, 197) and vit.min() == 0 and vit.max() == 49
    assert benchmark.product_index(25, 38, 9).unique().numel() == 81


# ----------------------------------------------------------------------------------------------
# Autograd, registration, torch.compile (public API: extension when built, else fallback)

def _double_inputs(seed=6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[0, 1, 1, 4, 4, 4], [2, 2, 0, 3, 1, 0], [4, 3, 2, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    return x, g, index


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
def test_gradcheck(index_dtype):
    x, g, index = _double_inputs()
    index = index.to(index_dtype)
    assert torch.autograd.gradcheck(lambda t: rpe_ops.rpe_index(t, index), (x,))
    assert torch.autograd.gradgradcheck(lambda t: rpe_ops.rpe_index(t, index), (x,))
    assert torch.autograd.gradcheck(lambda t: rpe_ops.rpe_index_backward(t, index, 5), (g,))
    assert torch.autograd.gradgradcheck(lambda t: rpe_ops.rpe_index_backward(t, index, 5), (g,))


def test_gradients_are_each_others_op():
    x, g, index = _double_inputs()
    out = rpe_ops.rpe_index(x, index)
    (grad_x,) = torch.autograd.grad(out, x, g.detach())
    torch.testing.assert_close(grad_x, rpe_ops.rpe_index_backward(g.detach(), index, 5))
    summed = rpe_ops.rpe_index_backward(g, index, 5)
    (grad_g,) = torch.autograd.grad(summed, g, x.detach())
    torch.testing.assert_close(grad_g, rpe_ops.rpe_index(x.detach(), index))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
def test_opcheck(dtype, index_dtype):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, 5, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(2, 3, 4, 6, generator=gen).to(dtype).requires_grad_()
    index = make_index(4, 6, 5, index_dtype, gen)
    torch.library.opcheck(torch.ops.rpe_ops.rpe_index.default, (x, index))
    torch.library.opcheck(torch.ops.rpe_ops.rpe_index_backward.default, (g, index, 5))


def test_schemas():
    assert str(torch.ops.rpe_ops.rpe_index.default._schema) == \
        "rpe_ops::rpe_index(Tensor input, Tensor index) -> Tensor"
    assert str(torch.ops.rpe_ops.rpe_index_backward.default._schema) == \
        "rpe_ops::rpe_index_backward(Tensor grad_output, Tensor index, int num_buckets) -> Tensor"


def _irpe_like(x, g, index):
    logits = rpe_ops.rpe_index(x, index)
    return rpe_ops.rpe_index_backward(logits.softmax(-1) * g, index, x.shape[-1]).sum()


@pytest.mark.parametrize("backend,dynamic", [("aot_eager", True), ("inductor", False)])
def test_torch_compile_fullgraph(backend, dynamic):
    torch._dynamo.reset()
    x, g, index = _double_inputs()
    compiled = torch.compile(_irpe_like, fullgraph=True, backend=backend, dynamic=dynamic)
    value = compiled(x, g, index)
    grads = torch.autograd.grad(value, (x, g))
    expected = _irpe_like(x, g, index)
    torch.testing.assert_close(value, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, (x, g))):
        torch.testing.assert_close(got, want)


def test_backend_reporting():
    assert rpe_ops.backend("cpu") == ("extension" if rpe_ops.EXTENSION_AVAILABLE else "fallback")
    assert rpe_ops.backend(torch.device("cpu")) == rpe_ops.backend()
    if rpe_ops.EXTENSION_AVAILABLE:
        assert os.path.isfile(rpe_ops.EXTENSION_PATH)
    else:
        assert rpe_ops.EXTENSION_PATH is None


# ----------------------------------------------------------------------------------------------
# Errors

_X = torch.randn(2, 3, 4, 5)
_G = torch.randn(2, 3, 4, 6)
_INDEX = torch.arange(24).remainder(5).reshape(4, 6)  # values 0..4
_NEGATIVE = _INDEX.clone().index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor(-1))
_TOO_BIG = _INDEX.clone().index_put_((torch.tensor(3), torch.tensor(5)), torch.tensor(5))

# name: (lookup or bucket sum, arguments, expected message)
ERROR_CASES = {
    "input_3d": ("lookup", (_X[0], _INDEX),
                 r"rpe_index: input must be a 4-D tensor \(B, H, Lq, num_buckets\), got a 3-D tensor"),
    "index_3d": ("lookup", (_X, _INDEX[None]), r"rpe_index: index must be a 2-D tensor \(Lq, Lk\), got a 3-D"),
    "index_float": ("lookup", (_X, _INDEX.float()), r"rpe_index: index must be int32 or int64, got"),
    "input_int": ("lookup", (_X.int(), _INDEX),
                  r"rpe_index: input must be float32, float64, float16 or bfloat16, got"),
    "rows": ("lookup", (_X, _INDEX[:3]), r"rpe_index: index has 3 rows but input has Lq = input.size\(2\) = 4"),
    "negative": ("lookup", (_X, _NEGATIVE),
                 r"rpe_index: index values must lie in \[0, num_buckets\) = \[0, 5\), got values in \[-1, 4\]"),
    "too_big": ("lookup", (_X, _TOO_BIG), r"rpe_index: index values must lie in .* got values in \[0, 5\]"),
    "grad_3d": ("sum", (_G[0], _INDEX, 5),
                r"rpe_index_backward: grad_output must be a 4-D tensor \(B, H, Lq, Lk\), got a 3-D"),
    "sum_index_double": ("sum", (_G, _INDEX.double(), 5), r"rpe_index_backward: index must be int32 or int64"),
    "grad_int": ("sum", (_G.long(), _INDEX, 5),
                 r"rpe_index_backward: grad_output must be float32, float64, float16 or bfloat16"),
    "sum_shape": ("sum", (_G, _INDEX[:, :5], 5), r"rpe_index_backward: index shape \[4, 5\] must equal the "
                                                 r"last two dims \(Lq, Lk\) of grad_output, got \[2, 3, 4, 6\]"),
    "num_buckets": ("sum", (_G, _INDEX, -1), r"rpe_index_backward: num_buckets must be non-negative, got -1"),
    "sum_range": ("sum", (_G, _INDEX, 4),
                  r"rpe_index_backward: index values must lie in \[0, num_buckets\) = \[0, 4\), got values"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors(impl, case):
    which, args, message = ERROR_CASES[case]
    fn = impl[0] if which == "lookup" else impl[1]
    with pytest.raises(RuntimeError, match=message):
        fn(*args)


def test_device_mismatch_is_reported():
    # A meta input with a CPU index dispatches to the shared shape-only implementation.
    x = torch.empty(2, 3, 4, 5, device="meta")
    with pytest.raises(RuntimeError, match="rpe_index: input and index must be on the same device"):
        rpe_ops.rpe_index(x, torch.zeros(4, 6, dtype=torch.long))
    with pytest.raises(RuntimeError, match="rpe_index_backward: grad_output and index must be on the same"):
        rpe_ops.rpe_index_backward(torch.empty(2, 3, 4, 6, device="meta"), torch.zeros(4, 6, dtype=torch.long), 5)


def test_meta_tensors_give_shapes():
    out = rpe_ops.rpe_index(torch.empty(2, 3, 4, 5, device="meta"), torch.empty(4, 7, dtype=torch.int32,
                                                                                 device="meta"))
    assert out.shape == (2, 3, 4, 7) and out.device.type == "meta"


# ----------------------------------------------------------------------------------------------
# Process-level behaviour: fallback selection, warnings, finding an installed extension

def _run(code, cwd, env_extra=None, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPE_OPS_")}
    env["PYTHONPATH"] = pythonpath if pythonpath is not None else ROOT
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _copy_package(dest, with_library=False):
    """Copies the Python files of rpe_ops (and optionally the loaded _C library) to dest/rpe_ops."""
    target = os.path.join(dest, "rpe_ops")
    os.makedirs(target)
    for name in os.listdir(os.path.dirname(rpe_ops.__file__)):
        if name.endswith(".py"):
            shutil.copy(os.path.join(os.path.dirname(rpe_ops.__file__), name), target)
    if with_library:
        shutil.copy(rpe_ops.EXTENSION_PATH, target)
    return target


def test_missing_extension_warns_once_per_process(tmp_path):
    _copy_package(tmp_path)
    out = _run("""
        import os, sys, warnings
        import torch
        # Only the copy without a compiled library is reachable.
        sys.path[:] = [p for p in sys.path if p and not os.path.isdir(os.path.join(p, "rpe_ops"))]
        sys.path.insert(0, os.getcwd())
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import rpe_ops
            assert not rpe_ops.EXTENSION_AVAILABLE and rpe_ops.backend() == "fallback"
            x = torch.randn(2, 3, 4, 5, requires_grad=True)
            index = torch.randint(0, 5, (4, 6), dtype=torch.int32)
            for _ in range(3):
                rpe_ops.rpe_index(x, index).sum().backward()
                rpe_ops.rpe_index_backward(torch.randn(2, 3, 4, 6), index, 5)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        print(len(messages))
        print(messages[0])
    """, cwd=tmp_path, pythonpath="")
    count, message = out.strip().split("\n", 1)
    assert count == "1"
    assert "compiled extension not available" in message
    assert "pip install --no-build-isolation ./rpe_ops" in message
    assert "python setup.py build_ext --inplace" in message
    assert "RPE_OPS_FALLBACK=1" in message


def test_env_var_forces_fallback_without_warning(tmp_path):
    out = _run("""
        import warnings
        warnings.filterwarnings("error", message="rpe_ops")   # a warning of rpe_ops fails the run
        import torch
        import rpe_ops
        assert not rpe_ops.EXTENSION_AVAILABLE and rpe_ops.backend() == "fallback"
        assert rpe_ops._LOAD_ERROR == "RPE_OPS_FALLBACK is set"
        x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
        g = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
        index = torch.randint(0, 5, (4, 6))
        torch.testing.assert_close(rpe_ops.rpe_index(x, index), torch.stack(
            [x[:, :, i, index[i]] for i in range(4)], dim=2))
        assert torch.autograd.gradgradcheck(lambda t: rpe_ops.rpe_index(t, index), (x,))
        assert torch.autograd.gradgradcheck(lambda t: rpe_ops.rpe_index_backward(t, index, 5), (g,))
        torch.library.opcheck(torch.ops.rpe_ops.rpe_index.default, (x, index))
        torch.library.opcheck(torch.ops.rpe_ops.rpe_index_backward.default, (g, index.int(), 5))
        f = torch.compile(lambda a: rpe_ops.rpe_index_backward(rpe_ops.rpe_index(a, index), index, 5),
                          fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(f(x), rpe_ops.rpe_index_backward(rpe_ops.rpe_index(x, index), index, 5))
        print("ok")
    """, cwd=tmp_path, env_extra={"RPE_OPS_FALLBACK": "1"})
    assert out.strip() == "ok"


def test_installed_extension_found_when_source_folder_shadows_it(tmp_path):
    """Running from a checkout whose rpe_ops/ has no compiled library, with rpe_ops installed
    elsewhere on sys.path (pip install ./rpe_ops): the installed library is used."""
    require_extension()
    site, repo = tmp_path / "site", tmp_path / "repo"
    _copy_package(site, with_library=True)
    _copy_package(repo)
    out = _run("""
        import warnings
        warnings.filterwarnings("error", message="rpe_ops")
        import torch
        import rpe_ops
        print(rpe_ops.__file__)
        print(rpe_ops.EXTENSION_PATH)
        print(rpe_ops.backend())
        x = torch.randn(2, 3, 4, 5)
        index = torch.randint(0, 5, (4, 6))
        torch.testing.assert_close(rpe_ops.rpe_index(x, index), rpe_ops._fallback.rpe_index(x, index))
    """, cwd=repo, pythonpath=str(site))
    module, library, backend = out.split()
    assert module.startswith(str(repo)) and library.startswith(str(site)) and backend == "extension"


# ----------------------------------------------------------------------------------------------
# CUDA

@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
def test_cuda_matches_reference(dtype, index_dtype):
    gen = torch.Generator().manual_seed(8)
    for batch, heads, lq, lk, nb in [(2, 8, 30, 30, 81), (1, 3, 5, 300, 7), (3, 5, 17, 9, 2)]:
        x = torch.randn(batch, heads, lq, nb, generator=gen).to(dtype)
        g = torch.randn(batch, heads, lq, lk, generator=gen).to(dtype)
        index = make_index(lq, lk, nb, index_dtype, gen)
        out = rpe_ops.rpe_index(x.cuda(), index.cuda())
        torch.testing.assert_close(out.cpu().double(), reference_lookup(x, index), rtol=0, atol=0)
        grad = rpe_ops.rpe_index_backward(g.cuda(), index.cuda(), nb)
        torch.testing.assert_close(grad.cpu().double(), reference_bucket_sum(g, index, nb), **SUM_TOL[dtype])


@needs_cuda
def test_cuda_extension_kernels_are_used():
    require_extension()
    if rpe_ops.backend("cuda") != "extension":
        pytest.fail("the extension was built without CUDA kernels on a machine with CUDA")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_many_buckets_and_rows(dtype):
    # More buckets than one shared-memory tile holds, and more rows than the grid has blocks.
    gen = torch.Generator().manual_seed(9)
    nb = 10000
    g = torch.randn(1, 2, 3, 20000, generator=gen, dtype=dtype)
    index = make_index(3, 20000, nb, generator=gen)
    grad = rpe_ops.rpe_index_backward(g.cuda(), index.cuda(), nb)
    torch.testing.assert_close(grad.cpu(), _fallback.rpe_index_backward(g, index, nb))
    rows = (1 << 20) + 3
    x = torch.randn(1, 1, rows, 2, generator=gen, dtype=dtype)
    index = make_index(rows, 1, 2, generator=gen)
    torch.testing.assert_close(rpe_ops.rpe_index(x.cuda(), index.cuda()).cpu(), _fallback.rpe_index(x, index))
    g = torch.randn(1, 1, rows, 1, generator=gen, dtype=dtype)
    torch.testing.assert_close(rpe_ops.rpe_index_backward(g.cuda(), index.cuda(), 2).cpu(),
                               _fallback.rpe_index_backward(g, index, 2))


@needs_cuda
def test_cuda_non_contiguous_side_stream_and_autograd():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 5, 6, 3, generator=gen, dtype=torch.float64).permute(0, 3, 2, 1).cuda()  # (2, 3, 6, 5)
    index = make_index(6, 7, 5, generator=gen).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())      # x and index were made on the default stream
    with torch.cuda.stream(stream):
        out = rpe_ops.rpe_index(x, index)
    stream.synchronize()
    torch.testing.assert_close(out.cpu(), reference_lookup(x.cpu(), index.cpu()))
    xg = x.detach().requires_grad_()
    # Shared-memory atomics make the order of additions, hence the last bits, vary.
    assert torch.autograd.gradgradcheck(lambda t: rpe_ops.rpe_index(t, index), (xg,), nondet_tol=1e-12)


@needs_cuda
def test_cuda_errors(monkeypatch):
    x = torch.randn(2, 3, 4, 5, device="cuda")
    index = torch.randint(0, 5, (4, 6), device="cuda")
    with pytest.raises(RuntimeError, match="rpe_index: input and index must be on the same device"):
        rpe_ops.rpe_index(x, index.cpu())
    with pytest.raises(RuntimeError, match="rpe_index: input and index must be on the same device"):
        rpe_ops.rpe_index(x.cpu(), index)
    bad = index.clone()
    bad[0, 0] = 7
    monkeypatch.setenv("RPE_OPS_CHECK_INDEX", "1")
    with pytest.raises(RuntimeError, match=r"index values must lie in \[0, num_buckets\) = \[0, 5\)"):
        rpe_ops.rpe_index(x, bad)
    with pytest.raises(RuntimeError, match=r"index values must lie in \[0, num_buckets\) = \[0, 5\)"):
        rpe_ops.rpe_index_backward(torch.randn(2, 3, 4, 6, device="cuda"), bad, 5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_second_device():
    x = torch.randn(2, 3, 4, 5, device="cuda:1")
    index = torch.randint(0, 5, (4, 6), device="cuda:1")
    out = rpe_ops.rpe_index(x, index)
    assert out.device == x.device
    torch.testing.assert_close(out.cpu(), _fallback.rpe_index(x.cpu(), index.cpu()))
    grad = rpe_ops.rpe_index_backward(out, index, 5)
    assert grad.device == x.device


# ----------------------------------------------------------------------------------------------
# Deterministic mode

@pytest.fixture
def deterministic_mode():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_deterministic_mode_selects_scatter_add_for_the_cuda_bucket_sum(deterministic_mode):
    assert rpe_ops.bucket_sum_implementation("cuda") == "scatter_add"
    assert rpe_ops.bucket_sum_implementation(torch.device("cuda", 1)) == "scatter_add"
    assert rpe_ops.bucket_sum_implementation("cpu") == "operator"  # the CPU kernel is deterministic
    torch.use_deterministic_algorithms(False)
    assert rpe_ops.bucket_sum_implementation("cuda") == "operator"


def test_deterministic_bucket_sum_routes_both_paths_and_equals_the_operator(deterministic_mode, monkeypatch):
    # on a machine without CUDA, let the CPU stand for a device whose kernel adds with atomics:
    # the value path's forward and the key path's backward must both take scatter_add, and give
    # the operator's sums up to float rounding
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 9, 25, generator=gen, dtype=torch.float64, requires_grad=True)
    attn = torch.randn(2, 3, 9, 14, generator=gen, dtype=torch.float64, requires_grad=True)
    index = make_index(9, 14, 25, generator=gen)
    expected_v = torch.ops.rpe_ops.rpe_index_backward(attn, index, 25)
    expected_k_grad = torch.autograd.grad(rpe_ops.rpe_index(x, index).sum(), x)[0]

    calls = []
    real = _fallback.rpe_index_backward

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(rpe_ops, "_ATOMIC_BUCKET_SUM_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(_fallback, "rpe_index_backward", spy)
    value_term = rpe_ops.rpe_index_backward(attn, index, 25)
    k_grad = torch.autograd.grad(rpe_ops.rpe_index(x, index).sum(), x)[0]
    assert calls == [attn.shape, (2, 3, 9, 14)]
    torch.testing.assert_close(value_term, expected_v)
    torch.testing.assert_close(k_grad, expected_k_grad)
    # and its own gradient (a lookup) still flows
    (grad_attn,) = torch.autograd.grad(value_term.sum(), attn)
    torch.testing.assert_close(grad_attn, torch.ones_like(attn))


@needs_cuda
def test_cuda_deterministic_mode_runs_the_value_path(deterministic_mode):
    gen = torch.Generator().manual_seed(12)
    attn = torch.randn(2, 8, 30, 30, generator=gen).cuda().requires_grad_()
    index = make_index(30, 30, 81, generator=gen).cuda()
    first = rpe_ops.rpe_index_backward(attn, index, 81)
    assert torch.equal(first, rpe_ops.rpe_index_backward(attn, index, 81))
    torch.testing.assert_close(first.cpu(), _fallback.rpe_index_backward(attn.detach().cpu(), index.cpu(), 81))
    first.sum().backward()
