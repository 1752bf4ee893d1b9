"""Panoptic quality against hand-worked cases (the COCO panoptic API's rules)."""
import io

import numpy as np
import pytest
from PIL import Image

from datasets.panoptic_eval import (PanopticEvaluationError, PanopticEvaluator, format_table,
                                    image_stats)
from util.panoptic import id_to_rgb

CATEGORIES = {1: {"id": 1, "isthing": 1}, 2: {"id": 2, "isthing": 0}, 3: {"id": 3, "isthing": 1}}


def _png(ids):
    buf = io.BytesIO()
    Image.fromarray(id_to_rgb(np.asarray(ids))).save(buf, format="PNG")
    return buf.getvalue()


def _evaluate(gt_ids, gt_segments, pred_ids, pred_segments, categories=CATEGORIES):
    evaluator = PanopticEvaluator({7: {"segments_info": gt_segments}}, categories,
                                  lambda image_id: np.asarray(gt_ids))
    evaluator.update([{"image_id": 7, "png_string": _png(pred_ids), "segments_info": pred_segments}])
    return evaluator.summarize()


# Case 1 (4x4): ground truth thing 1 on rows 0-1, stuff 2 on rows 2-3 / columns 0-1, void on
# rows 2-3 / columns 2-3. Predictions: 10 (cat 1) = rows 0-1 plus two void pixels: IoU 8 / (10 + 8
# - 8 - 2) = 1. 11 (cat 2) = three of the four stuff pixels: IoU 3 / 4. 12 (cat 1) = the fourth
# stuff pixel: FP. 13 (cat 3) = two void pixels only: ignored.
GT1 = [[1, 1, 1, 1],
       [1, 1, 1, 1],
       [2, 2, 0, 0],
       [2, 2, 0, 0]]
GT1_SEGMENTS = [{"id": 1, "category_id": 1, "iscrowd": 0, "area": 8},
                {"id": 2, "category_id": 2, "iscrowd": 0, "area": 4}]
PRED1 = [[10, 10, 10, 10],
         [10, 10, 10, 10],
         [11, 11, 10, 10],
         [11, 12, 13, 13]]
PRED1_SEGMENTS = [{"id": 10, "category_id": 1}, {"id": 11, "category_id": 2},
                  {"id": 12, "category_id": 1}, {"id": 13, "category_id": 3}]


def test_void_is_left_out_of_iou_and_false_positives():
    results = _evaluate(GT1, GT1_SEGMENTS, PRED1, PRED1_SEGMENTS)
    # cat 1: TP 1 (IoU 1), FP 1 -> PQ 1 / 1.5, SQ 1, RQ 2/3; cat 2: TP 1 (IoU .75): PQ = SQ = .75,
    # RQ 1; cat 3: nothing counted, so not averaged
    assert results["Things"] == pytest.approx({"pq": 2 / 3, "sq": 1.0, "rq": 2 / 3, "n": 1})
    assert results["Stuff"] == pytest.approx({"pq": 0.75, "sq": 0.75, "rq": 1.0, "n": 1})
    assert results["All"] == pytest.approx({"pq": (2 / 3 + 0.75) / 2, "sq": 0.875,
                                            "rq": (2 / 3 + 1) / 2, "n": 2})
    assert results["per_class"][3] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert "Things" in format_table(results)


def test_iou_must_exceed_one_half_and_categories_must_agree():
    gt = [[1, 1, 0, 0], [1, 1, 0, 0]]
    segments = [{"id": 1, "category_id": 1, "iscrowd": 0, "area": 4}]
    # 2 of 4 pixels, nothing else: IoU 2 / 4 = 0.5 exactly -> no match: FN 1 and FP 1
    half = image_stats(np.asarray(gt), segments, np.asarray([[5, 5, 0, 0], [0, 0, 0, 0]]),
                       [{"id": 5, "category_id": 1}], CATEGORIES)
    assert (half[1].tp, half[1].fp, half[1].fn) == (0, 1, 1)
    # 3 of 4: IoU 0.75 -> TP
    more = image_stats(np.asarray(gt), segments, np.asarray([[5, 5, 0, 0], [5, 0, 0, 0]]),
                       [{"id": 5, "category_id": 1}], CATEGORIES)
    assert (more[1].tp, more[1].fp, more[1].fn) == (1, 0, 0) and more[1].iou == pytest.approx(0.75)
    # the same pixels with another category: FN for 1, FP for 3
    other = image_stats(np.asarray(gt), segments, np.asarray(gt) * 5, [{"id": 5, "category_id": 3}],
                        CATEGORIES)
    assert (other[1].fn, other[3].fp, other[1].tp + other[3].tp) == (1, 1, 0)


