"""The F.scaled_dot_product_attention path of RPEMultiheadAttention (CUDA, need_weights=False, no
iRPE on v) against the plain PyTorch path, its reference: the additive bias it builds, values and
gradients, and the statistics of the kernel's dropout.

forward takes that path on CUDA, and on the CPU in inference (no gradient recorded, no dropout);
elsewhere the tests route forward there (`force_sdpa`), which runs the same code with PyTorch's CPU
attention kernels, so that the bias, the masks and the gradients through them are checked on every
machine.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from models.rpe_attention import RPEMultiheadAttention, irpe
from models.rpe_attention.rpe_attention_function import split_heads

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
SETTINGS = [("product", "ctx", "k"), ("euc", "bias", "k"), ("cross", "ctx", "qk"),
            ("product", "bias", "q"), (None, None, None)]


def make_layer(method, mode, rpe_on, dropout=0.0, dtype=torch.float32, device="cpu", seed=0,
               width=32):
    torch.manual_seed(seed)
    config = None if method is None else irpe.get_rpe_config(ratio=1.9, method=method, mode=mode,
                                                             rpe_on=rpe_on)
    layer = RPEMultiheadAttention(width, 4, dropout=dropout, rpe_config=config).to(device, dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def force_sdpa(layer):
    """Route forward through the SDPA path on any device (it is CUDA-only by default)."""
    layer._sdpa_applies = lambda q, need_weights: not need_weights and layer.rpe_v is None
    return layer


def run(layer, x, **kwargs):
    """Output and every gradient of one forward + backward with need_weights=False."""
    x = x.detach().requires_grad_()
    out, weights = layer(x, x, x, need_weights=False, **kwargs)
    assert weights is None
    ramp = torch.linspace(-1, 1, out.shape[-1], device=out.device)
    (out.float() * ramp).square().sum().backward()
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    layer.zero_grad()
    return [out.detach()] + grads


def count_calls(monkeypatch, owner, name):
    """Wrap owner.name so that its calls are counted: returns the list they append to."""
    calls = []
    original = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **kw: calls.append(1) or original(*a, **kw))
    return calls


def assert_fused_equals_plain_on_cuda(layer, x, calls, path):
    """Outputs and gradients of the plain path (which must not add to `calls`) and of the fused
    one (which must), padded batch, float32 (PyTorch's float32 matmuls do not use TF32 unless
    told to: the reference is full float32)."""
    kwargs = {"key_padding_mask": padding(device="cuda"), "hw": (5, 6)}
    layer.use_fused_kernels = False
    plain = run(layer, x, **kwargs)
    assert not calls
    layer.use_fused_kernels = True
    fused = run(layer, x, **kwargs)
    assert calls, f"forward did not take the {path} path on CUDA"
    for a, b in zip(fused, plain):
        assert_close_relative(a, b, 2e-5)


def padding(batch=2, length=30, pad=7, device="cpu"):
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    mask[1, -pad:] = True
    return mask


def projections(layer, x):
    """q (scaled), k, v as (N, H, L, D), computed here from the layer's weights."""
    q, k, v = F.linear(x, layer.in_proj_weight, layer.in_proj_bias).chunk(3, dim=-1)
    heads = layer.num_heads
    q = q * layer.head_dim ** -0.5
    return split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)


def assert_close_relative(a, b, rtol):
    """Largest difference within rtol of b's largest magnitude."""
    scale = b.abs().max().clamp(min=1e-30)
    assert ((a - b).abs().max() / scale).item() <= rtol, ((a - b).abs().max() / scale).item()


# ----------------------------------------------------------------------------------------------
# The additive bias (CPU)

@pytest.mark.parametrize("method,mode,rpe_on", SETTINGS)
@pytest.mark.parametrize("mask_kind", ["padding", "bool", "per_head_float"])
def test_bias_plus_qk_gives_the_weights_of_the_plain_path(method, mode, rpe_on, mask_kind):
    layer = make_layer(method, mode, rpe_on, dtype=torch.float64).eval()
    layer.use_fused_kernels = False
    x = torch.randn(30, 2, 32, dtype=torch.float64)
    kwargs = {"key_padding_mask": padding(), "hw": (5, 6)}
    if mask_kind == "bool":
        kwargs["attn_mask"] = torch.rand(30, 30) < 0.2
        kwargs["attn_mask"].fill_diagonal_(False)
    elif mask_kind == "per_head_float":
        kwargs["attn_mask"] = torch.randn(2 * 4, 30, 30, dtype=torch.float64)
    _, plain = layer(x, x, x, need_weights=True, average_attn_weights=False, **kwargs)
    q, k, _ = projections(layer, x)
    bias = layer._logit_bias(q, k, kwargs.get("attn_mask"), kwargs["key_padding_mask"], 5, 6,
                             layer.head_dim ** -0.5)
    # (N, H, L, S), or broadcastable to it (an encoding shared by the heads)
    assert torch.broadcast_shapes(bias.shape, (2, 4, 30, 30)) == (2, 4, 30, 30)
    assert bias.dtype == q.dtype
    assert torch.isneginf(bias[1, :, :, -7:]).all()
    assert torch.isfinite(bias[0]).all() == (mask_kind != "bool")
    torch.testing.assert_close((q @ k.transpose(-2, -1) + bias).softmax(-1), plain,
                               rtol=1e-10, atol=1e-12)


