"""predict.py on real photographs (scikit-image's bundled samples) with a model-zoo format file."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import skimage
import torch
from PIL import Image

import datasets.transforms as T
import main
import predict
from datasets.coco_names import COCO_CATEGORY_NAMES
from models import build_model
from models.detr import PostProcess
from tests.conftest import ROOT
from tests.test_main import TINY
from util.attention_maps import capture_encoder_attention
from util.misc import nested_tensor_from_tensor_list

# scikit-image (requirements-test.txt) ships these photographs inside its wheel
PHOTOS = os.path.join(os.path.dirname(skimage.__file__), "data")
SIZE, MAX_SIZE = 96, 160  # small images keep the test fast; the rule is evaluation's
RPE = ["--enc_rpe2d", "rpe-2.0-product-ctx-1-k"]


def zoo_model(*extra, seed=0, biases=None):
    """The tiny model and its options; `biases` {class: value} raise some class logits, so that
    scores spread over a useful range although the weights are random."""
    args = main.get_args_parser().parse_args([*TINY, *RPE, "--num_classes", "91", *map(str, extra)])
    torch.manual_seed(seed)
    model, _, _ = build_model(args)
    with torch.no_grad():
        for label, value in (biases or {}).items():
            model.class_embed.bias[label] = value
    return model.eval(), args


def save_zoo_file(path, model, args):
    """The model zoo's layout: {'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'}."""
    torch.save({"model": model.state_dict(), "optimizer": {}, "lr_scheduler": {}, "epoch": 299,
                "args": args}, path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three colour photographs in a folder, and a grayscale one as a file of its own."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut.png", "coffee.png", "chelsea.png"):
        shutil.copy(os.path.join(PHOTOS, name), folder / name)
    return folder, os.path.join(PHOTOS, "camera.png")


def pixels_differ(drawn, original):
    return bool((np.asarray(drawn) != np.asarray(original.convert("RGB"))).any())


def reference_detections(model, paths, batch_size, threshold):
    """PostProcess of the model on the same batches, as predictions.json should hold them."""
    transform = T.Compose([T.RandomResize([SIZE], max_size=MAX_SIZE), T.normalize_transform()])
    expected = []
    for start in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[start:start + batch_size]]
        samples = nested_tensor_from_tensor_list([transform(im, None)[0] for im in images])
        sizes = torch.tensor([[im.height, im.width] for im in images])
        with torch.no_grad():
            results = PostProcess()(model(samples), sizes)
        for i, result in enumerate(results):
            for box, score, label in zip(result["boxes"], result["scores"], result["labels"]):
                if score > threshold:
                    x0, y0, x1, y1 = box.tolist()
                    expected.append((start + i + 1, paths[start + i], int(label),
                                     [x0, y0, x1 - x0, y1 - y0], float(score)))
    return expected


