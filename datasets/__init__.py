"""Data sets for DETR: COCO 2017 detection and panoptic, and a built-in synthetic toy set (same
COCO layouts).

`build_dataset(image_set, args)` reads `args.dataset_file` ('coco', 'coco_panoptic', 'toy' or
'toy_panoptic'), `args.coco_path` or your own files (`args.train_ann`, `args.train_images`,
`args.val_ann`, `args.val_images`), `args.coco_panoptic_path`, `args.toy_path` (optional:
`args.output_dir`, `args.toy_num_train`, `args.toy_num_val`) and `args.masks` (targets with masks).
"""
import torch

from datasets import coco, coco_panoptic, toy, toy_panoptic
from datasets.coco import CocoDetection, DatasetNotFoundError, uses_own_files
from datasets.coco_panoptic import CocoPanoptic
from datasets.panoptic_eval import PanopticEvaluator
from datasets.coco_eval import CocoEvaluator
from datasets.toy import ToyDataError, generate_toy_coco

BUILDERS = {"coco": coco.build, "coco_panoptic": coco_panoptic.build, "toy": toy.build,
            "toy_panoptic": toy_panoptic.build}
SUPPORTED_DATASETS = tuple(BUILDERS)
# DETR's class counts (largest category id + 1)
NUM_CLASSES = {"coco": 91, "coco_panoptic": 250, "toy": toy.NUM_CLASSES,
               "toy_panoptic": toy_panoptic.NUM_CLASSES}

__all__ = ["build_dataset", "get_coco_api_from_dataset", "CocoDetection", "CocoEvaluator",
           "DatasetNotFoundError", "ToyDataError", "generate_toy_coco", "num_classes_for",
           "CocoPanoptic", "PanopticEvaluator", "is_thing_map_for", "dataset_categories",
           "uses_own_files"]


def build_dataset(image_set, args):
    """The 'train' or 'val' split of the data set named by `args.dataset_file`."""
    if image_set not in ("train", "val"):
        raise ValueError(f"unknown image_set {image_set!r}: expected 'train' or 'val'")
    dataset_file = getattr(args, "dataset_file", None)
    if dataset_file not in BUILDERS:
        raise ValueError(f"unknown --dataset_file {dataset_file!r}: expected one of "
                         f"{list(SUPPORTED_DATASETS)}")
    return BUILDERS[dataset_file](image_set, args)


def num_classes_for(dataset_file):
    """DETR's num_classes (largest category id + 1) for a data set name."""
    if dataset_file not in NUM_CLASSES:
        raise ValueError(f"unknown --dataset_file {dataset_file!r}: expected one of "
                         f"{list(SUPPORTED_DATASETS)}, or pass --num_classes")
    return NUM_CLASSES[dataset_file]


def is_thing_map_for(dataset_file):
    """{category id: True for things, False for stuff} of a panoptic data set; None otherwise."""
    if dataset_file == "coco_panoptic":
        # DETR's convention: category ids up to 90 are things, the others (up to 200) stuff
        return {i: i <= 90 for i in range(201)}
    if dataset_file == "toy_panoptic":
        return toy_panoptic.is_thing_map()
    return None


def _unwrapped(dataset):
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO object behind a data set (torch.utils.data.Subset wrappers removed)."""
    dataset = _unwrapped(dataset)
    if isinstance(dataset, CocoDetection):
        return dataset.coco
    raise TypeError(f"no COCO ground truth behind a {type(dataset).__name__}; expected a "
                    f"CocoDetection, possibly wrapped in torch.utils.data.Subset")


def dataset_categories(dataset):
    """{category id: name} of a COCO-format data set, in id order (plain ints and strings)."""
    dataset = _unwrapped(dataset)
    # a panoptic set's categories include stuff, which its box/mask AP ground truth lacks
    if isinstance(dataset, CocoPanoptic):
        cats = dataset.categories
    else:
        cats = get_coco_api_from_dataset(dataset).cats
    return {int(i): str(cats[i].get("name", i)) for i in sorted(cats)}
