"""COCO box and mask evaluation (COCOeval), batch by batch and across processes.

    evaluator = CocoEvaluator(coco_gt)            # iou_types=("bbox", "segm") for mask AP too
    for batch ...:
        evaluator.update({image_id: {"scores": ..., "labels": ..., "boxes": ...}, ...})
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    text = evaluator.summarize()                  # the usual 12-line table; numbers in .stats

Each `update` runs COCOeval's per-image step at once and keeps only its per-image results, which
`synchronize_between_processes` gathers from every process.
"""
import copy

import numpy as np
import torch

from datasets.coco import fill_annotation_defaults, mask_to_rle, quiet
from datasets.coco_eval_backends import get_backend
from util.misc import all_gather

SUPPORTED_IOU_TYPES = ("bbox", "segm")


def _as_numpy(value):
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def predictions_to_coco(predictions, iou_type="bbox"):
    """{image_id: {'scores', 'labels', and 'boxes' (N, 4) xyxy in pixels, or for iou_type 'segm'
    'masks' (N, 1, H, W) 0/1}} -> COCO result dicts ('bbox' xywh, or 'segmentation' RLE)."""
    key = "masks" if iou_type == "segm" else "boxes"
    results = []
    for image_id, pred in predictions.items():
        items, scores, labels = (_as_numpy(pred[k]) for k in (key, "scores", "labels"))
        if not (len(items) == len(scores) == len(labels)):
            raise ValueError(f"predictions for image {image_id} have {len(items)} {key}, "
                             f"{len(scores)} scores and {len(labels)} labels; they must match")
        for item, score, label in zip(items, scores.tolist(), labels.tolist()):
            if key == "masks":
                found = {"segmentation": mask_to_rle(item.reshape(item.shape[-2:]))}
            else:
                x0, y0, x1, y1 = item.tolist()
                found = {"bbox": [x0, y0, x1 - x0, y1 - y0]}
            results.append({"image_id": int(image_id), "category_id": int(label), **found,
                            "score": float(score)})
    return results


def _per_image_shape(params, num_images):
    """COCOeval orders its per-image results as [category][area range][image]."""
    return len(params.catIds) if params.useCats else 1, len(params.areaRng), num_images


class CocoEvaluator:
    """Box (and mask) AP of predictions against `coco_gt` (a pycocotools COCO, left unchanged);
    `backend` names the library that computes AP ('pycocotools' or 'faster_coco_eval')."""

    def __init__(self, coco_gt, iou_types=("bbox",), backend="pycocotools"):
        iou_types = tuple(iou_types)
        unsupported = [t for t in iou_types if t not in SUPPORTED_IOU_TYPES]
        if unsupported:
            raise ValueError(f"unsupported IoU type(s) {unsupported}: this evaluator supports "
                             f"{list(SUPPORTED_IOU_TYPES)}")
        self.backend = get_backend(backend)
        # COCOeval writes into the ground truth ('ignore' on every annotation): work on a copy,
        # so the data set's own COCO object stays as it was read
        coco_gt = fill_annotation_defaults(copy.deepcopy(coco_gt))
        if "segm" in iou_types:
            unmasked = [a["id"] for a in coco_gt.anns.values() if "segmentation" not in a]
            if unmasked:
                raise ValueError(f"mask AP needs a 'segmentation' in every ground-truth annotation; "
                                 f"annotations {unmasked[:5]} have none")
        self.iou_types = iou_types
        self.coco_gt = self.backend.ground_truth(coco_gt)
        self.coco_eval = {t: self.backend.new_eval(self.coco_gt, t) for t in iou_types}
        self.img_ids = []
        self.eval_imgs = {t: [] for t in iou_types}
        self._merged = False

    def __getitem__(self, iou_type):
        return self.coco_eval[iou_type]

    def update(self, predictions):
        """Evaluate one batch: {image_id: {'scores', 'labels', 'boxes' xyxy (and 'masks')}}; an
        image with no predictions still counts (its ground truth becomes misses)."""
        img_ids = sorted({int(i) for i in predictions})
        if not img_ids:
            return
        unknown = [i for i in img_ids if i not in self.coco_gt.imgs]
        if unknown:
            raise ValueError(f"predictions for image ids {unknown[:5]} that are not in the ground truth; "
                             f"evaluate against the COCO object of the data set the images came from")
        self._merged = False
        self.img_ids.extend(img_ids)
        for iou_type in self.iou_types:
            results = predictions_to_coco(predictions, iou_type)
            coco_eval = self.coco_eval[iou_type]
            coco_eval.cocoDt = self.backend.load_results(self.coco_gt, img_ids, results)
            coco_eval.params.imgIds = list(img_ids)
            quiet(coco_eval.evaluate)
            evaluated = getattr(coco_eval, self.backend.per_image_field)
            per_image = np.empty(len(evaluated), dtype=object)
            per_image[:] = evaluated
            self.eval_imgs[iou_type].append(
                per_image.reshape(_per_image_shape(coco_eval.params, len(img_ids))))

    def _local_eval_imgs(self, iou_type):
        if self.eval_imgs[iou_type]:
            return np.concatenate(self.eval_imgs[iou_type], axis=2)
        return np.empty(_per_image_shape(self.coco_eval[iou_type].params, 0), dtype=object)

    def _merge(self, gather):
        for iou_type in self.iou_types:
            payload = (np.asarray(self.img_ids, dtype=np.int64), self._local_eval_imgs(iou_type))
            gathered = gather(payload)
            img_ids = np.concatenate([ids for ids, _ in gathered])
            eval_imgs = np.concatenate([e for _, e in gathered], axis=2)
            # An image seen twice (e.g. padding of a distributed sampler) counts once.
            img_ids, first = np.unique(img_ids, return_index=True)
            eval_imgs = eval_imgs[..., first]
            coco_eval = self.coco_eval[iou_type]
            setattr(coco_eval, self.backend.per_image_field, list(eval_imgs.flatten()))
            coco_eval.params.imgIds = [int(i) for i in img_ids]
            coco_eval._paramsEval = copy.deepcopy(coco_eval.params)
        self._merged = True

    def synchronize_between_processes(self):
        """Gather the per-image results of all processes (util.misc.all_gather) into each one."""
        self._merge(all_gather)

    def accumulate(self):
        """Precision/recall over all evaluated images (merges local results if not yet done)."""
        if not self._merged:
            self._merge(lambda payload: [payload])
        for coco_eval in self.coco_eval.values():
            self.backend.accumulate(coco_eval)

    def summarize(self):
        """Compute `stats` of each COCOeval and return the summary tables as text."""
        parts = []
        for iou_type, coco_eval in self.coco_eval.items():
            if not coco_eval.eval:
                raise RuntimeError("CocoEvaluator.summarize() called before accumulate(); "
                                   "call accumulate() first")
            _, text = quiet(coco_eval.summarize)
            parts.append(f"IoU metric: {iou_type}\n{text}")
        return "".join(parts)
