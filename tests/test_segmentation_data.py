"""Segmentation data: masks through the transforms, COCO polygon/RLE masks, COCO panoptic, toy panoptic."""
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from datasets import transforms as T
from datasets.coco import CocoDetection, segmentation_mask
from datasets.coco_panoptic import CocoPanoptic
from datasets.toy_panoptic import is_thing_map, panoptic_categories, write_toy_panoptic
from datasets.toy import generate_toy_coco
from util.misc import collate_fn
from util.panoptic import rgb_to_id

from tests.mini_coco import write_mini_coco
from tests.mini_panoptic import add_instance_masks, box_mask, write_mini_panoptic


def _target(masks):
    """A target whose boxes are the extents of its (N, H, W) masks."""
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    h, w = masks.shape[-2:]
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.arange(len(masks)),
            "area": torch.tensor([float(m.sum()) for m in masks]), "iscrowd": torch.zeros(len(masks), dtype=torch.int64),
            "masks": torch.from_numpy(masks), "size": torch.tensor([h, w]), "orig_size": torch.tensor([h, w])}


@pytest.fixture
def sample():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 21, 30)) > 0.6
    masks[0] = False
    masks[0, 2:9, 3:12] = True  # a rectangle: its box is exact
    masks[2] = False
    masks[2, 15:20, 24:29] = True  # bottom-right corner, cut off by crops
    image = Image.fromarray(rng.integers(0, 255, (21, 30, 3), dtype=np.uint8))
    return image, _target(masks)


