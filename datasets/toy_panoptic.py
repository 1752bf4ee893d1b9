"""Panoptic annotations for the toy images (`datasets.toy`), so segmentation runs offline.

`write_toy_panoptic(root)` adds root/annotations/panoptic_{train,val}2017.json and the PNGs in
root/panoptic_{train,val}2017/. The shapes are the things; the background is two stuff regions,
the rows above the image's middle and those below. A shape's mask is read back from its image:
the saturated pixels inside its box, checked against the pixel count the toy set recorded.
"""
import json
import os
import shutil
import uuid

import numpy as np
from PIL import Image

from datasets import toy
from datasets.coco_panoptic import CocoPanoptic
from datasets.toy import CATEGORIES, ToyDataError
from util.panoptic import id_to_rgb

STUFF_CATEGORIES = tuple({"id": i, "name": name, "supercategory": "background"}
                         for i, name in ((4, "upper background"), (5, "lower background")))
NUM_CLASSES = max(c["id"] for c in STUFF_CATEGORIES) + 1
# a shape pixel's channels differ by far more than this, a (grey, noisy) background pixel's by less
SATURATION_THRESHOLD = 60


def panoptic_categories():
    return ([dict(c, isthing=1) for c in CATEGORIES] +
            [dict(c, isthing=0) for c in STUFF_CATEGORIES])


def is_thing_map():
    """{category id: is a thing} over 0..NUM_CLASSES - 1 (0 is no category; counted as stuff)."""
    things = {c["id"] for c in CATEGORIES}
    return {i: i in things for i in range(NUM_CLASSES)}


def _add_segment(segments, ids, category_id, mask):
    """Append the segment of `mask` to `segments` and paint its id (the next one) into `ids`."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    segments.append({"id": len(segments) + 1, "category_id": category_id, "iscrowd": 0,
                     "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                     "area": int(mask.sum())})
    ids[mask] = len(segments)


def panoptic_ids(pixels, objects):
    """Id image and segments_info of one toy image (H, W, 3 uint8) and its instance annotations."""
    height, width = pixels.shape[:2]
    spread = pixels.max(-1).astype(np.int64) - pixels.min(-1)
    ids = np.zeros((height, width), dtype=np.int64)
    segments = []
    for ann in objects:
        x, y, w, h = (int(v) for v in ann["bbox"])
        mask = np.zeros((height, width), dtype=bool)
        mask[y:y + h, x:x + w] = spread[y:y + h, x:x + w] > SATURATION_THRESHOLD
        if int(mask.sum()) != ann["area"]:
            raise ToyDataError(f"toy image {ann['image_id']}: {int(mask.sum())} shape pixels found "
                               f"in box {ann['bbox']}, {ann['area']} recorded; the toy images no "
                               f"longer have saturated shapes on grey, update {__name__}")
        _add_segment(segments, ids, ann["category_id"], mask)
    rows = np.arange(height)[:, None] < height // 2
    for category, region in ((4, rows), (5, ~rows)):
        mask = region & (ids == 0)
        if mask.any():
            _add_segment(segments, ids, category, mask)
    return ids, segments


def _write_split(root, tmp, split_dir):
    with open(os.path.join(root, "annotations", f"instances_{split_dir}.json")) as f:
        instances = json.load(f)
    by_image = {}
    for ann in instances["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    png_dir = os.path.join(tmp, f"panoptic_{split_dir}")
    os.makedirs(png_dir)
    annotations = []
    for image in instances["images"]:
        with Image.open(os.path.join(root, split_dir, image["file_name"])) as img:
            pixels = np.asarray(img.convert("RGB"))
        ids, segments = panoptic_ids(pixels, by_image.get(image["id"], []))
        file_name = os.path.splitext(image["file_name"])[0] + ".png"
        Image.fromarray(id_to_rgb(ids)).save(os.path.join(png_dir, file_name), compress_level=1)
        annotations.append({"image_id": image["id"], "file_name": file_name, "segments_info": segments})
    return {"info": {"description": "toy shapes, panoptic"}, "licenses": [],
            "images": instances["images"], "annotations": annotations,
            "categories": panoptic_categories()}


def write_toy_panoptic(root):
    """Add the panoptic annotations to the toy set at `root` unless there; returns `root`.
    The PNG folders are renamed into place; the json files, written last, mark a complete set."""
    done = [os.path.join(root, "annotations", f"panoptic_{s}.json") for s in toy.SPLIT_DIRS]
    if all(os.path.isfile(p) for p in done):
        return root
    tmp = os.path.join(root, f".panoptic.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        for split_dir, json_path in zip(toy.SPLIT_DIRS, done):
            data = _write_split(root, tmp, split_dir)
            final_dir = os.path.join(root, f"panoptic_{split_dir}")
            shutil.rmtree(final_dir, ignore_errors=True)  # a partial folder of an interrupted run
            os.rename(os.path.join(tmp, f"panoptic_{split_dir}"), final_dir)
            with open(json_path + ".tmp", "w") as f:
                json.dump(data, f, separators=(",", ":"))
            os.replace(json_path + ".tmp", json_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def build(image_set, args):
    """The toy images with panoptic targets (masks with --masks), generated when missing."""
    root = write_toy_panoptic(toy.generated_root(args))
    return CocoPanoptic(root, root, image_set, transforms=toy.make_toy_transforms(image_set),
                        return_masks=getattr(args, "masks", False))
