"""The flex attention path of RPEMultiheadAttention (models/rpe_attention/flex_attention.py)
against the plain PyTorch path, its reference: outputs and gradients for every kind of encoding,
the padding mask and the padded tail, rows without keys, compilations per map size, and the rule
that chooses the path.

On the CPU, flex attention has no backward and its kernels compile only forward: there the
values and gradients are checked with flex attention's own uncompiled implementation (which
computes what the kernels compute, densely, in float64 too) and the compiled forward kernel
separately; the CUDA tests check the compiled kernels both ways (tools/gpu_check.sh runs them).
"""
import pytest
import torch
from torch._dynamo.utils import counters
from torch.nn.attention import flex_attention as torch_flex

from models.rpe_attention import flex_attention
from tests.test_sdpa_path import (assert_close_relative, assert_fused_equals_plain_on_cuda,
                                  count_calls, make_layer, projections, run)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# the uncompiled implementation's advice to compile it (see reference_kernel)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
SETTINGS = [("product", "ctx", "k"), ("euc", "bias", "k"), ("cross", "ctx", "qk"),
            ("product", "bias", "q"), ("quant", "ctx", "q"), (None, None, None)]


def force_flex(monkeypatch):
    """Route forward through the flex path wherever it can run (it is CUDA training only)."""
    monkeypatch.setattr(flex_attention, "flex_applies",
                        lambda layer, q, need_weights, attn_mask, key_padding_mask:
                        layer.use_fused_kernels and not need_weights and layer.rpe_v is None)


@pytest.fixture
def reference_kernel(monkeypatch):
    """flex attention's uncompiled implementation in place of the compiled kernel, and allowed
    to take CPU tensors that need gradients (the CPU kernels have no backward; it has)."""
    monkeypatch.setattr(flex_attention, "_flex_attention", lambda: torch_flex.flex_attention)
    monkeypatch.setattr(torch_flex, "_validate_device", lambda *tensors: None)


def compare(layer, x, monkeypatch, rtol, atol, **kwargs):
    layer.use_fused_kernels = False
    plain = run(layer, x, **kwargs)
    force_flex(monkeypatch)
    layer.use_fused_kernels = True
    flex = run(layer, x, **kwargs)
    for a, b in zip(flex, plain):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# Values and gradients (CPU, flex attention's reference implementation, float64)

@pytest.mark.parametrize("method,mode,rpe_on", SETTINGS)
def test_flex_path_equals_the_plain_path(method, mode, rpe_on, monkeypatch, reference_kernel):
    # 5 x 6 map with one image padded on the right: padded keys in every row of the map, and a
    # padded tail of 128 - 30 tokens
    layer = make_layer(method, mode, rpe_on, dtype=torch.float64).train()
    x = torch.randn(30, 2, 32, dtype=torch.float64)
    pad = torch.zeros(2, 5, 6, dtype=torch.bool)
    pad[1, :, 4:] = True
    compare(layer, x, monkeypatch, 1e-10, 1e-12, key_padding_mask=pad.flatten(1), hw=(5, 6))


def test_flex_path_without_padding_mask_and_a_length_of_whole_blocks(monkeypatch,
                                                                     reference_kernel):
    layer = make_layer("cross", "ctx", "qk", dtype=torch.float64).train()
    x = torch.randn(128, 2, 32, dtype=torch.float64)  # 8 x 16: no tail, no block mask
    compare(layer, x, monkeypatch, 1e-10, 1e-12, hw=(8, 16))
    x = torch.randn(30, 2, 32, dtype=torch.float64)  # no padding mask, but a tail
    compare(layer, x, monkeypatch, 1e-10, 1e-12, hw=(5, 6))


def test_a_query_row_without_keys_gives_zeros_and_leaves_the_rest_as_it_was(monkeypatch,
                                                                             reference_kernel):
    """Image 1 entirely padded: its rows have no key (the plain path gives nan there)."""
    layer = make_layer("product", "ctx", "k", dtype=torch.float64).train()
    x = torch.randn(30, 2, 32, dtype=torch.float64)
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[1] = True
    q, k, v = (t.detach() for t in projections(layer, x))
    q.requires_grad_()
    out = flex_attention.irpe_flex_attention(q, k, v, None, layer.rpe_k, pad, 5, 6)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    layer.use_fused_kernels = False
    plain, _ = layer(x, x, x, key_padding_mask=pad, need_weights=False, hw=(5, 6))
    assert torch.isnan(plain[:, 1]).all()
    torch.testing.assert_close(layer._output(out)[:, 0], plain[:, 0], rtol=1e-10, atol=1e-12)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))


# ----------------------------------------------------------------------------------------------
# The compiled kernel (CPU: forward only)

@pytest.fixture(scope="module")
def compiled_layer():
    """One layer whose flex kernel compiles once for this module."""
    torch._dynamo.reset()
    return make_layer("product", "ctx", "k").eval()


def compiled_forward(layer, height, width):
    x = torch.randn(height * width, 2, 32)
    pad = torch.zeros(2, height, width, dtype=torch.bool)
    pad[1, :, width - 2:] = True
    pad = pad.flatten(1)
    with torch.no_grad():
        layer.use_fused_kernels = False
        plain, _ = layer(x, x, x, key_padding_mask=pad, need_weights=False, hw=(height, width))
        q, k, v = projections(layer, x)
        out = flex_attention.irpe_flex_attention(q, k, v, None, layer.rpe_k, pad, height, width)
    return layer._output(out), plain


