"""Fused attention weights on the CPU (compiled extension only).

attention_weights(q, k, lookup, index, extra, key_bias, dropout_p) computes

    logits = q @ k^T + extra + lookup[..., index] + key_bias[:, None, None, :]
    weights = dropout(softmax(logits, -1), dropout_p)

with one pass of the compiled kernel over the logits (lookup, mask, softmax and
dropout together) where the plain PyTorch path makes a fresh (B, H, L, S)
tensor for every step, and a backward that also sums the lookup's gradient
into its buckets in that pass. The dropout keep-mask is Bernoulli(1 - p) per
weight with kept weights scaled by 1 / (1 - p), as torch.nn.functional.dropout;
it is drawn by a counter-based generator seeded from PyTorch's default
generator, so torch.manual_seed makes it repeatable (the draws differ from
torch.bernoulli's). It is kept as one bit per weight for the backward.
"""
from typing import Optional

import torch
from torch import Tensor

from . import EXTENSION_AVAILABLE, _has_kernel

__all__ = ["attention_weights", "fused_attention_available"]

_FUSED = EXTENSION_AVAILABLE and _has_kernel("attention_softmax", "CPU")


def fused_attention_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True when attention_weights runs for tensors of this device and dtype."""
    return _FUSED and device.type == "cpu" and dtype in (torch.float32, torch.float64)


def _draw_seed() -> int:
    return int(torch.empty((), dtype=torch.int64).random_())


class _AttentionWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, lookup, index, extra, key_bias, dropout_p):
        logits = torch.matmul(q, k.transpose(-2, -1))
        if extra is not None:
            logits.add_(extra)
        seed = _draw_seed() if dropout_p > 0 else 0
        weights, keep = torch.ops.rpe_ops.attention_softmax(logits, lookup, index, key_bias,
                                                            dropout_p, seed)
        ctx.save_for_backward(q, k, logits, keep, index)
        ctx.dropout_p = dropout_p
        ctx.lookup_shape = None if lookup is None else lookup.shape
        ctx.extra_shape = None if extra is None else extra.shape
        return weights

    @staticmethod
    def backward(ctx, grad):
        q, k, probs, keep, index = ctx.saved_tensors
        need_q, need_k, need_lookup, _, need_extra, _, _ = ctx.needs_input_grad
        num_buckets = ctx.lookup_shape[-1] if need_lookup else 0
        grad_logits, grad_lookup = torch.ops.rpe_ops.attention_softmax_backward(
            grad, probs, keep, ctx.dropout_p, index if need_lookup else None, num_buckets)
        grad_q = grad_logits @ k if need_q else None
        grad_k = grad_logits.transpose(-2, -1) @ q if need_k else None
        grad_lookup = grad_lookup.sum_to_size(ctx.lookup_shape) if need_lookup else None
        grad_extra = grad_logits.sum_to_size(ctx.extra_shape) if need_extra else None
        return grad_q, grad_k, grad_lookup, None, grad_extra, None, None


def attention_weights(q: Tensor, k: Tensor, lookup: Optional[Tensor] = None,
                      index: Optional[Tensor] = None, extra: Optional[Tensor] = None,
                      key_bias: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """Attention weights (B, H, L, S) of q (B, H, L, D) and k (B, H, S, D).

    lookup (B or 1, H or 1, L, num_buckets) with index (L, S): the contextual iRPE term
    lookup[b, h, i, index[i, j]] (gradient to lookup, not to index). extra: any further additive
    term broadcastable to (B, H, L, S) (other encodings, an attention mask). key_bias (B, S): a float
    term per key (0, or -inf for padding). dropout_p: dropout on the weights (0 in eval mode).
    CPU, float32 / float64 (see fused_attention_available).
    """
    if extra is not None:
        extra = extra.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if key_bias is not None:
        key_bias = key_bias.to(q.dtype)
    return _AttentionWeights.apply(q, k, lookup, index, extra, key_bias, float(dropout_p))
