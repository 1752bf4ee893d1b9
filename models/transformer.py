"""DETR's encoder-decoder transformer. Unlike torch.nn.Transformer, positional encodings are added
to queries and keys in every attention layer, the decoder returns the (normalised) output of every
layer, and the encoder self-attention carries iRPE over the h x w feature map."""
import copy
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rpe_attention import RPEMultiheadAttention, parse_rpe_string


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


class _FeedForwardLayer(nn.Module):
    """What the encoder and decoder layers share: the feed-forward block, and per sublayer a
    layer norm `norm{i}` and a dropout `dropout{i}`."""

    def _add_feedforward(self, d_model, dim_feedforward, dropout, activation, normalize_before,
                         sublayers):
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        for i in range(1, sublayers + 1):
            setattr(self, f"norm{i}", nn.LayerNorm(d_model))
        for i in range(1, sublayers + 1):
            setattr(self, f"dropout{i}", nn.Dropout(dropout))
        self.activation = _get_activation_fn(activation)
        self.normalize_before = normalize_before

    def _feedforward(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class TransformerEncoderLayer(_FeedForwardLayer):
    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False, rpe_config=None):
        super().__init__()
        self.self_attn = RPEMultiheadAttention(d_model, nhead, dropout=dropout, rpe_config=rpe_config)
        self._add_feedforward(d_model, dim_feedforward, dropout, activation, normalize_before, 2)

    def _attend(self, x: Tensor, src_mask: Optional[Tensor], src_key_padding_mask: Optional[Tensor],
                pos: Optional[Tensor], hw: Optional[Tuple[int, int]]) -> Tensor:
        q = k = _with_pos(x, pos)
        return self.self_attn(q, k, value=x, attn_mask=src_mask,
                              key_padding_mask=src_key_padding_mask, need_weights=False, hw=hw)[0]

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None,
                hw: Optional[Tuple[int, int]] = None) -> Tensor:
        if self.normalize_before:
            src = src + self.dropout1(self._attend(self.norm1(src), src_mask, src_key_padding_mask, pos, hw))
            return src + self.dropout2(self._feedforward(self.norm2(src)))
        src = self.norm1(src + self.dropout1(self._attend(src, src_mask, src_key_padding_mask, pos, hw)))
        return self.norm2(src + self.dropout2(self._feedforward(src)))


class TransformerDecoderLayer(_FeedForwardLayer):
    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self._add_feedforward(d_model, dim_feedforward, dropout, activation, normalize_before, 3)

    def _self_attend(self, x: Tensor, mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                     query_pos: Optional[Tensor]) -> Tensor:
        q = k = _with_pos(x, query_pos)
        return self.self_attn(q, k, value=x, attn_mask=mask, key_padding_mask=key_padding_mask,
                              need_weights=False)[0]

    def _cross_attend(self, x: Tensor, memory: Tensor, mask: Optional[Tensor],
                      key_padding_mask: Optional[Tensor], pos: Optional[Tensor],
                      query_pos: Optional[Tensor]) -> Tensor:
        return self.multihead_attn(query=_with_pos(x, query_pos), key=_with_pos(memory, pos),
                                   value=memory, attn_mask=mask, key_padding_mask=key_padding_mask,
                                   need_weights=False)[0]

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None,
                query_pos: Optional[Tensor] = None) -> Tensor:
        if self.normalize_before:
            tgt = tgt + self.dropout1(self._self_attend(self.norm1(tgt), tgt_mask,
                                                        tgt_key_padding_mask, query_pos))
            tgt = tgt + self.dropout2(self._cross_attend(self.norm2(tgt), memory, memory_mask,
                                                         memory_key_padding_mask, pos, query_pos))
            return tgt + self.dropout3(self._feedforward(self.norm3(tgt)))
        tgt = self.norm1(tgt + self.dropout1(self._self_attend(tgt, tgt_mask, tgt_key_padding_mask,
                                                               query_pos)))
        tgt = self.norm2(tgt + self.dropout2(self._cross_attend(tgt, memory, memory_mask,
                                                                memory_key_padding_mask, pos, query_pos)))
        return self.norm3(tgt + self.dropout3(self._feedforward(tgt)))


class TransformerEncoder(nn.Module):
    def __init__(self, encoder_layer, num_layers, norm=None):
        super().__init__()
        self.layers = _get_clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: Tensor, mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None,
                hw: Optional[Tuple[int, int]] = None) -> Tensor:
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                           pos=pos, hw=hw)
        return output if self.norm is None else self.norm(output)


class TransformerDecoder(nn.Module):
    def __init__(self, decoder_layer, num_layers, norm=None, return_intermediate=False):
        super().__init__()
        self.layers = _get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None,
                query_pos: Optional[Tensor] = None) -> Tensor:
        """Returns (num_layers, Q, B, C) if return_intermediate, else (1, Q, B, C); normalised."""
        output = tgt
        intermediate: List[Tensor] = []
        for layer in self.layers:
            output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                           tgt_key_padding_mask=tgt_key_padding_mask,
                           memory_key_padding_mask=memory_key_padding_mask, pos=pos,
                           query_pos=query_pos)
            if self.return_intermediate:
                intermediate.append(output if self.norm is None else self.norm(output))
        if self.return_intermediate:
            return torch.stack(intermediate)
        return (output if self.norm is None else self.norm(output)).unsqueeze(0)


class Transformer(nn.Module):
    """DETR's transformer. rpe_config: the encoder's iRPE, as an `--enc_rpe2d` string or an
    irpe.RPEConfigs; None or "" (the default): DETR's plain attention."""

    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, dropout=0.1, activation="relu", normalize_before=False,
                 return_intermediate_dec=False, rpe_config=None):
        super().__init__()
        if isinstance(rpe_config, str):
            rpe_config = parse_rpe_string(rpe_config)
        encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                normalize_before, rpe_config=rpe_config)
        encoder_norm = nn.LayerNorm(d_model) if normalize_before else None
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers, encoder_norm)
        decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                normalize_before)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, nn.LayerNorm(d_model),
                                          return_intermediate=return_intermediate_dec)
        self.d_model = d_model
        self.nhead = nhead
        self._reset_parameters()

    def _reset_parameters(self):
        # every matrix, the iRPE tables included, starts xavier-uniform
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor,
                pos_embed: Tensor) -> Tuple[Tensor, Tensor]:
        """src (B, C, H, W), mask (B, H, W) True on padding, query_embed (Q, C), pos_embed like src
        -> (decoder outputs (layers, B, Q, C), memory (B, C, H, W))."""
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_embed = query_embed.unsqueeze(1).repeat(1, bs, 1)
        mask = mask.flatten(1)
        tgt = torch.zeros_like(query_embed)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed, hw=(h, w))
        hs = self.decoder(tgt, memory, memory_key_padding_mask=mask, pos=pos_embed,
                          query_pos=query_embed)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).view(bs, c, h, w)


def _get_clones(module, n):
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def _get_activation_fn(activation):
    activations = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if activation not in activations:
        raise ValueError(f"activation should be relu, gelu or glu, not {activation!r}")
    return activations[activation]


def build_transformer(args):
    return Transformer(d_model=args.hidden_dim, dropout=args.dropout, nhead=args.nheads,
                       dim_feedforward=args.dim_feedforward, num_encoder_layers=args.enc_layers,
                       num_decoder_layers=args.dec_layers, normalize_before=args.pre_norm,
                       return_intermediate_dec=True,
                       rpe_config=parse_rpe_string(getattr(args, "enc_rpe2d", "")))
