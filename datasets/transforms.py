"""Joint transforms of a (PIL image, target) pair; the target (or None) is prepare_target's dict.

Geometric steps work on PIL images and keep boxes, masks and 'size' in step; `Normalize` turns
the boxes into (cx, cy, w, h) / image size, as the DETR loss expects. Randomness comes from
Python's `random`, which PyTorch reseeds in every DataLoader worker.
"""
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from util.box_ops import box_xyxy_to_cxcywh
from util.misc import IMAGENET_MEAN, IMAGENET_STD

# Per-instance entries of a target: filtered together when boxes are removed.
INSTANCE_FIELDS = ("boxes", "labels", "area", "iscrowd", "masks")

# DETR's multi-scale training: short sides 480, 512, ..., 800.
TRAIN_SCALES = tuple(range(480, 801, 32))
TRAIN_MAX_SIZE = 1333
CROP_PRE_SCALES = (400, 500, 600)
CROP_MIN_SIZE = 384
CROP_MAX_SIZE = 600
VAL_SCALE = 800


def get_size_with_aspect_ratio(image_size, size, max_size=None):
    """Output (h, w) for resizing `image_size` = (w, h) to short side `size`, the long side
    capped by `max_size` (then the short side is round(max_size * short / long), at least 1)."""
    w, h = image_size
    short, long = float(min(w, h)), float(max(w, h))
    if max_size is not None and long / short * size > max_size:
        # at least one pixel: a very thin image (1 x 3000, say) would otherwise round to 0
        size = max(1, int(round(max_size * short / long)))
    if min(w, h) == size:
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(image, target, size, max_size=None):
    """Resize a PIL image (bilinear) to short side `size` or to an explicit (h, w) `size`."""
    if isinstance(size, (list, tuple)):
        new_h, new_w = (int(s) for s in size)
    else:
        new_h, new_w = get_size_with_aspect_ratio(image.size, size, max_size)
    w, h = image.size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if target is None:
        return image, None
    target = dict(target)
    ratio_w, ratio_h = new_w / w, new_h / h
    if "boxes" in target:
        scale = torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=torch.float32)
        target["boxes"] = target["boxes"] * scale
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    if "masks" in target:
        target["masks"] = resize_masks(target["masks"], new_h, new_w)
    target["size"] = torch.tensor([new_h, new_w], dtype=torch.int64)
    return image, target


def resize_masks(masks, height, width):
    """(N, h, w) bool masks -> (N, height, width), nearest neighbour (torch's rule)."""
    if masks.shape[-2:] == (height, width):
        return masks
    if masks.shape[0] == 0:
        return masks.new_zeros((0, height, width))
    return F.interpolate(masks[:, None].float(), size=(height, width), mode="nearest")[:, 0] > 0.5


def crop(image, target, region):
    """Crop `region` = (top, left, height, width); boxes are clipped to it (area recomputed),
    and those left empty are dropped with their other instance fields."""
    top, left, height, width = (int(v) for v in region)
    image = image.crop((left, top, left + width, top + height))
    if target is None:
        return image, None
    target = dict(target)
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    if "masks" in target:
        target["masks"] = target["masks"][:, top:top + height, left:left + width]
    if "boxes" in target:
        boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
        limit = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = torch.minimum(boxes, limit).clamp(min=0)
        target["boxes"] = boxes
        target["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target.update({k: target[k][keep] for k in INSTANCE_FIELDS if k in target})
    return image, target


def hflip(image, target):
    """Mirror a PIL image left-right; a box (x0, y0, x1, y1) becomes (w - x1, y0, w - x0, y1)."""
    w = image.width
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if target is None:
        return image, None
    target = dict(target)
    if "boxes" in target:
        x0, y0, x1, y1 = target["boxes"].unbind(-1)
        target["boxes"] = torch.stack([w - x1, y0, w - x0, y1], dim=-1)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image, target


def pad(image, target, padding):
    """Pad a PIL image with `padding` = (right, bottom) black pixels (masks with False)."""
    pad_w, pad_h = (int(v) for v in padding)
    padded = Image.new(image.mode, (image.width + pad_w, image.height + pad_h))
    padded.paste(image, (0, 0))
    if target is None:
        return padded, None
    target = dict(target)
    target["size"] = torch.tensor([padded.height, padded.width], dtype=torch.int64)
    if "masks" in target:
        target["masks"] = F.pad(target["masks"], (0, pad_w, 0, pad_h))
    return padded, target


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self):
        inner = "".join(f"\n    {t!r}" for t in self.transforms)
        return f"{type(self).__name__}({inner}\n)"


