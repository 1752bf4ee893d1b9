"""The DETR model: state_dict contract, forward/backward, matcher, criterion, post-processing."""
import itertools
import json
import math
import os
import urllib.error

import pytest
import torch
from torch import nn

import main
from models import build_model
from models.backbone import Backbone, BackboneWeightsError, FrozenBatchNorm2d
from models.detr import PostProcess, SetCriterion
from models.matcher import HungarianMatcher
from models.position_encoding import PositionEmbeddingSine
from models.transformer import TransformerEncoderLayer
from models.rpe_attention import parse_rpe_string
from util import box_ops
from util.misc import NestedTensor, nested_tensor_from_tensor_list

from tests.conftest import load_reference


def make_args(*argv):
    return main.get_args_parser().parse_args(["--backbone_weights", "none", "--device", "cpu", *argv])


SMALL = ["--backbone", "resnet18", "--hidden_dim", "32", "--nheads", "4", "--dim_feedforward", "64",
         "--enc_layers", "2", "--dec_layers", "3", "--num_queries", "7", "--num_classes", "5"]


# ----------------------------------------------------------------------------------------------
# State dict contract

@pytest.mark.parametrize("config", ["rpe-1.9-product-ctx-1-k", "rpe-2.0-product-ctx-1-k", "no-rpe"])
def test_state_dict_matches_model_zoo_schema(config):
    schema = load_reference("state_dict_schema.json")[config]
    model, _, _ = build_model(make_args("--enc_rpe2d", "" if config == "no-rpe" else config,
                                        "--num_classes", "91"))
    got = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]
    assert got == schema
    # a file with exactly these keys and shapes loads strictly
    zoo_file = {k: torch.zeros(shape) for k, shape, _ in schema}
    model.load_state_dict(zoo_file, strict=True)


def test_build_model_without_num_classes_says_how_to_give_it():
    # the count comes from the data, which main.py reads; models/ does not know the data sets
    with pytest.raises(ValueError, match="args.num_classes is not set: give --num_classes"):
        build_model(make_args("--backbone", "resnet18"))


def test_default_options_are_detrs():
    args = main.get_args_parser().parse_args([])
    expected = dict(lr=1e-4, lr_backbone=1e-5, batch_size=2, weight_decay=1e-4, clip_max_norm=0.1,
                    backbone="resnet50", position_embedding="sine", enc_layers=6, dec_layers=6,
                    dim_feedforward=2048, hidden_dim=256, dropout=0.1, nheads=8, num_queries=100,
                    pre_norm=False, aux_loss=True, set_cost_class=1, set_cost_bbox=5,
                    set_cost_giou=2, bbox_loss_coef=5, giou_loss_coef=2, eos_coef=0.1,
                    dataset_file="coco", enc_rpe2d="", backbone_weights="imagenet", seed=42)
    assert {k: getattr(args, k) for k in expected} == expected
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_rpe_tables_are_xavier_initialised_inside_detr():
    model, _, _ = build_model(make_args(*SMALL, "--enc_rpe2d", "rpe-2.0-product-ctx-1-k"))
    table = model.transformer.encoder.layers[0].self_attn.rpe_k.lookup_table_weight
    assert table.abs().sum() > 0  # not the zero start of the bare module
    fan_in, fan_out = table.shape[1] * table.shape[2], table.shape[0] * table.shape[2]
    assert table.abs().max() <= math.sqrt(6.0 / (fan_in + fan_out))


# ----------------------------------------------------------------------------------------------
# Forward and backward

