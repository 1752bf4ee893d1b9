"""Your own data (--train_ann ... with any file names, images in a zip or a folder) and
--finetune from a checkpoint of another class count, through main.py on the CPU."""
import argparse
import json
import os
import re
import zipfile

import pytest
import torch

import main
from models import build_model
from tests.mini_coco import mini_coco_dataset
from tests.test_main import TINY
from util.checkpoint import CheckpointError, load_checkpoint, load_for_finetuning

# the mini set's categories 1, 3, 7 renumbered to 1, 2, 4: the classifier has 4 + 1 = 5 classes
RENUMBER = {1: 1, 3: 2, 7: 4}
NAMES = {1: "alpha", 2: "beta", 4: "gamma"}
RPE = ["--enc_rpe2d", "rpe-2.0-product-ctx-1-k"]


def write_split(folder, name, image_ids, layout, zip_folder=""):
    """A COCO-format file `name`.json of the mini set's `image_ids` and their images, in a folder
    or a zip (members under `zip_folder`); returns (annotation file, images path)."""
    dataset, files = mini_coco_dataset(num_random=0)
    dataset["images"] = [i for i in dataset["images"] if i["id"] in image_ids]
    dataset["annotations"] = [dict(a, category_id=RENUMBER[a["category_id"]])
                              for a in dataset["annotations"] if a["image_id"] in image_ids]
    dataset["categories"] = [dict(c, id=RENUMBER[c["id"]]) for c in dataset["categories"]]
    annotation_file = os.path.join(folder, f"{name}.json")
    with open(annotation_file, "w") as f:
        json.dump(dataset, f)
    wanted = {i["file_name"] for i in dataset["images"]}
    if layout == "zip":
        images = os.path.join(folder, f"{name}_pictures.zip")
        with zipfile.ZipFile(images, "w") as zf:
            for file_name in wanted:
                zf.writestr(f"{zip_folder}/{file_name}" if zip_folder else file_name, files[file_name])
    else:
        images = os.path.join(folder, f"{name}_pictures")
        os.makedirs(images)
        for file_name in wanted:
            with open(os.path.join(images, file_name), "wb") as f:
                f.write(files[file_name])
    return annotation_file, images


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """Training images in a zip (under a folder), validation images in a folder; two of each."""
    folder = str(tmp_path_factory.mktemp("own"))
    train_ann, train_images = write_split(folder, "my_training_boxes", {1, 5}, "zip", "photos")
    val_ann, val_images = write_split(folder, "held_out", {2, 5}, "folder")
    return ["--train_ann", train_ann, "--train_images", train_images,
            "--val_ann", val_ann, "--val_images", val_images]


def run_main(*argv):
    return main.run([str(a) for a in argv])


def tiny_args(*extra):
    return main.get_args_parser().parse_args([*TINY, *RPE, *map(str, extra)])


def test_own_files_train_and_evaluate(own_data, tmp_path):
    out = tmp_path / "out"
    stats = run_main(*own_data, "--output_dir", out, "--epochs", 1, "--batch_size", 2, *TINY, *RPE)
    assert len(stats["coco_eval_bbox"]) == 12
    checkpoint = load_checkpoint(out / "checkpoint.pth")  # weights_only, Namespace allow-listed
    args = checkpoint["args"]
    assert args.num_classes == 5 and args.category_names == NAMES
    assert checkpoint["model"]["class_embed.weight"].shape == (6, 32)
    assert "num_classes 5: the largest category id + 1" in (out / "run.log").read_text()


def test_file_names_and_zip_layouts(tmp_path):
    import datasets
    for zip_folder in ("", "deep/er"):
        folder = tmp_path / (zip_folder.replace("/", "_") or "top")
        folder.mkdir()
        ann, images = write_split(str(folder), "boxes", {1, 2, 3}, "zip", zip_folder)
        args = argparse.Namespace(dataset_file="coco", masks=False, val_ann=ann, val_images=images)
        ds = datasets.build_dataset("val", args)
        assert len(ds) == 3 and ds.images.prefix == zip_folder
        assert ds[0][0].shape[0] == 3
        assert datasets.dataset_categories(ds) == NAMES


@pytest.mark.parametrize("case, expected", [
    ("missing_ann", "annotation file .*nowhere.json does not exist"),
    ("missing_images", "image folder or zip .*no_pictures does not exist"),
    ("zip_lacks", r"lacks 1 image\(s\) listed in .*, e.g. photos/000002.png"),
    ("folder_lacks", r"the folder .* lacks 1 image\(s\) .*000002.png"),
    ("not_coco", r"is not in COCO format: it has no list 'images'"),
    ("not_json", "is not valid json"),
    ("unknown_category", r"annotations use category ids \[9\] that 'categories' does not list"),
    ("half_given", "--train_ann needs --train_images as well"),
    ("too_few_classes", "the data has category id 4, but the classifier has ids 0..2"),
])
def test_messages_for_bad_own_data(tmp_path, capsys, case, expected):
    folder = str(tmp_path)
    ann, images = write_split(folder, "train", {1, 2}, "zip", "photos")
    val = write_split(folder, "val", {1}, "folder")
    argv = ["--val_ann", val[0], "--val_images", val[1]]
    extra = []
    if case == "missing_ann":
        ann = os.path.join(folder, "nowhere.json")
    elif case == "missing_images":
        images = os.path.join(folder, "no_pictures")
    elif case == "zip_lacks":
        with zipfile.ZipFile(images, "w") as zf:
            zf.writestr("photos/000001.jpg", b"")
    elif case == "folder_lacks":
        ann, images = write_split(folder, "again", {1, 2}, "folder")
        os.remove(os.path.join(images, "000002.png"))
    elif case in ("not_coco", "not_json", "unknown_category"):
        with open(ann) as f:
            data = json.load(f)
        text = {"not_coco": json.dumps({"annotations": []}), "not_json": "{'images': [",
                "unknown_category": json.dumps(dict(data, annotations=[
                    dict(data["annotations"][0], category_id=9)]))}[case]
        with open(ann, "w") as f:
            f.write(text)
    elif case == "too_few_classes":
        extra = ["--num_classes", 3]
    argv += ["--train_ann", ann] + ([] if case == "half_given" else ["--train_images", images])
    with pytest.raises(SystemExit) as info:
        run_main(*argv, *extra, "--epochs", 1, *TINY)
    message = str(info.value)
    assert re.search(expected, message), message
    assert "Traceback" not in message


