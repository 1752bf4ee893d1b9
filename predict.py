"""Detect objects in your pictures with a trained checkpoint and draw what was found.

    python predict.py --resume rpe-2.0-product-ctx-1-k.pth --images photos/ street.jpg \
        --output_dir predictions [--threshold 0.7] [--attention] [--masks]

Writes OUTPUT_DIR/predictions.json (COCO results, plus file_name and category_name) and
OUTPUT_DIR/<image name>.png with the boxes drawn; with --attention also OUTPUT_DIR/attention/,
the last encoder layer's self-attention seen from the centres of the best boxes. A checkpoint
with a mask head draws its panoptic segmentation instead, and writes the COCO panoptic PNGs
(OUTPUT_DIR/panoptic/) and OUTPUT_DIR/panoptic.json. The model options come from the checkpoint's
args; a bare state_dict needs main.py's model options on the command line.
"""
import argparse
import contextlib
import copy
import json
import logging
import math
import os
import sys

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

import datasets.transforms as T
from datasets import is_thing_map_for, num_classes_for
from datasets.coco_names import COCO_CATEGORY_NAMES
from main import get_args_parser as main_args_parser
from models import build_model
from models.segmentation import PostProcessPanoptic
from util.attention_maps import capture_encoder_attention
from util.checkpoint import CheckpointError, check_compatible, load_checkpoint
from util.misc import nested_tensor_from_tensor_list
from util.panoptic import id_to_rgb
from util.panoptic_pictures import draw_panoptic, panoptic_from_png
from util.visualize import draw_detections

logger = logging.getLogger("predict")

IMAGE_EXTENSIONS = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="DETR with iRPE: detect objects in pictures",
        epilog="Checkpoints without args also take main.py's model options (--enc_rpe2d, "
               "--backbone, --num_classes, --num_queries, ...).")
    parser.add_argument("--resume", required=True, help="checkpoint path or http(s) URL")
    parser.add_argument("--images", nargs="+", required=True,
                        help="image files, or folders whose images (not subfolders) are read")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--threshold", type=float, default=0.7,
                        help="keep predictions whose class probability exceeds this")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--size", type=int, default=T.VAL_SCALE, help="short side the model sees")
    parser.add_argument("--max_size", type=int, default=T.TRAIN_MAX_SIZE, help="long side at most")
    parser.add_argument("--attention", action="store_true",
                        help="also draw the last encoder layer's attention from a few points")
    parser.add_argument("--attention_points", type=int, default=3,
                        help="how many points (the centres of the best-scoring boxes)")
    parser.add_argument("--masks", action="store_true",
                        help="draw the panoptic segmentation and write COCO panoptic PNGs and "
                             "panoptic.json (the default for a checkpoint trained with --masks; "
                             "a file without args needs it)")
    return parser


def find_images(paths):
    """The image files among `paths` (files as given, folders' images in name order)."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path)
                           if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
            found += [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise SystemExit(f"error: --images {path}: no such file or folder")
    if not found:
        raise SystemExit(f"error: no images in {' '.join(paths)} (extensions read: "
                         f"{', '.join(sorted(IMAGE_EXTENSIONS)[:12])}, ...)")
    return found


def output_names(paths):
    """A distinct output name per image: its file name without extension, numbered on repeats."""
    names, taken = [], set()
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, k = stem, 1
        while name in taken:
            k += 1
            name = f"{stem}_{k}"
        taken.add(name)
        names.append(name)
    return names


def make_transform(size, max_size):
    """Evaluation's transform (short side `size`, long side at most `max_size`)."""
    return T.Compose([T.RandomResize([size], max_size=max_size), T.normalize_transform()])


def read_image(path):
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as err:
        raise SystemExit(f"error: cannot read {path} as an image ({err})") from None


def model_options(checkpoint, command_line, device):
    """main.py's options for building the checkpoint's model: its args over the command line's."""
    options = copy.copy(command_line)
    file_args = checkpoint.get("args")
    if file_args is not None:
        saved = vars(file_args) if isinstance(file_args, argparse.Namespace) else dict(file_args)
        defaults = vars(main_args_parser().parse_args([]))
        for key, value in vars(command_line).items():
            if key in saved and saved[key] != value and defaults.get(key) != value:
                logger.warning("--%s %s ignored: the checkpoint's args give %r", key, value, saved[key])
        vars(options).update(saved)
    # the weights come from the checkpoint; nothing is downloaded
    options.device, options.backbone_weights = device, "none"
    return options


