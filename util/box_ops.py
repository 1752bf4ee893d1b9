"""Box conversions and overlaps under DETR's names, computed by torchvision.ops."""
from torchvision import ops


def box_cxcywh_to_xyxy(boxes):
    return ops.box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes):
    return ops.box_convert(boxes, "xyxy", "cxcywh")


def generalized_box_iou(boxes1, boxes2):
    """Pairwise generalized IoU (Rezatofighi et al., 2019) of (N, 4) and (M, 4) xyxy boxes."""
    # Inverted boxes give wrong results silently; catch them where they are made.
    if (boxes1[:, 2:] < boxes1[:, :2]).any() or (boxes2[:, 2:] < boxes2[:, :2]).any():
        raise ValueError("generalized_box_iou expects xyxy boxes with x1 >= x0 and y1 >= y0")
    return ops.generalized_box_iou(boxes1, boxes2)