def _targets():
    return [
        {"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.2]])},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.7, 0.2, 0.4, 0.3]])},
    ]


@pytest.mark.parametrize("setting", ["", "rpe-2.0-product-ctx-1-k", "rpe-1.9-cross-ctx-0-qkv",
                                     "rpe-2.0-quant-bias-1-qk"])
def test_forward_backward_on_differently_sized_images(setting):
    torch.manual_seed(0)
    args = make_args(*SMALL, "--enc_rpe2d", setting, "--lr_backbone", "1e-5")
    model, criterion, postprocessors = build_model(args)
    images = [torch.randn(3, 96, 130), torch.randn(3, 120, 64), torch.randn(3, 64, 64)]
    samples = nested_tensor_from_tensor_list(images)
    outputs = model(samples)
    assert outputs["pred_logits"].shape == (3, 7, 6)
    assert outputs["pred_boxes"].shape == (3, 7, 4)
    assert len(outputs["aux_outputs"]) == 2
    losses = criterion(outputs, _targets())
    assert {"loss_ce_0", "loss_bbox_1", "loss_giou_1", "cardinality_error", "class_error"} <= set(losses)
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    assert torch.isfinite(total)
    total.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    results = postprocessors["bbox"](outputs, torch.tensor([[96, 130], [120, 64], [64, 64]]))
    assert [r["boxes"].shape for r in results] == [(7, 4)] * 3


def test_backbone_training_is_limited_to_layer2_to_layer4():
    model, _, _ = build_model(make_args(*SMALL, "--lr_backbone", "1e-5"))
    trainable = {n.split(".")[1] for n, p in model.backbone[0].named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    model, _, _ = build_model(make_args(*SMALL, "--lr_backbone", "0"))
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_dilation_gives_stride_16():
    with pytest.raises(ValueError, match="--dilation needs a bottleneck ResNet"):
        Backbone("resnet18", False, False, True)
    for dilation, stride in [(False, 32), (True, 16)]:
        backbone = Backbone("resnet50", False, False, dilation)
        x = NestedTensor(torch.zeros(1, 3, 128, 96), torch.zeros(1, 128, 96, dtype=torch.bool))
        feature = backbone(x)["0"]
        assert feature.tensors.shape[-2:] == (128 // stride, 96 // stride)
        assert feature.mask.shape[-2:] == (128 // stride, 96 // stride)


def test_encoder_output_on_valid_tokens_ignores_padding():
    """Relative positions of unpadded tokens do not change when the map is padded, so neither may
    the encoder output at those tokens (the padding is masked as keys)."""
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(16, 2, 32, dropout=0.0,
                                    rpe_config=parse_rpe_string("rpe-1.9-product-ctx-0-qkv")).eval()
    for p in layer.parameters():
        if p.dim() > 1:
            nn.init.normal_(p, std=0.3)
    h, w, ph, pw = 3, 4, 5, 7
    x = torch.randn(1, 16, h, w)
    pos_net = PositionEmbeddingSine(8, normalize=True)

    def run(features, mask):
        hh, ww = features.shape[-2:]
        pos = pos_net(NestedTensor(features, mask)).flatten(2).permute(2, 0, 1)
        out = layer(features.flatten(2).permute(2, 0, 1), src_key_padding_mask=mask.flatten(1),
                    pos=pos, hw=(hh, ww))
        return out.permute(1, 2, 0).reshape(1, 16, hh, ww)

    alone = run(x, torch.zeros(1, h, w, dtype=torch.bool))
    padded_x = torch.randn(1, 16, ph, pw) * 10
    padded_x[..., :h, :w] = x
    mask = torch.ones(1, ph, pw, dtype=torch.bool)
    mask[:, :h, :w] = False
    padded = run(padded_x, mask)
    torch.testing.assert_close(padded[..., :h, :w], alone, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Matcher

def test_matcher_is_optimal_against_brute_force():
    torch.manual_seed(1)
    matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    outputs = {"pred_logits": torch.randn(2, 5, 4),
               "pred_boxes": torch.rand(2, 5, 4) * 0.5 + 0.25}
    targets = [{"labels": torch.tensor([0, 2, 1]), "boxes": torch.rand(3, 4) * 0.5 + 0.25},
               {"labels": torch.tensor([3]), "boxes": torch.rand(1, 4) * 0.5 + 0.25}]
    indices = matcher(outputs, targets)
    for b, (src, tgt) in enumerate(indices):
        prob = outputs["pred_logits"][b].softmax(-1)
        pred, gt = outputs["pred_boxes"][b], targets[b]["boxes"]

        def cost(i, j):
            l1 = (pred[i] - gt[j]).abs().sum()
            giou = box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(pred[i:i + 1]),
                                               box_ops.box_cxcywh_to_xyxy(gt[j:j + 1]))[0, 0]
            return 5 * l1 - prob[i, targets[b]["labels"][j]] - 2 * giou

        best = min(sum(cost(i, j) for j, i in enumerate(perm))
                   for perm in itertools.permutations(range(5), len(gt)))
        assert len(src) == len(gt)
        got = sum(cost(i, j) for i, j in zip(src.tolist(), tgt.tolist()))
        assert got == pytest.approx(best.item(), abs=1e-5)


def test_matcher_handles_images_without_targets():
    matcher = HungarianMatcher(1, 5, 2)
    outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_boxes": torch.rand(2, 4, 4) * 0.5 + 0.2}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    indices = matcher(outputs, [empty, empty])
    assert all(len(i) == 0 and len(j) == 0 and i.dtype == torch.int64 for i, j in indices)
    indices = matcher(outputs, [empty, {"labels": torch.tensor([1]), "boxes": torch.rand(1, 4) * 0.4 + 0.3}])
    assert len(indices[0][0]) == 0 and len(indices[1][0]) == 1


# ----------------------------------------------------------------------------------------------
# Criterion and post-processing, against values computed by hand

def test_criterion_losses_by_hand():
    # one image, two queries, two classes (+ no-object); one target of class 1 at a known box
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.2, 0.2, 0.2, 0.2]]])
    target = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]])}]
    criterion = SetCriterion(2, HungarianMatcher(1, 5, 2), weight_dict={}, eos_coef=0.1,
                             losses=["labels", "boxes", "cardinality"])
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, target)

    # Matching: query 0 has L1 0.2 and GIoU 0.5; query 1 is far away -> query 0 takes the target.
    def log_softmax(row, k):
        return row[k] - math.log(sum(math.exp(v) for v in row))

    nll_matched = -log_softmax([2.0, 0.0, -1.0], 1)           # class 1, weight 1
    nll_unmatched = -log_softmax([0.0, 1.0, 0.5], 2)         # no-object, weight 0.1
    expected_ce = (1.0 * nll_matched + 0.1 * nll_unmatched) / (1.0 + 0.1)
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-6)
    # box (0.5,0.5,0.4,0.4) vs (0.5,0.5,0.2,0.4): L1 = 0.2; xyxy (0.3,0.3,0.7,0.7) vs
    # (0.4,0.3,0.6,0.7): intersection 0.08, union 0.16, enclosing 0.16 -> GIoU 0.5
    assert losses["loss_bbox"].item() == pytest.approx(0.2, rel=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.5, rel=1e-6)
    # query 0 predicts class 0 (wrong), query 1 class 1 (counted as an object): 2 vs 1 target
    assert losses["class_error"].item() == pytest.approx(100.0)
    assert losses["cardinality_error"].item() == pytest.approx(1.0)


