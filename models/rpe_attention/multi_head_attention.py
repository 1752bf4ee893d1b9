"""RPEMultiheadAttention: nn.MultiheadAttention with iRPE, taking the token map size `hw`."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from rpe_ops.attention import attention_weights, fused_attention_available

from . import flex_attention
from .irpe import build_rpe
from .rpe_attention_function import apply_masks, as_additive_mask, merge_heads, split_heads


class RPEMultiheadAttention(nn.Module):
    """A drop-in for nn.MultiheadAttention (same parameter names) plus `rpe_q`, `rpe_k`, `rpe_v`
    built from `rpe_config` (irpe.get_rpe_config; None: plain attention). forward takes `hw=(h, w)`,
    the map the tokens were flattened from (row-major), needed unless the map is square.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, batch_first=False,
                 rpe_config=None):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.rpe_q, self.rpe_k, self.rpe_v = build_rpe(rpe_config, self.head_dim, num_heads)
        self.use_fused_kernels = True  # _fused_weights (CPU), _fast_output (CUDA)
        self._reset_parameters()

    def _reset_parameters(self):
        # as nn.MultiheadAttention; the iRPE tables keep their zero start
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def _fused_applies(self, q: Tensor) -> bool:
        applies = self.use_fused_kernels and fused_attention_available(q.device, q.dtype)
        if not torch.jit.is_scripting():
            applies = applies and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
        return applies

    def _plus_rpe_q(self, bias: Optional[Tensor], k: Tensor, height: Optional[int],
                    width: Optional[int], scaling: float) -> Optional[Tensor]:
        """bias plus the iRPE term on q (from the scaled keys, transposed to (query, key) order)."""
        if self.rpe_q is None:
            return bias
        term = self.rpe_q(k * scaling, height, width).transpose(-2, -1)
        return term if bias is None else bias + term

    def _masked(self, bias: Optional[Tensor], q: Tensor, k: Tensor, attn_mask: Optional[Tensor],
                key_padding_mask: Optional[Tensor]) -> Tensor:
        """bias (or zeros) expanded to (N, H, L, S), as apply_masks wants it, plus the masks."""
        shape = [q.shape[0], q.shape[1], q.shape[2], k.shape[2]]
        bias = q.new_zeros(shape) if bias is None else bias.expand(shape)
        return apply_masks(bias, attn_mask, key_padding_mask)

    def _fused_weights(self, q: Tensor, k: Tensor, attn_mask: Optional[Tensor],
                       key_padding_mask: Optional[Tensor], height: Optional[int],
                       width: Optional[int], scaling: float) -> Tensor:
        """Steps 2 to 4 below in the compiled kernel of rpe_ops.attention: the same weights up to
        float rounding (the dropout draws differ), fewer passes over the (N, H, L, S) logits.
        Scripted models call it too, so that they give the eager model's numbers bit for bit."""
        lookup: Optional[Tensor] = None
        index: Optional[Tensor] = None
        extra: Optional[Tensor] = None
        if self.rpe_k is not None:
            lookup, index, extra = self.rpe_k.fused_terms(q, height, width)
        extra = self._plus_rpe_q(extra, k, height, width, scaling)
        if attn_mask is not None:
            extra = self._masked(extra, q, k, attn_mask, None)
        key_bias: Optional[Tensor] = None
        if key_padding_mask is not None:
            key_bias = as_additive_mask(key_padding_mask, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        return attention_weights(q, k, lookup, index, extra, key_bias, dropout_p)

    @torch.jit.unused
    def _sdpa_applies(self, q: Tensor, need_weights: bool) -> bool:
        return (self.use_fused_kernels and q.is_cuda and not need_weights and self.rpe_v is None
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing())

    def _logit_bias(self, q: Tensor, k: Tensor, attn_mask: Optional[Tensor],
                    key_padding_mask: Optional[Tensor], height: Optional[int],
                    width: Optional[int], scaling: float) -> Optional[Tensor]:
        """What steps 2 and 3 below add to q @ k^T, as one tensor of q's dtype, (N, H, L, S) or
        broadcastable to it (-inf on keys not allowed); None if there is nothing to add."""
        bias: Optional[Tensor] = None
        if self.rpe_k is not None:
            bias = self.rpe_k(q, height, width)
        bias = self._plus_rpe_q(bias, k, height, width, scaling)
        if attn_mask is None and key_padding_mask is None:
            return bias if bias is None else bias.to(q.dtype)
        return self._masked(bias, q, k, attn_mask, key_padding_mask).to(q.dtype)

    def _inference_sdpa_applies(self, q: Tensor, need_weights: bool) -> bool:
        """CPU inference (no gradient recorded, no dropout drawn), no weights asked for, no iRPE on
        v: there PyTorch's SDPA with the iRPE terms and masks as its additive mask is 1.5x faster
        than the fused kernel, as it never writes the (N, H, L, S) weights. Scripted code takes it
        alike, so that it keeps the eager numbers."""
        applies = (self.use_fused_kernels and q.device.type == "cpu" and not need_weights
                   and self.rpe_v is None and not torch.is_grad_enabled()
                   and (not self.training or self.dropout == 0.0))
        if not torch.jit.is_scripting():
            applies = applies and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
        return applies

    def _inference_bias(self, q: Tensor, k: Tensor, attn_mask: Optional[Tensor],
                        key_padding_mask: Optional[Tensor], height: Optional[int],
                        width: Optional[int], scaling: float) -> Optional[Tensor]:
        """_logit_bias without autograd: the padding mask is added in place into the iRPE term
        on k, a fresh (N, H, L, S) tensor, instead of into a copy of it."""
        if (self.rpe_k is None or self.rpe_q is not None or attn_mask is not None
                or key_padding_mask is None):
            return self._logit_bias(q, k, attn_mask, key_padding_mask, height, width, scaling)
        bias = self.rpe_k(q, height, width)
        full = [q.shape[0], q.shape[1], q.shape[2], k.shape[2]]
        if bias.dtype != q.dtype or not bias.is_contiguous() or list(bias.shape) != full:
            return self._masked(bias, q, k, None, key_padding_mask).to(q.dtype)
        return bias.add_(as_additive_mask(key_padding_mask, q.dtype)[:, None, None, :])

    @torch.jit.unused
    def _sdpa_output(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                     key_padding_mask: Optional[Tensor], height: Optional[int],
                     width: Optional[int], scaling: float) -> Tensor:
        """Steps 2 to 5 below (without rpe_v) in F.scaled_dot_product_attention: the plain path's
        output up to float rounding, without keeping the (N, H, L, S) weights. With a bias the
        memory-efficient kernel runs (flash takes no bias, cuDNN returns no bias gradient)."""
        bias = self._logit_bias(q, k, attn_mask, key_padding_mask, height, width, scaling)
        dropout_p = self.dropout if self.training else 0.0
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with sdpa_kernel(backends):
            # q carries the scaling already
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p,
                                                  scale=1.0)

    @torch.jit.unused
    def _fast_output(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                     key_padding_mask: Optional[Tensor], need_weights: bool, height: Optional[int],
                     width: Optional[int], scaling: float) -> Optional[Tensor]:
        """Steps 2 to 5 below in one kernel where one applies, else None: flex attention where
        flex_attention.flex_applies chooses it, else PyTorch's SDPA (see _sdpa_applies)."""
        if flex_attention.flex_applies(self, q, need_weights, attn_mask, key_padding_mask):
            return flex_attention.irpe_flex_attention(q, k, v, self.rpe_q, self.rpe_k,
                                                      key_padding_mask, height, width, scaling)
        if self._sdpa_applies(q, need_weights):
            return self._sdpa_output(q, k, v, attn_mask, key_padding_mask, height, width, scaling)
        return None

    def _output(self, out: Tensor) -> Tensor:
        """(N, H, L, D) -> the layer's output, shaped like its query."""
        out = self.out_proj(merge_heads(out))
        if self.batch_first:
            out = out.transpose(0, 1)
        return out

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, hw: Optional[Tuple[int, int]] = None,
                average_attn_weights: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        """As nn.MultiheadAttention's forward (query (L, N, E), key and value (S, N, E)), plus hw,
        the (h, w) of the token map. The order of the terms is the one the published iRPE-DETR
        checkpoints were trained with.
        """
        if self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        scaling = self.head_dim ** -0.5
        height: Optional[int] = None
        width: Optional[int] = None
        if hw is not None:
            height, width = hw[0], hw[1]

        # 1. projections; q is scaled before anything uses it
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q: Optional[Tensor] = None
        b_k: Optional[Tensor] = None
        b_v: Optional[Tensor] = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = split_heads(F.linear(query, w_q, b_q) * scaling, self.num_heads)
        k = split_heads(F.linear(key, w_k, b_k), self.num_heads)
        v = split_heads(F.linear(value, w_v, b_v), self.num_heads)

        if not torch.jit.is_scripting():
            fast_out = self._fast_output(q, k, v, attn_mask, key_padding_mask, need_weights, height,
                                         width, scaling)
            if fast_out is not None:
                return self._output(fast_out), None
        if self._inference_sdpa_applies(q, need_weights):
            bias = self._inference_bias(q, k, attn_mask, key_padding_mask, height, width, scaling)
            # q carries the scaling already
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
            return self._output(out), None
        if self._fused_applies(q):
            attn = self._fused_weights(q, k, attn_mask, key_padding_mask, height, width, scaling)
        else:
            # 2. logits with the relative position terms: on k from the (scaled) queries, on q
            #    from the (scaled) keys, transposed to (query, key) order
            logits = q @ k.transpose(-2, -1)
            if self.rpe_k is not None:
                logits = logits + self.rpe_k(q, height, width)
            if self.rpe_q is not None:
                logits = logits + self.rpe_q(k * scaling, height, width).transpose(-2, -1)

            # 3. masks
            logits = apply_masks(logits, attn_mask, key_padding_mask)

            # 4. weights
            attn = F.dropout(logits.softmax(dim=-1), p=self.dropout, training=self.training)

        # 5. output, with the relative position term on v from the same (dropped-out) weights
        out = attn @ v
        if self.rpe_v is not None:
            out = out + self.rpe_v(attn, height, width)
        out = self._output(out)

        if not need_weights:
            return out, None
        return out, attn.mean(dim=1) if average_attn_weights else attn