def test_bias_is_none_without_encodings_or_masks_so_the_flash_kernel_may_run():
    layer = make_layer(None, None, None)
    q, k, _ = projections(layer, torch.randn(12, 2, 32))
    assert layer._logit_bias(q, k, None, None, 3, 4, 0.25) is None


# ----------------------------------------------------------------------------------------------
# Values and gradients

@pytest.mark.parametrize("method,mode,rpe_on", SETTINGS)
@pytest.mark.parametrize("train", [False, True])
def test_sdpa_path_equals_the_plain_path_on_cpu(method, mode, rpe_on, train):
    layer = make_layer(method, mode, rpe_on, dtype=torch.float64).train(train)
    x = torch.randn(30, 2, 32, dtype=torch.float64)
    layer.use_fused_kernels = False
    plain = run(layer, x, key_padding_mask=padding(), hw=(5, 6))
    layer.use_fused_kernels = True
    sdpa = run(force_sdpa(layer), x, key_padding_mask=padding(), hw=(5, 6))
    for a, b in zip(sdpa, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@CUDA
@pytest.mark.parametrize("method,mode,rpe_on", SETTINGS)
@pytest.mark.parametrize("train", [False, True])
def test_sdpa_path_equals_the_plain_path_on_cuda_float32(method, mode, rpe_on, train, monkeypatch):
    calls = count_calls(monkeypatch, F, "scaled_dot_product_attention")
    layer = make_layer(method, mode, rpe_on, device="cuda").train(train)
    assert_fused_equals_plain_on_cuda(layer, torch.randn(30, 2, 32, device="cuda"), calls, "SDPA")


@CUDA
@pytest.mark.parametrize("train", [False, True])
def test_sdpa_path_at_coco_size_under_bfloat16_autocast(train):
    """The encoder's shape (25 x 38 map, 256 wide, 8 heads, rpe-2.0-product-ctx-1-k): its
    950 keys are not a multiple of the kernels' alignment."""
    torch.manual_seed(0)
    config = irpe.get_rpe_config(ratio=2.0, method="product", mode="ctx", shared_head=True,
                                 rpe_on="k")
    layer = RPEMultiheadAttention(256, 8, dropout=0.0, rpe_config=config).cuda().train(train)
    with torch.no_grad():
        layer.rpe_k.lookup_table_weight.normal_(0, 0.5)
    x = torch.randn(950, 2, 256, device="cuda")
    pad = torch.zeros(2, 25, 38, dtype=torch.bool, device="cuda")
    pad[1, :, 30:] = True
    kwargs = {"key_padding_mask": pad.flatten(1), "hw": (25, 38)}
    results = {}
    for fused in (False, True):
        layer.use_fused_kernels = fused
        with torch.autocast("cuda", torch.bfloat16):
            results[fused] = run(layer, x, **kwargs)
    layer.use_fused_kernels = False
    reference = run(layer, x, **kwargs)  # float32
    assert results[True][0].dtype == torch.bfloat16
    for a, b, c in zip(results[True], results[False], reference):
        # bfloat16 keeps 8 bits: both paths are as far from float32 as rounding makes them
        assert_close_relative(a.float(), c.float(), 3e-2)
        assert_close_relative(a.float(), b.float(), 3e-2)


@CUDA
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_memory_efficient_kernel_takes_the_bias_and_returns_its_gradient(dtype, rtol):
    """The path's preferred kernel accepts an unaligned (N, H, L, S) bias that needs a gradient
    (it raises if it cannot run) and agrees with the math kernel in float32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    inputs = [torch.randn(2, 8, 950, 32, device="cuda") for _ in range(3)]
    inputs.append(torch.randn(2, 8, 950, 950, device="cuda") * 0.5)
    results = []
    cases = ((SDPBackend.EFFICIENT_ATTENTION, dtype), (SDPBackend.MATH, torch.float32))
    for backend, kind in cases:
        q, k, v, bias = (t.to(kind).requires_grad_() for t in inputs)
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q * 32 ** -0.5, k, v, attn_mask=bias, scale=1.0)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v, bias))
        results.append([out.float(), *(g.float() for g in grads)])
    for a, b in zip(*results):
        assert_close_relative(a, b, rtol)


# ----------------------------------------------------------------------------------------------
# Dropout

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_a_fraction_1_minus_p_and_scales_by_1_over_1_minus_p(device, p):
    """With uniform logits (q = 0) and v the identity, the output is the dropped-out weights:
    every kept weight is 1 / (valid keys * (1 - p)); padded keys get none. The backward goes
    through the same keep-mask."""
    layer = make_layer("product", "ctx", "k", dropout=p, device=device, width=128).train()
    length, valid, batch = 32, 25, 4
    q = torch.zeros(batch, 4, length, 32, device=device)
    k = torch.randn(batch, 4, length, 32, device=device)
    v = torch.eye(length, 32, device=device).expand(batch, 4, length, 32).clone().requires_grad_()
    pad = torch.zeros(batch, length, dtype=torch.bool, device=device)
    pad[:, valid:] = True
    with torch.no_grad():
        layer.rpe_k.lookup_table_weight.zero_()  # uniform logits over the valid keys
    out = layer._sdpa_output(q, k, v, None, pad, 4, 8, 1.0)
    weights = out[..., :length]
    assert (weights[..., valid:] == 0).all()
    kept = weights[..., :valid] != 0
    n = kept.numel()
    fraction = kept.float().mean().item()
    assert abs(fraction - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), fraction
    torch.testing.assert_close(weights[..., :valid][kept],
                               torch.full((int(kept.sum()),), 1 / (valid * (1 - p)), device=device))
    # d(sum out) / dv[j, c] = sum over i of the dropped weight [i, j], the same mask as forward
    out.sum().backward()
    torch.testing.assert_close(v.grad[..., :length, 0], weights.sum(dim=-2))
    second = layer._sdpa_output(q, k, v, None, pad, 4, 8, 1.0)[..., :length]
    assert not torch.equal(second != 0, weights != 0), "the same keep-mask twice"


def test_the_sdpa_path_is_off_for_weights_rpe_v_the_switch_and_the_cpu():
    layer = make_layer("product", "ctx", "k")
    q = torch.zeros(1, 4, 3, 8)
    assert not layer._sdpa_applies(q, False)  # CPU tensors: the plain or fused CPU path
    if torch.cuda.is_available():
        q = q.cuda()
        layer.cuda()
        assert layer._sdpa_applies(q, False)
        assert not layer._sdpa_applies(q, True)
        layer.use_fused_kernels = False
        assert not layer._sdpa_applies(q, False)
        assert not make_layer("product", "ctx", "qkv", device="cuda")._sdpa_applies(q, False)


@pytest.mark.parametrize("method,mode,rpe_on", SETTINGS)
def test_cpu_inference_takes_sdpa_with_the_plain_numbers_scripted_too(method, mode, rpe_on,
                                                                       monkeypatch):
    """Eval under no_grad on the CPU: SDPA with the bias as its mask, the plain path's output up to
    float rounding, and the scripted layer's bit for bit; with gradients or dropout, not SDPA."""
    layer = make_layer(method, mode, rpe_on).eval()
    x = torch.randn(30, 2, 32)
    kwargs = {"key_padding_mask": padding(), "hw": (5, 6), "need_weights": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(layer)
    calls = count_calls(monkeypatch, F, "scaled_dot_product_attention")
    with torch.no_grad():
        layer.use_fused_kernels = False
        plain = layer(x, x, x, **kwargs)[0]
        assert not calls
        layer.use_fused_kernels = True
        out = layer(x, x, x, **kwargs)[0]
        assert len(calls) == 1
        assert_close_relative(out, plain, 2e-6)
        assert torch.equal(scripted(x, x, x, **kwargs)[0], out)
        assert len(calls) == 1  # scripted code calls the operator itself, not F's function
        layer.train()  # dropout 0: nothing drawn, SDPA still
        layer(x, x, x, **kwargs)
        assert len(calls) == 2
        layer.dropout = 0.1
        layer(x, x, x, **kwargs)
        assert len(calls) == 2
    layer.eval()
    layer(x, x, x, **kwargs)  # gradients recorded: the fused or plain CPU path
    assert len(calls) == 2
