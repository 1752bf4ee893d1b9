"""Segmentation model: state-dict contract, attention map, mask head, losses, post-processing."""
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import datasets
import main
from models import build_model
from models.detr import SetCriterion
from models.matcher import HungarianMatcher
from models.segmentation import (DETRsegm, MaskHeadSmallConv, MHAttentionMap, PostProcessPanoptic,
                                 PostProcessSegm, dice_loss, sigmoid_focal_loss)
from util.misc import nested_tensor_from_tensor_list
from util.panoptic import rgb_to_id

from tests.conftest import load_reference

# the smallest model the mask head allows: GroupNorm(8) needs hidden / 16 and hidden + heads
# divisible by 8
SMALL_MASKS = ["--backbone", "resnet18", "--hidden_dim", "128", "--nheads", "8",
               "--dim_feedforward", "64", "--enc_layers", "1", "--dec_layers", "2",
               "--num_queries", "5", "--num_classes", "6", "--masks"]


def make_args(*argv):
    return main.get_args_parser().parse_args(["--backbone_weights", "none", "--device", "cpu", *argv])


# ----------------------------------------------------------------------------------------------
# State dict contract

@pytest.mark.parametrize("name,rpe", [("detr-r50-panoptic", ""),
                                      ("rpe-2.0-product-ctx-1-k-panoptic", "rpe-2.0-product-ctx-1-k")])
def test_masks_state_dict_matches_published_schema(name, rpe):
    reference = load_reference("state_dict_schema_masks.json")[name]
    args = make_args("--masks", "--dataset_file", "coco_panoptic", "--enc_rpe2d", rpe,
                     "--num_classes", "250")
    args.is_thing_map = datasets.is_thing_map_for("coco_panoptic")  # as main.py sets it
    model, _, postprocessors = build_model(args)
    got = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]
    assert got == reference["schema"]
    assert sorted(postprocessors) == sorted(reference["postprocessors"])
    model.load_state_dict({k: torch.zeros(shape) for k, shape, _ in reference["schema"]}, strict=True)


def test_masks_on_coco_gives_segm_but_no_panoptic_postprocessor():
    _, criterion, postprocessors = build_model(make_args(*SMALL_MASKS))
    assert sorted(postprocessors) == ["bbox", "segm"]
    assert "masks" in criterion.losses
    assert criterion.weight_dict["loss_mask"] == 1 and criterion.weight_dict["loss_dice"] == 1


def test_mask_head_widths_that_group_norm_cannot_take_are_refused():
    with pytest.raises(ValueError, match="--hidden_dim a multiple of 128"):
        build_model(make_args(*SMALL_MASKS, "--hidden_dim", "64", "--nheads", "8"))


# ----------------------------------------------------------------------------------------------
# Attention map and mask head against loops written out

