"""Panoptic quality (PQ, SQ, RQ) with the rules of the COCO panoptic API (panopticapi).

Segments of one category match when their IoU is above 0.5 (the union leaves out the
prediction's pixels on void). PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP,
RQ = TP / (TP + FP/2 + FN/2). Unmatched ground truth is FN unless crowd; an unmatched prediction
is FP unless more than half of it lies on void or on its category's crowd region. The scores are
averaged over the categories with any TP, FP or FN.
"""
import io
from collections import defaultdict

import numpy as np
from PIL import Image

from util.misc import all_gather
from util.panoptic import rgb_to_id

VOID = 0


class PanopticEvaluationError(ValueError):
    """Predictions that do not fit the ground truth (ids, categories, sizes)."""


class CategoryStats:
    """Counts of one category: summed IoU of the matches, TP, FP, FN."""

    def __init__(self):
        self.iou, self.tp, self.fp, self.fn = 0.0, 0, 0, 0

    def add(self, other):
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn


def image_stats(gt_ids, gt_segments, pred_ids, pred_segments, categories):
    """{category_id: CategoryStats} of one image from its (H, W) id images and segments_info."""
    if gt_ids.shape != pred_ids.shape:
        raise PanopticEvaluationError(f"predicted id image {pred_ids.shape} and ground truth "
                                      f"{gt_ids.shape} differ in size")
    gt = {s["id"]: s for s in gt_segments}
    pred = {s["id"]: dict(s) for s in pred_segments}
    labels, counts = np.unique(pred_ids, return_counts=True)
    for label, count in zip(labels.tolist(), counts.tolist()):
        if label not in pred:
            if label == VOID:
                continue
            raise PanopticEvaluationError(f"segment id {label} is in the predicted PNG but not in "
                                          f"its segments_info")
        pred[label]["area"] = count
        if pred[label]["category_id"] not in categories:
            raise PanopticEvaluationError(f"predicted category {pred[label]['category_id']} is not "
                                          f"a category of the ground truth")
    absent = [i for i, s in pred.items() if "area" not in s]
    if absent:
        raise PanopticEvaluationError(f"segments {absent[:5]} of segments_info are not in the PNG")

    # intersections of every (ground truth, prediction) id pair
    pairs, counts = np.unique(np.stack([gt_ids.ravel(), pred_ids.ravel()]), axis=1, return_counts=True)
    intersection = {(int(g), int(p)): int(c) for (g, p), c in zip(pairs.T, counts)}

    stats = defaultdict(CategoryStats)
    gt_matched, pred_matched = set(), set()
    for (g, p), inter in intersection.items():
        if g not in gt or p not in pred or gt[g].get("iscrowd", 0) == 1:
            continue
        if gt[g]["category_id"] != pred[p]["category_id"]:
            continue
        union = pred[p]["area"] + gt[g]["area"] - inter - intersection.get((VOID, p), 0)
        iou = inter / union
        if iou > 0.5:
            stats[gt[g]["category_id"]].tp += 1
            stats[gt[g]["category_id"]].iou += iou
            gt_matched.add(g)
            pred_matched.add(p)

    crowd_by_category = {}
    for g, segment in gt.items():
        if g in gt_matched:
            continue
        if segment.get("iscrowd", 0) == 1:
            crowd_by_category[segment["category_id"]] = g
            continue
        stats[segment["category_id"]].fn += 1

    for p, segment in pred.items():
        if p in pred_matched:
            continue
        ignored = intersection.get((VOID, p), 0)
        if segment["category_id"] in crowd_by_category:
            ignored += intersection.get((crowd_by_category[segment["category_id"]], p), 0)
        if ignored / segment["area"] > 0.5:
            continue
        stats[segment["category_id"]].fp += 1
    return stats


def pq_average(stats, categories, isthing=None):
    """Mean PQ, SQ, RQ over the categories (all, or only things / stuff) that occur; and per class."""
    per_class, occurring = {}, []
    for category_id, category in categories.items():
        if isthing is not None and bool(category.get("isthing", 1)) != isthing:
            continue
        s = stats.get(category_id, CategoryStats())
        if s.tp + s.fp + s.fn == 0:
            per_class[category_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        denominator = s.tp + 0.5 * s.fp + 0.5 * s.fn
        per_class[category_id] = {"pq": s.iou / denominator, "sq": s.iou / s.tp if s.tp else 0.0,
                                  "rq": s.tp / denominator}
        occurring.append(per_class[category_id])
    n = len(occurring)
    # the panoptic API divides by n unguarded; an empty group scores 0 here
    means = {k: sum(c[k] for c in occurring) / n if n else 0.0 for k in ("pq", "sq", "rq")}
    return {**means, "n": n}, per_class


class PanopticEvaluator:
    """Per-image, per-category counts across processes, from ground-truth `annotations` {image_id:
    annotation}, `categories` {id: category} and `load_ids(image_id)`, the (H, W) id image."""

    def __init__(self, annotations, categories, load_ids):
        self.annotations = annotations
        self.categories = categories
        self.load_ids = load_ids
        self.per_image = {}

    @classmethod
    def from_dataset(cls, dataset):
        """The evaluator of a CocoPanoptic data set (possibly inside torch.utils.data.Subset)."""
        while hasattr(dataset, "dataset") and not hasattr(dataset, "load_ids"):
            dataset = dataset.dataset
        if not hasattr(dataset, "load_ids"):
            raise PanopticEvaluationError(f"panoptic quality needs panoptic ground truth; "
                                          f"{type(dataset).__name__} has none")
        return cls(dataset.annotations, dataset.categories, dataset.load_ids)

    def update(self, predictions):
        """predictions: PostProcessPanoptic's outputs, each with its 'image_id' added."""
        for prediction in predictions:
            image_id = int(prediction["image_id"])
            if image_id not in self.annotations:
                raise PanopticEvaluationError(f"prediction for image {image_id}, which has no "
                                              f"ground truth")
            with Image.open(io.BytesIO(prediction["png_string"])) as png:
                pred_ids = rgb_to_id(np.asarray(png.convert("RGB")))
            self.per_image[image_id] = dict(image_stats(
                self.load_ids(image_id), self.annotations[image_id]["segments_info"], pred_ids,
                prediction["segments_info"], self.categories))

    def synchronize_between_processes(self):
        """Gather every process's images; an image seen twice (sampler padding) counts once."""
        merged = {}
        for per_image in all_gather(self.per_image):
            merged.update(per_image)
        self.per_image = merged

    def summarize(self):
        """{'All', 'Things', 'Stuff': {'pq', 'sq', 'rq', 'n'}, 'per_class': {id: {'pq', 'sq', 'rq'}}}."""
        stats = defaultdict(CategoryStats)
        for per_image in self.per_image.values():
            for category_id, s in per_image.items():
                stats[category_id].add(s)
        results = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            results[name], per_class = pq_average(stats, self.categories, isthing)
            if isthing is None:
                results["per_class"] = per_class
        return results


def format_table(results):
    """The panoptic API's summary table as text."""
    lines = [f"{'':10s}|{'PQ':>8s} {'SQ':>8s} {'RQ':>8s} {'N':>5s}", "-" * 41]
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        lines.append(f"{name:10s}|{100 * r['pq']:8.1f} {100 * r['sq']:8.1f} {100 * r['rq']:8.1f} "
                     f"{r['n']:5d}")
    return "\n".join(lines)