@dataclass
class RandomHorizontalFlip:
    p: float = 0.5

    def __call__(self, image, target):
        return hflip(image, target) if random.random() < self.p else (image, target)


@dataclass
class RandomResize:
    """Resize to a short side drawn uniformly from `sizes`, long side capped by `max_size`."""
    sizes: Sequence[int]
    max_size: Optional[int] = None

    def __post_init__(self):
        if len(self.sizes) == 0:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = list(self.sizes)

    def __call__(self, image, target):
        return resize(image, target, random.choice(self.sizes), self.max_size)


@dataclass
class RandomSizeCrop:
    """Crop a random region: height uniform in [min_size, min(h, max_size)], width likewise,
    position uniform. A side shorter than `min_size` is taken whole."""
    min_size: int
    max_size: int

    def __post_init__(self):
        if self.min_size > self.max_size:
            raise ValueError(f"RandomSizeCrop: min_size {self.min_size} is larger than max_size "
                             f"{self.max_size}")

    def get_region(self, width, height):
        crop_w = random.randint(min(self.min_size, width), min(width, self.max_size))
        crop_h = random.randint(min(self.min_size, height), min(height, self.max_size))
        top = random.randint(0, height - crop_h)
        left = random.randint(0, width - crop_w)
        return top, left, crop_h, crop_w

    def __call__(self, image, target):
        return crop(image, target, self.get_region(image.width, image.height))


@dataclass
class RandomSelect:
    """Apply `first` with probability p, otherwise `second`."""
    first: Callable
    second: Callable
    p: float = 0.5

    def __call__(self, image, target):
        chosen = self.first if random.random() < self.p else self.second
        return chosen(image, target)


@dataclass
class ToTensor:
    """PIL image -> float (C, H, W) tensor in [0, 1]; the target is unchanged."""

    def __call__(self, image, target):
        return TF.to_tensor(image), target


@dataclass
class Normalize:
    """Standardise a tensor image; boxes become (cx, cy, w, h) divided by the image (w, h)."""
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __post_init__(self):
        self.mean, self.std = list(self.mean), list(self.std)

    def __call__(self, image, target):
        image = TF.normalize(image, mean=self.mean, std=self.std)
        if target is None:
            return image, None
        target = dict(target)
        if "boxes" in target:
            h, w = image.shape[-2:]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / scale
        return image, target


def normalize_transform():
    return Compose([ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def make_coco_transforms(image_set):
    """DETR's COCO augmentation ('train') or evaluation resize ('val')."""
    if image_set == "train":
        multi_scale = RandomResize(TRAIN_SCALES, max_size=TRAIN_MAX_SIZE)
        cropped = Compose([RandomResize(CROP_PRE_SCALES),
                           RandomSizeCrop(CROP_MIN_SIZE, CROP_MAX_SIZE), multi_scale])
        return Compose([RandomHorizontalFlip(0.5), RandomSelect(multi_scale, cropped, p=0.5),
                        normalize_transform()])
    if image_set == "val":
        return Compose([RandomResize([VAL_SCALE], max_size=TRAIN_MAX_SIZE), normalize_transform()])
    raise ValueError(f"unknown image_set {image_set!r}: expected 'train' or 'val'")
