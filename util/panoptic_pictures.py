"""Pictures of panoptic segmentations, and OUTPUT_DIR/panoptic.png (image, truth, prediction)."""
import io

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_segmentation_masks

from util.panoptic import rgb_to_id
from util.visualize import _font_file, denormalize, predict, scaled, titled_grid

# RGB fill colours by category id (cycled); instances of a class get lighter and darker shades
SEGMENT_COLOURS = ((230, 60, 50), (60, 190, 80), (60, 110, 235), (240, 200, 40), (150, 90, 200),
                   (50, 200, 210), (240, 130, 40), (200, 80, 160), (130, 130, 130), (120, 170, 60))
SHADES = (1.0, 0.7, 1.25, 0.55, 1.4)


def segment_colour(category_id, instance=0):
    """The fill colour (r, g, b) of the `instance`-th segment of a class in one picture."""
    base = np.array(SEGMENT_COLOURS[(int(category_id) - 1) % len(SEGMENT_COLOURS)], dtype=float)
    shade = SHADES[instance % len(SHADES)]
    colour = base * shade if shade <= 1 else base + (255 - base) * (shade - 1)
    return tuple(int(v) for v in np.clip(np.rint(colour), 0, 255))


def panoptic_from_png(prediction):
    """A PostProcessPanoptic result -> (ids (H, W) int64, segments_info)."""
    with Image.open(io.BytesIO(prediction["png_string"])) as png:
        ids = rgb_to_id(np.asarray(png.convert("RGB")))
    return ids, prediction["segments_info"]


def panoptic_from_target(target):
    """A DETR target with 'masks' (N, H, W) and 'labels' -> (ids, segments_info); -1: no mask."""
    masks = target["masks"].bool().cpu()
    ids = np.full(masks.shape[-2:], -1, dtype=np.int64)
    segments = []
    for k, (mask, label) in enumerate(zip(masks, target["labels"].tolist())):
        ids[mask.numpy()] = k
        segments.append({"id": k, "category_id": int(label)})
    return ids, segments


def _label_point(mask):
    """(x, y) deep inside a boolean (H, W) mask, even a bent one: the middle one of the pixels
    that survive the most erosions."""
    current = mask[None, None].float()
    while True:
        # a 3 x 3 erosion (min pooling), the outside of the picture counting as background
        eroded = -F.max_pool2d(-F.pad(current, (1, 1, 1, 1)), 3, stride=1)
        if not eroded.any():
            break
        current = eroded
    ys, xs = torch.nonzero(current[0, 0], as_tuple=True)  # in row-major order
    return int(xs[len(xs) // 2]), int(ys[len(ys) // 2])


def draw_panoptic(image, ids, segments, class_names, size=256, alpha=0.6):
    """uint8 (3, H, W) `image` scaled to `size`, the `segments` of `ids` coloured and named."""
    image = scaled(image, size)[0]
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None, None].float()
    ids = F.interpolate(ids, size=tuple(image.shape[-2:]), mode="nearest")[0, 0].long()
    masks, colours, names, seen = [], [], [], {}
    for segment in segments:
        mask = ids == int(segment["id"])
        if not mask.any():
            continue
        category = int(segment["category_id"])
        masks.append(mask)
        colours.append(segment_colour(category, seen.get(category, 0)))
        seen[category] = seen.get(category, 0) + 1
        names.append(class_names.get(category, str(category)))
    if not masks:
        return image
    image = draw_segmentation_masks(image, torch.stack(masks), alpha=alpha, colors=colours)
    picture = TF.to_pil_image(image)
    draw = ImageDraw.Draw(picture)
    font_size = min(max(9, size // 20), 32)
    font_file = _font_file()
    font = ImageFont.truetype(font_file, font_size) if font_file else ImageFont.load_default()
    for mask, name in zip(masks, names):
        draw.text(_label_point(mask), name, fill="white", font=font, anchor="mm",
                  stroke_width=max(1, font_size // 8), stroke_fill="black")
    return TF.pil_to_tensor(picture)


def panoptic_picture(model, postprocessor, dataset, class_names, device, num_images=8, size=192,
                     per_row=2):
    """The first `num_images` of `dataset`: image, ground truth, prediction; uint8 (3, H, W)."""
    items = [dataset[i] for i in range(min(num_images, len(dataset)))]
    if not items:
        raise ValueError("panoptic_picture needs a data set with at least one image")
    if "masks" not in items[0][1]:
        raise ValueError("panoptic_picture needs targets with masks (a panoptic data set, --masks)")
    cells = []
    for image, target in items:
        # one image at a time: the post-processing resizes a padded batch's masks as a whole
        prediction = predict(model, postprocessor, [image], device, sizes_device="cpu")[0]
        picture = denormalize(image)
        cells.append(scaled(picture, size)[0])
        cells.append(draw_panoptic(picture, *panoptic_from_target(target), class_names, size))
        cells.append(draw_panoptic(picture, *panoptic_from_png(prediction), class_names, size))
    titles = ["image", "ground truth", "predicted"]
    return titled_grid(cells, 3 * min(per_row, len(items)), titles, max(12, size // 14))
