"""RPEMultiheadAttention: nn.MultiheadAttention with iRPE, taking the token map size `hw`."""
import torch
from torch import nn

from .irpe import build_rpe
from .rpe_attention_function import rpe_multi_head_attention_forward


class RPEMultiheadAttention(nn.Module):
    """Multi-head attention whose logits / outputs carry image relative position encodings.

    A drop-in for nn.MultiheadAttention (same parameter names: `in_proj_weight`, `in_proj_bias`,
    `out_proj`), plus `rpe_q`, `rpe_k`, `rpe_v` built from `rpe_config` (see irpe.get_rpe_config;
    None gives plain attention). forward takes `hw=(h, w)`, the map the tokens were flattened from
    (row-major), which the encodings need unless the map is square.
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
        self._reset_parameters()

    def _reset_parameters(self):
        # as nn.MultiheadAttention; the iRPE tables keep their zero start
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                hw=None, *, average_attn_weights=True):
        """query (L, N, E), key and value (S, N, E) ((N, L, E) with batch_first).

        Returns (output like query, weights (N, L, S) averaged over heads, or None).
        """
        if self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        out, weights = rpe_multi_head_attention_forward(
            query, key, value, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.out_proj.weight, self.out_proj.bias, dropout_p=self.dropout,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights,
            rpe_q=self.rpe_q, rpe_k=self.rpe_k, rpe_v=self.rpe_v, hw=hw)
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, weights
