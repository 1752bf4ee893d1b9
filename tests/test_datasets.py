"""Tests of the data sets, transforms and COCO evaluation in `datasets/`."""
import argparse
import contextlib
import copy
import io
import json
import math
import os
import pickle
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

import datasets
from datasets import coco_eval as coco_eval_module
from datasets import toy
from datasets import transforms as T
from datasets.coco import CocoDetection, DatasetNotFoundError, load_coco_api
from datasets.coco_eval import CocoEvaluator
from tests.mini_coco import write_mini_coco
from util.box_ops import box_cxcywh_to_xyxy

# ----------------------------------------------------------------------------------------------
# Helpers written independently of the code under test


def expected_resize(w, h, size, max_size):
    """(h, w) after resizing to short side `size`: SPEC.md's "Resize size" rule in exact rational
    arithmetic (the code under test works in floats), with a side of at least one pixel."""
    short, long = Fraction(min(w, h)), Fraction(max(w, h))
    if max_size is not None and long * size > max_size * short:
        size = max(1, round(max_size * short / long))  # Fraction rounds half to even, exactly
    if short == size:
        return h, w
    new_long = math.floor(long * size / short)
    return (new_long, size) if w < h else (size, new_long)


def expected_target(image, width, height):
    """Target of one mini-COCO image, computed from the raw annotations in plain Python."""
    boxes, labels, areas = [], [], []
    for ann in image["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        x0, y0 = min(max(x, 0), width), min(max(y, 0), height)
        x1, y1 = min(max(x + w, 0), width), min(max(y + h, 0), height)
        if x1 > x0 and y1 > y0:
            boxes.append([x0, y0, x1, y1])
            labels.append(ann["category_id"])
            areas.append(ann["area"])
    return boxes, labels, areas


def images_with_annotations(dataset):
    by_image = {img["id"]: dict(img, annotations=[]) for img in dataset["images"]}
    for ann in dataset["annotations"]:
        by_image[ann["image_id"]]["annotations"].append(ann)
    return by_image


def random_target(rng, width, height, n):
    """Random xyxy boxes inside a (width, height) image, with labels and areas."""
    x = np.sort(rng.uniform(0, width, size=(n, 2)), axis=1)
    y = np.sort(rng.uniform(0, height, size=(n, 2)), axis=1)
    boxes = torch.tensor(np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1), dtype=torch.float32)
    return {
        "boxes": boxes,
        "labels": torch.arange(n, dtype=torch.int64),
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "iscrowd": torch.zeros(n, dtype=torch.int64),
        "image_id": torch.tensor([1]),
        "orig_size": torch.tensor([height, width]),
        "size": torch.tensor([height, width]),
    }


def random_image(rng, width, height):
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


def make_args(**kwargs):
    defaults = {"dataset_file": "coco", "coco_path": None, "toy_path": None, "masks": False}
    defaults.update(kwargs)
    return argparse.Namespace(**defaults)


def collate(batch):
    return tuple(zip(*batch))


def assert_targets_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def mini_folder(tmp_path_factory):
    return write_mini_coco(str(tmp_path_factory.mktemp("mini_folder")), layout="folder")


@pytest.fixture(scope="module")
def mini_zip(tmp_path_factory):
    return write_mini_coco(str(tmp_path_factory.mktemp("mini_zip")), layout="zip")


# ----------------------------------------------------------------------------------------------
# Reading COCO


def test_folder_and_zip_give_identical_samples(mini_folder, mini_zip):
    for split in ("train", "val"):
        from_folder = CocoDetection(mini_folder["root"], split)
        from_zip = CocoDetection(mini_zip["root"], split)
        assert len(from_folder) == len(from_zip) == len(mini_folder["dataset"]["images"])
        for i in range(len(from_folder)):
            img_f, tgt_f = from_folder[i]
            img_z, tgt_z = from_zip[i]
            assert np.array_equal(np.asarray(img_f), np.asarray(img_z))
            assert_targets_equal(tgt_f, tgt_z)
    # and after the evaluation transforms, as tensors
    from_folder = CocoDetection(mini_folder["root"], "val", transforms=T.make_coco_transforms("val"))
    from_zip = CocoDetection(mini_zip["root"], "val", transforms=T.make_coco_transforms("val"))
    for i in range(len(from_folder)):
        img_f, tgt_f = from_folder[i]
        img_z, tgt_z = from_zip[i]
        assert torch.equal(img_f, img_z)
        assert_targets_equal(tgt_f, tgt_z)