def test_predict_on_photos_equals_postprocess(photos, tmp_path):
    folder, gray = photos
    model, args = zoo_model(biases={1: 4.0, 17: 4.0})  # person and cat
    checkpoint = save_zoo_file(tmp_path / "zoo.pth", model, args)
    paths = [str(folder / n) for n in ("astronaut.png", "chelsea.png", "coffee.png")] + [gray]
    all_scores = [d[4] for d in reference_detections(model, paths, 3, threshold=0.0)]
    threshold = sorted(all_scores)[len(all_scores) // 2]  # half of the predictions pass
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "predict.py", "--resume", str(checkpoint), "--images", str(folder), gray,
         "--output_dir", str(out), "--threshold", str(threshold), "--device", "cpu",
         "--batch_size", "3", "--size", str(SIZE), "--max_size", str(MAX_SIZE), "--attention"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

    predictions = json.loads((out / "predictions.json").read_text())
    expected = reference_detections(model, paths, 3, threshold)
    assert 0 < len(predictions) == len(expected) < len(all_scores)
    labels = set()
    for got, (image_id, path, label, bbox, score) in zip(predictions, expected):
        assert (got["image_id"], got["file_name"], got["category_id"]) == (image_id, path, label)
        assert got["category_name"] == COCO_CATEGORY_NAMES[label]
        assert got["bbox"] == pytest.approx(bbox, abs=1e-3)
        assert got["score"] == pytest.approx(score, abs=1e-6)
        labels.add(label)
    assert labels <= {1, 17}

    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        with Image.open(path) as original, Image.open(out / f"{name}.png") as drawn:
            assert drawn.format == "PNG" and drawn.size == original.size and drawn.mode == "RGB"
            found = any(p["file_name"] == path for p in predictions)
            assert pixels_differ(drawn, original) == found, name
        with Image.open(out / "attention" / f"{name}.png") as figure:
            # the picture and a heat map per point, side by side
            aspect = original.width / original.height
            assert figure.format == "PNG" and figure.width > 2 * aspect * figure.height


def test_file_without_args_names_and_empty_results(photos, tmp_path):
    folder, _ = photos
    model, args = zoo_model("--num_classes", 5, seed=1, biases={2: 6.0})
    # a bare state_dict needs the model options on the command line
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    common = ["--images", str(folder / "chelsea.png"), "--device", "cpu", "--size", SIZE,
              "--max_size", MAX_SIZE]
    with pytest.raises(SystemExit, match="chelsea.png .* would overwrite an input picture"):
        predict.run(list(map(str, ["--resume", bare, "--output_dir", folder, *common])))
    with pytest.raises(SystemExit,
                       match="this file was trained with .*--enc_rpe2d iRPE tables of 81 buckets"):
        predict.run(list(map(str, ["--resume", bare, "--output_dir", tmp_path / "a", *common])))
    out = tmp_path / "b"
    found = predict.run(list(map(str, ["--resume", bare, "--output_dir", out, "--threshold", 1.0,
                                       *common, *TINY, *RPE, "--num_classes", 5])))
    assert found == [] and json.loads((out / "predictions.json").read_text()) == []
    with Image.open(folder / "chelsea.png") as original, Image.open(out / "chelsea.png") as drawn:
        assert not pixels_differ(drawn, original)

    # a checkpoint's own category names win over COCO's
    args.category_names = {1: "alpha", 2: "beta", 4: "gamma"}
    named = save_zoo_file(tmp_path / "named.pth", model, args)
    found = predict.run(list(map(str, ["--resume", named, "--output_dir", tmp_path / "c",
                                       "--threshold", 0.5, *common])))
    assert found and {d["category_name"] for d in found} == {"beta"}


def test_transform_is_evaluations(photos):
    image = Image.open(os.path.join(PHOTOS, "coffee.png")).convert("RGB")
    ours = predict.make_transform(T.VAL_SCALE, T.TRAIN_MAX_SIZE)(image, None)[0]
    evaluation = T.make_coco_transforms("val")(image, None)[0]
    assert ours.shape == (3, 800, 1200) and torch.equal(ours, evaluation)


def test_encoder_attention_capture():
    model, _ = zoo_model()
    images = [torch.randn(3, 128, 160), torch.randn(3, 96, 64)]  # the second is padded
    with torch.no_grad():
        plain = model(images)
        with capture_encoder_attention(model) as captured:
            hooked = model(images)
    # the captured layer returns its weights: another CPU path, the same numbers up to rounding
    torch.testing.assert_close(plain["pred_boxes"], hooked["pred_boxes"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain["pred_logits"], hooked["pred_logits"], rtol=1e-5, atol=1e-6)
    h, w = captured["hw"]
    weights, padding = captured["weights"], captured["padding"]
    assert weights.shape == (2, h * w, h * w) and padding.shape == (2, h * w)
    assert padding[1].any() and not padding[0].any()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, h * w))
    assert (weights[1][:, padding[1]] == 0).all()
    # the hooks are gone afterwards, and iRPE is part of what was captured
    assert not model.transformer.encoder.layers[-1].self_attn._forward_hooks
    with torch.no_grad():
        model.transformer.encoder.layers[-1].self_attn.rpe_k.lookup_table_weight.zero_()
        with capture_encoder_attention(model) as without_rpe:
            model(images)
    assert not torch.allclose(without_rpe["weights"], weights, atol=1e-4)


def test_attention_map_of_a_point_is_its_cells_row():
    # attention where every token looks only at itself: a point's map is one-hot at its own cell
    h, w = 3, 5
    padding = torch.zeros(2, h, w, dtype=torch.bool)
    padding[1, 2:, :] = padding[1, :, 4:] = True  # image 1 covers 2 x 4 cells of the batch
    captured = {"hw": (h, w), "weights": torch.eye(h * w).repeat(2, 1, 1),
                "padding": padding.flatten(1)}
    # image 1: 256 x 128 pixels, resized to 128 x 64 in a 160 x 96 batch: 64 pixels per cell
    sizes = ((256, 128), (128, 64), (160, 96))
    maps, extent = predict.attention_maps(captured, 1, [(200, 70), (10, 127)], sizes)
    assert extent == (0, 256, 128, 0)
    expected = torch.zeros(2, 2, 4)
    expected[0, 1, 3] = expected[1, 1, 0] = 1
    assert torch.equal(torch.stack(maps), expected)


# ----------------------------------------------------------------------------------------------
# --masks: a segmentation checkpoint