def test_attention_map_against_a_loop():
    torch.manual_seed(0)
    attn = MHAttentionMap(8, 8, num_heads=2)
    q, k = torch.randn(2, 3, 8), torch.randn(2, 8, 3, 4)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, :, 3] = True
    mask[1, 2, :] = True
    out = attn(q, k, mask)
    assert out.shape == (2, 3, 2, 3, 4)

    wq, bq, wk, bk = attn.q_linear.weight, attn.q_linear.bias, attn.k_linear.weight, attn.k_linear.bias
    expected = torch.empty(2, 3, 2, 3, 4)
    for b in range(2):
        for i in range(3):
            qi = wq @ q[b, i] + bq
            logits = torch.empty(2, 3, 4)
            for n in range(2):
                for y in range(3):
                    for x in range(4):
                        kv = wk @ k[b, :, y, x] + bk
                        logits[n, y, x] = (qi[4 * n:4 * n + 4] @ kv[4 * n:4 * n + 4]) / math.sqrt(4)
            logits[:, mask[b]] = float("-inf")
            # one softmax over the positions of each head
            expected[b, i] = torch.softmax(logits.flatten(1), 1).view(2, 3, 4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert (out[1][:, :, mask[1]] == 0).all()


def test_mask_head_against_functional_steps():
    torch.manual_seed(0)
    head = MaskHeadSmallConv(136, [64, 32, 16], 128)
    x, bbox_mask = torch.randn(2, 128, 2, 3), torch.rand(2, 3, 8, 2, 3)
    c4, c3, c2 = torch.randn(2, 64, 4, 6), torch.randn(2, 32, 8, 12), torch.randn(2, 16, 16, 24)
    out = head(x, bbox_mask, [c4, c3, c2])
    assert out.shape == (6, 1, 16, 24)

    def conv(layer, y):
        return F.conv2d(y, layer.weight, layer.bias, padding=layer.padding)

    def norm(layer, y):
        return F.relu(F.group_norm(y, 8, layer.weight, layer.bias))

    expected = []
    for b in range(2):
        for q in range(3):
            y = torch.cat([x[b:b + 1], bbox_mask[b:b + 1, q]], 1)
            y = norm(head.gn2, conv(head.lay2, norm(head.gn1, conv(head.lay1, y))))
            for adapter, lay, gn, c in ((head.adapter1, head.lay3, head.gn3, c4),
                                        (head.adapter2, head.lay4, head.gn4, c3),
                                        (head.adapter3, head.lay5, head.gn5, c2)):
                lateral = conv(adapter, c[b:b + 1])
                # nearest upsampling by an integer factor repeats each value
                factor = lateral.shape[-1] // y.shape[-1]
                y = lateral + y.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
                y = norm(gn, conv(lay, y))
            expected.append(conv(head.out_lay, y))
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The whole model

def _images():
    torch.manual_seed(1)
    return nested_tensor_from_tensor_list([torch.randn(3, 64, 96), torch.randn(3, 96, 64)])


def test_detrsegm_keeps_the_detectors_outputs_and_adds_masks_at_stride_4():
    model, _, _ = build_model(make_args(*SMALL_MASKS))
    model.eval()
    samples = _images()
    with torch.no_grad():
        out = model(samples)
        detector_out = model.detr(samples)
    assert out["pred_masks"].shape == (2, 5, 96 // 4, 96 // 4)
    torch.testing.assert_close(out["pred_logits"], detector_out["pred_logits"])
    torch.testing.assert_close(out["pred_boxes"], detector_out["pred_boxes"])
    assert len(out["aux_outputs"]) == 1 and "pred_masks" not in out["aux_outputs"][0]


@pytest.mark.parametrize("frozen", [False, True])
def test_frozen_detector_gets_no_gradients(frozen):
    model, criterion, _ = build_model(make_args(*SMALL_MASKS, *(["--frozen_weights", "x.pth"] if frozen else [])))
    model.train()
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]),
                "masks": torch.zeros(1, 64, 96, dtype=torch.bool)},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]]),
                "masks": torch.ones(1, 96, 64, dtype=torch.bool)}]
    losses = criterion(model(_images()), targets)
    assert {"loss_mask", "loss_dice"} <= set(losses) and "loss_mask_0" not in losses
    sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict).backward()
    detector_grads = [p.grad for p in model.detr.parameters() if p.requires_grad or p.grad is not None]
    head_grads = [p.grad for n, p in model.named_parameters() if not n.startswith("detr.")]
    assert all(g is not None and g.abs().sum() > 0 for g in head_grads)
    if frozen:
        assert detector_grads == []
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in detector_grads)


def test_segmentation_parts_script():
    attn = torch.jit.script(MHAttentionMap(16, 16, 2))
    head = torch.jit.script(MaskHeadSmallConv(136, [64, 32, 16], 128))
    q, k, mask = torch.randn(1, 2, 16), torch.randn(1, 16, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool)
    assert attn(q, k, mask).shape == (1, 2, 2, 2, 2)
    assert head(torch.randn(1, 128, 2, 2), torch.rand(1, 2, 8, 2, 2),
                [torch.randn(1, 64, 4, 4), torch.randn(1, 32, 8, 8), torch.randn(1, 16, 16, 16)]).shape \
        == (2, 1, 16, 16)


def test_detrsegm_scripts_and_gives_the_same_outputs():
    model, _, _ = build_model(make_args(*SMALL_MASKS, "--enc_rpe2d", "rpe-2.0-product-ctx-1-k"))
    model.eval()
    scripted = torch.jit.script(model)
    samples = _images()
    with torch.no_grad():
        got, expected = scripted(samples), model(samples)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        torch.testing.assert_close(got[key], expected[key])