def test_images_match_files_and_are_rgb(mini_zip):
    ds = CocoDetection(mini_zip["root"], "val")
    for i, image_id in enumerate(ds.ids):
        info = ds.coco.imgs[image_id]
        image, target = ds[i]
        assert image.mode == "RGB"
        assert image.size == (info["width"], info["height"])
        reference = Image.open(io.BytesIO(mini_zip["files"][info["file_name"]])).convert("RGB")
        assert np.array_equal(np.asarray(image), np.asarray(reference))
    gray_index = ds.ids.index(2)
    pixels = np.asarray(ds[gray_index][0])
    assert pixels.shape[2] == 3
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])


def test_target_preparation(mini_folder):
    ds = CocoDetection(mini_folder["root"], "train")
    by_image = images_with_annotations(mini_folder["dataset"])
    assert ds.ids == sorted(by_image)
    for i, image_id in enumerate(ds.ids):
        info = by_image[image_id]
        _, target = ds[i]
        boxes, labels, areas = expected_target(info, info["width"], info["height"])
        n = len(boxes)
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (n, 4)
        assert torch.allclose(target["boxes"], torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == labels
        assert torch.allclose(target["area"], torch.tensor(areas, dtype=torch.float32))
        assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].tolist() == [0] * n
        assert target["image_id"].dtype == torch.int64 and target["image_id"].tolist() == [image_id]
        for key in ("orig_size", "size"):
            assert target[key].dtype == torch.int64
            assert target[key].tolist() == [info["height"], info["width"]]


def test_target_edge_cases_explicitly(mini_folder):
    ds = CocoDetection(mini_folder["root"], "train")
    # image 1: the crowd annotation (category 7) is dropped, the one without 'iscrowd' is kept
    _, t1 = ds[ds.ids.index(1)]
    assert t1["labels"].tolist() == [1, 3]
    # image 2 (40 x 56): clipped boxes; the zero-width box and the box right of the image removed
    _, t2 = ds[ds.ids.index(2)]
    assert t2["boxes"].tolist() == [[30.0, 40.0, 40.0, 56.0], [0.0, 50.0, 5.0, 56.0]]
    assert t2["labels"].tolist() == [1, 7]
    # images 3 (no annotations) and 6 (only a crowd annotation): empty targets
    for image_id in (3, 6):
        _, t = ds[ds.ids.index(image_id)]
        assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
        assert t["area"].shape == (0,) and t["iscrowd"].shape == (0,)


def test_empty_image_through_transforms(mini_folder):
    for split in ("train", "val"):
        ds = CocoDetection(mini_folder["root"], split, transforms=T.make_coco_transforms(split))
        image, target = ds[ds.ids.index(3)]
        assert image.shape[0] == 3
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        assert target["size"].tolist() == list(image.shape[-2:])


def test_dataloader_workers_read_the_zip(mini_zip):
    transforms = T.Compose([T.ToTensor()])
    ds = CocoDetection(mini_zip["root"], "val", transforms=transforms)
    expected = [ds[i] for i in range(len(ds))]  # opens the archive in this process first
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    for _ in range(2):
        got = [pair for images, targets in loader for pair in zip(images, targets)]
        assert len(got) == len(expected)
        for (img, tgt), (ref_img, ref_tgt) in zip(got, expected):
            assert torch.equal(img, ref_img)
            assert_targets_equal(tgt, ref_tgt)
    # the parent's own handle still reads correctly afterwards
    for i in range(len(ds)):
        assert torch.equal(ds[i][0], expected[i][0])


def test_dataset_pickles_without_the_zip_handle(mini_zip):
    ds = CocoDetection(mini_zip["root"], "val")
    first = np.asarray(ds[0][0])
    blob = pickle.dumps(ds)
    copy = pickle.loads(blob)
    assert np.array_equal(np.asarray(copy[0][0]), first)
    assert np.array_equal(np.asarray(ds[1][0]), np.asarray(copy[1][0]))


def test_folder_preferred_when_both_exist(tmp_path):
    root = str(tmp_path)
    write_mini_coco(root, layout="zip")
    write_mini_coco(root, layout="folder")
    ds = CocoDetection(root, "val")
    assert isinstance(ds.images, datasets.coco.FolderImages)


# ----------------------------------------------------------------------------------------------
# Missing data


def test_missing_coco_path_argument():
    with pytest.raises(DatasetNotFoundError, match="--coco_path"):
        datasets.build_dataset("val", make_args(coco_path=None))


