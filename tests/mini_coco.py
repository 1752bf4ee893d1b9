"""A tiny COCO 2017 style data set written on demand, for tests.

    info = write_mini_coco(root)                  # folders root/train2017/, root/val2017/
    info = write_mini_coco(root, layout="zip")    # zips root/train2017.zip, root/val2017.zip

Both splits get the same images and annotations (`info["dataset"]`, the COCO json as a dict). The
fixed images cover the awkward cases of target preparation:

    id 1  64x48 RGB JPEG       two plain boxes (one without 'iscrowd') and a crowd annotation
    id 2  40x56 grayscale PNG  a box sticking out right/bottom, one out left, a zero-width box,
                               and a box entirely right of the image
    id 3  50x50 RGB PNG        no annotations
    id 5  72x40 palette PNG    two boxes (image ids need not be contiguous)
    id 6  48x48 RGB PNG        only a crowd annotation

followed by `num_random` images (ids 101, 102, ...) of 32 to 96 pixels a side with 1 to 3
random boxes inside the image. Category ids are 1, 3 and 7 (not contiguous).
"""
import io
import json
import os
import zipfile

import numpy as np
from PIL import Image

CATEGORIES = [
    {"id": 1, "name": "alpha", "supercategory": "test"},
    {"id": 3, "name": "beta", "supercategory": "test"},
    {"id": 7, "name": "gamma", "supercategory": "test"},
]

# (id, file name, (width, height), PIL mode, annotations as (category, xywh box, iscrowd or None))
FIXED_IMAGES = [
    (1, "000001.jpg", (64, 48), "RGB", [
        (1, [4.0, 6.0, 20.0, 10.0], 0),
        (3, [30.5, 20.0, 25.0, 20.0], None),
        (7, [0.0, 0.0, 30.0, 30.0], 1),
    ]),
    (2, "000002.png", (40, 56), "L", [
        (1, [30.0, 40.0, 20.0, 30.0], 0),
        (3, [10.0, 10.0, 0.0, 5.0], 0),
        (7, [-5.0, 50.0, 10.0, 10.0], 0),
        (1, [45.0, 5.0, 5.0, 5.0], 0),
    ]),
    (3, "000003.png", (50, 50), "RGB", []),
    (5, "000005.png", (72, 40), "P", [
        (7, [10.0, 5.0, 30.0, 20.0], 0),
        (3, [50.0, 10.0, 12.0, 25.0], 0),
    ]),
    (6, "000006.png", (48, 48), "RGB", [
        (1, [5.0, 5.0, 20.0, 20.0], 1),
    ]),
]


def _image_bytes(rng, size, mode, file_name):
    width, height = size
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "L":
        image = image.convert("L")
    elif mode == "P":
        image = image.quantize(colors=16)
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if file_name.endswith(".jpg") else "PNG")
    return buf.getvalue()


def _random_images(rng, count):
    specs = []
    for k in range(count):
        width, height = (int(v) for v in rng.integers(32, 97, size=2))
        annotations = []
        for _ in range(int(rng.integers(1, 4))):
            w = float(rng.integers(4, width // 2 + 1))
            h = float(rng.integers(4, height // 2 + 1))
            x = float(rng.integers(0, int(width - w) + 1))
            y = float(rng.integers(0, int(height - h) + 1))
            category = CATEGORIES[int(rng.integers(0, len(CATEGORIES)))]["id"]
            annotations.append((category, [x, y, w, h], 0))
        specs.append((101 + k, f"{101 + k:06d}.png", (width, height), "RGB", annotations))
    return specs


def mini_coco_dataset(num_random=3, seed=0):
    """The COCO json dict and the image bytes {file_name: bytes} of the mini set."""
    rng = np.random.default_rng(seed)
    images, annotations, files = [], [], {}
    for image_id, file_name, size, mode, anns in FIXED_IMAGES + _random_images(rng, num_random):
        files[file_name] = _image_bytes(rng, size, mode, file_name)
        images.append({"id": image_id, "file_name": file_name, "width": size[0], "height": size[1]})
        for category, box, iscrowd in anns:
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                   "bbox": list(box), "area": box[2] * box[3]}
            if iscrowd is not None:
                ann["iscrowd"] = iscrowd
            annotations.append(ann)
    dataset = {"info": {"description": "mini COCO for tests"}, "licenses": [], "images": images,
               "annotations": annotations, "categories": [dict(c) for c in CATEGORIES]}
    return dataset, files


def write_mini_coco(root, layout="folder", splits=("train2017", "val2017"), num_random=3, seed=0):
    """Write the mini set under `root` ('folder' or 'zip' image layout); returns a description.

    The description has 'root', 'layout', 'dataset' (the COCO json dict, the same for every split)
    and 'files' ({file_name: encoded image bytes}).
    """
    if layout not in ("folder", "zip"):
        raise ValueError(f"layout must be 'folder' or 'zip', got {layout!r}")
    dataset, files = mini_coco_dataset(num_random=num_random, seed=seed)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split in splits:
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(dataset, f)
        if layout == "folder":
            os.makedirs(os.path.join(root, split), exist_ok=True)
            for file_name, data in files.items():
                with open(os.path.join(root, split, file_name), "wb") as f:
                    f.write(data)
        else:
            with zipfile.ZipFile(os.path.join(root, f"{split}.zip"), "w") as zf:
                zf.writestr(f"{split}/", b"")
                for file_name, data in files.items():
                    zf.writestr(f"{split}/{file_name}", data)
    return {"root": root, "layout": layout, "dataset": dataset, "files": files}