# ----------------------------------------------------------------------------------------------
# Losses, hand-computed

def test_focal_loss_by_hand():
    ln2 = math.log(2)
    # logit 0 (p = 0.5): target 1 -> 0.25 * 0.5^2 * ln 2; target 0 -> 0.75 * 0.5^2 * ln 2
    logits = torch.tensor([[0.0, 0.0], [math.log(3), math.log(3)]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # p = 0.75: target 1 -> 0.25 * 0.25^2 * ln(4/3); target 0 -> 0.75 * 0.75^2 * ln 4
    first = (0.25 * 0.25 * ln2 + 0.75 * 0.25 * ln2) / 2
    second = (0.25 * 0.0625 * math.log(4 / 3) + 0.75 * 0.5625 * math.log(4)) / 2
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, 2), torch.tensor((first + second) / 2))
    no_alpha = (0.25 * ln2 + 0.25 * ln2) / 2
    torch.testing.assert_close(sigmoid_focal_loss(logits[:1], targets[:1], 1, alpha=-1),
                               torch.tensor(no_alpha))


def test_dice_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 100.0, -100.0, -100.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    # p = 0.5 everywhere: 1 - (2 * 1 + 1) / (2 + 2 + 1) = 0.4; a perfect mask: 1 - 5 / 5 = 0
    torch.testing.assert_close(dice_loss(logits, targets, 1), torch.tensor(0.4))
    torch.testing.assert_close(dice_loss(logits, targets, 4), torch.tensor(0.1))


def test_criterion_mask_losses_pad_targets_and_upsample_predictions():
    criterion = SetCriterion(3, HungarianMatcher(1, 5, 2), {}, 0.1, ["masks"])
    # one query per image; constant logits 0 stay 0 when upsampled from 2x3 to the padded 4x6
    outputs = {"pred_logits": torch.zeros(2, 1, 4), "pred_boxes": torch.full((2, 1, 4), 0.5),
               "pred_masks": torch.zeros(2, 1, 2, 3)}
    mask_a = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask_a[0, :2, :2] = True  # 4 of the 24 padded pixels
    mask_b = torch.ones(1, 2, 6, dtype=torch.bool)  # 12 of 24
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.2, 0.2, 0.3, 0.3]]), "masks": mask_a},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.3, 1.0, 0.5]]), "masks": mask_b}]
    losses = criterion(outputs, targets)
    ln2 = math.log(2)
    focal_a = (4 * 0.0625 + 20 * 0.1875) * ln2 / 24
    focal_b = (12 * 0.0625 + 12 * 0.1875) * ln2 / 24
    torch.testing.assert_close(losses["loss_mask"], torch.tensor((focal_a + focal_b) / 2))
    dice_a, dice_b = 1 - 5 / 17, 1 - 13 / 25
    torch.testing.assert_close(losses["loss_dice"], torch.tensor((dice_a + dice_b) / 2))