def test_missing_root(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as info:
        datasets.build_dataset("val", make_args(coco_path=missing))
    assert missing in str(info.value)


def test_missing_annotation_file(tmp_path):
    root = str(tmp_path)
    write_mini_coco(root, layout="folder", splits=("train2017",))
    with pytest.raises(DatasetNotFoundError) as info:
        CocoDetection(root, "val")
    message = str(info.value)
    assert os.path.join(root, "annotations", "instances_val2017.json") in message
    assert "expected layout" in message


def test_missing_images(tmp_path):
    root = str(tmp_path)
    write_mini_coco(root, layout="folder")
    os.rename(os.path.join(root, "val2017"), os.path.join(root, "moved"))
    with pytest.raises(DatasetNotFoundError) as info:
        CocoDetection(root, "val")
    message = str(info.value)
    assert os.path.join(root, "val2017") in message
    assert os.path.join(root, "val2017.zip") in message
    assert isinstance(info.value, FileNotFoundError)


def test_zip_missing_member(tmp_path):
    root = str(tmp_path)
    info = write_mini_coco(root, layout="zip")
    dataset = dict(info["dataset"])
    dataset["images"] = dataset["images"] + [
        {"id": 999, "file_name": "not_there.jpg", "width": 10, "height": 10}]
    with open(os.path.join(root, "annotations", "instances_val2017.json"), "w") as f:
        json.dump(dataset, f)
    with pytest.raises(DatasetNotFoundError, match="val2017/not_there.jpg"):
        CocoDetection(root, "val")


def test_unsupported_options(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="--coco_panoptic_path"):
        datasets.build_dataset("val", make_args(dataset_file="coco_panoptic"))
    with pytest.raises(ValueError, match="unknown --dataset_file"):
        datasets.build_dataset("val", make_args(dataset_file="voc"))
    with pytest.raises(ValueError, match="toy_panoptic"):
        datasets.build_dataset("val", make_args(dataset_file="toy", masks=True))
    with pytest.raises(ValueError, match="image_set"):
        datasets.build_dataset("test", make_args())


def test_build_dataset_and_coco_api(mini_folder):
    args = make_args(coco_path=mini_folder["root"])
    train = datasets.build_dataset("train", args)
    val = datasets.build_dataset("val", args)
    assert len(train) == len(val) == len(mini_folder["dataset"]["images"])
    image, target = val[0]
    assert image.dtype == torch.float32 and image.dim() == 3
    subset = torch.utils.data.Subset(torch.utils.data.Subset(val, [0, 1, 2]), [1])
    assert datasets.get_coco_api_from_dataset(subset) is val.coco
    assert datasets.get_coco_api_from_dataset(val) is val.coco
    with pytest.raises(TypeError):
        datasets.get_coco_api_from_dataset([1, 2, 3])


# ----------------------------------------------------------------------------------------------
# Transforms


def test_resize_rule_hand_worked_cases():
    # typical COCO image: 640 x 480 -> short side 800, long side int(800 * 640 / 480) = 1066
    assert T.get_size_with_aspect_ratio((640, 480), 800, 1333) == (800, 1066)
    # very wide: 5 * 800 > 1333, so size = round(1333 * 200 / 1000) = 267, long = int(267 * 5) = 1335
    assert T.get_size_with_aspect_ratio((1000, 200), 800, 1333) == (267, 1335)
    # short side already 800 (and 1200 / 800 * 800 <= 1333): unchanged
    assert T.get_size_with_aspect_ratio((800, 1200), 800, 1333) == (1200, 800)
    # 2 * 800 > 1333: size = round(666.5) = 666 (round half to even), long = int(666 * 2) = 1332
    assert T.get_size_with_aspect_ratio((500, 1000), 800, 1333) == (1332, 666)
    # square, no cap
    assert T.get_size_with_aspect_ratio((600, 600), 400) == (400, 400)


def test_resize_rule_many_sizes():
    checked = 0
    for w in range(1, 2400, 41):
        for h in range(1, 2400, 53):
            for size in (400, 480, 800):
                for max_size in (None, 1333):
                    assert T.get_size_with_aspect_ratio((w, h), size, max_size) == \
                        expected_resize(w, h, size, max_size), (w, h, size, max_size)
                    checked += 1
    assert checked > 10000


def test_resize_never_gives_an_empty_side():
    # a 1 x 3000 image under DETR's cap: round(1333 / 3000) = 0 without the one-pixel floor
    for w, h in [(1, 3000), (3000, 1), (1, 2001), (2, 6000), (1, 1)]:
        for size in (480, 800):
            new_h, new_w = T.get_size_with_aspect_ratio((w, h), size, 1333)
            assert min(new_h, new_w) >= 1 and (new_h, new_w) == expected_resize(w, h, size, 1333)
    image, target = T.resize(Image.new("RGB", (3000, 1)), None, 800, 1333)
    assert min(image.size) >= 1


def test_resize_image_and_boxes():
    rng = np.random.default_rng(1)
    cases = [(64, 48, 80, None), (48, 64, 30, None), (300, 40, 100, 500), (50, 50, 50, None),
             (120, 90, 90, 1333), (31, 77, 64, 100)]
    for w, h, size, max_size in cases:
        image = random_image(rng, w, h)
        target = random_target(rng, w, h, 5)
        out_image, out = T.resize(image, target, size, max_size)
        new_h, new_w = expected_resize(w, h, size, max_size)
        assert out_image.size == (new_w, new_h)
        assert out["size"].tolist() == [new_h, new_w]
        sx, sy = new_w / w, new_h / h
        assert torch.allclose(out["boxes"], target["boxes"] * torch.tensor([sx, sy, sx, sy]))
        assert torch.allclose(out["area"], target["area"] * sx * sy)
        assert out["orig_size"].tolist() == [h, w]
        if (new_w, new_h) != (w, h):
            reference = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
            assert np.array_equal(np.asarray(out_image), np.asarray(reference))
        else:
            assert np.array_equal(np.asarray(out_image), np.asarray(image))


def test_crop_against_box_intersection():
    rng = np.random.default_rng(2)
    for _ in range(200):
        w, h = (int(v) for v in rng.integers(20, 120, size=2))
        image = random_image(rng, w, h)
        target = random_target(rng, w, h, 8)
        ch, cw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out_image, out = T.crop(image, target, (top, left, ch, cw))
        assert np.array_equal(np.asarray(out_image), np.asarray(image)[top:top + ch, left:left + cw])
        assert out["size"].tolist() == [ch, cw]
        kept_boxes, kept_labels = [], []
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            x0, y0 = max(box[0], left) - left, max(box[1], top) - top
            x1, y1 = min(box[2], left + cw) - left, min(box[3], top + ch) - top
            if x1 > x0 and y1 > y0:
                kept_boxes.append([x0, y0, x1, y1])
                kept_labels.append(label)
        assert out["labels"].tolist() == kept_labels
        assert torch.allclose(out["boxes"], torch.tensor(kept_boxes, dtype=torch.float32).reshape(-1, 4), atol=1e-4)
        b = out["boxes"]
        assert torch.allclose(out["area"], (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= cw).all() and (b[:, 3] <= ch).all()
        assert len(out["iscrowd"]) == len(out["labels"])


def test_random_size_crop_bounds():
    random.seed(3)
    crop = T.RandomSizeCrop(384, 600)
    rng = np.random.default_rng(3)
    for _ in range(200):
        w, h = (int(v) for v in rng.integers(400, 900, size=2))
        top, left, ch, cw = crop.get_region(w, h)
        assert 384 <= ch <= min(h, 600) and 384 <= cw <= min(w, 600)
        assert 0 <= top <= h - ch and 0 <= left <= w - cw
    # an image smaller than the minimum crop is taken whole on that side
    top, left, ch, cw = crop.get_region(300, 700)
    assert (left, cw) == (0, 300) and 384 <= ch <= 600


def test_flip():
    rng = np.random.default_rng(4)
    for _ in range(20):
        w, h = (int(v) for v in rng.integers(10, 100, size=2))
        image = random_image(rng, w, h)
        target = random_target(rng, w, h, 6)
        flipped_image, flipped = T.hflip(image, target)
        assert np.array_equal(np.asarray(flipped_image), np.asarray(image)[:, ::-1])
        b, f = target["boxes"], flipped["boxes"]
        assert torch.allclose(f[:, 0], w - b[:, 2]) and torch.allclose(f[:, 2], w - b[:, 0])
        assert torch.equal(f[:, 1], b[:, 1]) and torch.equal(f[:, 3], b[:, 3])
        assert (f[:, 2] > f[:, 0]).all() and (f >= 0).all() and (f[:, 2] <= w).all()
        back_image, back = T.hflip(flipped_image, flipped)
        assert np.array_equal(np.asarray(back_image), np.asarray(image))
        assert torch.allclose(back["boxes"], b, atol=1e-4)
        assert torch.equal(back["labels"], target["labels"])


def test_to_tensor_and_normalize_round_trip():
    rng = np.random.default_rng(5)
    w, h = 70, 50
    image = random_image(rng, w, h)
    target = random_target(rng, w, h, 7)
    tensor, out = T.normalize_transform()(image, target)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    raw = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    assert torch.allclose(tensor * std + mean, raw, atol=1e-5)
    cxcywh = out["boxes"]
    assert (cxcywh >= 0).all() and (cxcywh <= 1).all()
    back = box_cxcywh_to_xyxy(cxcywh) * torch.tensor([w, h, w, h])
    assert torch.allclose(back, target["boxes"], atol=1e-4)
    assert torch.equal(out["labels"], target["labels"])


def test_coco_transform_recipe():
    train = T.make_coco_transforms("train")
    flip, select, normalize = train.transforms
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(select, T.RandomSelect) and select.p == 0.5
    assert select.first.sizes == [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
    assert select.first.max_size == 1333
    pre, crop, post = select.second.transforms
    assert pre.sizes == [400, 500, 600] and pre.max_size is None
    assert (crop.min_size, crop.max_size) == (384, 600)
    assert post.sizes == select.first.sizes and post.max_size == 1333
    val = T.make_coco_transforms("val")
    assert val.transforms[0].sizes == [800] and val.transforms[0].max_size == 1333
    with pytest.raises(ValueError):
        T.make_coco_transforms("test")


def test_val_pipeline_sizes(mini_folder):
    ds = CocoDetection(mini_folder["root"], "val", transforms=T.make_coco_transforms("val"))
    for i, image_id in enumerate(ds.ids):
        info = ds.coco.imgs[image_id]
        image, target = ds[i]
        new_h, new_w = expected_resize(info["width"], info["height"], 800, 1333)
        assert tuple(image.shape) == (3, new_h, new_w)
        assert target["size"].tolist() == [new_h, new_w]
        assert target["orig_size"].tolist() == [info["height"], info["width"]]


def test_train_pipeline_invariants(mini_folder):
    random.seed(6)
    ds = CocoDetection(mini_folder["root"], "train", transforms=T.make_coco_transforms("train"))
    raw = CocoDetection(mini_folder["root"], "train")
    for _ in range(3):
        for i in range(len(ds)):
            image, target = ds[i]
            _, original = raw[i]
            assert target["size"].tolist() == list(image.shape[-2:])
            n = len(target["boxes"])
            assert len(target["labels"]) == len(target["area"]) == len(target["iscrowd"]) == n
            b = target["boxes"]
            assert (b[:, :2] > 0).all() and (b[:, :2] < 1).all()
            assert (b[:, 2:] > 0).all() and (b[:, 2:] <= 1).all()
            xyxy = box_cxcywh_to_xyxy(b)
            assert (xyxy >= -1e-5).all() and (xyxy <= 1 + 1e-5).all()
            remaining = original["labels"].tolist()
            for label in target["labels"].tolist():  # labels are a sub-multiset of the original
                remaining.remove(label)
            assert min(image.shape[-2:]) <= 800


# ----------------------------------------------------------------------------------------------
# Evaluation


def clean_gt(num_images=10, per_image=3, categories=(1, 2), seed=0):
    """A COCO ground truth of well separated 40 x 40 boxes (no crowd, nothing degenerate)."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 400, "height": 100})
        for k in range(per_image):
            x = 100.0 * k + float(rng.integers(5, 50))
            y = float(rng.integers(5, 50))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.choice(categories)), "bbox": [x, y, 40.0, 40.0],
                                "area": 1600.0, "iscrowd": 0})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": c, "name": str(c)} for c in categories]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def gt_predictions(coco, image_ids, shift=0.0):
    """Predictions equal to the ground truth boxes (xyxy), optionally shifted right by `shift`."""
    predictions = {}
    for image_id in image_ids:
        anns = [a for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = [[a["bbox"][0] + shift, a["bbox"][1], a["bbox"][0] + a["bbox"][2] + shift,
                  a["bbox"][1] + a["bbox"][3]] for a in anns]
        predictions[image_id] = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.ones(len(anns)),
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
        }
    return predictions


def no_predictions(image_ids):
    return {i: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                "labels": torch.zeros(0, dtype=torch.int64)} for i in image_ids}


def evaluate(coco, batches):
    evaluator = CocoEvaluator(coco, ("bbox",))
    for batch in batches:
        evaluator.update(batch)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    text = evaluator.summarize()
    return evaluator, text


def test_perfect_predictions_give_ap_one(capsys):
    coco = clean_gt()
    ids = sorted(coco.imgs)
    evaluator, text = evaluate(coco, [gt_predictions(coco, ids[:4]), gt_predictions(coco, ids[4:])])
    stats = evaluator.coco_eval["bbox"].stats
    assert stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0)
    assert evaluator["bbox"] is evaluator.coco_eval["bbox"]
    assert "IoU metric: bbox" in text and "Average Precision" in text
    assert "precision" in evaluator.coco_eval["bbox"].eval
    assert capsys.readouterr().out == ""  # pycocotools' printing is captured


def test_shifted_predictions_lower_ap():
    coco = clean_gt()
    ids = sorted(coco.imgs)
    # a shift of 8 px on a 40 px box: IoU = 32 / 48 = 2/3, which passes the thresholds
    # 0.50, 0.55, 0.60, 0.65 and fails 0.70 ... 0.95: AP@[.5:.95] = 4/10, AP50 = 1, AP75 = 0
    evaluator, _ = evaluate(coco, [gt_predictions(coco, ids, shift=8.0)])
    stats = evaluator.coco_eval["bbox"].stats
    assert stats[0] == pytest.approx(0.4)
    assert stats[1] == pytest.approx(1.0)
    assert stats[2] == pytest.approx(0.0)


def test_half_the_images_without_predictions():
    coco = clean_gt(num_images=10, per_image=1, categories=(1,))
    ids = sorted(coco.imgs)
    # recall reaches 1/2 at precision 1: 51 of the 101 recall points have precision 1
    evaluator, _ = evaluate(coco, [gt_predictions(coco, ids[:5]), no_predictions(ids[5:])])
    stats = evaluator.coco_eval["bbox"].stats
    assert stats[0] == pytest.approx(51 / 101)
    assert stats[8] == pytest.approx(0.5)  # AR@100


def test_no_detections_at_all():
    coco = clean_gt()
    evaluator, text = evaluate(coco, [no_predictions(sorted(coco.imgs))])
    assert evaluator.coco_eval["bbox"].stats[0] == pytest.approx(0.0)
    # nothing evaluated at all: -1 everywhere (pycocotools' "absent"), no crash
    evaluator, text = evaluate(coco, [])
    assert list(evaluator.coco_eval["bbox"].stats) == [-1.0] * 12
    assert "Average Precision" in text


def test_evaluator_on_mini_coco_with_awkward_images(mini_folder):
    ds = CocoDetection(mini_folder["root"], "val")
    coco = datasets.get_coco_api_from_dataset(ds)
    predictions = {}
    for i, image_id in enumerate(ds.ids):
        _, target = ds[i]
        predictions[image_id] = {"boxes": target["boxes"], "labels": target["labels"],
                                 "scores": torch.linspace(1, 0.5, len(target["labels"]))}
    evaluator, text = evaluate(coco, [predictions])
    ap = evaluator.coco_eval["bbox"].stats[0]
    assert 0 < ap <= 1  # the zero-width ground truth box cannot be matched


def synchronize_two_ranks(rank0, rank1, monkeypatch):
    """rank0.synchronize_between_processes() as if rank1 ran in a second process; then accumulate
    and summarize on rank 0."""
    sent = []
    monkeypatch.setattr(coco_eval_module, "all_gather", lambda data: sent.append(data) or [data])
    rank1.synchronize_between_processes()
    # all_gather pickles what it sends: so does the second "process" here
    monkeypatch.setattr(coco_eval_module, "all_gather",
                        lambda data: [data, pickle.loads(pickle.dumps(sent[0]))])
    rank0.synchronize_between_processes()
    rank0.accumulate()
    rank0.summarize()


def test_synchronize_merges_processes(monkeypatch):
    coco = clean_gt()
    ids = sorted(coco.imgs)
    reference, _ = evaluate(coco, [gt_predictions(coco, ids[:6], shift=3.0), no_predictions(ids[6:])])

    # two "processes": rank 0 sees images 1-6, rank 1 images 6-10 (image 6 twice, as a
    # distributed sampler's padding would give)
    rank0 = CocoEvaluator(coco)
    rank0.update(gt_predictions(coco, ids[:6], shift=3.0))
    rank1 = CocoEvaluator(coco)
    rank1.update(no_predictions(ids[6:]))
    rank1.update(gt_predictions(coco, ids[5:6], shift=3.0))
    synchronize_two_ranks(rank0, rank1, monkeypatch)
    assert rank0.coco_eval["bbox"].params.imgIds == ids
    assert np.allclose(rank0.coco_eval["bbox"].stats, reference.coco_eval["bbox"].stats)
    assert not np.allclose(reference.coco_eval["bbox"].stats[0], 1.0)


def test_summarize_before_accumulate_is_an_error():
    evaluator = CocoEvaluator(clean_gt())
    with pytest.raises(RuntimeError, match="accumulate"):
        evaluator.summarize()
    with pytest.raises(ValueError, match="needs a 'segmentation'"):
        CocoEvaluator(clean_gt(), ("bbox", "segm"))
    with pytest.raises(ValueError, match="unsupported"):
        CocoEvaluator(clean_gt(), ("keypoints",))
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluator.update(no_predictions([12345]))


# ----------------------------------------------------------------------------------------------
# Toy data

SMALL_TOY = {"num_train": 12, "num_val": 4}


def all_files(root):
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


def test_toy_generation_is_deterministic(tmp_path):
    a = toy.generate_toy_coco(str(tmp_path / "a"), **SMALL_TOY)
    b = toy.generate_toy_coco(str(tmp_path / "b"), **SMALL_TOY)
    files_a, files_b = all_files(a), all_files(b)
    assert len(files_a) == 12 + 4 + 3  # images, two annotation files, the settings file
    assert files_a == files_b
    # images do not depend on how many follow them
    c = toy.generate_toy_coco(str(tmp_path / "c"), num_train=5, num_val=4)
    files_c = all_files(c)
    for name in ("train2017/000001.png", "train2017/000005.png", "val2017/000004.png"):
        assert files_c[name] == files_a[name]


def test_toy_generation_is_idempotent_and_atomic(tmp_path, monkeypatch):
    root = str(tmp_path / "toy")
    toy.generate_toy_coco(root, **SMALL_TOY)
    before = {p: os.stat(os.path.join(root, p)).st_mtime_ns for p in all_files(root)}
    calls = []
    monkeypatch.setattr(toy, "render_toy_image", lambda *a, **k: calls.append(1))
    assert toy.generate_toy_coco(root, **SMALL_TOY) == root
    assert not calls
    after = {p: os.stat(os.path.join(root, p)).st_mtime_ns for p in all_files(root)}
    assert before == after
    assert sorted(os.listdir(tmp_path)) == ["toy"]  # no temporary folders left


def test_toy_generation_failure_leaves_nothing(tmp_path, monkeypatch):
    real = toy.render_toy_image
    count = []

    def failing(*args, **kwargs):
        count.append(1)
        if len(count) > 5:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(toy, "render_toy_image", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        toy.generate_toy_coco(str(tmp_path / "toy"), **SMALL_TOY)
    assert os.listdir(tmp_path) == []


def test_toy_refuses_foreign_or_different_folders(tmp_path):
    root = tmp_path / "toy"
    root.mkdir()
    (root / "something.txt").write_text("not toy data")
    with pytest.raises(toy.ToyDataError) as info:
        toy.generate_toy_coco(str(root), **SMALL_TOY)
    assert str(root) in str(info.value) and "delete" in str(info.value)
    assert isinstance(info.value, FileExistsError)

    other = str(tmp_path / "other")
    toy.generate_toy_coco(other, **SMALL_TOY)
    with pytest.raises(toy.ToyDataError, match="num_train"):
        toy.generate_toy_coco(other, num_train=13, num_val=4)
    os.remove(os.path.join(other, "val2017", "000001.png"))
    with pytest.raises(toy.ToyDataError, match="incomplete"):
        toy.generate_toy_coco(other, **SMALL_TOY)


def test_toy_annotations_describe_the_images(tmp_path):
    root = toy.generate_toy_coco(str(tmp_path / "toy"), num_train=40, num_val=4)
    coco = load_coco_api(os.path.join(root, "annotations", "instances_train2017.json"))
    assert len(coco.imgs) == 40
    assert sorted(coco.cats) == [1, 2, 3]
    assert toy.NUM_CLASSES == max(coco.cats) + 1
    counts = [len(coco.imgToAnns[i]) for i in coco.imgs]
    assert min(counts) >= 1 and max(counts) <= toy.MAX_OBJECTS
    threshold = 75  # L1 over RGB: shape/background edges are far above it, background steps below
    for image_id, info in coco.imgs.items():
        pixels = np.asarray(Image.open(os.path.join(root, "train2017", info["file_name"]))).astype(int)
        height, width, _ = pixels.shape
        assert (info["width"], info["height"]) == (width, height)
        assert toy.IMAGE_SIZE[0] <= min(width, height) and max(width, height) <= toy.IMAGE_SIZE[1]
        inside = np.zeros((height, width), dtype=bool)
        for ann in coco.imgToAnns[image_id]:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= width and y + h <= height and w > 0 and h > 0
            assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
            inside[y:y + h, x:x + w] = True
            # tight: every side of the box has a shape pixel next to background just outside it
            if x > 0:
                assert (np.abs(pixels[y:y + h, x] - pixels[y:y + h, x - 1]).sum(1) > threshold).any()
            if x + w < width:
                assert (np.abs(pixels[y:y + h, x + w - 1] - pixels[y:y + h, x + w]).sum(1) > threshold).any()
            if y > 0:
                assert (np.abs(pixels[y, x:x + w] - pixels[y - 1, x:x + w]).sum(1) > threshold).any()
            if y + h < height:
                assert (np.abs(pixels[y + h - 1, x:x + w] - pixels[y + h, x:x + w]).sum(1) > threshold).any()
        # boxes hold everything: strong edges only occur next to a box
        for axis in (0, 1):
            step = np.abs(np.diff(pixels, axis=axis)).sum(2) > threshold
            a = inside[1:, :] if axis == 0 else inside[:, 1:]
            b = inside[:-1, :] if axis == 0 else inside[:, :-1]
            assert not (step & ~a & ~b).any()


def test_toy_build_and_evaluation(tmp_path):
    args = make_args(dataset_file="toy", toy_path=str(tmp_path / "toy"), toy_num_train=8, toy_num_val=6)
    train = datasets.build_dataset("train", args)
    val = datasets.build_dataset("val", args)
    assert (len(train), len(val)) == (8, 6)
    image, target = train[0]
    assert image.dtype == torch.float32 and image.shape[0] == 3
    assert target["size"].tolist() == list(image.shape[-2:])
    assert (target["boxes"] > 0).all() and (target["boxes"] <= 1).all()
    # ground truth read back through the data set scores AP 1 with the evaluator
    raw = CocoDetection(args.toy_path, "val")
    coco = datasets.get_coco_api_from_dataset(val)
    predictions = {}
    for i, image_id in enumerate(raw.ids):
        _, t = raw[i]
        predictions[image_id] = {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))}
    evaluator, _ = evaluate(coco, [predictions])
    assert evaluator.coco_eval["bbox"].stats[0] == pytest.approx(1.0)
    assert datasets.num_classes_for("toy") == toy.NUM_CLASSES


def test_toy_default_path():
    assert toy.default_toy_path("out") == os.path.join("out", "toy_data")
    assert toy.default_toy_path(None) == os.path.join(".", "toy_data")


def test_toy_transforms():
    rng = np.random.default_rng(7)
    image = random_image(rng, 100, 90)
    target = random_target(rng, 100, 90, 3)
    val_image, val_target = toy.make_toy_transforms("val")(image, target)
    assert tuple(val_image.shape) == (3, 90, 100)
    assert torch.allclose(box_cxcywh_to_xyxy(val_target["boxes"]) * torch.tensor([100, 90, 100, 90]),
                          target["boxes"], atol=1e-4)
    random.seed(0)
    for _ in range(10):
        train_image, train_target = toy.make_toy_transforms("train")(image, target)
        assert tuple(train_image.shape) == (3, 90, 100)
        xyxy = box_cxcywh_to_xyxy(train_target["boxes"]) * torch.tensor([100, 90, 100, 90])
        flipped = torch.stack([100 - target["boxes"][:, 2], target["boxes"][:, 1],
                               100 - target["boxes"][:, 0], target["boxes"][:, 3]], dim=1)
        assert torch.allclose(xyxy, target["boxes"], atol=1e-4) or torch.allclose(xyxy, flipped, atol=1e-4)


def test_evaluation_leaves_the_data_sets_coco_object_unchanged(mini_folder):
    ds = CocoDetection(mini_folder["root"], "val")
    coco = datasets.get_coco_api_from_dataset(ds)
    before = copy.deepcopy(coco.dataset), copy.deepcopy(coco.anns)
    predictions = {image_id: {"boxes": torch.tensor([[1.0, 2.0, 20.0, 30.0]]),
                              "labels": torch.tensor([1]), "scores": torch.tensor([0.9])}
                   for image_id in ds.ids}
    evaluate(coco, [predictions])
    assert (coco.dataset, coco.anns) == before
