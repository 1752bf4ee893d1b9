"""The COCO panoptic PNG encoding: a pixel's colour (R, G, B) is the segment id R + 256 G + 256^2 B."""
import numpy as np


def id_to_rgb(ids):
    """(H, W) integer ids -> (H, W, 3) uint8 colours."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 256 ** 2 % 256], axis=-1).astype(np.uint8)


def rgb_to_id(rgb):
    """(H, W, 3) colours -> (H, W) int64 segment ids."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 ** 2 * rgb[..., 2]