def test_box_losses_are_divided_by_the_number_of_boxes():
    criterion = SetCriterion(3, HungarianMatcher(1, 5, 2), {}, 0.1, ["boxes"])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]],
                          [[0.6, 0.6, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]])
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])},
               {"labels": torch.tensor([1, 2]), "boxes": boxes[1].clone()}]
    losses = criterion({"pred_logits": torch.zeros(2, 2, 4), "pred_boxes": boxes}, targets)
    # only image 0's box differs (L1 0.1), averaged over 3 target boxes
    assert losses["loss_bbox"].item() == pytest.approx(0.1 / 3, rel=1e-5)


def test_postprocess_by_hand():
    logits = torch.tensor([[[math.log(3.0), 0.0, 0.0]]])  # softmax: 0.6, 0.2, 0.2 (last = none)
    boxes = torch.tensor([[[0.5, 0.25, 0.5, 0.5]]])
    out = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[200, 100]]))[0]
    assert out["labels"].tolist() == [0]
    assert out["scores"].item() == pytest.approx(0.6)
    torch.testing.assert_close(out["boxes"], torch.tensor([[25.0, 0.0, 75.0, 100.0]]))


def test_generalized_box_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [3.0, 0.0, 4.0, 1.0], [1.0, 1.0, 3.0, 3.0]])
    # identical: 1; disjoint: iou 0, union 5, enclosing 8 -> -3/8; overlap: 1/7 - (9-7)/9
    expected = torch.tensor([[1.0, -3 / 8, 1 / 7 - 2 / 9]])
    torch.testing.assert_close(box_ops.generalized_box_iou(a, b), expected)
    with pytest.raises(ValueError, match="x1 >= x0"):
        box_ops.generalized_box_iou(a, torch.tensor([[2.0, 0.0, 1.0, 1.0]]))
    # DETR's box_iou, by hand on the same boxes: (iou, union)
    iou, union = box_ops.box_iou(a, b)
    torch.testing.assert_close(iou, torch.tensor([[1.0, 0.0, 1 / 7]]))
    torch.testing.assert_close(union, torch.tensor([[4.0, 5.0, 7.0]]))


