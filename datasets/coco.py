"""COCO object detection: reading images and annotations, and preparing DETR targets.

Either your own files (`--{train,val}_ann` and `--{train,val}_images`: any COCO-format json and a
folder or zip of its images) or COCO 2017's layout under `--coco_path` (LAYOUT_HELP); an image
folder is preferred over the zip when both exist.
"""
import contextlib
import io
import json
import logging
import multiprocessing
import os
import zipfile

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from datasets import transforms as T

logger = logging.getLogger(__name__)

SPLITS = {"train": "train2017", "val": "val2017"}

LAYOUT_HELP = (
    "expected layout: <root>/annotations/instances_{train,val}2017.json and, for the images, "
    "either folders <root>/train2017/ and <root>/val2017/ or zips <root>/train2017.zip and "
    "<root>/val2017.zip whose members are train2017/<file_name> and val2017/<file_name>"
)

OWN_FILES_HELP = (
    "a split of your own data is --{split}_ann FILE (a COCO-format annotation json: 'images' with "
    "'id' and 'file_name', 'annotations' with 'image_id', 'category_id' and 'bbox' [x, y, w, h], "
    "'categories' with 'id' and 'name') and --{split}_images (a folder holding the files named in "
    "it, or a zip with them as members, at its top or under one folder)"
)

COCO_FORMAT = {"images": ("id", "file_name"), "annotations": ("image_id", "category_id", "bbox"),
               "categories": ("id", "name")}


class DatasetNotFoundError(FileNotFoundError):
    """Data missing or not laid out as expected; the message names the path and the layout."""


class BadImageError(RuntimeError):
    """An image that cannot be read or decoded (truncated, corrupt, not an image)."""


SKIP_HELP = "pass --skip_bad_images to train and evaluate without such images"


def fill_annotation_defaults(coco):
    """Give a pycocotools COCO's annotations 'iscrowd' 0 and the box 'area' where missing."""
    for ann in coco.anns.values():
        ann.setdefault("iscrowd", 0)
        if "area" not in ann and "bbox" in ann:
            ann["area"] = ann["bbox"][2] * ann["bbox"][3]
    return coco


def coco_format_problem(data):
    """What keeps `data` (a parsed json) from being a COCO detection file, or None."""
    if not isinstance(data, dict):
        return f"its top level is a {type(data).__name__}, not an object"
    for key, fields in COCO_FORMAT.items():
        entries = data.get(key)
        if not isinstance(entries, list):
            return f"it has no list '{key}' (its keys: {sorted(data)[:8]})"
        for entry in entries:
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                return f"an entry of '{key}' lacks {missing}: {str(entry)[:120]}"
    bad_box = next((a for a in data["annotations"] if not (
        isinstance(a["bbox"], list) and len(a["bbox"]) == 4)), None)
    if bad_box is not None:
        return f"an annotation's bbox is not [x, y, w, h]: {str(bad_box)[:120]}"
    category_ids = {c["id"] for c in data["categories"]}
    unknown = sorted({a["category_id"] for a in data["annotations"]} - category_ids)
    if unknown:
        return f"annotations use category ids {unknown[:10]} that 'categories' does not list"
    image_ids = {i["id"] for i in data["images"]}
    orphans = [a for a in data["annotations"] if a["image_id"] not in image_ids]
    if orphans:
        return (f"{len(orphans)} annotation(s) name an image id that 'images' lacks, e.g. "
                f"{orphans[0]['image_id']}")
    return None