def load_model(checkpoint_path, command_line, device, masks=False):
    """(model in eval mode, PostProcess, {category id: name}, options) of a checkpoint; `masks`
    builds a segmentation model from a file without args (a detector's args win, with a warning)."""
    checkpoint = load_checkpoint(checkpoint_path)
    options = model_options(checkpoint, command_line, device)
    if masks and checkpoint.get("args") is None:
        options.masks = True
    elif masks and not getattr(options, "masks", False):
        logger.warning("--masks: %s is a detector without a mask head (trained without --masks): "
                       "drawing its boxes", checkpoint_path)
    options.num_classes = options.num_classes or num_classes_for(options.dataset_file)
    model, _, postprocessors = build_model(options)
    check_compatible(model, checkpoint, options)
    model.load_state_dict(checkpoint["model"], strict=True)
    names = getattr(options, "category_names", None)
    if not names:  # COCO's names are the right ones only for a COCO-sized classifier
        names = COCO_CATEGORY_NAMES if options.num_classes == num_classes_for("coco") else {}
    names = {int(k): str(v) for k, v in names.items()}
    return model.eval().to(device), postprocessors["bbox"], names, options


def thing_map(options):
    """{category id: is a thing} of a segmentation model: its own, its data set's, or all things."""
    found = getattr(options, "is_thing_map", None)
    if found is None:  # None for a data set without stuff
        found = is_thing_map_for(options.dataset_file)
    if found is None:
        found = {i: True for i in range(options.num_classes)}
    return {int(k): bool(v) for k, v in found.items()}


def coco_results(found, image_id, file_name, threshold, category_names):
    """PostProcess's output for one image -> COCO results (bbox xywh) of the scores above threshold."""
    keep = found["scores"] > threshold
    return [{"image_id": image_id, "file_name": file_name, "category_id": label,
             "category_name": category_names.get(label, f"class {label}"),
             "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
            for (x0, y0, x1, y1), score, label in zip(found["boxes"][keep].tolist(),
                                                      found["scores"][keep].tolist(),
                                                      found["labels"][keep].tolist())]


def draw_picture(image, detections):
    """A copy of the PIL `image` with each detection (coco_results) drawn, labelled 'name score'."""
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in detections)])
    labels = [d["category_id"] for d in detections]
    names = {d["category_id"]: d["category_name"] for d in detections}
    drawn = draw_detections(TF.pil_to_tensor(image), boxes, labels, names,
                            scores=[d["score"] for d in detections], size=max(image.size))
    return TF.to_pil_image(drawn)