def test_sine_position_embedding_by_formula():
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[:, :, 3] = True  # last column padded
    pos = PositionEmbeddingSine(4, temperature=10000, normalize=True)(
        NestedTensor(torch.zeros(1, 1, 3, 4), mask))
    assert pos.shape == (1, 8, 3, 4)
    r, c = 1, 2  # second row, third column
    y = (r + 1) / (3 + 1e-6) * 2 * math.pi
    x = (c + 1) / (3 + 1e-6) * 2 * math.pi
    dims = [10000 ** (2 * (i // 2) / 4) for i in range(4)]
    expected = [math.sin(y / dims[0]), math.cos(y / dims[1]), math.sin(y / dims[2]), math.cos(y / dims[3]),
                math.sin(x / dims[0]), math.cos(x / dims[1]), math.sin(x / dims[2]), math.cos(x / dims[3])]
    assert pos[0, :, r, c].tolist() == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Backbone details

def test_frozen_batchnorm_equals_batchnorm_in_eval_and_drops_the_counter():
    bn = nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(5)
    frozen.load_state_dict(bn.state_dict(), strict=True)  # has num_batches_tracked
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(frozen(x), bn(x))
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}


def test_backbone_weights_from_a_path(tmp_path):
    import torchvision
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    backbone = Backbone("resnet18", False, False, False, weights=str(path))
    torch.testing.assert_close(backbone.body.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    torch.testing.assert_close(backbone.body.bn1.running_var, reference.bn1.running_var)
    with pytest.raises(BackboneWeightsError, match="does not fit resnet50"):
        Backbone("resnet50", False, False, False, weights=str(path))
    with pytest.raises(BackboneWeightsError, match="neither 'imagenet', 'none' nor an existing file"):
        Backbone("resnet18", False, False, False, weights=str(tmp_path / "missing.pth"))


def test_imagenet_weights_without_network_say_how_to_proceed(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(BackboneWeightsError) as err:
        Backbone("resnet18", True, False, False, weights="imagenet")
    message = str(err.value)
    assert "resnet18-f37072fd.pth" in message and str(tmp_path) in message
    assert "--backbone_weights none" in message and "--backbone_weights PATH" in message


def test_building_a_model_without_imagenet_never_downloads(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("network used")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)
    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    build_model(make_args(*SMALL))
