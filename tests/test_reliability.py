"""Failure paths: fewer GPUs on resume, divergence, crashes in evaluation, bad data, and the
checks that tell a broken model from a working one."""
import os
import zipfile

import pytest
import torch

import engine
import main
from tests.mini_coco import write_mini_coco
from tests.test_main import TINY, run_cli, run_main
from util.checkpoint import get_rng_states, load_checkpoint, save_atomic, set_rng_states


def test_rng_states_restore_on_a_process_that_sees_fewer_gpus(monkeypatch):
    states = get_rng_states()
    states["cuda"] = [bytes(range(16)), bytes(range(1, 17))]  # written by a process with 2 GPUs
    restored = {}

    def set_rng_state(state, device="cuda"):
        index = torch.device(device).index if not isinstance(device, int) else device
        if index is None or index >= 1:  # as torch does for a device it does not have
            raise RuntimeError(f"invalid device ordinal {device}")
        restored[index] = bytes(state.tolist())

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    set_rng_states(states)
    assert restored == {0: bytes(range(16))}


# ----------------------------------------------------------------------------------------------
# Runs that fail: divergence, errors during the run, evaluation crashes, resumed learning rates

# two training iterations (batch 2) and one validation batch per epoch
SMALL_TOY = ["--dataset_file", "toy", "--toy_num_train", "4", "--toy_num_val", "2"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return tmp_path_factory.mktemp("toy") / "toy_data"


def test_divergence_with_an_absurd_learning_rate_stops_with_the_loss_message(toy_root, tmp_path):
    out = tmp_path / "out"
    common = [*SMALL_TOY, "--toy_path", toy_root, *TINY, "--output_dir", out, "--epochs", 1,
              "--enc_rpe2d", "rpe-2.0-product-ctx-1-k"]
    out.mkdir()
    save_atomic({"model": {"w": torch.arange(3.0)}, "epoch": 7}, out / "checkpoint.pth")  # an earlier run's
    before = (out / "checkpoint.pth").read_bytes()
    # Adam moves every weight by about lr per step: the second iteration's predictions are nan,
    # which the Hungarian matcher (scipy) would reject with an unrelated ValueError
    proc = run_cli("main.py", *common, "--lr", "1e30", "--lr_backbone", "1e30")
    assert proc.returncode != 0
    assert "the loss is nan at epoch 0, iteration 1" in proc.stderr, proc.stderr[-2000:]
    assert "predictions are not finite" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "checkpoint.pth").read_bytes() == before


def test_a_failure_during_the_run_keeps_its_traceback_in_run_log(toy_root, tmp_path, monkeypatch):
    from models.matcher import HungarianMatcher

    def broken(self, outputs, targets):
        raise ValueError("cost matrix is infeasible")  # as scipy's linear_sum_assignment raises

    monkeypatch.setattr(HungarianMatcher, "forward", broken)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="infeasible"):  # not turned into a one-line input error
        run_main(*SMALL_TOY, "--toy_path", toy_root, *TINY, "--output_dir", out, "--epochs", 1)
    log = (out / "run.log").read_text()
    assert "the run failed" in log and "Traceback (most recent call last)" in log
    assert "ValueError: cost matrix is infeasible" in log


