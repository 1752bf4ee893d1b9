"""The tensor steps of RPEMultiheadAttention, as plain (TorchScript-compatible) functions.
Shapes: L target length, S source length, N batch, E embedding, H heads, D = E / H head size."""
from typing import Optional

import torch
from torch import Tensor


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(L, N, E) -> (N, H, L, D)."""
    length, batch, embed_dim = x.shape
    return x.view(length, batch, num_heads, embed_dim // num_heads).permute(1, 2, 0, 3)


def merge_heads(x: Tensor) -> Tensor:
    """(N, H, L, D) -> (L, N, E)."""
    batch, num_heads, length, head_dim = x.shape
    return x.permute(2, 0, 1, 3).reshape(length, batch, num_heads * head_dim)


def as_additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask (True = not allowed) becomes -inf/0; a float mask is added as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def apply_masks(logits: Tensor, attn_mask: Optional[Tensor],
                key_padding_mask: Optional[Tensor]) -> Tensor:
    """logits (N, H, L, S) plus attn_mask (L, S) or (N * H, L, S), then key_padding_mask (N, S)."""
    batch, num_heads = logits.shape[0], logits.shape[1]
    if attn_mask is not None:
        mask = as_additive_mask(attn_mask, logits.dtype)
        if mask.dim() == 3:  # (N * H, L, S)
            mask = mask.view(batch, num_heads, mask.shape[-2], mask.shape[-1])
        logits = logits + mask
    if key_padding_mask is not None:
        logits = logits + as_additive_mask(key_padding_mask, logits.dtype)[:, None, None, :]
    return logits
