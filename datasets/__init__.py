"""Data sets for DETR: COCO 2017 detection and panoptic, your own COCO-format files, and a
built-in synthetic toy set in the same layouts; `build_dataset(image_set, args)` picks one by
`args.dataset_file`."""
import logging

import torch
from torch.utils.data import DataLoader, DistributedSampler

import util.misc as utils
from datasets import coco, coco_panoptic, toy, toy_panoptic
from datasets.coco import CocoDetection, DatasetNotFoundError, uses_own_files
from datasets.coco_panoptic import CocoPanoptic
from datasets.panoptic_eval import PanopticEvaluator
from datasets.coco_eval import CocoEvaluator
from datasets.toy import ToyDataError, generate_toy_coco

logger = logging.getLogger(__name__)

BUILDERS = {"coco": coco.build, "coco_panoptic": coco_panoptic.build, "toy": toy.build,
            "toy_panoptic": toy_panoptic.build}
SUPPORTED_DATASETS = tuple(BUILDERS)
# DETR's class counts (largest category id + 1)
NUM_CLASSES = {"coco": 91, "coco_panoptic": 250, "toy": toy.NUM_CLASSES,
               "toy_panoptic": toy_panoptic.NUM_CLASSES}

__all__ = ["build_dataset", "get_coco_api_from_dataset", "CocoDetection", "CocoEvaluator",
           "DatasetNotFoundError", "ToyDataError", "generate_toy_coco", "num_classes_for",
           "CocoPanoptic", "PanopticEvaluator", "is_thing_map_for", "dataset_categories",
           "uses_own_files", "class_setup", "build_loaders", "build_datasets"]


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


def build_datasets(args):
    """(training set or None with --eval, validation set); the main process builds first, so that
    data made on first use (the toy sets) is made once."""
    if utils.is_main_process():
        dataset_val = build_dataset(image_set="val", args=args)
    if args.distributed:
        torch.distributed.barrier()
    if not utils.is_main_process():
        dataset_val = build_dataset(image_set="val", args=args)
    return None if args.eval else build_dataset(image_set="train", args=args), dataset_val


def class_setup(args, dataset):
    """(num_classes, is_thing_map, category names {id: name}) of the data; for your own files
    num_classes follows the categories (largest id + 1) unless --num_classes is given."""
    category_names = dataset_categories(dataset)
    largest = max(category_names, default=0)
    num_classes = args.num_classes
    if num_classes is None and uses_own_files(args):
        num_classes = largest + 1
        logger.info("num_classes %d: the largest category id + 1 of the annotation file "
                    "(categories %s)", num_classes, category_names)
    num_classes = num_classes or num_classes_for(args.dataset_file)
    if largest >= num_classes:
        raise ValueError(f"the data has category id {largest}, but the classifier has ids "
                         f"0..{num_classes - 1} (--num_classes {num_classes}): pass --num_classes "
                         f"{largest + 1} or more, or leave it out to follow the categories")
    return num_classes, is_thing_map_for(args.dataset_file), category_names


def build_loaders(args, dataset_train, dataset_val):
    """(train loader, val loader, train sampler, generators): loaders whose randomness comes from
    generators saved with each checkpoint; the training ones are None and () without a training
    set. On CUDA they hand out batches in pinned memory."""
    pin = torch.device(args.device).type == "cuda"
    sampler_val = (DistributedSampler(dataset_val, shuffle=False) if args.distributed
                   else torch.utils.data.SequentialSampler(dataset_val))
    data_loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False,
                                 collate_fn=utils.collate_fn, num_workers=args.num_workers,
                                 generator=torch.Generator().manual_seed(args.seed), pin_memory=pin)
    if dataset_train is None:
        return None, data_loader_val, None, ()
    sampler_generator = torch.Generator().manual_seed(args.seed + utils.get_rank())
    loader_generator = torch.Generator().manual_seed(args.seed + 1000 + utils.get_rank())
    sampler_train = (DistributedSampler(dataset_train, seed=args.seed) if args.distributed
                     else torch.utils.data.RandomSampler(dataset_train, generator=sampler_generator))
    batch_sampler_train = torch.utils.data.BatchSampler(sampler_train, args.batch_size, drop_last=True)
    if len(batch_sampler_train) == 0:
        raise SystemExit(f"the training set ({len(dataset_train)} images) gives no full batch of "
                         f"--batch_size {args.batch_size} per process")
    data_loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler_train,
                                   collate_fn=utils.collate_fn, num_workers=args.num_workers,
                                   generator=loader_generator, pin_memory=pin)
    return data_loader_train, data_loader_val, sampler_train, (sampler_generator, loader_generator)