def quiet(fn, *args, **kwargs):
    """Call a function with its progress printing captured; returns (result, text)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = fn(*args, **kwargs)
    return result, buf.getvalue()


def coco_from_dict(dataset, coco_class=COCO):
    """A pycocotools COCO (or `coco_class`, of the same interface) indexing the dict `dataset`,
    without its progress printing."""
    coco, _ = quiet(coco_class)
    coco.dataset = dataset
    quiet(coco.createIndex)
    return coco


def load_coco_api(annotation_file, help_text=LAYOUT_HELP):
    """pycocotools COCO object of a COCO-format json file; ValueError saying what is wrong."""
    try:
        with open(annotation_file, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"annotation file {annotation_file} is not valid json ({err})") from None
    problem = coco_format_problem(data)
    if problem:
        raise ValueError(f"annotation file {annotation_file} is not in COCO format: {problem}; "
                         f"{help_text}")
    # pycocotools indexes annotations by 'id'; hand-made files often leave it out
    for number, ann in enumerate(data["annotations"], start=1):
        ann.setdefault("id", number)
    return fill_annotation_defaults(coco_from_dict(data))


class FolderImages:
    """Images stored as files in a folder."""

    def __init__(self, folder, help_text=LAYOUT_HELP):
        self.folder = folder
        self.help_text = help_text

    def path(self, file_name):
        return os.path.join(self.folder, file_name)

    def lacking(self, file_names):
        """('the folder ... lacks', the file names among `file_names` with no file there)."""
        return (f"the folder {self.folder} lacks",
                [f for f in file_names if not os.path.isfile(self.path(f))])

    def open_bytes(self, file_name):
        path = self.path(file_name)
        if not os.path.isfile(path):
            raise DatasetNotFoundError(f"image file {path} is missing; {self.help_text}")
        return open(path, "rb")

    def describe(self, file_name):
        return f"image file {self.path(file_name)}"

    def __repr__(self):
        return f"{type(self).__name__}({self.folder!r})"


class ZipImages:
    """Images stored as members `<prefix>/<file_name>` (`<file_name>` for prefix '') of a zip.

    Opened lazily once per process and never pickled: each DataLoader worker has its own handle.
    """

    def __init__(self, zip_path, prefix, help_text=LAYOUT_HELP):
        self.zip_path = zip_path
        self.prefix = prefix
        self.help_text = help_text
        self._zip = None
        self._pid = None

    def _archive(self):
        if self._zip is None or self._pid != os.getpid():
            # A handle inherited through fork shares its file offset with the parent: never reuse it.
            self._zip = zipfile.ZipFile(self.zip_path, "r")
            self._pid = os.getpid()
        return self._zip

    def member(self, file_name):
        return f"{self.prefix}/{file_name}" if self.prefix else file_name

    def describe(self, file_name):
        return f"member {self.member(file_name)} of {self.zip_path}"

    def lacking(self, file_names):
        """('<zip> lacks', the members of `file_names` that the archive does not have)."""
        names = set(self._archive().namelist())
        return f"{self.zip_path} lacks", [m for m in map(self.member, file_names) if m not in names]

    def open_bytes(self, file_name):
        try:
            data = self._archive().read(self.member(file_name))
        except KeyError:
            raise DatasetNotFoundError(
                f"{self.zip_path} has no member {self.member(file_name)}; {self.help_text}") from None
        return io.BytesIO(data)

    def __getstate__(self):
        return {**self.__dict__, "_zip": None, "_pid": None}

    def __repr__(self):
        return f"{type(self).__name__}({self.zip_path!r}, prefix={self.prefix!r})"


def find_images(root, split_name):
    """The image source of `split_name` (e.g. 'val2017') under `root`: its folder, else its zip."""
    folder = os.path.join(root, split_name)
    zip_path = os.path.join(root, split_name + ".zip")
    if os.path.isdir(folder):
        return FolderImages(folder)
    if os.path.isfile(zip_path):
        if not zipfile.is_zipfile(zip_path):
            raise DatasetNotFoundError(f"{zip_path} is not a readable zip archive; {LAYOUT_HELP}")
        return ZipImages(zip_path, split_name)
    raise DatasetNotFoundError(
        f"no images for {split_name}: neither the folder {folder} nor the zip {zip_path} exists; "
        f"{LAYOUT_HELP}")


def zip_prefix(zip_path, file_names):
    """The folder inside a zip of your own images that holds the files: '' (its top) or the one
    folder under which most of `file_names` are members."""
    with zipfile.ZipFile(zip_path) as archive:
        names = set(archive.namelist())
    counts = {"": sum(f in names for f in file_names)}
    for file_name in file_names[:1]:
        for member in names:
            if member.endswith("/" + file_name):
                prefix = member[:-len(file_name) - 1]
                counts[prefix] = sum(f"{prefix}/{f}" in names for f in file_names)
    return max(counts, key=lambda p: (counts[p], p == ""))


def open_own_images(path, file_names, help_text):
    """The image source of your own split: `path` is a folder or a zip archive of the images."""
    if os.path.isdir(path):
        return FolderImages(path, help_text)
    if not os.path.exists(path):
        raise DatasetNotFoundError(f"image folder or zip {path} does not exist; {help_text}")
    if not zipfile.is_zipfile(path):
        raise DatasetNotFoundError(f"{path} is neither a folder nor a zip archive; {help_text}")
    return ZipImages(path, zip_prefix(path, file_names), help_text)


def coco_2017_annotation_file(root, split):
    """`root`/annotations/instances_{train,val}2017.json, checked to exist."""
    if not root:
        raise DatasetNotFoundError(f"no data root given (set --coco_path); {LAYOUT_HELP}")
    if not os.path.isdir(root):
        raise DatasetNotFoundError(f"data root {root} does not exist or is not a folder; {LAYOUT_HELP}")
    annotation_file = os.path.join(root, "annotations", f"instances_{SPLITS[split]}.json")
    if not os.path.isfile(annotation_file):
        raise DatasetNotFoundError(f"annotation file {annotation_file} is missing; {LAYOUT_HELP}")
    return annotation_file


def segmentation_mask(segmentation, height, width, image_id=None):
    """(height, width) bool mask of a COCO 'segmentation': polygons, or RLE (plain or compressed)."""
    try:
        if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
            polygons = [p for p in segmentation if len(p) >= 6]
            if not polygons:
                return torch.zeros((height, width), dtype=torch.bool)
            rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
        elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
            rle = coco_mask.frPyObjects(segmentation, height, width)
        else:
            rle = dict(segmentation)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
        mask = coco_mask.decode(rle)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"image {image_id}: an annotation's 'segmentation' is neither polygons "
                         f"nor RLE ({err})") from err
    if mask.shape[:2] != (height, width):
        raise ValueError(f"image {image_id}: an RLE 'segmentation' of size {list(mask.shape[:2])} "
                         f"on an image of size {[height, width]}")
    return torch.from_numpy(mask.reshape(height, width) > 0)


def mask_to_rle(mask):
    """A (H, W) 0/1 mask as COCO's compressed RLE, its counts a str (json-ready)."""
    rle = coco_mask.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def clipped_xyxy(bboxes, width, height):
    """COCO [x, y, w, h] boxes -> (N, 4) float32 (x0, y0, x1, y1), clipped to the image."""
    boxes = torch.tensor(bboxes, dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    return boxes


def count_box_faults(coco):
    """(boxes reaching outside their image, boxes of zero or negative size) among the non-crowd
    annotations of a pycocotools COCO; prepare_target clips the first and drops the second."""
    outside = empty = 0
    for ann in coco.anns.values():
        image = coco.imgs.get(ann.get("image_id"), {})
        if ann.get("iscrowd", 0) or "bbox" not in ann:
            continue
        x, y, bw, bh = ann["bbox"]
        width, height = image.get("width", float("inf")), image.get("height", float("inf"))
        x0, y0 = min(max(x, 0), width), min(max(y, 0), height)
        x1, y1 = min(max(x + bw, 0), width), min(max(y + bh, 0), height)
        if not (x1 > x0 and y1 > y0):
            empty += 1
        elif (x0, y0, x1, y1) != (x, y, x + bw, y + bh):
            outside += 1
    return outside, empty


def annotation_target(image_size, image_id, annotations):
    """DETR target of COCO annotations (or panoptic segments) on an image of (w, h) `image_size`:
    boxes xyxy clipped to the image, 'area' the box area where absent, sizes int64 [h, w]."""
    w, h = image_size
    size = torch.tensor([h, w], dtype=torch.int64)
    return {
        "boxes": clipped_xyxy([a["bbox"] for a in annotations], w, h),
        "labels": torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64),
        "image_id": torch.tensor([image_id], dtype=torch.int64),
        "area": torch.tensor([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in annotations],
                             dtype=torch.float32),
        "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in annotations], dtype=torch.int64),
        "orig_size": size,
        "size": size.clone(),
    }


