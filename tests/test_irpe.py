"""iRPE bucket arithmetic, configuration and the attention layer, against tests/data (the
published arithmetic) and against independent slow implementations."""
import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from models.rpe_attention import RPEMultiheadAttention, irpe
from models.rpe_attention.irpe import bucket_ids, get_rpe_config, parse_rpe_string, piecewise_index

from tests.conftest import ROOT, load_reference


# ----------------------------------------------------------------------------------------------
# Bucket ids

def test_bucket_ids_equal_reference():
    ref = load_reference("bucket_ids.pt.xz")
    assert len(ref) > 0
    for name, entry in ref.items():
        method, ratio, size, skip = name.split("-")
        height, width = map(int, size.split("x"))
        skip = int(skip[len("skip"):])
        ids = bucket_ids(method, float(ratio), height, width, skip)
        assert torch.equal(ids, entry["ids"].long()), name
        assert irpe.num_buckets_of(method, float(ratio), skip) == entry["num_buckets"], name


def _g_slow(x, alpha, beta, gamma):
    """Eq. 18 of the paper for one number, in float32 arithmetic (numpy scalars)."""
    f32 = np.float32
    x = f32(x)
    if abs(x) <= alpha:
        return int(np.round(x))
    y = f32(alpha) + f32(np.log(f32(abs(x)) / f32(alpha))) / f32(math.log(gamma / alpha)) * f32(beta - alpha)
    return int(np.sign(x) * min(f32(beta), np.round(y)))


@pytest.mark.parametrize("ratio", [0.5, 1.0, 1.9, 2.0, 2.5, 3.0, 4.7])
def test_piecewise_index_matches_slow_formula(ratio):
    alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio
    x = torch.arange(-400, 401)
    got = piecewise_index(x, alpha, beta, gamma)
    expected = torch.tensor([_g_slow(v, alpha, beta, gamma) for v in x.tolist()])
    assert torch.equal(got, expected)
    # invariants: odd, non-decreasing, bounded by beta_int
    assert torch.equal(got.flip(0), -got)
    assert (got[1:] >= got[:-1]).all()
    assert got.abs().max() == int(beta)


def _ids_slow(method, ratio, height, width):
    alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio
    b = int(beta)
    g = lambda v: _g_slow(v, alpha, beta, gamma)  # noqa: E731
    pos = [(r, c) for r in range(height) for c in range(width)]
    out = torch.empty(len(pos), len(pos), dtype=torch.int64)
    for i, (ri, ci) in enumerate(pos):
        for j, (rj, cj) in enumerate(pos):
            dr, dc = ri - rj, ci - cj
            out[i, j] = {
                "euc": lambda: g(round(math.sqrt(dr * dr + dc * dc))) + b,
                "quant": lambda: g(dr * dr + dc * dc) + b,
                "cross_rows": lambda: g(dr) + b,
                "cross_cols": lambda: g(dc) + b,
                "product": lambda: (g(dr) + b) * (2 * b + 1) + g(dc) + b,
            }[method]()
    return out


@pytest.mark.parametrize("method", ["euc", "quant", "cross_rows", "cross_cols", "product"])
def test_bucket_ids_match_slow_loops_on_other_sizes(method):
    for ratio, (h, w) in [(1.3, (3, 11)), (2.2, (8, 5)), (3.5, (1, 13))]:
        ids = bucket_ids(method, ratio, h, w)
        assert torch.equal(ids, _ids_slow(method, ratio, h, w)), (ratio, h, w)
        assert 0 <= ids.min() and ids.max() < irpe.num_buckets_of(method, ratio)


def test_bucket_ids_skip_tokens_use_the_extra_bucket():
    ids = bucket_ids("product", 1.9, 4, 5, skip=1)
    plain = bucket_ids("product", 1.9, 4, 5)
    nb = irpe.num_buckets_of("product", 1.9, skip=1)
    assert nb == 49 + 1
    assert (ids[0, :] == nb - 1).all() and (ids[:, 0] == nb - 1).all()
    assert torch.equal(ids[1:, 1:], plain)


