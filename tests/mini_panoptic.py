"""Masks for the mini COCO set of tests/mini_coco.py, for segmentation tests.

    add_instance_masks(root)     # 'segmentation' in the instances files: polygons and RLE
    write_mini_panoptic(root)    # root/annotations/panoptic_*.json and root/panoptic_*/ PNGs

Instance masks: every annotation gets a polygon, a diamond inscribed in its box, except each
image's second annotation, which gets the box as an uncompressed RLE (so both forms are read).
Panoptic: each image's non-crowd boxes, drawn in order (a later one covers an earlier one), are
thing segments (categories 1, 3, 7); the rest of the image is stuff 20 (upper half) and 21 (lower
half), except a void column at x = 0; crowd annotations become crowd segments.
"""
import json
import os

import numpy as np
from PIL import Image

from util.panoptic import id_to_rgb

STUFF = [{"id": 20, "name": "upper", "supercategory": "stuff", "isthing": 0},
         {"id": 21, "name": "lower", "supercategory": "stuff", "isthing": 0}]


def box_rle(box, height, width):
    """Uncompressed COCO RLE (column-major run lengths, starting with zeros) of a box's pixels."""
    counts, current = [0], False
    for value in box_mask(box, height, width).flatten(order="F"):
        if value != current:
            counts.append(0)
            current = value
        counts[-1] += 1
    return {"size": [height, width], "counts": counts}


def box_mask(box, height, width):
    """Pixels whose centres lie inside an xywh box."""
    x, y, w, h = box
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    return (xs > x) & (xs < x + w) & (ys > y) & (ys < y + h)


def diamond(box):
    x, y, w, h = box
    return [[x + w / 2, y, x + w, y + h / 2, x + w / 2, y + h, x, y + h / 2]]


def add_instance_masks(root, splits=("train2017", "val2017")):
    for split in splits:
        path = os.path.join(root, "annotations", f"instances_{split}.json")
        with open(path) as f:
            dataset = json.load(f)
        sizes = {img["id"]: (img["height"], img["width"]) for img in dataset["images"]}
        seen = {}
        for ann in dataset["annotations"]:
            k = seen[ann["image_id"]] = seen.get(ann["image_id"], -1) + 1
            if k == 1:
                ann["segmentation"] = box_rle(ann["bbox"], *sizes[ann["image_id"]])
            else:
                ann["segmentation"] = diamond(ann["bbox"])
        with open(path, "w") as f:
            json.dump(dataset, f)
    return root


def panoptic_image(image, annotations):
    """(ids (H, W), segments_info) of one image of the mini set."""
    height, width = image["height"], image["width"]
    ids = np.zeros((height, width), dtype=np.int64)
    segments = []
    for k, ann in enumerate(annotations):
        mask = box_mask(ann["bbox"], height, width)
        mask[:, 0] = False
        if mask.any():
            ids[mask] = k + 1
            segments.append({"id": k + 1, "category_id": ann["category_id"],
                             "iscrowd": ann.get("iscrowd", 0)})
    rows = np.arange(height)[:, None] < height // 2
    for segment_id, category, region in ((1000, 20, rows), (1001, 21, ~rows)):
        mask = region & (ids == 0)
        mask[:, 0] = False
        ids[mask] = segment_id
        segments.append({"id": segment_id, "category_id": category, "iscrowd": 0})
    kept = []
    for s in segments:  # boxes and areas of what is left visible
        ys, xs = np.nonzero(ids == s["id"])
        if len(xs):
            s["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            s["area"] = int(len(xs))
            kept.append(s)
    return ids, kept


def write_mini_panoptic(root, dataset, splits=("train2017", "val2017")):
    """Panoptic json and PNGs under `root` for the mini set `dataset` (the COCO json dict)."""
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    by_image = {}
    for ann in dataset["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    categories = [dict(c, isthing=1) for c in dataset["categories"]] + STUFF
    truth = {}
    for split in splits:
        os.makedirs(os.path.join(root, f"panoptic_{split}"), exist_ok=True)
        annotations = []
        for image in dataset["images"]:
            ids, segments = panoptic_image(image, by_image.get(image["id"], []))
            file_name = f"{image['id']:012d}.png"
            Image.fromarray(id_to_rgb(ids)).save(os.path.join(root, f"panoptic_{split}", file_name))
            annotations.append({"image_id": image["id"], "file_name": file_name, "segments_info": segments})
            truth[image["id"]] = (ids, segments)
        with open(os.path.join(root, "annotations", f"panoptic_{split}.json"), "w") as f:
            json.dump({"images": dataset["images"], "annotations": annotations,
                       "categories": categories}, f)
    return truth