def prepare_target(image_size, image_id, annotations, return_masks=False):
    """DETR target of one image's COCO annotations: crowds dropped, boxes left empty by clipping
    removed with their other fields; with `return_masks`, 'masks' (N, h, w) bool."""
    w, h = image_size
    annotations = [a for a in annotations if not a.get("iscrowd", 0)]
    if return_masks:
        missing = [a.get("id") for a in annotations if "segmentation" not in a]
        if missing:
            raise ValueError(f"--masks: annotations {missing[:5]} of image {image_id} have no "
                             f"'segmentation'; use an instances file with masks, or drop --masks")
        masks = [segmentation_mask(a["segmentation"], h, w, image_id) for a in annotations]
    target = annotation_target(image_size, image_id, annotations)
    if return_masks:
        target["masks"] = torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=torch.bool)
    boxes = target["boxes"]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    target.update({k: target[k][keep] for k in T.INSTANCE_FIELDS if k in target})
    return target


class CocoDetection(torch.utils.data.Dataset):
    """(image, target) pairs of one COCO-format split ('train' or 'val'), by image id.

    From COCO 2017's layout under `root`, or your own `annotation_file` and `images` (a folder or
    zip). An unreadable image raises BadImageError; with `skip_bad_images` the next readable image
    takes its place and `self.skipped` counts it.
    """

    def __init__(self, root, split, transforms=None, annotation_file=None, images=None,
                 return_masks=False, skip_bad_images=False):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected one of {sorted(SPLITS)}")
        if (annotation_file is None) != (images is None):
            raise ValueError("annotation_file and images go together: give both or neither")
        own_files = annotation_file is not None
        help_text = OWN_FILES_HELP.format(split=split) if own_files else LAYOUT_HELP
        if not own_files:
            annotation_file = coco_2017_annotation_file(root, split)
            images = find_images(root, SPLITS[split])
        elif not os.path.isfile(annotation_file):
            raise DatasetNotFoundError(
                f"annotation file {annotation_file} does not exist; {help_text}")
        self.root = root
        self.split = split
        self.annotation_file = annotation_file
        self.coco = load_coco_api(annotation_file, help_text)
        self.ids = sorted(self.coco.imgs.keys())
        self.transforms = transforms
        self.return_masks = return_masks
        # images skipped by this process and its DataLoader workers (shared memory)
        self.skipped = multiprocessing.Value("i", 0) if skip_bad_images else None
        outside, empty = count_box_faults(self.coco)
        if outside or empty:
            logger.info("%s: %d boxes reach outside their image and are clipped to it, %d have zero "
                        "or negative size (or lie outside the image) and are dropped",
                        annotation_file, outside, empty)
        file_names = [self.coco.imgs[i]["file_name"] for i in self.ids]
        if own_files:
            images = open_own_images(images, file_names, help_text)
        self.images = images
        self._check_images(file_names, own_files)

    def _check_images(self, file_names, own_files):
        """Name the images that the annotation file lists and the source lacks, before training."""
        # a stat per image in a folder: COCO 2017's own folders are trusted as before
        if not (own_files or isinstance(self.images, ZipImages)):
            return
        where, missing = self.images.lacking(file_names)
        if missing:
            raise DatasetNotFoundError(
                f"{where} {len(missing)} image(s) listed in {self.annotation_file}, e.g. "
                f"{', '.join(missing[:5])}; {self.images.help_text}")

    def __len__(self):
        return len(self.ids)

    def load_image(self, image_id):
        """The image as an RGB PIL image; BadImageError naming the file when it cannot be read."""
        file_name = self.coco.imgs[image_id]["file_name"]
        try:
            with self.images.open_bytes(file_name) as f, Image.open(f) as img:
                return img.convert("RGB")  # decodes all of it: a truncated file fails here
        except DatasetNotFoundError:
            raise
        except (OSError, SyntaxError, ValueError, zipfile.BadZipFile) as err:  # BadZipFile: bad CRC
            what = f"{self.images.describe(file_name)} (image id {image_id}): {err}"
            raise BadImageError(f"cannot read {what}; replace the file, or {SKIP_HELP}") from err

    def load_target(self, image_id, image_size):
        annotations = self.coco.imgToAnns.get(image_id, [])
        return prepare_target(image_size, image_id, annotations, self.return_masks)

    def _load_readable(self, index):
        """(image_id, image) of `index`, or with skipping on, of the next readable image."""
        for attempt in range(len(self.ids)):
            image_id = self.ids[(index + attempt) % len(self.ids)]
            try:
                return image_id, self.load_image(image_id)
            except (BadImageError, DatasetNotFoundError) as err:
                if self.skipped is None:
                    raise
                with self.skipped.get_lock():
                    self.skipped.value += 1
                logger.warning("skipped (--skip_bad_images): %s", str(err).split("; ")[0])
        raise BadImageError(f"no image of {self.annotation_file} can be read")

    def __getitem__(self, index):
        image_id, image = self._load_readable(index)
        target = self.load_target(image_id, image.size)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self):
        return (f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, "
                f"images={len(self)}, source={self.images!r})")