def segmentation_model(photo):
    """A tiny model with a mask head for the toy panoptic classes and its options. Its classifier
    is left with two classes, 1 (a thing) and 4 (stuff), balanced on `photo` so that about half
    of the queries take each, every query scoring at least 0.5."""
    from datasets.toy_panoptic import is_thing_map, panoptic_categories
    from tests.test_segmentation_main import TINY_MASKS
    args = main.get_args_parser().parse_args([*TINY_MASKS, *RPE, "--masks", "--num_classes", "6",
                                              "--dataset_file", "toy_panoptic"])
    args.is_thing_map = is_thing_map()
    args.category_names = {c["id"]: c["name"] for c in panoptic_categories()}
    torch.manual_seed(3)
    model, _, _ = build_model(args)
    with torch.no_grad():
        model.detr.class_embed.bias.copy_(torch.tensor([-20.0, 0, -20, -20, 0, -20, -20]))
        transform = T.Compose([T.RandomResize([SIZE], max_size=MAX_SIZE), T.normalize_transform()])
        logits = model.eval()([transform(Image.open(photo).convert("RGB"), None)[0]])["pred_logits"]
        model.detr.class_embed.bias[1] += (logits[0, :, 4] - logits[0, :, 1]).median()
    return model, args


def test_predict_masks_equal_postprocess_panoptic(photos, tmp_path):
    from models.segmentation import PostProcessPanoptic
    from util.panoptic import rgb_to_id
    model, args = segmentation_model(os.path.join(PHOTOS, "astronaut.png"))
    checkpoint = save_zoo_file(tmp_path / "segm.pth", model, args)
    folder = tmp_path / "in"
    folder.mkdir()
    # a and b are square (one unpadded batch of two), c is a batch of its own
    for name, source in (("a.png", "astronaut.png"), ("b.png", "camera.png"), ("c.png", "coffee.png")):
        shutil.copy(os.path.join(PHOTOS, source), folder / name)
    out = tmp_path / "out"
    predict.run(list(map(str, ["--resume", checkpoint, "--images", folder, "--output_dir", out,
                               "--threshold", 0.45, "--device", "cpu", "--batch_size", 2,
                               "--size", SIZE, "--max_size", MAX_SIZE])))  # no --masks: from args

    transform = T.Compose([T.RandomResize([SIZE], max_size=MAX_SIZE), T.normalize_transform()])
    postprocess = PostProcessPanoptic(args.is_thing_map, threshold=0.45)
    data = json.loads((out / "panoptic.json").read_text())
    assert [a["file_name"] for a in data["annotations"]] == ["a.png", "b.png", "c.png"]
    assert {c["id"]: (c["name"], c["isthing"]) for c in data["categories"]} == {
        1: ("rectangle", 1), 2: ("circle", 1), 3: ("triangle", 1), 4: ("upper background", 0),
        5: ("lower background", 0)}
    kinds = set()
    for batch in (["a", "b"], ["c"]):
        images = [Image.open(folder / f"{n}.png").convert("RGB") for n in batch]
        with torch.no_grad():
            outputs = model(nested_tensor_from_tensor_list([transform(im, None)[0] for im in images]))
        sizes = [transform(im, None)[0].shape[-2:] for im in images]
        expected = postprocess(outputs, sizes, [(im.height, im.width) for im in images])
        for name, image, want in zip(batch, images, expected):
            want_ids = rgb_to_id(np.asarray(Image.open(io.BytesIO(want["png_string"]))))
            annotation = next(a for a in data["annotations"] if a["file_name"] == f"{name}.png")
            with Image.open(out / "panoptic" / f"{name}.png") as png:
                got_ids = rgb_to_id(np.asarray(png))
            assert got_ids.shape == (image.height, image.width)
            # the file's segment k + 1 is the post-processing's segment k that covers pixels
            kept = [s for s in want["segments_info"] if (want_ids == s["id"]).any()]
            assert len(annotation["segments_info"]) == len(kept) >= 2
            for got, ref in zip(annotation["segments_info"], kept):
                mask = want_ids == ref["id"]
                assert np.array_equal(got_ids == got["id"], mask), name
                assert (got["category_id"], got["isthing"], got["area"]) == (
                    ref["category_id"], int(ref["isthing"]), int(mask.sum()))
                ys, xs = np.nonzero(mask)
                assert got["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
                assert got["category_name"] == args.category_names[ref["category_id"]]
                kinds.add(got["isthing"])
            assert (got_ids == 0).sum() == (~np.isin(want_ids, [s["id"] for s in kept])).sum()
            with Image.open(out / f"{name}.png") as drawn:  # the segments drawn over the photo
                assert drawn.size == image.size and pixels_differ(drawn, image)
    assert kinds == {0, 1}  # things and stuff were both found


def test_masks_of_a_detector_draw_its_boxes(photos, tmp_path, capsys):
    model, args = zoo_model(biases={1: 6.0})
    checkpoint = save_zoo_file(tmp_path / "zoo.pth", model, args)
    out = tmp_path / "out"
    found = predict.run(list(map(str, ["--resume", checkpoint, "--images", photos[1], "--masks",
                                       "--output_dir", out, "--device", "cpu", "--size", SIZE,
                                       "--max_size", MAX_SIZE, "--threshold", 0.1])))
    assert "detector without a mask head" in capsys.readouterr().out
    assert found and (out / "camera.png").is_file()
    assert not (out / "panoptic").exists() and not (out / "panoptic.json").exists()