def test_hflip_mirrors_masks_like_boxes(sample):
    image, target = sample
    flipped_image, flipped = T.hflip(image, target)
    expected = target["masks"].numpy()[:, :, ::-1]
    assert np.array_equal(flipped["masks"].numpy(), expected)
    assert np.array_equal(np.asarray(flipped_image), np.asarray(image)[:, ::-1])
    # the rectangle's box is still its mask's extent
    ys, xs = np.nonzero(expected[0])
    assert flipped["boxes"][0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("size", [(33, 47), (10, 14), (21, 30)])
def test_resize_takes_masks_by_torchs_nearest_rule(sample, size):
    image, target = sample
    resized_image, resized = T.resize(image, target, size)
    h, w = size
    # nearest: output pixel (i, j) takes input pixel (floor(i * 21 / h), floor(j * 30 / w))
    rows = np.floor(np.arange(h) * (21 / h)).astype(int)
    cols = np.floor(np.arange(w) * (30 / w)).astype(int)
    expected = target["masks"].numpy()[:, rows][:, :, cols]
    assert resized["masks"].dtype == torch.bool
    assert np.array_equal(resized["masks"].numpy(), expected)
    assert resized_image.size == (w, h) and resized["size"].tolist() == [h, w]


def test_crop_cuts_masks_and_drops_them_with_their_boxes(sample):
    image, target = sample
    cropped_image, cropped = T.crop(image, target, (1, 2, 12, 20))  # top, left, height, width
    masks = target["masks"].numpy()
    # instance 2 (rows 15-19, columns 24-28) lies outside and goes with its box and label
    assert cropped["labels"].tolist() == [0, 1]
    assert np.array_equal(cropped["masks"].numpy(), masks[:2, 1:13, 2:22])
    assert np.array_equal(np.asarray(cropped_image), np.asarray(image)[1:13, 2:22])
    ys, xs = np.nonzero(cropped["masks"][0].numpy())
    assert cropped["boxes"][0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_pad_extends_masks_with_background(sample):
    image, target = sample
    padded_image, padded = T.pad(image, target, (5, 3))
    expected = np.pad(target["masks"].numpy(), ((0, 0), (0, 3), (0, 5)))
    assert np.array_equal(padded["masks"].numpy(), expected)
    assert padded_image.size == (35, 24) and padded["size"].tolist() == [24, 35]
    assert torch.equal(padded["boxes"], target["boxes"])
    assert np.array_equal(np.asarray(padded_image)[:21, :30], np.asarray(image))


def test_training_pipeline_keeps_masks_aligned_with_images_and_boxes(sample):
    image, target = sample
    random.seed(3)
    pipeline = T.make_coco_transforms("train")
    for _ in range(6):
        out_image, out = pipeline(image, target)
        assert out["masks"].shape == (len(out["boxes"]),) + tuple(out_image.shape[-2:])
        assert out["masks"].dtype == torch.bool and len(out["masks"]) == len(out["labels"])


def test_collate_pads_masks_to_the_batch(sample):
    image, target = sample
    small = dict(target, masks=target["masks"][:, :10, :12])
    samples, targets = collate_fn([(torch.zeros(3, 21, 30), target), (torch.zeros(3, 10, 12), small)])
    assert samples.tensors.shape[-2:] == (21, 30)
    assert targets[1]["masks"].shape == (3, 21, 30)
    assert torch.equal(targets[1]["masks"][:, :10, :12], small["masks"])
    assert not targets[1]["masks"][:, 10:].any() and not targets[1]["masks"][:, :, 12:].any()


# ----------------------------------------------------------------------------------------------
# COCO instance masks

def test_polygon_and_rle_masks_match_pycocotools(tmp_path):
    root = str(tmp_path / "coco")
    write_mini_coco(root, num_random=2)
    add_instance_masks(root)
    dataset = CocoDetection(root, "val", return_masks=True)
    reference = COCO(os.path.join(root, "annotations", "instances_val2017.json"))
    forms = set()
    for index, image_id in enumerate(dataset.ids):
        _, target = dataset[index]
        anns = [a for a in reference.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        kept = [a for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0 and
                min(a["bbox"][0] + a["bbox"][2], reference.imgs[image_id]["width"]) > max(a["bbox"][0], 0)]
        expected = np.stack([reference.annToMask(a) > 0 for a in kept]) if kept else np.zeros((0,) + tuple(target["size"].tolist()))
        assert np.array_equal(target["masks"].numpy(), expected), image_id
        forms.update("rle" if isinstance(a["segmentation"], dict) else "polygon" for a in kept)
    assert forms == {"rle", "polygon"}


def test_rle_by_hand_and_bad_segmentations():
    # 3 x 2 image, column-major runs: 1 zero, 3 ones, 2 zeros
    mask = segmentation_mask({"size": [3, 2], "counts": [1, 3, 2]}, 3, 2)
    assert mask.tolist() == [[False, True], [True, False], [True, False]]
    with pytest.raises(ValueError, match="neither polygons nor RLE"):
        segmentation_mask({"size": [3, 2]}, 3, 2)
    with pytest.raises(ValueError, match="size"):
        segmentation_mask({"size": [2, 2], "counts": [1, 3]}, 3, 2)


def test_masks_without_segmentation_are_refused(tmp_path):
    root = str(tmp_path / "coco")
    write_mini_coco(root, num_random=0)
    with pytest.raises(ValueError, match="have no 'segmentation'"):
        CocoDetection(root, "val", return_masks=True)[0]


# ----------------------------------------------------------------------------------------------
# COCO panoptic

def test_panoptic_targets_from_pngs_and_json(tmp_path):
    info = write_mini_coco(str(tmp_path / "coco"), layout="zip", num_random=2)
    truth = write_mini_panoptic(str(tmp_path / "panoptic"), info["dataset"])
    dataset = CocoPanoptic(str(tmp_path / "coco"), str(tmp_path / "panoptic"), "val")
    assert dataset.instances_file is None
    for index, image_id in enumerate(dataset.ids):
        image, target = dataset[index]
        ids, segments = truth[image_id]
        assert image.size == (ids.shape[1], ids.shape[0])
        assert target["labels"].tolist() == [s["category_id"] for s in segments]
        assert target["iscrowd"].tolist() == [s["iscrowd"] for s in segments]
        assert np.array_equal(target["masks"].numpy(), np.stack([ids == s["id"] for s in segments]))
        x, y, w, h = np.array([s["bbox"] for s in segments], dtype=np.float32).T
        assert np.array_equal(target["boxes"].numpy(), np.stack([x, y, x + w, y + h], 1))
    # the box/mask AP ground truth: the thing segments, their masks as RLE
    coco = dataset.coco
    assert {c["id"] for c in coco.dataset["categories"]} == {1, 3, 7}
    ann = next(a for a in coco.anns.values() if a["image_id"] == 5)
    ids, segments = truth[5]
    segment = next(s for s in segments if s["category_id"] == ann["category_id"])
    assert np.array_equal(coco.annToMask(ann) > 0, ids == segment["id"])


def test_panoptic_without_masks_and_missing_files(tmp_path):
    info = write_mini_coco(str(tmp_path / "coco"), num_random=0)
    write_mini_panoptic(str(tmp_path / "panoptic"), info["dataset"])
    dataset = CocoPanoptic(str(tmp_path / "coco"), str(tmp_path / "panoptic"), "train", return_masks=False)
    assert "masks" not in dataset[0][1]
    os.remove(tmp_path / "panoptic" / "annotations" / "panoptic_val2017.json")
    with pytest.raises(FileNotFoundError, match="panoptic_val2017.json is missing"):
        CocoPanoptic(str(tmp_path / "coco"), str(tmp_path / "panoptic"), "val")


# ----------------------------------------------------------------------------------------------
# Toy panoptic

def test_toy_panoptic_partitions_every_image(tmp_path):
    root = str(tmp_path / "toy")
    generate_toy_coco(root, num_train=3, num_val=6)
    write_toy_panoptic(root)
    assert write_toy_panoptic(root) == root  # made once
    with open(os.path.join(root, "annotations", "instances_val2017.json")) as f:
        instances = json.load(f)
    with open(os.path.join(root, "annotations", "panoptic_val2017.json")) as f:
        panoptic = json.load(f)
    assert [c["id"] for c in panoptic["categories"]] == [1, 2, 3, 4, 5]
    assert is_thing_map() == {0: False, 1: True, 2: True, 3: True, 4: False, 5: False}
    assert panoptic_categories()[3]["isthing"] == 0
    for ann in panoptic["annotations"]:
        with Image.open(os.path.join(root, "panoptic_val2017", ann["file_name"])) as png:
            ids = rgb_to_id(np.asarray(png.convert("RGB")))
        segments = ann["segments_info"]
        assert (ids > 0).all() and sorted(np.unique(ids)) == sorted(s["id"] for s in segments)
        things = [a for a in instances["annotations"] if a["image_id"] == ann["image_id"]]
        assert [s["category_id"] for s in segments] == [a["category_id"] for a in things] + [4, 5]
        for s, a in zip(segments, things):
            assert s["bbox"] == a["bbox"] and s["area"] == a["area"]
        h = ids.shape[0]
        upper, lower = segments[-2]["id"], segments[-1]["id"]
        assert not (ids[h // 2:] == upper).any() and not (ids[:h // 2] == lower).any()
        assert sum(s["area"] for s in segments) == ids.size