def test_bucket_ids_are_cached_per_size():
    a = irpe.bucket_ids("product", 2.0, 7, 9, 0, torch.device("cpu"))
    b = irpe.bucket_ids("product", 2.0, 7, 9, 0, "cpu")
    c = irpe.bucket_ids("product", 2.0, 9, 7, 0, torch.device("cpu"))
    assert a is b and a.dtype == torch.int32
    assert torch.equal(a, irpe.compute_bucket_ids("product", 2.0, 7, 9))
    assert a is not c and a.shape == c.shape and not torch.equal(a, c)


def test_bucket_id_cache_is_bounded_in_bytes_per_device():
    # multi-scale training meets hundreds of map sizes: the tables kept stay within the budget
    cache = irpe.BUCKET_ID_CACHE
    cache.clear()
    assert cache.max_bytes <= 64 * 2 ** 20
    sizes = [(h, w) for h in (24, 25) for w in range(30, 43)]  # large COCO maps, stride 32
    for h, w in sizes:
        ids = irpe.bucket_ids("product", 2.0, h, w, 0, "cpu")
        assert ids.dtype == torch.int32 and ids.shape == (h * w, h * w)
        assert cache.bytes_on("cpu") <= cache.max_bytes
    assert cache.bytes_on("cpu") > cache.max_bytes // 2  # it does keep tables
    assert sum(v.numel() * v.element_size() for _, v in cache._entries.values()) == cache.bytes_on("cpu")
    cache.clear()


def test_device_bounded_cache_evicts_least_recently_used_per_device():
    from models.rpe_attention.id_cache import DeviceBoundedCache
    cache = DeviceBoundedCache(max_bytes=100)  # 25 int32 values per device
    made = []

    def make(n, device):
        made.append((n, device))
        return torch.zeros(n, dtype=torch.int32, device=device)

    for key in ("a", "b"):
        cache.get((key, "cpu"), "cpu", lambda: make(10, "cpu"))
    cache.get(("m", "meta"), "meta", lambda: make(20, "meta"))  # another device's budget
    cache.get(("a", "cpu"), "cpu", lambda: make(10, "cpu"))      # hit; "a" becomes the newest
    cache.get(("c", "cpu"), "cpu", lambda: make(10, "cpu"))      # 120 bytes: "b" goes
    assert cache.bytes_on("cpu") == 80 and cache.bytes_on("meta") == 80
    assert set(cache._entries) == {("a", "cpu"), ("c", "cpu"), ("m", "meta")}
    big = cache.get(("big", "cpu"), "cpu", lambda: make(30, "cpu"))  # over the whole budget
    assert big.numel() == 30 and ("big", "cpu") not in cache._entries
    assert made == [(10, "cpu"), (10, "cpu"), (20, "meta"), (10, "cpu"), (30, "cpu")]


@pytest.mark.parametrize("ratio,expected", [(1.9, 49), (2.0, 81), (2.5, 121), (3.0, 169)])
def test_product_bucket_counts(ratio, expected):
    assert get_rpe_config(ratio, "product").rpe_k.num_buckets == expected
    assert get_rpe_config(ratio, "euc").rpe_k.num_buckets == int(expected ** 0.5)


# ----------------------------------------------------------------------------------------------
# Configuration strings

def test_parse_rpe_string_fields():
    cfg = parse_rpe_string("rpe-2.0-product-ctx-1-k")
    assert cfg.rpe_q is None and cfg.rpe_v is None
    assert (cfg.rpe_k.method, cfg.rpe_k.mode, cfg.rpe_k.shared_head, cfg.rpe_k.ratio) == (
        "product", "ctx", True, 2.0)
    cfg = parse_rpe_string("rpe-1.9-cross-bias-0-qk")
    assert cfg.rpe_q == cfg.rpe_k and cfg.rpe_v is None and not cfg.rpe_q.shared_head
    assert parse_rpe_string("") is None


