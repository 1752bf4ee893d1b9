"""Pictures of validation images: the ground truth beside the predicted boxes, in one PNG."""
import os

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageFont
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes, make_grid

from util.misc import IMAGENET_MEAN, IMAGENET_STD, nested_tensor_from_tensor_list

# box colours by category id (cycled); bright, so they stand out on photos and on the toy shapes
PALETTE = ("yellow", "magenta", "cyan", "orange", "lime", "white", "deepskyblue", "hotpink")
PADDING = 6
HEADER = 30


def class_colour(category_id):
    return PALETTE[(int(category_id) - 1) % len(PALETTE)]


def _font_file():
    """matplotlib's DejaVu Sans, readable at any size (None: PIL's small built-in font)."""
    try:
        import matplotlib
    except ImportError:
        return None
    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    return path if os.path.isfile(path) else None


def scaled(image, size):
    """`image` resized so that its longer side is `size`, and the factor it was scaled by."""
    height, width = image.shape[-2:]
    factor = size / max(height, width)
    new_size = [max(1, round(height * factor)), max(1, round(width * factor))]
    return TF.resize(image, new_size, antialias=True), factor


def denormalize(image):
    """A normalised (3, H, W) float image (datasets.transforms.Normalize) back to uint8."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=image.device)[:, None, None]
    return (image * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def draw_detections(image, boxes, labels, class_names, scores=None, size=256):
    """uint8 (3, H, W) `image` scaled to `size`, `boxes` (xyxy) drawn, named and scored."""
    image, factor = scaled(image, size)
    if len(boxes) == 0:
        return image
    boxes = boxes.detach().float().cpu() * factor
    texts = [class_names.get(int(label), str(int(label))) for label in labels]
    if scores is not None:
        texts = [f"{text} {float(score):.2f}" for text, score in zip(texts, scores)]
    font = _font_file()
    # lines and labels grow with the picture, the labels only up to a size that stays readable
    return draw_bounding_boxes(image, boxes, texts, colors=[class_colour(label) for label in labels],
                               width=max(2, size // 250), font=font,
                               font_size=min(max(10, size // 18), 40) if font else None,
                               fill_labels=True)


@torch.no_grad()
def predict(model, postprocessor, images, device, sizes_device=None):
    """The post-processed outputs for a list of normalised images, in each image's pixels."""
    was_training = model.training
    model.eval()
    try:
        outputs = model(nested_tensor_from_tensor_list([image.to(device) for image in images]))
    finally:
        model.train(was_training)
    sizes = torch.tensor([image.shape[-2:] for image in images], device=sizes_device or device)
    return postprocessor(outputs, sizes)


def titled_grid(cells, columns, titles, font_size):
    """uint8 (3, H, W) cells in a grid of `columns`, each title centred above its column."""
    # every cell on a common canvas (make_grid needs one size), image at the top left
    canvas_h, canvas_w = max(c.shape[1] for c in cells), max(c.shape[2] for c in cells)
    cells = [TF.pad(c, [0, 0, canvas_w - c.shape[2], canvas_h - c.shape[1]], fill=255)
             for c in cells]
    grid = make_grid(cells, nrow=columns, padding=PADDING, pad_value=255)
    strip = Image.new("RGB", (grid.shape[2], HEADER), "white")
    draw = ImageDraw.Draw(strip)
    font_file = _font_file()
    font = ImageFont.truetype(font_file, font_size) if font_file else ImageFont.load_default()
    for column, title in enumerate(titles * (columns // len(titles))):
        centre = PADDING + column * (canvas_w + PADDING) + canvas_w / 2
        draw.text((centre, HEADER / 2), title, fill="black", font=font, anchor="mm")
    return torch.cat([TF.pil_to_tensor(strip), grid], dim=1)


def predictions_picture(model, postprocessor, dataset, class_names, device, num_images=8,
                        score_threshold=0.5, size=256, pairs_per_row=2):
    """The first `num_images` of `dataset`, ground truth beside predictions: uint8 (3, H, W)."""
    items = [dataset[i] for i in range(min(num_images, len(dataset)))]
    if not items:
        raise ValueError("predictions_picture needs a data set with at least one image")
    results = predict(model, postprocessor, [image for image, _ in items], device)
    cells = []
    for (image, target), result in zip(items, results):
        picture = denormalize(image)
        height, width = (int(v) for v in target["size"])
        gt_boxes = box_convert(target["boxes"], "cxcywh", "xyxy") * torch.tensor([width, height] * 2)
        cells.append(draw_detections(picture, gt_boxes, target["labels"], class_names, size=size))
        keep = result["scores"] >= score_threshold
        cells.append(draw_detections(picture, result["boxes"][keep], result["labels"][keep],
                                     class_names, scores=result["scores"][keep], size=size))
    titles = ["ground truth", f"predicted (score >= {score_threshold:g})"]
    return titled_grid(cells, 2 * min(pairs_per_row, len(items)), titles, max(12, size // 16))


def save_picture(picture, path):
    """Write a uint8 (3, H, W) picture as PNG; returns `path`."""
    TF.to_pil_image(picture).save(path, format="PNG")
    return path


def write_run_pictures(output_dir, model, postprocessor, dataset, class_names, device, num_images=8,
                       curves=True, panoptic_postprocessor=None):
    """OUTPUT_DIR/predictions.png, curves.png and panoptic.png; returns the paths written."""
    from util.plot_utils import plot_logs
    written = [plot_logs([output_dir], os.path.join(output_dir, "curves.png"))] if curves else []
    picture = predictions_picture(model, postprocessor, dataset, class_names, device, num_images)
    written.append(save_picture(picture, os.path.join(output_dir, "predictions.png")))
    if panoptic_postprocessor is not None:
        from util.panoptic_pictures import panoptic_picture
        picture = panoptic_picture(model, panoptic_postprocessor, dataset, class_names, device,
                                   num_images)
        written.append(save_picture(picture, os.path.join(output_dir, "panoptic.png")))
    return written
