"""main.py with --masks end to end on CPU: toy panoptic in two stages and jointly, a frozen
detector on COCO polygons, COCO panoptic evaluation, and the messages of options that do not fit."""
import json
import os

import pytest
import torch
from PIL import Image

import main

from tests.mini_coco import write_mini_coco
from tests.mini_panoptic import add_instance_masks, write_mini_panoptic
from tests.test_main import run_main
from util.checkpoint import load_checkpoint
from util.visualize import HEADER, PADDING

# the smallest model the mask head allows (GroupNorm with 8 groups)
TINY_MASKS = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "128",
              "--nheads", "8", "--dim_feedforward", "64", "--enc_layers", "1", "--dec_layers", "2",
              "--num_queries", "6", "--device", "cpu", "--num_workers", "0", "--print_freq", "5",
              "--vis_images", "0"]


def _log(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def test_toy_panoptic_detector_then_frozen_mask_head_then_eval(tmp_path):
    toy = ["--dataset_file", "toy_panoptic", "--toy_path", tmp_path / "toy", "--toy_num_train", "4",
           "--toy_num_val", "2", "--batch_size", "2", "--epochs", "1", *TINY_MASKS]
    run_main(*toy, "--output_dir", tmp_path / "detector", "--enc_rpe2d", "rpe-2.0-product-ctx-1-k")
    detector = load_checkpoint(tmp_path / "detector" / "checkpoint.pth")["model"]

    stats = run_main(*toy, "--output_dir", tmp_path / "masks", "--enc_rpe2d", "rpe-2.0-product-ctx-1-k",
                     "--masks", "--frozen_weights", tmp_path / "detector" / "checkpoint.pth",
                     "--vis_images", "2")
    # the pictures of a panoptic run: image, truth and prediction side by side; PQ in the curves
    with Image.open(tmp_path / "masks" / "panoptic.png") as picture:
        assert picture.width == 6 * 192 + 7 * PADDING and picture.height == HEADER + 192 + 2 * PADDING
    with Image.open(tmp_path / "masks" / "curves.png") as curves:
        assert curves.size == (1200, 1000)  # three rows of panels
    log = _log(tmp_path / "masks")[0]
    for key in ("test_PQ_all", "test_PQ_th", "test_PQ_st"):
        assert set(log[key]) == {"pq", "sq", "rq", "n"}
    assert log["test_PQ_th"]["n"] + log["test_PQ_st"]["n"] == log["test_PQ_all"]["n"]
    assert len(log["test_coco_eval_masks"]) == 12 and "train_loss_dice" in log
    assert "test_PQ_per_class" not in log
    pq_file = json.loads((tmp_path / "masks" / "eval" / "panoptic_latest.json").read_text())
    assert pq_file["PQ_all"] == log["test_PQ_all"] and set(pq_file["PQ_per_class"]) == {"1", "2", "3", "4", "5"}

    # the detector inside did not move; the mask head did train
    segm = load_checkpoint(tmp_path / "masks" / "checkpoint.pth")
    for k, v in detector.items():
        assert torch.equal(segm["model"]["detr." + k], v), k
    assert len(segm["optimizer"]["state"]) == sum(1 for k in segm["model"] if not k.startswith("detr."))

    # evaluating the checkpoint reproduces the epoch's numbers
    again = run_main(*toy, "--output_dir", tmp_path / "eval", "--enc_rpe2d", "rpe-2.0-product-ctx-1-k",
                     "--masks", "--eval", "--resume", tmp_path / "masks" / "checkpoint.pth")
    assert again["PQ_all"] == pytest.approx(stats["PQ_all"])
    assert again["coco_eval_masks"] == pytest.approx(stats["coco_eval_masks"])
    assert json.loads((tmp_path / "eval" / "panoptic_eval.json").read_text())["PQ_st"] == again["PQ_st"]


@pytest.fixture(scope="module")
def mini_masks(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_masks")
    info = write_mini_coco(str(root / "coco"), num_random=0)
    add_instance_masks(str(root / "coco"))
    write_mini_panoptic(str(root / "panoptic"), info["dataset"])
    return root


def test_frozen_mask_head_on_coco_polygons(mini_masks, tmp_path):
    # a detector checkpoint as DETR's first stage writes it (here untrained)
    from models import build_model
    detector, _, _ = build_model(main.get_args_parser().parse_args(["--num_classes", "8", *TINY_MASKS]))
    torch.save({"model": detector.state_dict()}, tmp_path / "detector.pth")
    stats = run_main("--coco_path", mini_masks / "coco", "--output_dir", tmp_path / "out", "--masks",
                     "--frozen_weights", tmp_path / "detector.pth", "--num_classes", "8",
                     "--epochs", "1", *TINY_MASKS)
    assert len(stats["coco_eval_masks"]) == 12 and "PQ_all" not in stats
    model = load_checkpoint(tmp_path / "out" / "checkpoint.pth")["model"]
    for k, v in detector.state_dict().items():
        assert torch.equal(model["detr." + k], v), k


def test_joint_mask_training_on_toy_panoptic(tmp_path):
    stats = run_main("--dataset_file", "toy_panoptic", "--toy_path", tmp_path / "toy", "--toy_num_train", "4",
                     "--toy_num_val", "2", "--batch_size", "2", "--epochs", "1", "--masks",
                     "--output_dir", tmp_path / "out", *TINY_MASKS)
    assert {"PQ_all", "coco_eval_masks"} <= set(stats)
    checkpoint = load_checkpoint(tmp_path / "out" / "checkpoint.pth")
    # without --frozen_weights the detector trains too
    head = sum(1 for k in checkpoint["model"] if not k.startswith("detr."))
    assert len(checkpoint["optimizer"]["state"]) > head


def test_coco_panoptic_evaluation(mini_masks, tmp_path):
    # no instances file next to the images: box and mask AP against the panoptic thing segments
    images = tmp_path / "images"
    os.makedirs(images)
    os.symlink(mini_masks / "coco" / "val2017", images / "val2017")
    stats = run_main("--dataset_file", "coco_panoptic", "--coco_path", images, "--coco_panoptic_path",
                     mini_masks / "panoptic", "--num_classes", "22", "--masks", "--eval",
                     "--output_dir", tmp_path / "out", *TINY_MASKS)
    assert {"PQ_all", "PQ_th", "PQ_st", "coco_eval_masks", "coco_eval_bbox"} <= set(stats)
    assert (tmp_path / "out" / "panoptic_eval.json").is_file()


@pytest.mark.parametrize("argv,message", [
    (["--frozen_weights", "detector.pth"], "add --masks"),
    (["--masks", "--dataset_file", "toy"], "use --dataset_file toy_panoptic"),
    (["--masks", "--dataset_file", "toy_panoptic", "--hidden_dim", "32"], "--hidden_dim a multiple of 128"),
])
def test_options_that_do_not_fit_get_one_message(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        run_main(*TINY_MASKS, "--toy_path", tmp_path / "toy", "--toy_num_train", "2",
                 "--toy_num_val", "2", "--eval", *argv)


def test_docs_panoptic_demo_commands_are_the_makefiles():
    """docs/segmentation.md shows the two commands `make panoptic_demo` runs: the same options."""
    import re
    import shlex
    from tests.conftest import ROOT
    with open(os.path.join(ROOT, "Makefile")) as f:
        make = f.read().replace("\\\n", " ")
    variables = dict(re.findall(r"^(\w+)\s*[?:]?=\s*(.*)$", make, flags=re.MULTILINE))
    recipe = make[make.index("panoptic_demo: setup"):make.index("\ntest:")]

    def expand(text):
        while "$(" in text:
            text = re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], text)
        return text
    made = [shlex.split(expand(line))[1:] for line in recipe.splitlines() if "main.py" in line]

    with open(os.path.join(ROOT, "docs", "segmentation.md")) as f:
        docs = f.read()
    block = docs[docs.index('ARGS="--dataset_file toy_panoptic'):].split("```")[0].replace("\\\n", " ")
    args = re.search(r'ARGS="([^"]*)"', block).group(1)
    shown = [shlex.split(line.replace("$ARGS", args))[1:] for line in block.splitlines()
             if line.startswith("python main.py")]
    assert len(made) == len(shown) == 2
    for got, want in zip(shown, made):
        assert got == want and got[0] == "main.py"