@pytest.mark.parametrize("bad", [
    "rpe-2.0-product-ctx-1",          # five fields
    "rpe-2.0-product-ctx-1-k-x",      # seven fields
    "2.0-product-ctx-1-k-q",          # no rpe prefix
    "rpe-2.0-manhattan-ctx-1-k",      # unknown method
    "rpe-2.0-product-mul-1-k",        # unknown mode
    "rpe-2.0-product-bias-1-v",       # bias on v
    "rpe-2.0-product-bias-1-qkv",     # bias on v
    "rpe-0-product-ctx-1-k",          # ratio 0
    "rpe--1.0-product-ctx-1-k",       # negative ratio (and so too many fields)
    "rpe-abc-product-ctx-1-k",        # ratio not a number
    "rpe-2.0-product-ctx-1-",         # empty rpe_on
    "rpe-2.0-product-ctx-1-kx",       # unknown letter
    "rpe-2.0-product-ctx-2-k",        # shared_head not 0/1
])
def test_malformed_rpe_strings_are_rejected_with_the_grammar(bad):
    with pytest.raises(ValueError) as err:
        parse_rpe_string(bad)
    assert "rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on}" in str(err.value)
    assert "Example: rpe-2.0-product-ctx-1-k" in str(err.value)


def test_negative_ratio_in_get_rpe_config():
    with pytest.raises(ValueError, match="ratio"):
        get_rpe_config(ratio=-1.0)


