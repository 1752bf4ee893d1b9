"""Position encodings of the feature map: DETR's fixed sine encoding and a learned one."""
import math

import torch
from torch import Tensor, nn

from util.misc import NestedTensor


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding (B, 2F, H, W) of the cumulative counts of unpadded pixels along rows
    and columns (normalised: an image spans [0, scale]), F row features then F column features,
    each interleaving sin (even) and cos (odd)."""

    def __init__(self, num_pos_feats=64, temperature=10000, normalize=False, scale=None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        mask = tensor_list.mask
        if mask is None:
            raise ValueError("PositionEmbeddingSine needs the padding mask of the NestedTensor")
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=not_mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: 50 row and 50 column embeddings, column features first."""

    def __init__(self, num_pos_feats=256):
        super().__init__()
        self.row_embed = nn.Embedding(50, num_pos_feats)
        self.col_embed = nn.Embedding(50, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        x = tensor_list.tensors
        height, width = x.shape[-2:]
        if height > self.row_embed.num_embeddings or width > self.col_embed.num_embeddings:
            raise ValueError(f"learned position embedding covers at most 50x50 positions, "
                             f"the feature map is {height}x{width}")
        cols = self.col_embed(torch.arange(width, device=x.device))
        rows = self.row_embed(torch.arange(height, device=x.device))
        pos = torch.cat([cols.unsqueeze(0).expand(height, -1, -1),
                         rows.unsqueeze(1).expand(-1, width, -1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).expand(x.shape[0], -1, -1, -1)


def build_position_encoding(args):
    num_pos_feats = args.hidden_dim // 2
    if args.position_embedding in ("v2", "sine"):
        return PositionEmbeddingSine(num_pos_feats, normalize=True)
    if args.position_embedding in ("v3", "learned"):
        return PositionEmbeddingLearned(num_pos_feats)
    raise ValueError(f"unknown --position_embedding {args.position_embedding!r}; use sine or learned")
