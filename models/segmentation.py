"""DETR's segmentation: a mask per object query on top of a (possibly frozen) detector. Each query
attends over the encoder memory (`MHAttentionMap`); those maps and the projected C5 go through an
FPN-like convolution stack (`MaskHeadSmallConv`, adding C4, C3, C2) to stride 4."""
import io
from typing import Dict, List, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from util.misc import NestedTensor, nested_tensor_from_tensor_list
from util.panoptic import id_to_rgb, rgb_to_id


class DETRsegm(nn.Module):
    """A DETR detector (`detr`) plus a mask head; `freeze_detr` fixes the detector's weights."""

    def __init__(self, detr, freeze_detr=False):
        super().__init__()
        self.detr = detr
        if freeze_detr:
            self.detr.requires_grad_(False)
        hidden_dim, nheads = detr.transformer.d_model, detr.transformer.nhead
        c5 = detr.backbone.num_channels
        self.bbox_attention = MHAttentionMap(hidden_dim, hidden_dim, nheads, dropout=0.0)
        # C4, C3, C2 of a ResNet have 1/2, 1/4, 1/8 of C5's channels
        self.mask_head = MaskHeadSmallConv(hidden_dim + nheads, [c5 // 2, c5 // 4, c5 // 8], hidden_dim)

    def forward(self, samples: Union[NestedTensor, Tensor, List[Tensor]]
                ) -> Dict[str, Union[Tensor, List[Dict[str, Tensor]]]]:
        """The detector's outputs plus 'pred_masks' (B, Q, H/4, W/4), mask logits of every query;
        samples as for DETR. The backbone must return its four stages (C2..C5)."""
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        features, pos = self.detr.backbone(samples)
        if len(features) != 4:
            raise ValueError("DETRsegm needs the backbone's four stages (C2..C5): build the "
                             "backbone with return_interm_layers (--masks)")
        src, mask = features[-1].decompose()
        if mask is None:
            raise ValueError("DETRsegm needs the padding mask of the NestedTensor")
        src_proj = self.detr.input_proj(src)
        hs, memory = self.detr.transformer(src_proj, mask, self.detr.query_embed.weight, pos[-1])
        out = self.detr.predictions(hs)
        # the masks come from the last decoder layer only
        bbox_mask = self.bbox_attention(hs[-1], memory, mask)
        seg_masks = self.mask_head(src_proj, bbox_mask,
                                   [features[2].tensors, features[1].tensors, features[0].tensors])
        out["pred_masks"] = seg_masks.view(src.shape[0], hs.shape[2], seg_masks.shape[-2],
                                           seg_masks.shape[-1])
        return out


def _repeat_per_query(x: Tensor, num_queries: int) -> Tensor:
    """(B, C, H, W) -> (B * num_queries, C, H, W), each image's map once per query."""
    return x.unsqueeze(1).repeat(1, num_queries, 1, 1, 1).flatten(0, 1)


class MaskHeadSmallConv(nn.Module):
    """Mask logits at stride 4 from the C5 projection and the per-query attention maps: dim =
    hidden + heads input channels; fpn_dims = channels of C4, C3, C2; context_dim = hidden."""

    def __init__(self, dim, fpn_dims, context_dim):
        super().__init__()
        widths = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        if any(w < 8 or w % 8 for w in widths):
            raise ValueError(f"the mask head's GroupNorm (8 groups) needs hidden_dim + nheads and "
                             f"hidden_dim / 2, / 4, / 8, / 16 divisible by 8 (got widths {widths}): "
                             f"use --hidden_dim a multiple of 128 and --nheads a multiple of 8")
        # lay1 (dim -> dim), lay2 (dim -> hidden / 2) ... lay5 (-> hidden / 16), each with gn{i}
        for i, (width_in, width) in enumerate(zip([dim] + widths[:-1], widths), 1):
            setattr(self, f"lay{i}", nn.Conv2d(width_in, width, 3, padding=1))
            setattr(self, f"gn{i}", nn.GroupNorm(8, width))
        self.out_lay = nn.Conv2d(widths[4], 1, 3, padding=1)
        for i in range(1, 4):  # adapter{i}: C4, C3, C2 to the width of lay{i + 1}
            setattr(self, f"adapter{i}", nn.Conv2d(fpn_dims[i - 1], widths[i], 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, bbox_mask: Tensor, fpns: List[Tensor]) -> Tensor:
        """x (B, hidden, h, w), bbox_mask (B, Q, heads, h, w), fpns [C4, C3, C2].

        Returns (B * Q, 1, 8h, 8w) mask logits (the size of C2).
        """
        num_queries = bbox_mask.shape[1]
        x = torch.cat([_repeat_per_query(x, num_queries), bbox_mask.flatten(0, 1)], 1)
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        x = self._merge(x, self.adapter1(fpns[0]), num_queries)
        x = F.relu(self.gn3(self.lay3(x)))
        x = self._merge(x, self.adapter2(fpns[1]), num_queries)
        x = F.relu(self.gn4(self.lay4(x)))
        x = self._merge(x, self.adapter3(fpns[2]), num_queries)
        x = F.relu(self.gn5(self.lay5(x)))
        return self.out_lay(x)

    @staticmethod
    def _merge(x: Tensor, lateral: Tensor, num_queries: int) -> Tensor:
        """The running map upsampled (nearest) to a backbone stage's size, plus that stage."""
        if lateral.shape[0] != x.shape[0]:
            lateral = _repeat_per_query(lateral, num_queries)
        return lateral + F.interpolate(x, size=lateral.shape[-2:], mode="nearest")


class MHAttentionMap(nn.Module):
    """Attention weights of each query over an (h, w) map, per head; no values are mixed."""

    def __init__(self, query_dim, hidden_dim, num_heads, dropout=0.0, bias=True):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.dropout = nn.Dropout(dropout)
        self.q_linear = nn.Linear(query_dim, hidden_dim, bias=bias)
        self.k_linear = nn.Linear(query_dim, hidden_dim, bias=bias)
        for linear in (self.q_linear, self.k_linear):
            nn.init.xavier_uniform_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        self.normalize_fact = float(hidden_dim / num_heads) ** -0.5

    def forward(self, q: Tensor, k: Tensor, mask: Tensor) -> Tensor:
        """q (B, Q, query_dim), k (B, query_dim, h, w), mask (B, h, w) True on padding ->
        (B, Q, heads, h, w)."""
        q = self.q_linear(q)
        # k_linear applied at every position of the map, as a 1x1 convolution
        k = F.conv2d(k, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
        head_dim = self.hidden_dim // self.num_heads
        qh = q.view(q.shape[0], q.shape[1], self.num_heads, head_dim)
        kh = k.view(k.shape[0], self.num_heads, head_dim, k.shape[-2], k.shape[-1])
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.normalize_fact, kh)
        weights = weights.masked_fill(mask[:, None, None], float("-inf"))
        # a distribution over the h * w positions for each head of each query
        weights = F.softmax(weights.flatten(3), dim=-1).view(weights.shape)
        return self.dropout(weights)


# Losses of the matched queries' mask logits and 0/1 targets, flattened to (N, pixels)
def dice_loss(inputs: Tensor, targets: Tensor, num_boxes: float) -> Tensor:
    """sum over masks of 1 - (2 sum(p t) + 1) / (sum p + sum t + 1), p = sigmoid(inputs); / num_boxes."""
    prob = inputs.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (prob * targets).sum(1) + 1
    denominator = prob.sum(1) + targets.sum(1) + 1
    return (1 - numerator / denominator).sum() / num_boxes


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """RetinaNet's focal loss per pixel, averaged over pixels, summed over masks; / num_boxes
    (alpha < 0: no class balancing)."""
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(1).mean(1).sum() / num_boxes


class PostProcessSegm(nn.Module):
    """Adds 'masks' (Q, 1, H, W) uint8, in original image pixels, to the box post-processor's results."""

    def __init__(self, threshold=0.5):
        super().__init__()
        self.threshold = threshold

    @torch.no_grad()
    def forward(self, results, outputs, orig_target_sizes, max_target_sizes):
        """orig_target_sizes: (B, 2) original (h, w); max_target_sizes: (B, 2) processed (h, w)."""
        if len(orig_target_sizes) != len(max_target_sizes) or len(results) != len(max_target_sizes):
            raise ValueError("results, orig_target_sizes and max_target_sizes need one entry per image")
        max_h, max_w = max_target_sizes.max(0)[0].tolist()
        masks = F.interpolate(outputs["pred_masks"], size=(max_h, max_w), mode="bilinear",
                              align_corners=False)
        masks = (masks.sigmoid() > self.threshold).cpu()
        for result, mask, (h, w), orig in zip(results, masks, max_target_sizes.tolist(),
                                              orig_target_sizes):
            cropped = mask[:, :h, :w].unsqueeze(1).float()
            result["masks"] = F.interpolate(cropped, size=tuple(orig.tolist()), mode="nearest").byte()
        return results


class PostProcessPanoptic(nn.Module):
    """Model outputs -> COCO panoptic predictions: {'png_string', 'segments_info'} per image.
    is_thing_map: {category id: True for things} (others are stuff); queries whose best class
    (not no-object) is less likely than `threshold` are dropped."""

    def __init__(self, is_thing_map, threshold=0.85):
        super().__init__()
        self.is_thing_map = dict(is_thing_map)
        self.threshold = threshold

    def _is_thing(self, label):
        return bool(self.is_thing_map.get(label, False))

    @torch.no_grad()
    def forward(self, outputs, processed_sizes, target_sizes=None):
        """processed_sizes: per image its (h, w) in the batch before padding; target_sizes: the
        (h, w) of the id image (default: processed_sizes). As in DETR, the mask logits of the whole
        padded batch are resized to the processed size (uncropped)."""
        if target_sizes is None:
            target_sizes = processed_sizes
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        if not (len(logits) == len(masks) == len(processed_sizes) == len(target_sizes)):
            raise ValueError("outputs, processed_sizes and target_sizes need one entry per image")
        predictions = []
        for cur_logits, cur_masks, size, target_size in zip(logits, masks, processed_sizes, target_sizes):
            scores, labels = cur_logits.softmax(-1).max(-1)
            keep = labels.ne(logits.shape[-1] - 1) & (scores > self.threshold)
            predictions.append(self._one_image(labels[keep], cur_masks[keep], _as_size(size),
                                               _as_size(target_size)))
        return predictions

    def _one_image(self, classes, masks, size, target_size):
        h, w = size
        if len(masks):
            masks = F.interpolate(masks[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        masks = masks.reshape(len(masks), h * w)
        # queries predicting the same stuff class become one segment, the first query's
        stuff_groups = {}
        for k, label in enumerate(classes.tolist()):
            if not self._is_thing(label):
                stuff_groups.setdefault(label, []).append(k)
        ids, area = self._assign(masks, size, target_size, list(stuff_groups.values()))
        if len(classes):
            # drop tiny segments and assign again until none is left (no merging then, as in DETR)
            while True:
                small = torch.as_tensor([a <= 4 for a in area], dtype=torch.bool)
                if not small.any():
                    break
                classes, masks = classes[~small], masks[~small]
                ids, area = self._assign(masks, size, target_size, [])
        segments_info = [{"id": i, "isthing": self._is_thing(c), "category_id": c, "area": a}
                         for i, (c, a) in enumerate(zip(classes.tolist(), area))]
        with io.BytesIO() as buf:
            Image.fromarray(id_to_rgb(ids)).save(buf, format="PNG")
            return {"png_string": buf.getvalue(), "segments_info": segments_info}

    @staticmethod
    def _assign(masks, size, target_size, groups):
        """Id image (target size) of the most likely query per pixel, and the area of each query."""
        h, w = size
        if masks.shape[0] == 0:
            ids = torch.zeros((h, w), dtype=torch.int64)
        else:
            ids = masks.transpose(0, 1).softmax(-1).argmax(-1).view(h, w).cpu()
        for group in groups:
            for k in group[1:]:
                ids[ids == k] = group[0]
        final_h, final_w = target_size
        # resized as an RGB image, so that the nearest-neighbour rule is PIL's
        image = Image.fromarray(id_to_rgb(ids.numpy())).resize((final_w, final_h), Image.Resampling.NEAREST)
        ids = rgb_to_id(np.asarray(image))
        area = [int((ids == i).sum()) for i in range(masks.shape[0])]
        return ids, area


def _as_size(size):
    return tuple(int(v) for v in (size.tolist() if isinstance(size, Tensor) else size))