def test_compiled_kernel_equals_the_plain_path_and_compiles_once_per_length_step(compiled_layer):
    graphs = counters["stats"]["unique_graphs"]
    # maps of 132, 140 and 150 tokens share the padded length 256 (two blocks of 128): one
    # compilation
    for height, width in ((12, 11), (10, 14), (10, 15)):
        out, plain = compiled_forward(compiled_layer, height, width)
        assert_close_relative(out, plain, 1e-5)
    assert counters["stats"]["unique_graphs"] - graphs == 1


# ----------------------------------------------------------------------------------------------
# The rule

def test_the_flex_path_is_not_taken_on_the_cpu(monkeypatch):
    monkeypatch.setattr(flex_attention, "USE_FLEX", {"ctx": True, "bias": True, None: True})
    layer = make_layer("product", "ctx", "k", width=64).train()
    assert not flex_attention.flex_applies(layer, torch.zeros(2, 4, 30, 16), False, None, None)


@CUDA
def test_rule_on_cuda(monkeypatch):
    monkeypatch.setattr(flex_attention, "USE_FLEX", {"ctx": True, "bias": True, None: False})
    def applies(method="product", mode="ctx", rpe_on="k", dropout=0.0, train=True, width=64,
                need_weights=False, attn_mask=None, key_padding_mask=None,
                dtype=torch.float32):
        layer = make_layer(method, mode, rpe_on, dropout=dropout, device="cuda", width=width)
        q = torch.zeros(2, 4, 30, width // 4, device="cuda", dtype=dtype)
        return flex_attention.flex_applies(layer.train(train), q, need_weights, attn_mask,
                                           key_padding_mask)
    assert applies() and applies(mode="bias") and applies(dtype=torch.bfloat16)
    assert applies(key_padding_mask=torch.zeros(2, 30, dtype=torch.bool, device="cuda"))
    assert not applies(dropout=0.1)  # flex attention has no dropout: SDPA's kernel drops out
    assert not applies(train=False)
    assert not applies(need_weights=True)
    assert not applies(rpe_on="qkv")
    assert not applies(width=32)  # head size 8: below the kernels' 16
    assert not applies(attn_mask=torch.zeros(30, 30, device="cuda"))
    assert not applies(key_padding_mask=torch.zeros(2, 30, device="cuda"))
    assert not applies(method=None)  # USE_FLEX[None]
    flex_attention.USE_FLEX["bias"] = False
    assert not applies(mode="bias") and applies(mode="ctx")


# ----------------------------------------------------------------------------------------------
# CUDA: the compiled kernels, forward and backward (tools/gpu_check.sh)

@CUDA
@pytest.mark.parametrize("method,mode,rpe_on", SETTINGS)
def test_flex_path_equals_the_plain_path_on_cuda_float32(method, mode, rpe_on, monkeypatch):
    calls = count_calls(monkeypatch, flex_attention, "irpe_flex_attention")
    if method is None:
        monkeypatch.setitem(flex_attention.USE_FLEX, None, True)
    layer = make_layer(method, mode, rpe_on, device="cuda", width=64).train()  # head size 16
    assert_fused_equals_plain_on_cuda(layer, torch.randn(30, 2, 64, device="cuda"), calls, "flex")


@CUDA
@pytest.mark.parametrize("setting", ["rpe-2.0-product-ctx-1-k", "rpe-2.0-product-bias-1-qk"])
def test_flex_path_on_cuda_at_coco_size_under_bfloat16_autocast_and_multi_scale(setting,
                                                                               monkeypatch):
    """The encoder's shape (256 wide, 8 heads) at three map sizes of one length step (897..1024
    tokens): one compilation."""
    from models.rpe_attention import RPEMultiheadAttention, irpe
    calls = count_calls(monkeypatch, flex_attention, "irpe_flex_attention")
    torch.manual_seed(0)
    layer = RPEMultiheadAttention(256, 8, dropout=0.0, rpe_config=irpe.parse_rpe_string(setting))
    layer = layer.cuda().train()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lookup_table" in name:
                p.normal_(0, 0.5)
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    for height, width in ((25, 38), (24, 40), (23, 42)):
        x = torch.randn(height * width, 2, 256, device="cuda")
        pad = torch.zeros(2, height, width, dtype=torch.bool, device="cuda")
        pad[1, :, width - 8:] = True
        kwargs = {"key_padding_mask": pad.flatten(1), "hw": (height, width)}
        layer.use_fused_kernels = True
        with torch.autocast("cuda", torch.bfloat16):
            fused = run(layer, x, **kwargs)
        layer.use_fused_kernels = False
        reference = run(layer, x, **kwargs)  # float32, plain
        assert fused[0].dtype == torch.bfloat16
        for a, b in zip(fused, reference):
            assert_close_relative(a.float(), b, 3e-2)
    assert len(calls) == 3  # the fused run at each size
    assert counters["stats"]["unique_graphs"] - graphs == 1
