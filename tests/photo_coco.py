"""A COCO 2017 style data set of real photographs, for tests that need real image statistics.

    write_photo_coco(root, train=("astronaut", "rocket"), val=("coffee",))

writes root/train2017/, root/val2017/ and root/annotations/instances_{train,val}2017.json from
the photographs scikit-image ships inside its wheel (requirements-test.txt), each with a few
hand-drawn boxes around what it shows. The files are copied as they are (PNG or JPEG).
"""
import json
import os
import shutil

import skimage
from PIL import Image

PHOTOS = os.path.join(os.path.dirname(skimage.__file__), "data")

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 2, "name": "cat", "supercategory": "animal"},
    {"id": 3, "name": "cup", "supercategory": "kitchen"},
    {"id": 4, "name": "rocket", "supercategory": "vehicle"},
    {"id": 5, "name": "flag", "supercategory": "object"},
]

# photograph: (file, [(category, [x, y, width, height]), ...])
PHOTOGRAPHS = {
    "astronaut": ("astronaut.png", [(1, [60.0, 10.0, 400.0, 502.0]),
                                    (5, [0.0, 0.0, 110.0, 240.0])]),
    "rocket": ("rocket.jpg", [(4, [290.0, 60.0, 80.0, 300.0]), (4, [240.0, 230.0, 190.0, 140.0])]),
    "coffee": ("coffee.png", [(3, [80.0, 40.0, 440.0, 330.0]), (3, [240.0, 110.0, 160.0, 100.0])]),
    "chelsea": ("chelsea.png", [(2, [60.0, 10.0, 330.0, 290.0])]),
    "hubble": ("hubble_deep_field.jpg", [(5, [400.0, 300.0, 200.0, 200.0])]),
}


def write_photo_coco(root, train=("astronaut", "rocket"), val=("coffee",)):
    """Write the photographs named in `train` and `val` (keys of PHOTOGRAPHS) under `root`.

    Returns {split: [(width, height) of each image]}.
    """
    sizes = {}
    for split, names in (("train2017", train), ("val2017", val)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        images, annotations = [], []
        for image_id, name in enumerate(names, start=1):
            file_name, boxes = PHOTOGRAPHS[name]
            shutil.copy(os.path.join(PHOTOS, file_name), os.path.join(root, split, file_name))
            with Image.open(os.path.join(PHOTOS, file_name)) as image:
                width, height = image.size
            images.append({"id": image_id, "file_name": file_name, "width": width,
                           "height": height})
            for category, box in boxes:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": category, "bbox": box,
                                    "area": box[2] * box[3], "iscrowd": 0})
        dataset = {"info": {"description": "photographs for tests"}, "licenses": [],
                   "images": images, "annotations": annotations, "categories": CATEGORIES}
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(dataset, f)
        sizes[split] = [(image["width"], image["height"]) for image in images]
    return sizes