def check_args(args):
    """Options the box-only toy set (which calls this) cannot honour."""
    if getattr(args, "masks", False) and getattr(args, "dataset_file", None) == "toy":
        raise ValueError("--masks needs masks, and --dataset_file toy has boxes only: use "
                         "--dataset_file toy_panoptic (the same images with panoptic masks)")


def own_files(args, image_set):
    """(--{image_set}_ann, --{image_set}_images) as given, (None, None) when neither is."""
    return getattr(args, f"{image_set}_ann", None), getattr(args, f"{image_set}_images", None)


def uses_own_files(args):
    """Whether any split comes from --train_ann / --val_ann files rather than --coco_path."""
    return any(any(own_files(args, image_set)) for image_set in SPLITS)


def build(image_set, args):
    """Detection split `image_set` ('train' or 'val'): from --{image_set}_ann and
    --{image_set}_images when given, else from COCO 2017's layout under `args.coco_path`."""
    check_args(args)
    transforms = T.make_coco_transforms(image_set)
    annotation_file, images = own_files(args, image_set)
    root = None
    if annotation_file or images:
        if not (annotation_file and images):
            given, lacking = ("ann", "images") if annotation_file else ("images", "ann")
            raise DatasetNotFoundError(f"--{image_set}_{given} needs --{image_set}_{lacking} as well; "
                                       f"{OWN_FILES_HELP.format(split=image_set)}")
    else:
        annotation_file = images = None
        root = getattr(args, "coco_path", None)
        if not root:
            raise DatasetNotFoundError(
                f"--dataset_file coco needs --coco_path pointing to the COCO 2017 data, or your "
                f"own files for the {image_set} split; {OWN_FILES_HELP.format(split=image_set)}; "
                f"or {LAYOUT_HELP}")
    return CocoDetection(root, image_set, transforms, annotation_file, images,
                         return_masks=getattr(args, "masks", False),
                         skip_bad_images=getattr(args, "skip_bad_images", False))
