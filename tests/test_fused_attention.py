"""The compiled attention kernel (rpe_ops.attention) against the plain PyTorch path of
RPEMultiheadAttention, its reference: values and gradients, train and eval, every kind of
encoding and mask, and the statistics of its dropout keep-mask."""
import math

import pytest
import torch
import torch.nn.functional as F

import rpe_ops
from models.rpe_attention import RPEMultiheadAttention, irpe
from rpe_ops.attention import attention_weights, fused_attention_available

pytestmark = pytest.mark.skipif(
    not fused_attention_available(torch.device("cpu"), torch.float32),
    reason="the compiled rpe_ops extension with the attention kernel is not built")

SETTINGS = [("product", "ctx", "k"), ("euc", "bias", "k"), ("quant", "ctx", "qkv"),
            ("cross", "ctx", "qk"), ("product", "bias", "qk"), ("cross", "bias", "k")]


def make_layer(method, mode, rpe_on, dropout=0.1, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    config = irpe.get_rpe_config(ratio=1.9, method=method, mode=mode, rpe_on=rpe_on)
    layer = RPEMultiheadAttention(32, 4, dropout=dropout, rpe_config=config).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def run(layer, fused, x, **kwargs):
    """Outputs, weights per head and every gradient of one forward + backward."""
    layer.use_fused_kernels = fused
    x = x.detach().requires_grad_()
    out, weights = layer(x, x, x, need_weights=True, average_attn_weights=False, **kwargs)
    (out.square().sum() + (weights * torch.linspace(0, 1, weights.shape[-1],
                                                    dtype=x.dtype)).sum()).backward()
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    layer.zero_grad()
    return out.detach(), weights.detach(), grads


def padding(batch=2, length=30, pad=7):
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[1, -pad:] = True
    return mask


@pytest.mark.parametrize("method,mode,rpe_on", SETTINGS)
@pytest.mark.parametrize("train", [False, True])
def test_fused_path_equals_the_plain_path_without_dropout(method, mode, rpe_on, train):
    layer = make_layer(method, mode, rpe_on, dropout=0.0).train(train)
    x = torch.randn(30, 2, 32, dtype=torch.float64)
    fused = run(layer, True, x, key_padding_mask=padding(), hw=(5, 6))
    plain = run(layer, False, x, key_padding_mask=padding(), hw=(5, 6))
    for a, b in zip([fused[0], fused[1]] + fused[2], [plain[0], plain[1]] + plain[2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mask_kind", ["bool", "float", "per_head"])
def test_attention_masks_take_the_same_path_in_both(mask_kind):
    layer = make_layer("product", "ctx", "k", dropout=0.0)
    x = torch.randn(30, 2, 32, dtype=torch.float64)
    if mask_kind == "bool":
        attn_mask = torch.rand(30, 30) < 0.3
        attn_mask.fill_diagonal_(False)
    elif mask_kind == "float":
        attn_mask = torch.randn(30, 30, dtype=torch.float64)
    else:
        attn_mask = torch.randn(2 * 4, 30, 30, dtype=torch.float64)
    fused = run(layer, True, x, attn_mask=attn_mask, key_padding_mask=padding(), hw=(5, 6))
    plain = run(layer, False, x, attn_mask=attn_mask, key_padding_mask=padding(), hw=(5, 6))
    for a, b in zip([fused[0], fused[1]] + fused[2], [plain[0], plain[1]] + plain[2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_float32_at_coco_like_size_agrees_within_float_rounding():
    torch.manual_seed(1)
    config = irpe.get_rpe_config(ratio=2.0, method="product", mode="ctx", rpe_on="k")
    layer = RPEMultiheadAttention(64, 8, dropout=0.0, rpe_config=config)
    with torch.no_grad():
        layer.rpe_k.lookup_table_weight.normal_(0, 0.5)
    x = torch.randn(13 * 19, 2, 64)
    fused = run(layer, True, x, key_padding_mask=padding(2, 13 * 19, 40), hw=(13, 19))
    plain = run(layer, False, x, key_padding_mask=padding(2, 13 * 19, 40), hw=(13, 19))
    for a, b in zip([fused[0], fused[1]] + fused[2], [plain[0], plain[1]] + plain[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def reference_with_keep_mask(layer, x, keep, key_padding_mask, hw):
    """The plain path's arithmetic written out, with a given dropout keep-mask."""
    heads, p = layer.num_heads, layer.dropout
    length, batch, embed = x.shape
    d = embed // heads
    q, k, v = F.linear(x, layer.in_proj_weight, layer.in_proj_bias).chunk(3, dim=-1)
    split = lambda t: t.reshape(length, batch, heads, d).permute(1, 2, 0, 3)
    q, k, v = split(q) * d ** -0.5, split(k), split(v)
    logits = q @ k.transpose(-2, -1) + layer.rpe_k(q, *hw)
    logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    weights = logits.softmax(-1) * keep / (1 - p)
    out = (weights @ v).permute(2, 0, 1, 3).reshape(length, batch, embed)
    return layer.out_proj(out), weights


def test_dropout_scales_kept_weights_and_backpropagates_through_the_same_mask():
    layer = make_layer("product", "ctx", "k", dropout=0.3).train()
    x = torch.randn(30, 2, 32, dtype=torch.float64)
    out, weights, grads = run(layer, True, x, key_padding_mask=padding(), hw=(5, 6))
    keep = weights != 0
    assert 0.55 < keep[0].double().mean() < 0.85  # not all kept, not all dropped
    x_ref = x.detach().requires_grad_()
    ref_out, ref_weights = reference_with_keep_mask(layer, x_ref, keep, padding(), (5, 6))
    (ref_out.square().sum() + (ref_weights * torch.linspace(0, 1, 30, dtype=x.dtype)).sum()).backward()
    torch.testing.assert_close(weights, ref_weights.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, ref_out.detach(), rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, [x_ref.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def keep_mask(shape, p, seed=0):
    torch.manual_seed(seed)
    return attention_weights(torch.zeros(*shape[:3], 1), torch.zeros(*shape[:2], shape[3], 1),
                             dropout_p=p) != 0


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_mask_is_bernoulli_with_the_right_probability(p):
    keep = keep_mask((4, 8, 200, 250), p).double()
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    # every row, head and batch entry is drawn afresh: per-row rates spread as a binomial
    rows = keep.mean(-1).flatten()
    row_sigma = math.sqrt(p * (1 - p) / keep.shape[-1])
    assert abs(rows.std().item() - row_sigma) < 0.1 * row_sigma
    # neighbours along rows and columns, and across heads, are uncorrelated
    centred = keep - keep.mean()
    var = centred.square().mean()
    for a, b in [(centred[..., 1:], centred[..., :-1]), (centred[:, :, 1:], centred[:, :, :-1]),
                 (centred[:, 1:], centred[:, :-1]), (centred[1:], centred[:-1])]:
        assert abs((a * b).mean() / var) < 5 / math.sqrt(a.numel())


def test_keep_mask_follows_torch_manual_seed_and_changes_between_calls():
    first = keep_mask((2, 2, 16, 16), 0.5, seed=3)
    again = keep_mask((2, 2, 16, 16), 0.5, seed=3)
    other = keep_mask((2, 2, 16, 16), 0.5, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    torch.manual_seed(3)
    q, k = torch.zeros(2, 2, 16, 1), torch.zeros(2, 2, 16, 1)
    a, b = attention_weights(q, k, dropout_p=0.5), attention_weights(q, k, dropout_p=0.5)
    assert not torch.equal(a != 0, b != 0)


def test_rows_masked_everywhere_give_nan_as_the_plain_path():
    layer = make_layer("product", "ctx", "k", dropout=0.0).eval()
    x = torch.randn(30, 2, 32, dtype=torch.float64)
    mask = padding(pad=30)
    fused, plain = [layer.train(False)(x, x, x, key_padding_mask=mask, hw=(5, 6))[0]
                    for layer.use_fused_kernels in (True, False)]
    assert fused[:, 1].isnan().all() and plain[:, 1].isnan().all()
    torch.testing.assert_close(fused[:, 0], plain[:, 0], rtol=1e-10, atol=1e-12)


def test_bucket_ids_out_of_range_are_refused_with_a_message():
    q, k = torch.randn(1, 2, 4, 3), torch.randn(1, 2, 5, 3)
    lookup = torch.randn(1, 2, 4, 6)
    index = torch.full((4, 5), 6, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="index"):
        attention_weights(q, k, lookup, index)


def test_fused_kernel_is_used_only_where_it_applies():
    layer = make_layer("product", "ctx", "k", dtype=torch.float32)
    x = torch.randn(30, 2, 32)
    assert layer._fused_applies(x.new_empty(1))
    assert not layer._fused_applies(x.new_empty(1, dtype=torch.bfloat16))
    scripted = torch.jit.script(layer.eval())  # scripted code calls the same fused operator
    assert scripted(x, x, x, hw=(5, 6))[0].equal(layer(x, x, x, hw=(5, 6))[0])
    layer.use_fused_kernels = False  # and the plain path gives other bits
    assert not scripted(x, x, x, hw=(5, 6))[0].equal(layer(x, x, x, hw=(5, 6))[0])
    assert rpe_ops.backend("cpu") == "extension"