def test_main_rejects_a_malformed_rpe_string_without_traceback():
    proc = subprocess.run([sys.executable, "main.py", "--enc_rpe2d", "rpe-2.0-product-bias-1-v"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "argument --enc_rpe2d" in proc.stderr and "Example: rpe-2.0-product-ctx-1-k" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------
# The attention layer

def test_attention_cases_equal_reference():
    cases = load_reference("attention_cases.pt")
    assert len(cases) == 7
    for case in cases:
        layer = RPEMultiheadAttention(case["embed_dim"], case["num_heads"],
                                      rpe_config=parse_rpe_string(case["enc_rpe2d"])).eval()
        layer.load_state_dict(case["state_dict"], strict=True)
        out, weights = layer(case["query"], case["key"], case["value"],
                             key_padding_mask=case["key_padding_mask"], hw=tuple(case["hw"]))
        torch.testing.assert_close(out, case["attn_output"], rtol=1e-5, atol=1e-5,
                                   msg=case["enc_rpe2d"])
        torch.testing.assert_close(weights, case["attn_output_weights"], rtol=1e-5, atol=1e-5,
                                   msg=case["enc_rpe2d"])


def _random_inputs(length, batch, embed_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(length, batch, embed_dim, generator=g)
    v = torch.randn(length, batch, embed_dim, generator=g)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[-1, -3:] = True
    return q, v, mask


@pytest.mark.parametrize("batch_first", [False, True])
def test_without_rpe_equals_nn_multihead_attention(batch_first):
    torch.manual_seed(0)
    ours = RPEMultiheadAttention(32, 4, dropout=0.1, batch_first=batch_first).eval()
    theirs = nn.MultiheadAttention(32, 4, dropout=0.1, batch_first=batch_first).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    q, v, mask = _random_inputs(12, 3, 32)
    attn_mask = torch.rand(12, 12) > 0.8
    attn_mask.fill_diagonal_(False)
    if batch_first:
        q, v = q.transpose(0, 1), v.transpose(0, 1)
    for kwargs in [{}, {"key_padding_mask": mask}, {"attn_mask": attn_mask, "key_padding_mask": mask},
                   {"attn_mask": torch.randn(12, 12)}, {"average_attn_weights": False}]:
        a_out, a_w = ours(q, q, v, **kwargs)
        b_out, b_w = theirs(q, q, v, **kwargs)
        torch.testing.assert_close(a_out, b_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a_w, b_w, rtol=1e-5, atol=1e-6)


def _slow_rpe_attention(layer, query, key, value, hw, key_padding_mask=None, keep=None):
    """Independent formulation: each table is gathered to full (.., L, L) size, then contracted.

    `keep` (N, H, L, S) bool: the dropout mask of training mode, applied to the attention weights
    (scaled by 1 / (1 - p)) before they meet v and the v-encoding, as SPEC.md orders it.
    """
    length, batch, embed_dim = query.shape
    heads = layer.num_heads
    d = embed_dim // heads
    s = d ** -0.5
    w = layer.in_proj_weight.chunk(3)
    b = layer.in_proj_bias.chunk(3)
    q, k, v = (torch.nn.functional.linear(x, wi, bi).reshape(length, batch, heads, d).permute(1, 2, 0, 3)
               for x, wi, bi in zip((query, key, value), w, b))
    q = q * s

    def term(module, x, kind):
        parts = [module.rp_rows, module.rp_cols] if hasattr(module, "rp_rows") else [module]
        total = 0
        for part in parts:
            ids = _ids_slow(part.method, part.ratio, *hw)
            if part.skip:
                ids = torch.nn.functional.pad(ids, (part.skip, 0, part.skip, 0),
                                              value=part.num_buckets - 1)
            if part.mode == "bias":
                total = total + part.lookup_table_bias[:, ids][None]
            elif kind == "v":
                table = part.lookup_table_weight[:, ids]  # (H', L, L, D)
                total = total + torch.einsum("nhij,hijd->nhid", x, table.expand(heads, -1, -1, -1))
            else:
                table = part.lookup_table_weight[:, :, ids]  # (H', D, L, L)
                total = total + torch.einsum("nhid,hdij->nhij", x, table.expand(heads, -1, -1, -1))
        return total

    logits = torch.einsum("nhid,nhjd->nhij", q, k)
    if layer.rpe_k is not None:
        logits = logits + term(layer.rpe_k, q, "k")
    if layer.rpe_q is not None:
        logits = logits + term(layer.rpe_q, k * s, "q").transpose(-1, -2)
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    attn = logits.softmax(-1)
    if keep is not None:
        attn = attn * keep / (1 - layer.dropout)
    out = torch.einsum("nhij,nhjd->nhid", attn, v)
    if layer.rpe_v is not None:
        out = out + term(layer.rpe_v, attn, "v")
    out = out.permute(2, 0, 1, 3).reshape(length, batch, embed_dim)
    return layer.out_proj(out), attn.mean(1)


CONFIGS = [f"rpe-{r}-{m}-{mode}-{sh}-{on}"
           for (r, m), mode, sh, on in itertools.product(
               [(1.9, "product"), (2.0, "euc"), (1.5, "quant"), (2.5, "cross")],
               ["bias", "ctx"], ["0", "1"], ["q", "k", "qk", "kv", "qkv"])
           if not (mode == "bias" and "v" in on)]


@pytest.mark.parametrize("setting", CONFIGS)
def test_rpe_attention_matches_slow_implementation(setting):
    torch.manual_seed(hash(setting) % 1000)
    layer = RPEMultiheadAttention(24, 3, rpe_config=parse_rpe_string(setting)).eval()
    with torch.no_grad():  # tables start at zero: make every term count
        for name, p in layer.named_parameters():
            if "lookup_table" in name:
                p.normal_()
    hw = (3, 5)
    q, v, mask = _random_inputs(15, 2, 24, seed=1)
    out, weights = layer(q, q, v, key_padding_mask=mask, hw=hw)
    slow_out, slow_weights = _slow_rpe_attention(layer, q, q, v, hw, mask)
    torch.testing.assert_close(out, slow_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights, slow_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting", ["rpe-1.9-product-ctx-0-qkv", "rpe-2.5-cross-ctx-1-kv",
                                     "rpe-2.0-euc-ctx-1-v", "rpe-1.5-quant-bias-0-qk"])
def test_rpe_attention_in_training_mode_with_dropout_matches_slow_implementation(setting, monkeypatch):
    # one dropout mask, drawn here, shared by the layer (through F.dropout) and the slow version:
    # the v-encoding must come from the dropped-out weights, values and gradients alike
    torch.manual_seed(7)
    layer = RPEMultiheadAttention(24, 3, dropout=0.5, rpe_config=parse_rpe_string(setting)).train()
    layer.use_fused_kernels = False  # the plain path (the compiled one: tests/test_fused_attention.py)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lookup_table" in name:
                p.normal_()
    q, v, mask = _random_inputs(15, 2, 24, seed=5)
    keep = torch.rand(2, 3, 15, 15, generator=torch.Generator().manual_seed(6)) > 0.5
    calls = []

    def shared_dropout(x, p=0.5, training=True, inplace=False):
        calls.append((tuple(x.shape), p, training))
        return x * keep / (1 - p) if training else x

    monkeypatch.setattr(torch.nn.functional, "dropout", shared_dropout)
    out, weights = layer(q, q, v, key_padding_mask=mask, hw=(3, 5))
    assert calls == [((2, 3, 15, 15), 0.5, True)]
    slow_out, slow_weights = _slow_rpe_attention(layer, q, q, v, (3, 5), mask, keep=keep)
    torch.testing.assert_close(out, slow_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights, slow_weights, rtol=1e-5, atol=1e-6)
    params = [p for _, p in layer.named_parameters()]
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, 24)).sum(), params)
    slow_grads = torch.autograd.grad((slow_out * torch.linspace(-1, 1, 24)).sum(), params,
                                     allow_unused=True)
    for (name, _), g, slow_g in zip(layer.named_parameters(), grads, slow_grads):
        torch.testing.assert_close(g, slow_g, rtol=1e-4, atol=1e-5, msg=name)