def save_attention(path, image, found, captured, index, count, category_names, sizes):
    """Image `index` of the batch with the centres of its `count` best-scoring boxes (above the
    threshold or not) marked, and beside it one heat map per point of where it attends."""
    from matplotlib.figure import Figure  # only --attention needs matplotlib

    best = found["scores"].argsort(descending=True)[:count].tolist()
    boxes = found["boxes"][best].cpu()
    points = [((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in boxes.tolist()]
    labels = [f"{category_names.get(int(found['labels'][j]), int(found['labels'][j]))} "
              f"{float(found['scores'][j]):.2f}" for j in best]
    maps, extent = attention_maps(captured, index, points, sizes)
    width, height = image.size
    fig = Figure(figsize=(3.2 * (len(maps) + 1), 3.2 * height / width + 0.5))
    axes = fig.subplots(1, len(maps) + 1, squeeze=False)[0]
    axes[0].imshow(image)
    axes[0].set_title("image")
    for k, ((x, y), heat, label) in enumerate(zip(points, maps, labels), start=1):
        axes[0].plot(x, y, "o", color="red", markersize=6, markeredgecolor="white")
        axes[0].annotate(str(k), (x, y), color="white", xytext=(4, 4), textcoords="offset points")
        # the map over a grey copy of the image, so that what is looked at can be recognised
        axes[k].imshow(image.convert("L"), cmap="gray")
        axes[k].imshow(heat.numpy(), cmap="inferno", alpha=0.6, extent=extent,
                       interpolation="nearest")
        axes[k].set_xlim(0, width)  # the last cells may reach past the image
        axes[k].set_ylim(height, 0)
        axes[k].plot(x, y, "o", color="red", markersize=6, markeredgecolor="white")
        axes[k].set_title(f"{k}: {label}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def attention_maps(captured, index, points, sizes):
    """(maps, extent): for each point (x, y) of image `index`, where its token attends, padding
    removed, and the (0, right, bottom, 0) image pixels those cells cover. `sizes`: the (w, h) of
    the image, of it resized for the model, and of the padded batch."""
    h, w = captured["hw"]
    weights = captured["weights"][index].reshape(h * w, h, w)
    valid = torch.ones(h, w, dtype=torch.bool) if captured["padding"] is None else \
        ~captured["padding"][index].reshape(h, w).cpu()
    rows, cols = int(valid[:, 0].sum()), int(valid[0].sum())
    (orig_w, orig_h), (resized_w, resized_h), (padded_w, padded_h) = sizes
    # image pixels per feature cell: the backbone's stride (padded / h), undoing the resize
    cell_w, cell_h = padded_w / w * orig_w / resized_w, padded_h / h * orig_h / resized_h
    maps = []
    for x, y in points:
        row, col = min(int(y / cell_h), rows - 1), min(int(x / cell_w), cols - 1)
        maps.append(weights[row * w + col, :rows, :cols].float().cpu())
    return maps, (0, cols * cell_w, rows * cell_h, 0)


def image_outputs(outputs, index, size, padded_size):
    """Image `index`'s outputs of a batch, its mask logits cut to the part that covers its (h, w)
    `size` of the `padded_size` batch, so that PostProcessPanoptic sees no padding."""
    masks = outputs["pred_masks"][index:index + 1]
    rows = math.ceil(masks.shape[-2] * size[0] / padded_size[0])
    cols = math.ceil(masks.shape[-1] * size[1] / padded_size[1])
    return {"pred_logits": outputs["pred_logits"][index:index + 1],
            "pred_masks": masks[..., :rows, :cols]}


def coco_panoptic_segments(ids, segments_info, category_names):
    """PostProcessPanoptic's id image and segments -> COCO panoptic ones (ids from 1, 0: none)."""
    ids = np.asarray(ids, dtype=np.int64)
    coco_ids = np.zeros_like(ids)
    segments = []
    for segment in segments_info:
        inside = ids == segment["id"]
        if not inside.any():
            continue
        new_id = len(segments) + 1
        coco_ids[inside] = new_id
        ys, xs = np.nonzero(inside)
        x0, y0 = int(xs.min()), int(ys.min())
        category = int(segment["category_id"])
        segments.append({"id": new_id, "category_id": category,
                         "category_name": category_names.get(category, f"class {category}"),
                         "isthing": int(bool(segment["isthing"])), "iscrowd": 0,
                         "area": int(inside.sum()),
                         "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]})
    return coco_ids, segments


def save_panoptic(args, name, image, prediction, category_names):
    """The picture with the segments drawn, and the COCO panoptic PNG; returns the annotation."""
    ids, segments_info = panoptic_from_png(prediction)
    coco_ids, segments = coco_panoptic_segments(ids, segments_info, category_names)
    drawn = draw_panoptic(TF.pil_to_tensor(image), coco_ids, segments, category_names,
                          size=max(image.size))
    TF.to_pil_image(drawn).save(os.path.join(args.output_dir, f"{name}.png"))
    Image.fromarray(id_to_rgb(coco_ids)).save(os.path.join(args.output_dir, "panoptic", f"{name}.png"))
    return {"file_name": f"{name}.png", "segments_info": segments}


def write_panoptic_json(args, paths, images, annotations, is_thing, category_names):
    categories = [{"id": k, "name": category_names.get(k, f"class {k}"), "isthing": int(is_thing[k])}
                  for k in sorted(set(category_names) | {s["category_id"] for a in annotations
                                                         for s in a["segments_info"]})
                  if k in is_thing]
    data = {"images": [{"id": k + 1, "file_name": path, "width": width, "height": height}
                       for k, (path, (width, height)) in enumerate(zip(paths, images))],
            "annotations": [dict(image_id=k + 1, **a) for k, a in enumerate(annotations)],
            "categories": categories}
    with open(os.path.join(args.output_dir, "panoptic.json"), "w") as f:
        json.dump(data, f)


@torch.no_grad()
def predict(args, model_command_line):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available here; use --device cpu")
    if args.batch_size < 1:
        raise SystemExit("error: --batch_size must be at least 1")
    paths = find_images(args.images)
    names = output_names(paths)
    inputs = {os.path.realpath(p) for p in paths}
    outputs = {os.path.realpath(os.path.join(args.output_dir, f"{n}.png")): n for n in names}
    clash = next((n for path, n in outputs.items() if path in inputs), None)
    if clash is not None:
        raise SystemExit(f"error: writing {clash}.png into --output_dir {args.output_dir} would "
                         f"overwrite an input picture; choose another --output_dir")
    model, postprocess, category_names, options = load_model(args.resume, model_command_line,
                                                             device, masks=args.masks)
    masks = bool(getattr(options, "masks", False))
    is_thing = thing_map(options) if masks else None
    panoptic = PostProcessPanoptic(is_thing, threshold=args.threshold) if masks else None
    transform = make_transform(args.size, args.max_size)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.attention:
        os.makedirs(os.path.join(args.output_dir, "attention"), exist_ok=True)
    if masks:
        os.makedirs(os.path.join(args.output_dir, "panoptic"), exist_ok=True)

    results, annotations, image_sizes = [], [], []
    for start in range(0, len(paths), args.batch_size):
        batch = range(start, min(start + args.batch_size, len(paths)))
        images = [read_image(paths[k]) for k in batch]
        tensors = [transform(image, None)[0] for image in images]
        samples = nested_tensor_from_tensor_list(tensors).to(device)
        orig_sizes = torch.tensor([[im.height, im.width] for im in images], device=device)
        attention = capture_encoder_attention(model) if args.attention else contextlib.nullcontext()
        with attention as captured:
            outputs = model(samples)
        for i, (k, found) in enumerate(zip(batch, postprocess(outputs, orig_sizes))):
            detections = coco_results(found, k + 1, paths[k], args.threshold, category_names)
            results += detections
            image_sizes.append(images[i].size)
            if masks:
                size = tuple(tensors[i].shape[-2:])
                prediction = panoptic(image_outputs(outputs, i, size, samples.tensors.shape[-2:]),
                                      [size], [(images[i].height, images[i].width)])[0]
                annotations.append(save_panoptic(args, names[k], images[i], prediction,
                                                 category_names))
            else:
                draw_picture(images[i], detections).save(os.path.join(args.output_dir,
                                                                      f"{names[k]}.png"))
            if args.attention:
                save_attention(os.path.join(args.output_dir, "attention", f"{names[k]}.png"),
                               images[i], found, captured, i, args.attention_points, category_names,
                               sizes=(images[i].size, tuple(tensors[i].shape[:0:-1]),
                                      tuple(samples.tensors.shape[:1:-1])))
        logger.info("%d/%d images", batch.stop, len(paths))

    with open(os.path.join(args.output_dir, "predictions.json"), "w") as f:
        json.dump(results, f)
    if masks:
        write_panoptic_json(args, paths, image_sizes, annotations, is_thing, category_names)
        logger.info("%d segments in %d images: %s, the COCO panoptic PNGs in %s",
                    sum(len(a["segments_info"]) for a in annotations), len(paths),
                    os.path.join(args.output_dir, "panoptic.json"),
                    os.path.join(args.output_dir, "panoptic"))
    logger.info("%d detections above %.2f in %d images: %s and one PNG per image in %s",
                len(results), args.threshold, len(paths),
                os.path.join(args.output_dir, "predictions.json"), args.output_dir)
    return results


def run(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], force=True)
    args, rest = get_args_parser().parse_known_args(argv)
    model_parser = argparse.ArgumentParser(
        usage="predict.py --resume CKPT --images PATH [PATH ...] --output_dir DIR [options] "
              "[main.py's model options]", parents=[main_args_parser()])
    model_command_line = model_parser.parse_args(rest)
    try:
        return predict(args, model_command_line)
    except (CheckpointError, OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    run()
