"""The libraries that can compute COCO AP for `CocoEvaluator` (`--coco_eval_backend`).

Both give COCOeval objects with the same `params`, `evaluate`, `summarize` and `stats`; they
differ in where `evaluate` leaves its per-image results (the attribute `per_image_field`).
`accumulate` leaves pycocotools' `eval` dict with both, so eval.pth reads the same.

faster_coco_eval (package faster-coco-eval) works in C++. Its twelve numbers equal pycocotools'
up to about 2e-16: pycocotools divides by `tp + fp + 2.2e-16`, faster_coco_eval by `tp + fp`.
"""
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

from datasets.coco import coco_from_dict, quiet

COCO_EVAL_BACKENDS = ("pycocotools", "faster_coco_eval")


class CocoEvalBackendError(ValueError):
    """An unknown backend, or one whose package is not installed."""


def _load_batch_results(coco_class, gt, img_ids, results):
    """The detections `results` on the images `img_ids` of `gt`, as a `coco_class` (its loadRes).
    loadRes copies every image of its COCO: on a view of the batch's images it costs the batch's."""
    view = coco_from_dict({"images": [gt.imgs[i] for i in img_ids],
                           "categories": list(gt.cats.values())}, coco_class)
    return quiet(view.loadRes, results)[0]


class PycocotoolsBackend:
    """The reference implementation (pure Python over numpy)."""

    name = "pycocotools"
    per_image_field = "evalImgs"

    def ground_truth(self, coco):
        return coco

    def new_eval(self, gt, iou_type):
        return COCOeval(gt, iouType=iou_type)

    def load_results(self, gt, img_ids, results):
        if not results:  # pycocotools' loadRes refuses an empty list: a COCO without annotations
            return coco_from_dict({"images": [], "annotations": [], "categories": []})
        return _load_batch_results(COCO, gt, img_ids, results)

    def accumulate(self, coco_eval):
        quiet(coco_eval.accumulate)


class FasterCocoEvalBackend:
    """faster-coco-eval: the same COCO/COCOeval interface, with evaluate/accumulate in C++."""

    name = "faster_coco_eval"
    per_image_field = "_evalImgs_cpp"

    def __init__(self):
        try:
            import faster_coco_eval
        except ImportError as err:
            raise CocoEvalBackendError(
                f"--coco_eval_backend faster_coco_eval needs the package faster-coco-eval, which "
                f"cannot be imported ({err}): pip install faster-coco-eval, or use "
                f"--coco_eval_backend pycocotools") from None
        self._lib = faster_coco_eval

    def ground_truth(self, coco):
        """The images, annotations (the very dicts) and categories as faster_coco_eval's COCO."""
        return coco_from_dict({"images": list(coco.imgs.values()),
                               "annotations": list(coco.anns.values()),
                               "categories": list(coco.cats.values())}, self._lib.COCO)

    def new_eval(self, gt, iou_type):
        # separate_eval keeps the per-image results (the default fuses evaluate and accumulate,
        # which leaves nothing to merge across processes); printing goes to stdout, which the
        # evaluator captures, rather than to this library's logger on every batch
        return self._lib.COCOeval_faster(gt, iouType=iou_type, separate_eval=True,
                                         print_function=print)

    def load_results(self, gt, img_ids, results):
        # an empty list gives a COCO without annotations
        return _load_batch_results(self._lib.COCO, gt, img_ids, results)

    def accumulate(self, coco_eval):
        """accumulate(), then `eval` in pycocotools' form: the same keys, its Params class."""
        quiet(coco_eval.accumulate)
        p = coco_eval.params
        params = Params(iouType=p.iouType)
        params.imgIds, params.catIds = [int(i) for i in p.imgIds], [int(c) for c in p.catIds]
        params.iouThrs, params.recThrs = np.array(p.iouThrs), np.array(p.recThrs)
        params.maxDets, params.areaRng = list(p.maxDets), [list(r) for r in p.areaRng]
        params.areaRngLbl, params.useCats = list(p.areaRngLbl), p.useCats
        coco_eval.eval = {"params": params, **{k: coco_eval.eval[k] for k in (
            "counts", "date", "precision", "recall", "scores")}}


def get_backend(name="pycocotools"):
    """The backend called `name` (one of COCO_EVAL_BACKENDS); CocoEvalBackendError if it is
    unknown or its package is missing."""
    if name == "pycocotools":
        return PycocotoolsBackend()
    if name == "faster_coco_eval":
        return FasterCocoEvalBackend()
    raise CocoEvalBackendError(f"unknown COCO evaluation backend {name!r}: expected one of "
                               f"{list(COCO_EVAL_BACKENDS)}")