def test_skip_token_config_matches_slow_implementation():
    cfg = get_rpe_config(ratio=1.9, method="product", mode="ctx", shared_head=False, skip=1,
                         rpe_on="qkv")
    layer = RPEMultiheadAttention(16, 2, rpe_config=cfg).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lookup_table" in name:
                p.normal_()
    q, v, _ = _random_inputs(1 + 4 * 3, 2, 16, seed=3)
    out, _ = layer(q, q, v, hw=(4, 3))
    slow_out, _ = _slow_rpe_attention(layer, q, q, v, (4, 3))
    torch.testing.assert_close(out, slow_out, rtol=1e-5, atol=1e-5)


def test_map_size_errors():
    layer = RPEMultiheadAttention(16, 2, rpe_config=parse_rpe_string("rpe-2.0-product-ctx-1-k"))
    q, v, _ = _random_inputs(12, 1, 16)
    with pytest.raises(ValueError, match="3x5 map"):
        layer(q, q, v, hw=(3, 5))
    with pytest.raises(ValueError, match="pass hw"):
        layer(q, q, v)
    q, v, _ = _random_inputs(16, 1, 16)
    assert layer(q, q, v)[0].shape == q.shape  # a square map needs no hw


def test_rpe_tables_receive_gradients_in_double():
    cfg = parse_rpe_string("rpe-1.9-product-ctx-0-qkv")
    layer = RPEMultiheadAttention(8, 2, rpe_config=cfg).double()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lookup_table" in name:
                p.normal_()
    x = torch.randn(6, 1, 8, dtype=torch.float64, requires_grad=True)
    tables = [p for n, p in layer.named_parameters() if "lookup_table" in n]

    def f(x, *t):
        return layer(x, x, x, hw=(2, 3))[0]

    assert torch.autograd.gradcheck(f, (x, *tables))


def test_bias_tables_broadcast_over_batch_and_heads():
    cfg = parse_rpe_string("rpe-2.0-euc-bias-1-k")
    layer = RPEMultiheadAttention(16, 4, rpe_config=cfg)
    x = torch.randn(2, 4, 6, 4)
    assert layer.rpe_k(x, 2, 3).shape == (1, 1, 6, 6)
    cfg = parse_rpe_string("rpe-2.0-euc-bias-0-k")
    layer = RPEMultiheadAttention(16, 4, rpe_config=cfg)
    assert layer.rpe_k(x, 2, 3).shape == (1, 4, 6, 6)
