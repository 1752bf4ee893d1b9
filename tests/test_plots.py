"""Plots of runs (util/plot_utils.py) and the end-of-run pictures (util/visualize.py, main.py)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageColor
from torch import nn

from models.detr import PostProcess
from tests.test_datasets import clean_gt, evaluate, gt_predictions
from tests.test_main import TINY, TOY, run_main
from util import plot_utils
from util.visualize import HEADER, PADDING, PALETTE, class_colour, draw_detections, predictions_picture


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The output folder of a real two-epoch main.py run on a tiny toy set."""
    root = tmp_path_factory.mktemp("plots")
    out = root / "out"
    run_main(*TOY, "--toy_path", root / "toy", *TINY, "--output_dir", out, "--epochs", 2,
             "--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--vis_images", 3)
    return out


def png_size(path):
    """(width, height) of a PNG file, after checking that it decodes completely."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def rgb(name):
    return torch.tensor(ImageColor.getrgb(name), dtype=torch.uint8)


def is_colour(picture, name):
    """(H, W) mask of the pixels of a (3, H, W) uint8 picture that have the colour `name`."""
    return (picture == rgb(name)[:, None, None]).all(dim=0)


# ----------------------------------------------------------------------------------------------
# util.plot_utils

def test_log_and_precision_recall_plots_of_a_real_run(run_dir, tmp_path):
    out = plot_utils.plot_logs([run_dir, run_dir], tmp_path / "logs.png", names=["a", "b"])
    assert png_size(out) == (1200, 680)  # figsize (15, 8.5) at 80 dpi
    eval_file = plot_utils.eval_file_of(run_dir)
    assert eval_file == run_dir / "eval" / "latest.pth"
    out = plot_utils.plot_precision_recall([eval_file], tmp_path / "pr.png")
    assert png_size(out) == (1200, 384)


def test_command_line_writes_both_plots(run_dir, tmp_path, capsys):
    plot_utils.main([str(run_dir), "--out", str(tmp_path / "plots.png")])
    assert png_size(tmp_path / "plots.png")[0] == 1200
    assert png_size(tmp_path / "plots_pr.png")[0] == 1200
    assert "plots.png" in capsys.readouterr().out


def test_precision_recall_curves_average_to_coco_ap():
    # real pycocotools output: exact boxes on half of the images, boxes shifted by 8 px (IoU 2/3)
    # on the others, and a confident false positive on three images
    coco = clean_gt(num_images=10, per_image=3)
    ids = sorted(coco.imgs)
    predictions = {**gt_predictions(coco, ids[:5], shift=8.0), **gt_predictions(coco, ids[5:])}
    for image_id in ids[:3]:
        p = predictions[image_id]
        p["boxes"] = torch.cat([p["boxes"], torch.tensor([[300.0, 50.0, 340.0, 90.0]])])
        p["scores"] = torch.cat([torch.linspace(0.5, 0.9, len(p["scores"])), torch.tensor([0.95])])
        p["labels"] = torch.cat([p["labels"], torch.tensor([1])])
    evaluator, _ = evaluate(coco, [predictions])
    stats = evaluator.coco_eval["bbox"].stats
    assert 0.1 < stats[2] < stats[1] < 1.0  # nothing trivial
    curves = plot_utils.precision_recall_curves(evaluator.coco_eval["bbox"].eval)
    means = [float(np.mean(curves[title][1])) for title in
             ("IoU 0.50:0.95 (mean)", "IoU 0.50", "IoU 0.75")]
    assert means == pytest.approx(list(stats[:3]), abs=1e-12)
    recall, precision = curves["IoU 0.50"]
    assert recall[0] == 0 and recall[-1] == 1 and np.all(np.diff(precision) <= 0)


def test_plot_messages_for_missing_or_wrong_files(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no log.txt; pass the --output_dir"):
        plot_utils.plot_logs([tmp_path], tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        plot_utils.plot_logs([tmp_path / "nowhere"], tmp_path / "x.png")
    (tmp_path / "log.txt").write_text('{"epoch": 0}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        plot_utils.plot_logs([tmp_path], tmp_path / "x.png")
    (tmp_path / "log.txt").write_text('{"epoch": 0}\n')
    with pytest.raises(ValueError, match="has no 'train_loss' at epoch"):
        plot_utils.plot_logs([tmp_path], tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="writes eval.pth"):
        plot_utils.plot_precision_recall([tmp_path / "eval.pth"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="could not read .*checkpoint.pth as an evaluation file"):
        plot_utils.plot_precision_recall([run_dir / "checkpoint.pth"], tmp_path / "x.png")
    torch.save({"precision": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a COCOeval.eval dict"):
        plot_utils.plot_precision_recall([tmp_path / "other.pth"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit, match="^error: .*nowhere is not a folder"):
        plot_utils.main([str(tmp_path / "nowhere")])


# ----------------------------------------------------------------------------------------------
# util.visualize and the end-of-run pictures

def test_training_run_writes_curves_and_predictions(run_dir):
    assert png_size(run_dir / "curves.png") == (1200, 680)
    width, height = png_size(run_dir / "predictions.png")
    # --vis_images 3: two pairs (ground truth, predicted) per row, two rows, cells of 256 px
    assert width == 4 * 256 + 5 * PADDING
    assert height == HEADER + 2 * 256 + 3 * PADDING
    assert "pictures:" in (run_dir / "run.log").read_text()


def test_drawn_boxes_land_on_the_box_edges():
    image = torch.full((3, 60, 90), 128, dtype=torch.uint8)
    box = torch.tensor([[10.0, 20.0, 50.0, 40.0]])  # xyxy in the 90 x 60 image
    drawn = draw_detections(image, box, torch.tensor([3]), {3: "triangle"}, size=180)
    assert drawn.shape == (3, 120, 180)  # scaled by 2
    colour = is_colour(drawn, class_colour(3))
    x0, y0, x1, y1 = 20, 40, 100, 80  # the box, scaled by 2
    assert colour[y1, x0 + 25:x1 - 2].all() and colour[y1 - 1, x0 + 25:x1 - 2].all()  # bottom
    assert colour[y0 + 25:y1, x0].all() and colour[y0 + 25:y1, x1].all()  # left, right
    assert colour[y0, x1 - 10:x1].all()  # top (the label covers its left part)
    assert not colour[y1 + 3:].any() and not colour[:, x1 + 3:].any() and not colour[:y0 - 1].any()
    assert not colour[y0 + 25:y1 - 3, x0 + 3:x1 - 3].any()  # inside, below the label


class FixedDetector(nn.Module):
    """Always 'predicts' one box of class 2 (score ~1) in the normalised cxcywh `box`."""

    def __init__(self, box):
        super().__init__()
        self.box = torch.tensor(box)

    def forward(self, samples):
        batch = samples.tensors.shape[0]
        logits = torch.tensor([[-9.0, -9.0, 9.0, -9.0], [-9.0, -9.0, -9.0, 9.0]])
        boxes = torch.stack([self.box, torch.tensor([0.5, 0.5, 0.1, 0.1])])
        return {"pred_logits": logits.expand(batch, -1, -1), "pred_boxes": boxes.expand(batch, -1, -1)}


def test_predictions_picture_puts_truth_left_and_predictions_right():
    # one 64 x 64 grey image, ground truth class 1 at the top left, prediction class 2 at the
    # bottom right (the second query scores "no object" and is not drawn)
    image = (torch.full((3, 64, 64), 0.5) - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) \
        / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    target = {"boxes": torch.tensor([[0.25, 0.25, 0.25, 0.25]]), "labels": torch.tensor([1]),
              "size": torch.tensor([64, 64])}
    picture = predictions_picture(FixedDetector([0.75, 0.75, 0.25, 0.25]), PostProcess(),
                                  [(image, target)], {1: "one", 2: "two"}, "cpu", size=128)
    assert picture.shape == (3, HEADER + 128 + 2 * PADDING, 2 * 128 + 3 * PADDING)
    top = HEADER + PADDING
    left_cell = picture[:, top:top + 128, PADDING:PADDING + 128]
    right_cell = picture[:, top:top + 128, 2 * PADDING + 128:2 * PADDING + 256]
    truth, predicted = is_colour(left_cell, class_colour(1)), is_colour(right_cell, class_colour(2))
    # boxes (scaled by 2): truth x, y in 16..48, predicted in 80..112
    assert truth[47, 20:48].all() and truth[20:48, 47].all() and not truth[60:].any()
    assert predicted[111, 84:112].all() and predicted[98:112, 111].all() and not predicted[:70].any()
    assert not is_colour(left_cell, class_colour(2)).any()
    # nothing else drawn on the right: the second query scores "no object"
    for other in set(PALETTE) - {class_colour(2)}:
        assert not is_colour(right_cell, other).any(), other


# ----------------------------------------------------------------------------------------------
# Panoptic pictures and the curves of a run with masks

class FixedSegmenter(nn.Module):
    """Two queries: class 1 (a thing) owning the bottom-right quarter, class 2 (stuff) the rest."""

    def forward(self, samples):
        batch = samples.tensors.shape[0]
        logits = torch.tensor([[-9.0, 9.0, -9.0, -9.0], [-9.0, -9.0, 9.0, -9.0]])
        masks = torch.full((2, 16, 16), -5.0)
        masks[0, 8:, 8:] = 5.0
        masks[1] = -masks[0]
        return {"pred_logits": logits.expand(batch, -1, -1), "pred_masks": masks.expand(batch, -1, -1, -1)}


def blended(colour, grey=128, alpha=0.6):
    return torch.tensor([grey * (1 - alpha) + c * alpha for c in colour])


def test_panoptic_picture_puts_image_truth_and_prediction_side_by_side():
    from models.segmentation import PostProcessPanoptic
    from util.panoptic_pictures import panoptic_picture, segment_colour
    grey = torch.full((3, 64, 64), 128 / 255)
    image = (grey - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) \
        / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, :32, :32] = True  # the truth: the thing at the top left
    masks[1] = ~masks[0]
    target = {"masks": masks, "labels": torch.tensor([1, 2]), "size": torch.tensor([64, 64])}
    picture = panoptic_picture(FixedSegmenter(), PostProcessPanoptic({1: True, 2: False}),
                               [(image, target)], {1: "one", 2: "two"}, "cpu", size=128)
    assert picture.shape == (3, HEADER + 128 + 2 * PADDING, 3 * 128 + 4 * PADDING)
    top = HEADER + PADDING
    cells = [picture[:, top:top + 128, PADDING + k * (128 + PADDING):PADDING + k * (128 + PADDING) + 128]
             .float() for k in range(3)]
    thing, stuff = blended(segment_colour(1)), blended(segment_colour(2))

    def colour_at(cell, y, x):
        return cell[:, y, x]

    # the image as it is; the thing at the top left in the truth, at the bottom right predicted
    # (corners of the quarters, away from the names written in the middle of each segment)
    assert (cells[0] - 128).abs().max() <= 1
    for (y, x), want_truth, want_predicted in (((4, 4), thing, stuff), ((124, 124), stuff, thing),
                                               ((4, 124), stuff, stuff), ((60, 60), thing, stuff),
                                               ((68, 68), stuff, thing)):
        torch.testing.assert_close(colour_at(cells[1], y, x), want_truth, atol=1.5, rtol=0)
        torch.testing.assert_close(colour_at(cells[2], y, x), want_predicted, atol=1.5, rtol=0)
    # the names are written in white inside their segments
    white = (cells[2] > 250).all(0)
    assert white[64:, 64:].any() and white[:64].any() and not white[64:, :40].any()


def test_label_point_lies_inside_a_bent_segment():
    from util.panoptic_pictures import _label_point
    mask = torch.zeros(40, 40, dtype=torch.bool)
    mask[:, :12] = True
    mask[28:, :] = True  # an L whose centre of mass is outside it
    x, y = _label_point(mask)
    assert mask[y, x] and 3 <= x <= 36 and 3 <= y <= 36  # inside, away from the edges


def test_curves_of_a_panoptic_run_add_masks_and_panoptic_quality(tmp_path):
    record = {f"{split}_{key}": 1.0 for _, key in plot_utils.LOG_PANELS for split in ("train", "test")}
    pq = {"pq": 0.5, "sq": 0.8, "rq": 0.6, "n": 3}
    lines = [dict(record, epoch=e, train_loss_mask=0.1, train_loss_dice=0.3,
                  test_coco_eval_bbox=[0.5] * 12, test_coco_eval_masks=[0.4] * 12,
                  test_PQ_all=pq, test_PQ_th=pq, test_PQ_st=pq) for e in range(3)]
    (tmp_path / "log.txt").write_text("\n".join(json.dumps(r) for r in lines))
    assert png_size(plot_utils.plot_logs([tmp_path], tmp_path / "c.png")) == (1200, 1000)
    del lines[1]["test_PQ_th"]
    (tmp_path / "log.txt").write_text("\n".join(json.dumps(r) for r in lines))
    with pytest.raises(ValueError, match="no 'test_PQ_th' at epoch"):
        plot_utils.plot_logs([tmp_path], tmp_path / "c.png")
