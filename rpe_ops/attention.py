"""Fused attention weights on the CPU (compiled extension only).

attention_weights(q, k, lookup, index, extra, key_bias, dropout_p) computes

    logits = q @ k^T + extra + lookup[..., index] + key_bias[:, None, None, :]
    weights = dropout(softmax(logits, -1), dropout_p)

in one pass of the compiled kernel (torch.ops.rpe_ops.attention_weights, autograd in C++). Its
dropout draws come from a counter-based generator seeded from PyTorch's default one (repeatable
under torch.manual_seed, other draws than torch.bernoulli's). Without the extension the operator
is the plain PyTorch arithmetic (so that scripted code naming it compiles), unused by the layers.
"""
from typing import Optional

import torch
from torch import Tensor

from . import EXTENSION_AVAILABLE, _has_kernel, _lib

__all__ = ["attention_weights", "fused_attention_available"]

_FUSED = EXTENSION_AVAILABLE and _has_kernel("attention_weights", "CPU")

if not _FUSED:
    _lib.define("attention_weights(Tensor q, Tensor k, Tensor? lookup, Tensor? index, "
                "Tensor? extra, Tensor? key_bias, float dropout_p) -> Tensor")

    def _plain_attention_weights(q, k, lookup, index, extra, key_bias, dropout_p):
        logits = q @ k.transpose(-2, -1)
        if extra is not None:
            logits = logits + extra
        if lookup is not None:
            shape = (*logits.shape[:3], lookup.shape[-1])
            logits = logits + lookup.expand(shape).gather(-1, index.long().expand(logits.shape))
        if key_bias is not None:
            logits = logits + key_bias.to(q.dtype)[:, None, None, :]
        return torch.nn.functional.dropout(logits.softmax(-1), dropout_p)

    _lib.impl("attention_weights", _plain_attention_weights, "CompositeImplicitAutograd")


def fused_attention_available(device: torch.device, dtype: torch.dtype,
                              built: bool = _FUSED) -> bool:
    """True when attention_weights runs the compiled kernel for tensors of this device and dtype
    (`built`, a default argument, is a constant to TorchScript)."""
    return built and device.type == "cpu" and (dtype == torch.float32 or dtype == torch.float64)


def attention_weights(q: Tensor, k: Tensor, lookup: Optional[Tensor] = None,
                      index: Optional[Tensor] = None, extra: Optional[Tensor] = None,
                      key_bias: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """Attention weights (B, H, L, S) of q (B, H, L, D) and k (B, H, S, D): lookup (B or 1, H or
    1, L, num_buckets) with index (L, S) the contextual iRPE term; extra any further term
    broadcastable to (B, H, L, S); key_bias (B, S) a float term per key (0, or -inf for padding).
    """
    return torch.ops.rpe_ops.attention_weights(q, k, lookup, index, extra, key_bias, dropout_p)
