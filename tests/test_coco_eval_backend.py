"""--coco_eval_backend: faster_coco_eval gives pycocotools' twelve numbers, through CocoEvaluator.

pycocotools is the reference. The detections are random but built to reach the corners of COCO
evaluation: crowd ground truth, images without ground truth, images without detections, tied
scores, more than 100 detections of a category in one image (maxDets), several categories, area
ranges taken from 'area' rather than from the box.

The two libraries differ in one documented corner (datasets/coco_eval_backends.py): a precision
of 1/1 is 1 - 2**-52 in pycocotools and 1.0 in faster_coco_eval. `assert_same_evaluation` allows
exactly that and nothing else in the precision table, and 1e-12 in the twelve numbers.
"""
import contextlib
import copy
import io
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import datasets.coco_eval as coco_eval_module
import main
from datasets import toy
from datasets.coco_eval import CocoEvaluator, predictions_to_coco
from datasets.coco_eval_backends import CocoEvalBackendError, get_backend
from tests.mini_coco import mini_coco_dataset, write_mini_coco
from tests.test_datasets import synchronize_two_ranks
from util.plot_utils import load_eval

PYCOCOTOOLS_ONE = 1.0 / (1.0 + np.spacing(1.0))  # 1/1 with its eps: 1 - 2**-52
TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32",
        "--nheads", "2", "--dim_feedforward", "64", "--enc_layers", "1", "--dec_layers", "1",
        "--num_queries", "120", "--device", "cpu", "--num_workers", "0", "--vis_images", "0"]


def coco_from_dict(dataset):
    coco = COCO()
    coco.dataset = json.loads(json.dumps(dataset))
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def random_detections(coco, seed, crowded_image=None):
    """{image_id: {'boxes' (xyxy), 'scores', 'labels'}}: noisy ground truth and false positives.

    Every fifth image gets no detection. `crowded_image` gets 130 detections of the category of
    its first annotation, the copy of that annotation scored lowest, so that maxDets=100 drops it.
    """
    rng = np.random.default_rng(seed)
    cat_ids = sorted(coco.cats)
    predictions = {}
    for n, image_id in enumerate(sorted(coco.imgs)):
        info = coco.imgs[image_id]
        boxes, scores, labels = [], [], []
        if n % 5 != 4:
            for ann in coco.imgToAnns[image_id]:  # crowd regions too: a crowd can be detected
                for _ in range(int(rng.integers(0, 3))):
                    noise = rng.normal(0, 0.05 * max(ann["bbox"][2:]), 4)
                    x, y, w, h = np.asarray(ann["bbox"]) + noise
                    boxes.append([x, y, x + abs(w), y + abs(h)])
                    wrong = int(rng.choice(cat_ids))
                    labels.append(ann["category_id"] if rng.random() < 0.85 else wrong)
                    scores.append(float(rng.random()))
            for _ in range(int(rng.integers(0, 6))):
                x, y = rng.uniform(0, info["width"]), rng.uniform(0, info["height"])
                w, h = rng.uniform(1, info["width"] / 2), rng.uniform(1, info["height"] / 2)
                boxes.append([x, y, x + w, y + h])
                labels.append(int(rng.choice(cat_ids)))
                scores.append(float(rng.random()))
            scores = [round(s, 1) if i % 3 == 0 else s for i, s in enumerate(scores)]  # ties
        if image_id == crowded_image:
            ann = coco.imgToAnns[image_id][0]
            x, y, w, h = ann["bbox"]
            for _ in range(129):
                dx, dy = rng.uniform(0, info["width"] / 2), rng.uniform(0, info["height"] / 2)
                boxes.append([dx, dy, dx + rng.uniform(1, 20), dy + rng.uniform(1, 20)])
                labels.append(ann["category_id"])
                scores.append(float(rng.uniform(0.5, 1.0)))
            boxes.append([x, y, x + w, y + h])
            labels.append(ann["category_id"])
            scores.append(0.01)
        predictions[image_id] = {"boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
                                 "scores": torch.tensor(scores, dtype=torch.float64),
                                 "labels": torch.tensor(labels, dtype=torch.int64)}
    return predictions


def in_batches(predictions, size):
    items = list(predictions.items())
    return [dict(items[i:i + size]) for i in range(0, len(items), size)]


def evaluate(coco, batches, backend, max_dets=None):
    evaluator = CocoEvaluator(coco, ("bbox",), backend=backend)
    if max_dets is not None:
        evaluator.coco_eval["bbox"].params.maxDets = max_dets
    for batch in batches:
        evaluator.update(batch)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator


