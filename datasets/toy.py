"""Built-in toy detection data: small synthetic images of simple shapes in COCO 2017's layout.

`generate_toy_coco(root)` writes, once and deterministically, root/{train,val}2017/*.png,
root/annotations/instances_{train,val}2017.json and root/toy_info.json (the settings; it marks a
complete set), read and evaluated as real COCO is. Each image is a grey gradient (on half of them
with noise) with 1 to `max_objects` shapes, one per cell of a GRID x GRID layout, each category in
its own hue, so that a detector trained from scratch on a CPU learns it within minutes. A box is
the exact extent of its shape's pixels, and 'area' its pixel count.
"""
import json
import os
import shutil
import uuid

import numpy as np
from PIL import Image, ImageDraw

from datasets import transforms as T
from datasets.coco import CocoDetection, check_args

CATEGORIES = tuple({"id": i, "name": name, "supercategory": "shape"}
                   for i, name in enumerate(("rectangle", "circle", "triangle"), start=1))
# DETR's convention: the largest category id + 1 (the "no object" class comes on top of it).
NUM_CLASSES = max(c["id"] for c in CATEGORIES) + 1

NUM_TRAIN = 1000
NUM_VAL = 100
# width and height each drawn uniformly from this range (inclusive). One size for all: batches need
# no padding, and 96 px gives ResNet's stride-32 features a 3 x 3 map, cheap to train on a CPU
IMAGE_SIZE = (96, 96)
MAX_OBJECTS = 4
SEED = 0

MIN_SHAPE = 12  # shortest shape side in pixels
GAP = 2  # minimum number of background pixels between two shapes' boxes
GRADIENT = 24.0  # largest brightness change of the background across the image
NOISE_PROBABILITY = 0.5  # share of images with pixel noise (noise makes PNGs large and slow)
MAX_NOISE = 2.0  # largest standard deviation of the pixel noise
# Each category has its own hue, so a detector can tell them apart early; the backgrounds are greys.
CLASS_COLOURS = {1: np.array([220, 50, 40]), 2: np.array([40, 190, 60]), 3: np.array([50, 80, 230])}
COLOUR_JITTER = 25
GRID = 2
BACKGROUND_GREY = (60, 190)

PNG_COMPRESS_LEVEL = 1  # fast zlib setting: the noisy images barely compress anyway
INFO_FILE = "toy_info.json"
FORMAT_NAME = "detr-toy-shapes"
FORMAT_VERSION = 2
SPLIT_DIRS = ("train2017", "val2017")


class ToyDataError(FileExistsError):
    """The toy data folder exists but is not a complete toy set made with the requested settings."""


def default_toy_path(output_dir=None):
    """Where the toy data goes by default: <output_dir>/toy_data, or ./toy_data."""
    return os.path.join(output_dir, "toy_data") if output_dir else os.path.join(".", "toy_data")


def _shape_mask(width, height, category, box, orientation):
    """Mask ('L' image) of one filled shape drawn inside box = (x, y, w, h)."""
    x, y, w, h = box
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    x1, y1 = x + w - 1, y + h - 1
    if category == 1:
        draw.rectangle([x, y, x1, y1], fill=255)
    elif category == 2:
        draw.ellipse([x, y, x1, y1], fill=255)
    else:
        cx, cy = x + (w - 1) / 2, y + (h - 1) / 2
        corners = [  # apex up, right, down, left
            [(cx, y), (x, y1), (x1, y1)],
            [(x1, cy), (x, y), (x, y1)],
            [(cx, y1), (x, y), (x1, y)],
            [(x, cy), (x1, y), (x1, y1)],
        ][orientation]
        draw.polygon(corners, fill=255)
    return mask


def render_toy_image(rng, image_size=IMAGE_SIZE, max_objects=MAX_OBJECTS):
    """One synthetic image and its objects: (PIL RGB image, [(category_id, xywh box, area)])."""
    width, height = (int(v) for v in rng.integers(image_size[0], image_size[1] + 1, size=2))
    background = rng.integers(*BACKGROUND_GREY) + rng.integers(-10, 11, size=3)
    # Soft linear gradient in a random direction.
    angle = rng.uniform(0, 2 * np.pi)
    strength = rng.uniform(0, GRADIENT)
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = (np.cos(angle) * xs / width + np.sin(angle) * ys / height) * strength
    pixels = background[None, None, :] + ramp[:, :, None]

    # Shapes sit in distinct cells of a GRID x GRID layout, each inside its cell.
    num_objects = int(rng.integers(1, min(max_objects, GRID * GRID) + 1))
    cells = rng.permutation(GRID * GRID)[:num_objects]
    cell_w, cell_h = width / GRID, height / GRID
    objects = []
    for cell in cells:
        category = int(rng.integers(1, NUM_CLASSES))
        side = min(cell_w, cell_h)
        w, h = (int(v) for v in rng.integers(int(0.55 * side), int(0.85 * side) + 1, size=2))
        if category == 2:
            h = w
        row, col = divmod(int(cell), GRID)
        x = int(col * cell_w + rng.integers(0, int(cell_w - w) + 1))
        y = int(row * cell_h + rng.integers(0, int(cell_h - h) + 1))
        mask = _shape_mask(width, height, category, (x, y, w, h), int(rng.integers(0, 4)))
        left, top, right, bottom = mask.getbbox()
        inside = np.asarray(mask) > 0
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        pixels[inside] = np.clip(CLASS_COLOURS[category] + jitter, 0, 255)
        objects.append((category, [left, top, right - left, bottom - top], int(inside.sum())))

    if rng.uniform() < NOISE_PROBABILITY:
        pixels += rng.normal(0.0, rng.uniform(0.5, MAX_NOISE), size=pixels.shape)
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), objects


