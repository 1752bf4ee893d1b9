"""COCO panoptic segmentation 2017: images, segment masks from the panoptic PNGs, DETR targets.

A PNG pixel's colour (R, G, B) is the segment id R + 256 G + 256^2 B (0: void); each segment of
an image's 'segments_info' becomes one target instance (its mask, category, box, area, iscrowd).
"""
import functools
import json
import os

import numpy as np
import torch
from PIL import Image

from datasets import transforms as T
from datasets.coco import (SPLITS, CocoDetection, DatasetNotFoundError, annotation_target,
                           coco_from_dict, find_images, load_coco_api, mask_to_rle)
from util.panoptic import rgb_to_id

PANOPTIC_LAYOUT_HELP = (
    "expected layout: <coco_panoptic_path>/annotations/panoptic_{train,val}2017.json and the PNG "
    "folders <coco_panoptic_path>/panoptic_{train,val}2017/; images under --coco_path as for "
    "detection (train2017/ and val2017/ folders or zips)"
)


class CocoPanoptic(CocoDetection):
    """(image, target) pairs of one COCO panoptic split, by image id (CocoDetection's reading).

    `image_root` holds the images, `panoptic_root` the json and PNGs. The box/mask AP ground truth
    is `instances_file` when given (as DETR does), else the panoptic data's thing segments.
    """

    def __init__(self, image_root, panoptic_root, split, transforms=None, return_masks=True,
                 instances_file=None):
        # CocoDetection's __init__ reads an instances file; this one reads the panoptic json
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected one of {sorted(SPLITS)}")
        split_name = SPLITS[split]
        for path, what in ((image_root, "--coco_path"), (panoptic_root, "--coco_panoptic_path")):
            if not path or not os.path.isdir(path):
                raise DatasetNotFoundError(f"{what} {path!r} is not a folder; {PANOPTIC_LAYOUT_HELP}")
        self.annotation_file = os.path.join(panoptic_root, "annotations", f"panoptic_{split_name}.json")
        self.png_folder = os.path.join(panoptic_root, f"panoptic_{split_name}")
        for path in (self.annotation_file, self.png_folder):
            if not os.path.exists(path):
                raise DatasetNotFoundError(f"{path} is missing; {PANOPTIC_LAYOUT_HELP}")
        try:
            with open(self.annotation_file) as f:
                data = json.load(f)
            self.images = {img["id"]: img for img in data["images"]}
            self.annotations = {ann["image_id"]: ann for ann in data["annotations"]}
            self.categories = {c["id"]: c for c in data["categories"]}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{self.annotation_file} is not a COCO panoptic json ({err!r})") from err
        unannotated = [i for i in self.images if i not in self.annotations]
        if unannotated:
            raise ValueError(f"{self.annotation_file}: images {unannotated[:5]} have no annotation")
        self.ids = sorted(self.images)
        self.image_source = find_images(image_root, split_name)
        self.split = split
        self.transforms = transforms
        self.return_masks = return_masks
        self.instances_file = instances_file
        self.skipped = None  # CocoDetection's item reading: unreadable images are not skipped

    def load_image(self, image_id):
        with self.image_source.open_bytes(self.images[image_id]["file_name"]) as f, Image.open(f) as img:
            return img.convert("RGB")

    def load_ids(self, image_id):
        """(H, W) int64 segment ids of an image's panoptic PNG (0: void)."""
        path = os.path.join(self.png_folder, self.annotations[image_id]["file_name"])
        if not os.path.isfile(path):
            raise DatasetNotFoundError(f"panoptic PNG {path} is missing; {PANOPTIC_LAYOUT_HELP}")
        with Image.open(path) as png:
            return rgb_to_id(np.asarray(png.convert("RGB")))

    def load_target(self, image_id, image_size):
        w, h = image_size
        segments = self.annotations[image_id]["segments_info"]
        target = annotation_target(image_size, image_id, segments)
        if self.return_masks:
            ids = self.load_ids(image_id)
            if ids.shape != (h, w):
                raise ValueError(f"panoptic PNG of image {image_id} is {ids.shape[1]}x{ids.shape[0]}, "
                                 f"the image {w}x{h}")
            segment_ids = np.array([s["id"] for s in segments], dtype=np.int64).reshape(-1, 1, 1)
            target["masks"] = torch.from_numpy(ids[None] == segment_ids)
        return target

    @functools.cached_property
    def coco(self):
        """pycocotools COCO ground truth of the thing instances, for box and mask AP."""
        if self.instances_file is not None:
            return load_coco_api(self.instances_file)
        return self._things_as_instances()

    def _things_as_instances(self):
        annotations = []
        for image_id in self.ids:
            things = [s for s in self.annotations[image_id]["segments_info"]
                      if self.categories[s["category_id"]].get("isthing", 1)]
            ids = self.load_ids(image_id) if things else None
            for s in things:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": s["category_id"], "bbox": s["bbox"],
                                    "area": s["area"], "iscrowd": s.get("iscrowd", 0),
                                    "segmentation": mask_to_rle(ids == s["id"])})
        return coco_from_dict({
            "images": [self.images[i] for i in self.ids], "annotations": annotations,
            "categories": [c for c in self.categories.values() if c.get("isthing", 1)]})

    def __repr__(self):
        return (f"{type(self).__name__}(split={self.split!r}, images={len(self)}, "
                f"annotations={self.annotation_file!r}, source={self.image_source!r})")


def build(image_set, args):
    """COCO panoptic 2017 split `image_set`: images under --coco_path, panoptic data under
    --coco_panoptic_path; box/mask AP against <coco_path>/annotations/instances_*.json if present."""
    if not getattr(args, "coco_path", None) or not getattr(args, "coco_panoptic_path", None):
        raise DatasetNotFoundError("--dataset_file coco_panoptic needs --coco_path (images) and "
                                   f"--coco_panoptic_path; {PANOPTIC_LAYOUT_HELP}")
    instances = os.path.join(args.coco_path, "annotations", f"instances_{SPLITS[image_set]}.json")
    return CocoPanoptic(args.coco_path, args.coco_panoptic_path, image_set,
                        transforms=T.make_coco_transforms(image_set),
                        return_masks=getattr(args, "masks", False),
                        instances_file=instances if os.path.isfile(instances) else None)