def test_input_errors_stay_one_line(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        run_main("--coco_path", tmp_path / "nowhere", "--output_dir", out, *TINY)
    assert str(err.value).startswith("error: ") and str(tmp_path / "nowhere") in str(err.value)
    assert "Traceback" not in (out / "run.log").read_text()


def test_checkpoint_of_an_epoch_survives_a_crash_in_its_evaluation(toy_root, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(engine, "evaluate", crash)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        run_main(*SMALL_TOY, "--toy_path", toy_root, *TINY, "--output_dir", out, "--epochs", 2)
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["epoch"] == 0 and "optimizer" in checkpoint


def test_resume_with_another_learning_rate_says_which_is_used(toy_root, tmp_path):
    out = tmp_path / "out"
    common = [*SMALL_TOY, "--toy_path", toy_root, *TINY, "--output_dir", out]
    run_main(*common, "--epochs", 1)
    run_main(*common, "--epochs", 2, "--resume", out / "checkpoint.pth", "--lr", "5e-4")
    log = (out / "run.log").read_text()
    assert log.count("--lr 0.0005 differs from the checkpoint's 0.0001: the checkpoint's is used") == 1
    assert "--lr_backbone" not in log.split("differs from")[0].splitlines()[-1]
    assert log.count("differs from the checkpoint's") == 1  # --lr_backbone was left as it was
    # and it is so: the optimizer runs at the checkpoint's rate
    assert load_checkpoint(out / "checkpoint.pth")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)


# ----------------------------------------------------------------------------------------------
# Data faults

def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_image_is_named_or_skipped_in_a_folder(tmp_path, caplog):
    from datasets.coco import BadImageError, CocoDetection
    write_mini_coco(str(tmp_path), layout="folder", splits=("train2017",), num_random=0)
    _truncate(tmp_path / "train2017" / "000005.png")
    (tmp_path / "train2017" / "000003.png").write_bytes(b"not an image at all")
    ds = CocoDetection(str(tmp_path), "train")
    index = ds.ids.index(5)
    with pytest.raises(BadImageError) as err:
        ds[index]
    assert f"cannot read image file {tmp_path / 'train2017' / '000005.png'} (image id 5)" in str(err.value)
    assert "--skip_bad_images" in str(err.value)
    with pytest.raises(BadImageError, match="000003.png"):
        ds[ds.ids.index(3)]

    skipping = CocoDetection(str(tmp_path), "train", skip_bad_images=True)
    with caplog.at_level("WARNING"):
        image, target = skipping[index]
    assert target["image_id"].item() == 6 and image.size == (48, 48)  # the next readable image
    assert skipping.skipped.value == 1 and "000005.png" in caplog.text
    skipping[skipping.ids.index(3)]  # 3 is unreadable, so is 5 after it: 6 is read
    assert skipping.skipped.value == 3


def test_truncated_zip_member_is_named(tmp_path):
    from datasets.coco import BadImageError, CocoDetection
    info = write_mini_coco(str(tmp_path), layout="zip", splits=("val2017",), num_random=0)
    archive = tmp_path / "val2017.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file_name, data in info["files"].items():
            zf.writestr(f"val2017/{file_name}", data[: len(data) // 2] if file_name == "000001.jpg" else data)
    ds = CocoDetection(str(tmp_path), "val")
    with pytest.raises(BadImageError) as err:
        ds[ds.ids.index(1)]
    assert f"cannot read member val2017/000001.jpg of {archive} (image id 1)" in str(err.value)


def test_unreadable_image_in_a_run(tmp_path):
    toy = tmp_path / "toy"
    common = [*SMALL_TOY, "--toy_path", toy, *TINY, "--num_workers", "1", "--epochs", "1"]
    from datasets.toy import generate_toy_coco
    generate_toy_coco(toy, num_train=4, num_val=2)
    bad = toy / "train2017" / sorted(os.listdir(toy / "train2017"))[1]
    _truncate(bad)
    # read in a DataLoader worker: the message is the worker's, without its traceback
    with pytest.raises(SystemExit) as err:
        run_main(*common, "--output_dir", tmp_path / "stopped")
    message = str(err.value)
    assert message.startswith(f"error: cannot read image file {bad}") and "Traceback" not in message
    run_main(*common, "--output_dir", tmp_path / "skipped", "--skip_bad_images")
    log = (tmp_path / "skipped" / "run.log").read_text()
    # read twice: by the batch-norm calibration of the random backbone, then in the epoch
    assert "training images skipped so far as unreadable (--skip_bad_images): 2," in log
    assert log.count("skipped (--skip_bad_images): cannot read image file") == 2


def test_box_faults_are_counted_once_and_handled_as_detr_does(tmp_path, caplog):
    from datasets.coco import CocoDetection, count_box_faults, prepare_target
    write_mini_coco(str(tmp_path), layout="folder", splits=("val2017",), num_random=0)
    with caplog.at_level("INFO"):
        ds = CocoDetection(str(tmp_path), "val")
    # image 2 (40 x 56): two boxes reach outside it, one has zero width, one lies right of it
    assert caplog.text.count("boxes reach outside") == 1
    assert "2 boxes reach outside their image and are clipped to it, 2 have zero or negative size" in caplog.text
    assert count_box_faults(ds.coco) == (2, 2)
    # a negative width is dropped, as an empty box is; a box sticking out is clipped
    annotations = [{"bbox": [10.0, 10.0, -4.0, 5.0], "category_id": 1},
                   {"bbox": [30.0, 40.0, 20.0, 30.0], "category_id": 3}]
    target = prepare_target((40, 56), 9, annotations)
    assert target["labels"].tolist() == [3]
    assert target["boxes"].tolist() == [[30.0, 40.0, 40.0, 56.0]]


# ----------------------------------------------------------------------------------------------
# Evaluating a checkpoint uses its weights

def test_eval_resume_scores_with_the_checkpoints_weights(tmp_path):
    # One validation image with one annotated box. The checkpoint's heads predict exactly that box
    # and class for every query (last layers: zero weights, biases set), so with its weights the
    # AP is 1; the same file with every tensor's entries shuffled, or a run that ignored the
    # loaded weights, scores near 0.
    import json
    from datasets import num_classes_for
    from datasets.toy import generate_toy_coco
    from models import build_model
    root = tmp_path / "toy"
    generate_toy_coco(root, num_train=1, num_val=1)
    ann_file = root / "annotations" / "instances_val2017.json"
    dataset = json.loads(ann_file.read_text())
    dataset["annotations"] = dataset["annotations"][:1]
    ann_file.write_text(json.dumps(dataset))
    image, (ann,) = dataset["images"][0], dataset["annotations"]
    x, y, w, h = ann["bbox"]
    box = torch.tensor([(x + w / 2) / image["width"], (y + h / 2) / image["height"],
                        w / image["width"], h / image["height"]], dtype=torch.float64)

    argv = ["--dataset_file", "toy", "--toy_path", root, "--toy_num_train", "1", "--toy_num_val", "1",
            *TINY, "--enc_rpe2d", "rpe-2.0-product-ctx-1-k"]
    args = main.get_args_parser().parse_args([str(a) for a in argv])
    args.num_classes = num_classes_for("toy")  # as main.py sets it from the data
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    with torch.no_grad():
        model.class_embed.weight.zero_()
        model.class_embed.bias.fill_(-10.0)
        model.class_embed.bias[ann["category_id"]] = 10.0
        last = model.bbox_embed.layers[-1]
        last.weight.zero_()
        last.bias.copy_(torch.logit(box).float())
    good = tmp_path / "good.pth"
    torch.save({"model": model.state_dict(), "args": args}, good)
    g = torch.Generator().manual_seed(0)
    shuffled = {k: v.flatten()[torch.randperm(v.numel(), generator=g)].view_as(v)
                for k, v in model.state_dict().items()}
    torch.save({"model": shuffled, "args": args}, tmp_path / "shuffled.pth")

    def ap(checkpoint):
        stats = run_main(*argv, "--eval", "--resume", checkpoint, "--output_dir", tmp_path / checkpoint.stem)
        return stats["coco_eval_bbox"][0]

    assert ap(good) == pytest.approx(1.0)
    assert ap(tmp_path / "shuffled.pth") < 0.1