def assert_same_evaluation(reference, candidate, iou_type="bbox"):
    """The twelve numbers within 1e-12; recall and score tables identical; the precision table
    identical once pycocotools' 1 - 2**-52 (its eps in the divisor) is read as 1."""
    ref, cand = reference.coco_eval[iou_type], candidate.coco_eval[iou_type]
    assert len(ref.stats) == len(cand.stats) == 12
    np.testing.assert_allclose(np.asarray(cand.stats), np.asarray(ref.stats), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(cand.eval["recall"]), ref.eval["recall"])
    np.testing.assert_array_equal(np.asarray(cand.eval["scores"]), ref.eval["scores"])
    def precision(e):
        return np.where(e.eval["precision"] == PYCOCOTOOLS_ONE, 1.0, e.eval["precision"])
    np.testing.assert_array_equal(precision(cand), precision(ref))


@pytest.fixture(scope="module")
def mini():
    dataset, _ = mini_coco_dataset(num_random=40, seed=3)
    return coco_from_dict(dataset)


@pytest.fixture(scope="module")
def toy_val(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("toy") / "toy_data")
    toy.generate_toy_coco(root, num_train=1, num_val=60)
    with open(os.path.join(root, "annotations", "instances_val2017.json")) as f:
        return coco_from_dict(json.load(f))


def test_mini_set_gives_pycocotools_numbers(mini):
    predictions = random_detections(mini, seed=0, crowded_image=1)
    reference = evaluate(mini, in_batches(predictions, 4), "pycocotools")
    fast = evaluate(mini, in_batches(predictions, 7), "faster_coco_eval")
    assert_same_evaluation(reference, fast)
    stats = reference.coco_eval["bbox"].stats
    assert 0.05 < stats[0] < 0.95 and stats[8] > stats[6] > 0  # neither trivially 0 nor 1
    # the data reach the corners that matter: crowd, empty images, > 100 detections of a class
    assert any(a.get("iscrowd") for a in mini.anns.values()) and not mini.imgToAnns[3]
    assert max(len(p["labels"]) for p in predictions.values()) > 100
    assert sum(len(p["labels"]) == 0 for p in predictions.values()) >= 5


def test_batches_give_one_plain_cocoeval_run(toy_val):
    """CocoEvaluator (batches, merge) against pycocotools' COCOeval run once on all detections."""
    predictions = random_detections(toy_val, seed=7, crowded_image=2)
    gt = copy.deepcopy(toy_val)
    with contextlib.redirect_stdout(io.StringIO()):
        plain = COCOeval(gt, gt.loadRes(predictions_to_coco(predictions)), iouType="bbox")
        plain.evaluate()
        plain.accumulate()
        plain.summarize()
    reference = SimpleNamespace(coco_eval={"bbox": plain})
    for backend in ("pycocotools", "faster_coco_eval"):
        assert_same_evaluation(reference, evaluate(toy_val, in_batches(predictions, 3), backend))


def test_a_backend_with_other_max_dets_fails_the_comparison(mini):
    """maxDets matters on these data: the comparison would catch a backend that got it wrong."""
    predictions = random_detections(mini, seed=0, crowded_image=1)
    reference = evaluate(mini, [predictions], "pycocotools")
    for backend in ("pycocotools", "faster_coco_eval"):
        wrong = evaluate(mini, [predictions], backend, max_dets=[1, 10, 1000])
        with pytest.raises(AssertionError):
            assert_same_evaluation(reference, wrong)


def test_toy_set_gives_pycocotools_numbers(toy_val):
    # toy areas are pixel counts of the shapes, smaller than their boxes: area ranges use 'area'
    assert any(a["area"] < a["bbox"][2] * a["bbox"][3] for a in toy_val.anns.values())
    for seed in range(3):
        predictions = random_detections(toy_val, seed=seed, crowded_image=seed + 1)
        reference = evaluate(toy_val, in_batches(predictions, 8), "pycocotools")
        fast = evaluate(toy_val, in_batches(predictions, 5), "faster_coco_eval")
        assert_same_evaluation(reference, fast)
        assert 0.05 < reference.coco_eval["bbox"].stats[0] < 0.95


def test_no_detections_and_nothing_evaluated(mini):
    empty = {i: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                 "labels": torch.zeros(0, dtype=torch.int64)} for i in sorted(mini.imgs)}
    for batches in ([empty], []):
        reference = evaluate(mini, batches, "pycocotools")
        fast = evaluate(mini, batches, "faster_coco_eval")
        assert_same_evaluation(reference, fast)
    assert list(fast.coco_eval["bbox"].stats) == [-1.0] * 12


def test_distributed_merge_gives_the_single_process_numbers(mini, monkeypatch):
    """Two "processes" sharing a (padding) image: their per-image results gathered and merged."""
    predictions = random_detections(mini, seed=1, crowded_image=5)
    ids = sorted(predictions)
    reference = evaluate(mini, [predictions], "pycocotools")
    for backend in ("pycocotools", "faster_coco_eval"):
        rank0 = CocoEvaluator(mini, backend=backend)
        rank1 = CocoEvaluator(mini, backend=backend)
        rank0.update({i: predictions[i] for i in ids[:25]})
        rank1.update({i: predictions[i] for i in ids[24:]})  # ids[24] on both ranks
        synchronize_two_ranks(rank0, rank1, monkeypatch)
        assert rank0.coco_eval["bbox"].params.imgIds == ids
        assert_same_evaluation(reference, rank0)


