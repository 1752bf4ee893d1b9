"""Time COCO box evaluation with each --coco_eval_backend on a synthetic val2017-sized set.

    python benchmarks/coco_eval.py                       # 5,000 images, 100 detections each
    python benchmarks/coco_eval.py --images 500          # a quick look

Seeded ground truth of val2017's shape (640 x 480, 80 categories, about 7 objects an image, some
crowd, some images empty) and 100 DETR-like detections an image. Each backend runs what
engine.evaluate runs; the script checks that they give the same twelve numbers.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
from pycocotools.coco import COCO

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.coco_eval import CocoEvaluator  # noqa: E402
from datasets.coco_eval_backends import COCO_EVAL_BACKENDS, quiet  # noqa: E402

WIDTH, HEIGHT = 640, 480


def synthetic_ground_truth(num_images, num_categories, rng):
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg",
                       "width": WIDTH, "height": HEIGHT})
        num_objects = 0 if rng.random() < 0.01 else int(rng.poisson(7))
        for _ in range(num_objects):
            side = float(np.exp(rng.uniform(np.log(8), np.log(400))))  # small, medium and large
            w = min(side * rng.uniform(0.5, 1.5), WIDTH - 1)
            h = min(side * rng.uniform(0.5, 1.5), HEIGHT - 1)
            x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.integers(1, num_categories + 1)),
                                "bbox": [x, y, w, h], "area": w * h * rng.uniform(0.5, 0.9),
                                "iscrowd": int(rng.random() < 0.01)})
    coco, _ = quiet(COCO)
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, num_categories + 1)]
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    quiet(coco.createIndex)
    return coco


def synthetic_detections(coco, per_image, num_categories, rng):
    """{image_id: {'boxes' (xyxy), 'scores', 'labels'}} with `per_image` detections each."""
    predictions = {}
    for image_id in sorted(coco.imgs):
        boxes, labels = [], []
        for ann in coco.imgToAnns[image_id]:
            for _ in range(int(rng.integers(1, 3))):
                x, y, w, h = ann["bbox"]
                x, y, w, h = np.asarray([x, y, w, h]) + rng.normal(0, 0.1, 4) * [w, h, w, h]
                boxes.append([x, y, x + abs(w), y + abs(h)])
                labels.append(ann["category_id"] if rng.random() < 0.8
                              else int(rng.integers(1, num_categories + 1)))
        boxes, labels = boxes[:per_image], labels[:per_image]
        scores = rng.uniform(0.2, 1.0, len(boxes)).tolist()  # copies tend to score higher
        missing = per_image - len(boxes)
        xy = rng.uniform(0, [WIDTH, HEIGHT], (missing, 2))
        wh = rng.uniform(4, 200, (missing, 2))
        boxes.extend(np.concatenate([xy, xy + wh], axis=1).tolist())
        labels.extend(rng.integers(1, num_categories + 1, missing).tolist())
        scores.extend(rng.beta(1, 4, missing).tolist())
        predictions[image_id] = {"boxes": torch.tensor(boxes, dtype=torch.float32),
                                 "scores": torch.tensor(scores, dtype=torch.float32),
                                 "labels": torch.tensor(labels, dtype=torch.int64)}
    return predictions


def run(backend, coco, predictions, batch_size):
    """engine.evaluate's COCO part; returns (twelve numbers, {phase: seconds})."""
    times = {}
    start = time.perf_counter()
    evaluator = CocoEvaluator(coco, ("bbox",), backend=backend)
    ids = sorted(predictions)
    for i in range(0, len(ids), batch_size):
        evaluator.update({image_id: predictions[image_id] for image_id in ids[i:i + batch_size]})
    times["update"] = time.perf_counter() - start
    mark = time.perf_counter()
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()
    times["accumulate"] = time.perf_counter() - mark
    times["total"] = time.perf_counter() - start
    return np.asarray(evaluator.coco_eval["bbox"].stats, dtype=np.float64), times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--per_image", type=int, default=100, help="detections per image")
    parser.add_argument("--categories", type=int, default=80)
    parser.add_argument("--batch_size", type=int, default=2,
                        help="images per update (DETR's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", nargs="+", default=list(COCO_EVAL_BACKENDS),
                        choices=COCO_EVAL_BACKENDS)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    coco = synthetic_ground_truth(args.images, args.categories, rng)
    predictions = synthetic_detections(coco, args.per_image, args.categories, rng)
    print(f"{len(coco.imgs)} images, {len(coco.anns)} objects "
          f"({sum(a['iscrowd'] for a in coco.anns.values())} crowd), {args.categories} categories, "
          f"{args.per_image} detections per image, batches of {args.batch_size}")

    results = {b: run(b, coco, predictions, args.batch_size) for b in args.backends}
    reference, base = results[args.backends[0]][0], results[args.backends[0]][1]["total"]
    print(f"{'backend':<18}{'update s':>10}{'accumulate s':>14}{'total s':>10}{'ratio':>8}")
    for backend, (_, times) in results.items():
        print(f"{backend:<18}{times['update']:>10.1f}{times['accumulate']:>14.2f}"
              f"{times['total']:>10.1f}{base / times['total']:>7.1f}x")
    print("AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl:")
    for backend, (stats, _) in results.items():
        print(f"  {backend:<18}" + " ".join(f"{s:.4f}" for s in stats))
    worst = max(float(np.abs(stats - reference).max()) for stats, _ in results.values())
    print(f"largest difference from {args.backends[0]}: {worst:.3g}")
    if worst > 1e-12:
        raise SystemExit(f"the backends disagree by {worst:.3g} (more than 1e-12)")


if __name__ == "__main__":
    main()
