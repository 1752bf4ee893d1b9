"""Multi-head attention with iRPE, written out step by step.

Shapes: L target length, S source length, N batch, E embedding, H heads, D = E / H head size.
"""
import torch
import torch.nn.functional as F


def _split_heads(x, num_heads):
    """(L, N, E) -> (N, H, L, D)."""
    length, batch, embed_dim = x.shape
    return x.view(length, batch, num_heads, embed_dim // num_heads).permute(1, 2, 0, 3)


def _as_additive_mask(mask, dtype):
    """A bool mask (True = not allowed) becomes -inf/0; a float mask is added as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def rpe_multi_head_attention_forward(query, key, value, num_heads, in_proj_weight, in_proj_bias,
                                     out_proj_weight, out_proj_bias, dropout_p=0.0, training=True,
                                     key_padding_mask=None, need_weights=True, attn_mask=None,
                                     average_attn_weights=True, rpe_q=None, rpe_k=None, rpe_v=None,
                                     hw=None):
    """Attention of `query` (L, N, E) over `key` (S, N, E) / `value` (S, N, E) with iRPE.

    key_padding_mask (N, S): True (or -inf) on keys to ignore. attn_mask (L, S) or (N * H, L, S):
    bool (True = not allowed) or float (added to the logits). rpe_q, rpe_k, rpe_v: iRPE modules or
    None; hw = (h, w) of the token map they encode. Returns (output (L, N, E), weights) where
    weights are (N, L, S) averaged over heads, (N, H, L, S) if not average_attn_weights, or None.
    The order of the terms is the one the published iRPE-DETR checkpoints were trained with.
    """
    length, batch, embed_dim = query.shape
    head_dim = embed_dim // num_heads
    scaling = head_dim ** -0.5
    height, width = hw if hw is not None else (None, None)

    # 1. projections; q is scaled before anything uses it
    w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q = _split_heads(F.linear(query, w_q, b_q) * scaling, num_heads)
    k = _split_heads(F.linear(key, w_k, b_k), num_heads)
    v = _split_heads(F.linear(value, w_v, b_v), num_heads)

    # 2. logits with the relative position terms: on k from the (scaled) queries, on q from the
    #    (scaled) keys, transposed to (query, key) order
    logits = q @ k.transpose(-2, -1)
    if rpe_k is not None:
        logits = logits + rpe_k(q, height, width)
    if rpe_q is not None:
        logits = logits + rpe_q(k * scaling, height, width).transpose(-2, -1)

    # 3. masks
    if attn_mask is not None:
        mask = _as_additive_mask(attn_mask, logits.dtype)
        if mask.dim() == 3:  # (N * H, L, S)
            mask = mask.view(batch, num_heads, *mask.shape[-2:])
        logits = logits + mask
    if key_padding_mask is not None:
        logits = logits + _as_additive_mask(key_padding_mask, logits.dtype)[:, None, None, :]

    # 4. weights
    attn = F.dropout(logits.softmax(dim=-1), p=dropout_p, training=training)

    # 5. output, with the relative position term on v from the same (dropped-out) weights
    out = attn @ v
    if rpe_v is not None:
        out = out + rpe_v(attn, height, width)
    out = out.permute(2, 0, 1, 3).reshape(length, batch, embed_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias)

    if not need_weights:
        return out, None
    return out, attn.mean(dim=1) if average_attn_weights else attn
