"""Box conversions and overlaps under DETR's names, computed by torchvision.ops."""
import torch
from torchvision import ops
from torchvision.ops import box_area  # noqa: F401  (DETR's name: area of (N, 4) xyxy boxes)


def box_cxcywh_to_xyxy(boxes):
    return ops.box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes):
    return ops.box_convert(boxes, "xyxy", "cxcywh")


def box_iou(boxes1, boxes2):
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes, as DETR returns it: (iou, union), (N, M)."""
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1, boxes2):
    """Pairwise generalized IoU (Rezatofighi et al., 2019) of (N, 4) and (M, 4) xyxy boxes."""
    # Inverted boxes give wrong results silently; catch them where they are made.
    if (boxes1[:, 2:] < boxes1[:, :2]).any() or (boxes2[:, 2:] < boxes2[:, :2]).any():
        raise ValueError("generalized_box_iou expects xyxy boxes with x1 >= x0 and y1 >= y0")
    return ops.generalized_box_iou(boxes1, boxes2)