def test_crowd_regions_are_neither_missed_nor_false_positives_of_their_category():
    # crowd segment 3 (cat 1) on the right half; thing 1 (cat 1) top-left, stuff 2 bottom-left
    gt = [[1, 1, 3, 3],
          [2, 2, 3, 3]]
    segments = [{"id": 1, "category_id": 1, "iscrowd": 0, "area": 2},
                {"id": 2, "category_id": 2, "iscrowd": 0, "area": 2},
                {"id": 3, "category_id": 1, "iscrowd": 1, "area": 4}]
    # prediction 5 (cat 1) = the crowd region plus one pixel of thing 1: 3 of 4 on crowd -> ignored;
    # prediction 6 (cat 3) on crowd pixels of category 1: crowd is per category -> FP;
    # prediction 7 (cat 2) = the stuff: TP
    pred = [[0, 5, 5, 5],
            [7, 7, 6, 5]]
    stats = image_stats(np.asarray(gt), segments, np.asarray(pred),
                        [{"id": 5, "category_id": 1}, {"id": 6, "category_id": 3},
                         {"id": 7, "category_id": 2}], CATEGORIES)
    assert (stats[1].tp, stats[1].fp, stats[1].fn) == (0, 0, 1)  # thing 1 missed, crowd not
    assert (stats[3].fp, stats[2].tp) == (1, 1)
    # a crowd segment is never matched, even by a perfect prediction
    perfect = image_stats(np.asarray(gt), segments, np.asarray([[0, 0, 9, 9], [0, 0, 9, 9]]),
                          [{"id": 9, "category_id": 1}], CATEGORIES)
    assert (perfect[1].tp, perfect[1].fp) == (0, 0)


def test_ground_truth_area_comes_from_the_json():
    # the json says 6 pixels for a 4-pixel segment (as when the PNG was resized): IoU 4 / 6
    gt = [[1, 1], [1, 1]]
    stats = image_stats(np.asarray(gt), [{"id": 1, "category_id": 1, "iscrowd": 0, "area": 6}],
                        np.asarray(gt), [{"id": 1, "category_id": 1}], CATEGORIES)
    assert stats[1].iou == pytest.approx(4 / 6)


def test_images_accumulate_and_duplicates_count_once():
    evaluator = PanopticEvaluator({1: {"segments_info": GT1_SEGMENTS}, 2: {"segments_info": GT1_SEGMENTS}},
                                  CATEGORIES, lambda image_id: np.asarray(GT1))
    perfect = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}]
    evaluator.update([{"image_id": 1, "png_string": _png(PRED1), "segments_info": PRED1_SEGMENTS}])
    evaluator.update([{"image_id": 2, "png_string": _png(GT1), "segments_info": perfect}] * 2)
    evaluator.synchronize_between_processes()
    results = evaluator.summarize()
    # cat 1: TP 2 (IoU 1 + 1), FP 1 -> 2 / 2.5; cat 2: TP 2 (.75 + 1) -> 1.75 / 2
    assert results["Things"]["pq"] == pytest.approx(0.8)
    assert results["Stuff"]["pq"] == pytest.approx(0.875)


def test_inconsistent_predictions_are_refused():
    with pytest.raises(PanopticEvaluationError, match="not in its segments_info"):
        _evaluate(GT1, GT1_SEGMENTS, PRED1, PRED1_SEGMENTS[:3])
    with pytest.raises(PanopticEvaluationError, match="not in the PNG"):
        _evaluate(GT1, GT1_SEGMENTS, PRED1, PRED1_SEGMENTS + [{"id": 99, "category_id": 1}])
    with pytest.raises(PanopticEvaluationError, match="not a category"):
        _evaluate(GT1, GT1_SEGMENTS, PRED1, PRED1_SEGMENTS[:3] + [{"id": 13, "category_id": 8}])