def _settings(num_train, num_val, image_size, max_objects, seed):
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "num_train": int(num_train),
            "num_val": int(num_val), "image_size": [int(image_size[0]), int(image_size[1])],
            "max_objects": int(max_objects), "seed": int(seed),
            "categories": [dict(c) for c in CATEGORIES]}


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, sort_keys=True, separators=(",", ":"))


def _write_split(root, split_index, split_dir, num_images, settings):
    os.makedirs(os.path.join(root, split_dir))
    images, annotations = [], []
    for i in range(num_images):
        image_id = i + 1
        # One generator per image: an image does not depend on how many come after it.
        rng = np.random.default_rng([settings["seed"], split_index, i])
        image, objects = render_toy_image(rng, settings["image_size"], settings["max_objects"])
        file_name = f"{image_id:06d}.png"
        image.save(os.path.join(root, split_dir, file_name), format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        images.append({"id": image_id, "file_name": file_name,
                       "width": image.width, "height": image.height})
        for category, bbox, area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category, "bbox": bbox, "area": area, "iscrowd": 0})
    _write_json(os.path.join(root, "annotations", f"instances_{split_dir}.json"), {
        "info": {"description": "synthetic shapes (toy detection data)",
                 "version": str(FORMAT_VERSION)},
        "licenses": [], "images": images, "annotations": annotations,
        "categories": settings["categories"]})


def _check_existing(root, settings):
    """Raise ToyDataError unless `root` is a complete toy set made with `settings`."""
    advice = f"delete {root} (it is regenerated on the next run) or choose another --toy_path"
    info_path = os.path.join(root, INFO_FILE)
    if not os.path.isdir(root):
        raise ToyDataError(f"{root} exists but is not a folder; {advice}")
    try:
        with open(info_path) as f:
            found = json.load(f)
    except (OSError, ValueError):
        raise ToyDataError(f"{root} exists but is not a complete toy data set "
                           f"(no readable {INFO_FILE}); {advice}") from None
    if found != settings:
        changed = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
        details = ", ".join(f"{k}: found {found.get(k)!r}, wanted {settings.get(k)!r}" for k in changed)
        raise ToyDataError(f"{root} holds toy data made with other settings ({details}); {advice}")
    for split_dir, count in zip(SPLIT_DIRS, (settings["num_train"], settings["num_val"])):
        ann = os.path.join(root, "annotations", f"instances_{split_dir}.json")
        folder = os.path.join(root, split_dir)
        if not os.path.isfile(ann) or not os.path.isdir(folder) or len(os.listdir(folder)) != count:
            raise ToyDataError(f"{root} is an incomplete toy data set ({ann} or the {count} images "
                               f"in {folder} are missing); {advice}")


def generate_toy_coco(root, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=IMAGE_SIZE,
                      max_objects=MAX_OBJECTS, seed=SEED):
    """Write the toy data set to `root` unless it is already there; returns `root`.

    Written beside `root` and renamed into place, so `root` is either absent or complete; a `root`
    holding anything else raises ToyDataError. The same settings always give the same bytes.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"the toy set needs at least one image per split (got num_train={num_train}, "
                         f"num_val={num_val})")
    if not (MIN_SHAPE + 2 * GAP <= image_size[0] <= image_size[1]):
        raise ValueError(f"toy image_size must be (low, high) with {MIN_SHAPE + 2 * GAP} <= low <= high, "
                         f"got {tuple(image_size)}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be at least 1, got {max_objects}")
    settings = _settings(num_train, num_val, image_size, max_objects, seed)
    root = os.fspath(root)
    if os.path.lexists(root):
        _check_existing(root, settings)
        return root

    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(root))}.tmp-{os.getpid()}-"
                               f"{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(os.path.join(tmp, "annotations"))
        for split_index, (split_dir, count) in enumerate(zip(SPLIT_DIRS, (num_train, num_val))):
            _write_split(tmp, split_index, split_dir, count, settings)
        _write_json(os.path.join(tmp, INFO_FILE), settings)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.lexists(root):
            raise
        _check_existing(root, settings)  # another process finished first
    return root


def make_toy_transforms(image_set):
    """Cheap augmentation for the small toy images: random flip when training, then normalise."""
    if image_set == "train":
        return T.Compose([T.RandomHorizontalFlip(0.5), T.normalize_transform()])
    if image_set == "val":
        return T.normalize_transform()
    raise ValueError(f"unknown image_set {image_set!r}: expected 'train' or 'val'")


def generated_root(args):
    """`args.toy_path` (or the default), the toy set generated there first when missing, with
    `args.toy_num_train` and `args.toy_num_val` images (None for the defaults)."""
    root = getattr(args, "toy_path", None) or default_toy_path(getattr(args, "output_dir", None))
    return generate_toy_coco(root, num_train=getattr(args, "toy_num_train", None) or NUM_TRAIN,
                             num_val=getattr(args, "toy_num_val", None) or NUM_VAL)


def build(image_set, args):
    """The toy split `image_set`, generated first into `args.toy_path` when missing."""
    check_args(args)
    root = generated_root(args)
    return CocoDetection(root, image_set, transforms=make_toy_transforms(image_set),
                         skip_bad_images=getattr(args, "skip_bad_images", False))