# ----------------------------------------------------------------------------------------------
# Fine-tuning

@pytest.fixture(scope="module")
def coco_checkpoint(tmp_path_factory):
    """A model-zoo style file of the tiny model: 91 classes, 6 queries, random weights."""
    torch.manual_seed(1)
    args = tiny_args("--num_classes", 91)
    model, _, _ = build_model(args)
    path = tmp_path_factory.mktemp("zoo") / "coco91.pth"
    torch.save({"model": model.state_dict(), "optimizer": {}, "lr_scheduler": {}, "epoch": 149,
                "args": args}, path)
    return path


def test_finetune_91_classes_into_5(own_data, coco_checkpoint, tmp_path):
    out = tmp_path / "out"
    # lr 0: the saved weights are those loaded at the start
    command = [*TINY, *RPE, *own_data, "--finetune", coco_checkpoint, "--num_queries", 4, "--lr", 0,
               "--lr_backbone", 0, "--output_dir", out, "--epochs", 1, "--batch_size", 2]
    run_main(*command)
    log = (out / "run.log").read_text()
    line = re.search(r"fine-tuning from .*coco91\.pth: (\d+) tensors loaded; (\d+) re-initialised "
                     r"\(the file's are skipped\): (.*)", log)
    assert line, log
    fresh = [item.split(" ")[0] for item in line.group(3).split("; ")]
    assert fresh == ["class_embed.weight", "class_embed.bias", "query_embed.weight"]
    assert "class_embed.weight (6, 32) (file: (92, 32))" in line.group(3)
    assert "query_embed.weight (4, 32) (file: (6, 32))" in line.group(3)
    assert "calibrated" not in log  # the backbone statistics come from the file

    file_state = load_checkpoint(coco_checkpoint)["model"]
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    state = checkpoint["model"]
    assert int(line.group(1)) == len(file_state) - 3 == len(state) - 3
    for name, tensor in state.items():
        if name in fresh:
            rows = tensor.shape[0]
            assert not torch.equal(tensor, file_state[name][:rows]), name
        else:
            assert torch.equal(tensor, file_state[name]), name
    assert checkpoint["epoch"] == 0 and checkpoint["args"].num_classes == 5

    # the same command with --auto_resume continues the run's own checkpoint, not the file
    run_main(*command, "--auto_resume")
    log = (out / "run.log").read_text()
    assert "gave this run its first start only: continuing from" in log
    assert "resumed from" in log.split("first start only")[1]
    assert log.count("fine-tuning from") == 1


def test_finetune_keeps_matching_queries_and_checks_the_architecture(coco_checkpoint):
    checkpoint = load_checkpoint(coco_checkpoint)
    torch.manual_seed(5)
    model, _, _ = build_model(tiny_args("--num_classes", 5))
    fresh_classifier = model.class_embed.weight.detach().clone()
    loaded, fresh = load_for_finetuning(model, checkpoint, tiny_args("--num_classes", 5))
    assert list(fresh) == ["class_embed.weight", "class_embed.bias"]
    assert torch.equal(model.query_embed.weight, checkpoint["model"]["query_embed.weight"])
    assert torch.equal(model.class_embed.weight, fresh_classifier)
    assert len(loaded) == len(checkpoint["model"]) - 2

    # same tensor shapes, other iRPE settings (ratio 2.2 also has 9x9 buckets): refused
    other = tiny_args("--enc_rpe2d", "rpe-2.2-product-ctx-1-k", "--num_classes", 91)
    with pytest.raises(CheckpointError, match="--enc_rpe2d 'rpe-2.0-product-ctx-1-k' \\(this run: "
                                              "'rpe-2.2-product-ctx-1-k'\\)"):
        load_for_finetuning(build_model(other)[0], checkpoint, other)
    # a file without args is judged by its tensors: another iRPE table size is named
    other = tiny_args("--enc_rpe2d", "rpe-1.9-product-ctx-1-k", "--num_classes", 91)
    with pytest.raises(CheckpointError, match="--enc_rpe2d iRPE tables of 81 buckets.*this run: iRPE tables of 49 buckets"):
        load_for_finetuning(build_model(other)[0], {"model": checkpoint["model"]}, other)


def test_finetune_with_resume_or_eval_is_refused(coco_checkpoint):
    for other in (["--resume", coco_checkpoint], ["--eval"]):
        with pytest.raises(SystemExit, match="--finetune FILE starts a new training run"):
            run_main("--finetune", coco_checkpoint, *other, "--dataset_file", "toy", *TINY)