def square_masks(coco, rng):
    """Mask predictions of every image: shifted copies of ground-truth boxes as 0/1 masks."""
    predictions = {}
    for image_id, info in coco.imgs.items():
        masks, scores, labels = [], [], []
        for ann in coco.imgToAnns[image_id]:
            x, y, w, h = (int(round(v + d)) for v, d in zip(ann["bbox"], rng.integers(-2, 3, 4)))
            mask = np.zeros((1, info["height"], info["width"]), dtype=np.uint8)
            mask[0, max(y, 0):max(y + h, 0), max(x, 0):max(x + w, 0)] = 1
            masks.append(mask)
            scores.append(float(rng.random()))
            labels.append(ann["category_id"])
        shape = (-1, 1, info["height"], info["width"])
        predictions[image_id] = {"masks": torch.tensor(np.array(masks)).reshape(shape),
                                 "scores": torch.tensor(scores),
                                 "labels": torch.tensor(labels, dtype=torch.int64)}
    return predictions


def test_mask_ap_gives_pycocotools_numbers(toy_val):
    rng = np.random.default_rng(0)
    dataset = json.loads(json.dumps(toy_val.dataset))
    for ann in dataset["annotations"]:  # polygon outlines of the boxes, some of them crowd
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        ann["iscrowd"] = int(rng.random() < 0.1)
    coco = coco_from_dict(dataset)
    predictions = square_masks(coco, rng)
    results = {}
    for backend in ("pycocotools", "faster_coco_eval"):
        evaluator = CocoEvaluator(coco, ("bbox", "segm"), backend=backend)
        for batch in in_batches(predictions, 16):
            evaluator.update({i: dict(p, boxes=torch.zeros(len(p["labels"]), 4))
                              for i, p in batch.items()})
        evaluator.accumulate()
        evaluator.summarize()
        results[backend] = evaluator
    assert_same_evaluation(results["pycocotools"], results["faster_coco_eval"], "segm")
    assert 0.05 < results["pycocotools"].coco_eval["segm"].stats[0] < 0.95


def test_main_eval_with_either_backend(tmp_path, monkeypatch):
    """`main.py --eval` of a real (untrained, 120 queries) model on the toy set: the option reaches
    the evaluator, and both backends give the same numbers (0 and -1 here, for an untrained model:
    the random detections above test the arithmetic) and eval.pth files of the same form."""
    asked = []
    real_get_backend = coco_eval_module.get_backend
    monkeypatch.setattr(coco_eval_module, "get_backend",
                        lambda name: asked.append(name) or real_get_backend(name))
    toy_args = ["--dataset_file", "toy", "--toy_path", str(tmp_path / "toy"),
                "--toy_num_train", "1", "--toy_num_val", "6", "--batch_size", "3"]
    stats, saved = {}, {}
    for backend in ("pycocotools", "faster_coco_eval"):
        out = tmp_path / backend
        stats[backend] = main.run(["--eval", "--output_dir", str(out), *toy_args, *TINY,
                                   "--coco_eval_backend", backend])["coco_eval_bbox"]
        saved[backend] = load_eval(out / "eval.pth")  # what util.plot_utils reads
    assert asked == ["pycocotools", "faster_coco_eval"]
    assert stats["faster_coco_eval"] == stats["pycocotools"]
    assert saved["faster_coco_eval"].keys() == saved["pycocotools"].keys()
    for key in ("precision", "recall", "scores"):
        np.testing.assert_array_equal(saved["faster_coco_eval"][key], saved["pycocotools"][key])
    fast_params, params = saved["faster_coco_eval"]["params"], saved["pycocotools"]["params"]
    assert vars(fast_params).keys() == vars(params).keys()


def test_missing_package_is_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import faster_coco_eval fails
    with pytest.raises(CocoEvalBackendError, match="pip install faster-coco-eval"):
        get_backend("faster_coco_eval")
    root = write_mini_coco(str(tmp_path / "coco"), num_random=0)["root"]
    with pytest.raises(SystemExit) as info:
        main.run(["--coco_path", root, "--eval", *TINY, "--coco_eval_backend", "faster_coco_eval"])
    message = str(info.value.code)
    assert message.startswith("error: ") and "pip install faster-coco-eval" in message
    assert "\n" not in message
    with pytest.raises(CocoEvalBackendError, match="pycocotools"):
        get_backend("detectron2")


def test_default_backend_is_pycocotools():
    args = main.get_args_parser().parse_args([])
    assert args.coco_eval_backend == "pycocotools"
    assert CocoEvaluator(coco_from_dict(mini_coco_dataset(0)[0])).backend.name == "pycocotools"