def test_criterion_mask_losses_of_matched_queries_against_numpy():
    torch.manual_seed(0)
    criterion = SetCriterion(3, HungarianMatcher(1, 5, 2), {}, 0.1, ["masks"])
    logits = torch.randn(1, 3, 4, 4)
    outputs = {"pred_logits": torch.zeros(1, 3, 4), "pred_masks": logits,
               "pred_boxes": torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1]]])}
    masks = torch.rand(2, 4, 4) > 0.5
    # target 0 sits where query 1 is, target 1 where query 0 is
    targets = [{"labels": torch.tensor([1, 2]), "masks": masks,
                "boxes": torch.tensor([[0.8, 0.8, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]])}]
    losses = criterion(outputs, targets)
    p = 1 / (1 + np.exp(-logits[0, [1, 0]].numpy().reshape(2, -1)))
    t = masks.numpy().reshape(2, -1).astype(np.float64)
    p_t = p * t + (1 - p) * (1 - t)
    focal = -(0.25 * t + 0.75 * (1 - t)) * (1 - p_t) ** 2 * np.log(p_t)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    assert losses["loss_mask"].item() == pytest.approx(focal.mean(1).sum() / 2, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice.sum() / 2, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Post-processing on hand-made outputs

def test_postprocess_segm_upsamples_crops_and_resizes():
    # bilinear 2x2 -> 4x4 (align_corners False): rows/columns 0..3 weigh the source as
    # (1, 0), (.75, .25), (.25, .75), (0, 1); logits +-10 leave the top-left 2x2 above 0
    logits = torch.tensor([[10.0, -10.0], [-10.0, -10.0]])
    outputs = {"pred_masks": torch.stack([logits, logits.flip(1)])[:, None]}  # (B=2, Q=1, 2, 2)
    results = [{}, {}]
    PostProcessSegm()(results, outputs, orig_target_sizes=torch.tensor([[4, 4], [4, 8]]),
                      max_target_sizes=torch.tensor([[4, 4], [2, 4]]))
    expected0 = torch.zeros(4, 4, dtype=torch.uint8)
    expected0[:2, :2] = 1
    assert results[0]["masks"].shape == (1, 1, 4, 4) and results[0]["masks"].dtype == torch.uint8
    assert torch.equal(results[0]["masks"][0, 0], expected0)
    # image 1: processed 2x4 (top of the 4x4 map: right half on), shown at 4x8 (each pixel twice)
    expected1 = torch.zeros(4, 8, dtype=torch.uint8)
    expected1[:, 4:] = 1
    assert torch.equal(results[1]["masks"][0, 0], expected1)


def _decode(prediction):
    with Image.open(io.BytesIO(prediction["png_string"])) as png:
        return rgb_to_id(np.asarray(png.convert("RGB")))


def _panoptic_outputs(classes, masks, num_classes=3, confidence=10.0):
    """Logits making query q predict classes[q] (None: no object) with high probability."""
    logits = torch.zeros(1, len(classes), num_classes + 1)
    for q, c in enumerate(classes):
        logits[0, q, num_classes if c is None else c] = confidence
    return {"pred_logits": logits, "pred_masks": masks[None], "pred_boxes": torch.zeros(1, len(classes), 4)}


def test_postprocess_panoptic_merges_stuff_drops_empty_and_resizes():
    # query 0: thing 1 in the top-left 4x4; query 1: stuff 2 top-right; query 2: stuff 2 bottom;
    # query 3: no object; query 4: class 1 but not confident
    masks = torch.full((5, 8, 8), -5.0)
    masks[0, :4, :4] = 5
    masks[1, :4, 4:] = 5
    masks[1, 4:, :] = 1  # second best at the bottom
    masks[2, 4:, :] = 5
    masks[3] = 20
    masks[4] = 20
    outputs = _panoptic_outputs([1, 2, 2, None, 1], masks)
    outputs["pred_logits"][0, 4] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    prediction = PostProcessPanoptic({1: True, 2: False}, threshold=0.85)(
        outputs, processed_sizes=[(8, 8)], target_sizes=[(16, 16)])[0]
    ids = _decode(prediction)
    expected = np.ones((8, 8), dtype=np.int64)
    expected[:4, :4] = 0
    assert np.array_equal(ids, expected.repeat(2, 0).repeat(2, 1))
    assert prediction["segments_info"] == [
        {"id": 0, "isthing": True, "category_id": 1, "area": 64},
        {"id": 1, "isthing": False, "category_id": 2, "area": 192}]


def test_postprocess_panoptic_reassigns_tiny_segments_and_handles_nothing_kept():
    masks = torch.full((2, 6, 6), -5.0)
    masks[0] = 1  # everywhere second best
    masks[1, 0, :3] = 5  # 3 pixels: dropped, then given to query 0
    outputs = _panoptic_outputs([1, 2], masks)
    post = PostProcessPanoptic({1: True, 2: True})
    prediction = post(outputs, [(6, 6)])[0]
    assert np.array_equal(_decode(prediction), np.zeros((6, 6)))
    assert prediction["segments_info"] == [{"id": 0, "isthing": True, "category_id": 1, "area": 36}]

    nothing = post(_panoptic_outputs([None, None], masks), [(6, 6)], [(3, 4)])[0]
    assert nothing["segments_info"] == [] and np.array_equal(_decode(nothing), np.zeros((3, 4)))
