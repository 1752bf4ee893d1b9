"""DETR's module interface (class names, signatures, defaults) and TorchScript: hand-built models
equal build_model's, scripted modules equal eager ones."""
import inspect
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision

import main
from models import build_model
from models.backbone import Backbone, BackboneBase, FrozenBatchNorm2d, Joiner
from models.detr import DETR, MLP, SetCriterion
from models.matcher import HungarianMatcher
from models.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from models.rpe_attention import RPEMultiheadAttention, parse_rpe_string
from models.rpe_attention.irpe import compute_bucket_ids
from models.transformer import Transformer
from util.misc import collate_fn, nested_tensor_from_tensor_list

from tests.conftest import ROOT, load_reference

TINY = dict(hidden_dim=32, nheads=4, dim_feedforward=64, enc_layers=1, dec_layers=2, num_queries=5,
            num_classes=3)


def script(module):
    # torch.jit.script warns that it is deprecated; it is what these tests are about
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(module)


def tiny_args(enc_rpe2d=""):
    argv = ["--backbone_weights", "none", "--device", "cpu", "--backbone", "resnet18",
            "--enc_rpe2d", enc_rpe2d]
    for name, value in TINY.items():
        argv += [f"--{name}", str(value)]
    return main.get_args_parser().parse_args(argv)


def hand_built(enc_rpe2d=""):
    """The way DETR's own hub code assembles a detector, with this repository's iRPE keyword."""
    hidden = TINY["hidden_dim"]
    backbone = Backbone("resnet18", train_backbone=True, return_interm_layers=False, dilation=False)
    joiner = Joiner(backbone, PositionEmbeddingSine(hidden // 2, normalize=True))
    transformer = Transformer(d_model=hidden, nhead=TINY["nheads"],
                              num_encoder_layers=TINY["enc_layers"],
                              num_decoder_layers=TINY["dec_layers"],
                              dim_feedforward=TINY["dim_feedforward"], return_intermediate_dec=True,
                              rpe_config=enc_rpe2d)
    return DETR(joiner, transformer, num_classes=TINY["num_classes"],
                num_queries=TINY["num_queries"], aux_loss=True)


def padded_batch(sizes=((64, 128), (96, 100))):
    """Images of different sizes: padding in both directions; by default a 3x4 feature map."""
    g = torch.Generator().manual_seed(0)
    return nested_tensor_from_tensor_list([torch.rand(3, h, w, generator=g) for h, w in sizes])


# ----------------------------------------------------------------------------------------------
# The interface

@pytest.mark.parametrize("enc_rpe2d", ["", "rpe-2.0-product-ctx-1-k"])
def test_hand_built_detr_has_the_state_dict_of_build_model(enc_rpe2d):
    built, _, _ = build_model(tiny_args(enc_rpe2d))
    ours = hand_built(enc_rpe2d)
    schema = [(k, tuple(v.shape)) for k, v in built.state_dict().items()]
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == schema
    assert any("rpe_k.lookup_table_weight" in k for k, _ in schema) == bool(enc_rpe2d)
    ours.load_state_dict(built.state_dict(), strict=True)
    built.eval()
    ours.eval()
    samples = padded_batch()
    torch.testing.assert_close(ours(samples)["pred_boxes"], built(samples)["pred_boxes"])


def _defaults(cls):
    return {name: p.default for name, p in inspect.signature(cls).parameters.items()}


def test_constructors_take_detrs_arguments_and_defaults():
    # DETR's signatures (facebookresearch/detr), plus this repository's optional extras at the end
    empty = inspect.Parameter.empty
    assert _defaults(Transformer) == dict(
        d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048,
        dropout=0.1, activation="relu", normalize_before=False, return_intermediate_dec=False,
        rpe_config=None)
    assert _defaults(PositionEmbeddingSine) == dict(num_pos_feats=64, temperature=10000,
                                                    normalize=False, scale=None)
    assert _defaults(PositionEmbeddingLearned) == dict(num_pos_feats=256)
    assert _defaults(HungarianMatcher) == dict(cost_class=1, cost_bbox=1, cost_giou=1)
    assert _defaults(DETR) == dict(backbone=empty, transformer=empty, num_classes=empty,
                                   num_queries=empty, aux_loss=False)
    assert _defaults(BackboneBase) == dict(backbone=empty, train_backbone=empty, num_channels=empty,
                                           return_interm_layers=empty)
    assert _defaults(Backbone) == dict(name=empty, train_backbone=empty, return_interm_layers=empty,
                                       dilation=empty, weights="none")
    assert _defaults(Joiner) == dict(backbone=empty, position_embedding=empty)
    assert _defaults(SetCriterion) == dict(num_classes=empty, matcher=empty, weight_dict=empty,
                                           eos_coef=empty, losses=empty)
    assert _defaults(MLP) == dict(input_dim=empty, hidden_dim=empty, output_dim=empty,
                                  num_layers=empty)


def test_backbone_base_wraps_any_torchvision_resnet():
    resnet = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = BackboneBase(resnet, train_backbone=True, num_channels=512, return_interm_layers=True)
    trainable = {n.split(".")[1] for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    out = backbone(padded_batch(((96, 160), (128, 100))))
    assert [tuple(x.tensors.shape[1:]) for x in out.values()] == [
        (64, 32, 40), (128, 16, 20), (256, 8, 10), (512, 4, 5)]
    # the mask follows the padding (stride 16, nearest): image 0 is 96 of 128 high, image 1 100 of
    # 160 wide
    mask = out["2"].mask
    assert mask[0, :6].logical_not().all() and mask[0, 6:].all()
    assert mask[1, :, :7].logical_not().all() and mask[1, :, 7:].all()
    assert not any(p.requires_grad for p in BackboneBase(resnet, False, 512, False).parameters())


def test_backbone_returns_detr_keys_channels_and_strides():
    """A Backbone built as DETR's hub code and segmentation model build it: feature maps keyed "0"
    (layer4) or "0".."3" (layer1..layer4), with DETR's num_channels, while the state_dict keeps
    the ResNet's module names (the model-zoo files load by them)."""
    samples = padded_batch(((64, 96), (40, 128)))  # a 64 x 128 batch: strides divide it exactly
    backbone = Backbone("resnet50", train_backbone=True, return_interm_layers=True, dilation=False)
    assert backbone.num_channels == 2048
    out = backbone(samples)
    assert list(out) == ["0", "1", "2", "3"]
    layers = zip(out.items(), (256, 512, 1024, 2048), (4, 8, 16, 32))
    for (key, feature), channels, stride in layers:
        assert feature.tensors.shape == (2, channels, 64 // stride, 128 // stride), key
        assert feature.mask.shape == (2, 64 // stride, 128 // stride), key
        # image 0 is 96 wide, image 1 40 high; nearest resizing keeps the cells that start inside
        columns = 96 // stride
        assert not feature.mask[0, :, :columns].any() and feature.mask[0, :, columns:].all()
        rows = -(-40 // stride)
        assert not feature.mask[1, :rows].any() and feature.mask[1, rows:].all()
    keys = backbone.state_dict().keys()
    assert "body.layer4.2.bn3.running_var" in keys and "body.conv1.weight" in keys
    assert not any(k.startswith(("body.0", "body.3")) for k in keys)

    for name, channels in (("resnet18", 512), ("resnet34", 512), ("resnet101", 2048)):
        assert Backbone(name, False, False, False).num_channels == channels, name
    small = Backbone("resnet18", train_backbone=False, return_interm_layers=False, dilation=False)
    out = small(samples)
    assert list(out) == ["0"] and out["0"].tensors.shape == (2, 512, 2, 4)
    dilated = Backbone("resnet50", False, False, dilation=True)(samples)
    assert list(dilated) == ["0"] and dilated["0"].tensors.shape == (2, 2048, 4, 8)


def test_batches_from_tensors_lists_and_collate():
    images = [torch.rand(3, 4, 6), torch.rand(3, 5, 2)]
    batch, targets = collate_fn([(images[0], {"a": 0}), (images[1], {"a": 1})])
    assert batch.tensors.shape == (2, 3, 5, 6) and targets == ({"a": 0}, {"a": 1})
    assert batch.mask[0].sum() == 6 and batch.mask[1].sum() == 20
    torch.testing.assert_close(batch.tensors[1, :, :5, :2], images[1])
    assert batch.tensors[1, :, :, 2:].abs().sum() == 0
    plain = nested_tensor_from_tensor_list(torch.rand(2, 3, 4, 5))
    assert plain.mask.shape == (2, 4, 5) and not plain.mask.any()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        nested_tensor_from_tensor_list(torch.rand(3, 4, 5))


# ----------------------------------------------------------------------------------------------
# TorchScript

def test_scripted_backbone_and_position_encodings_equal_eager():
    torch.manual_seed(0)
    feature_map = padded_batch(((5, 7), (6, 4)))
    for pos in (PositionEmbeddingSine(16, normalize=True), PositionEmbeddingSine(8),
                PositionEmbeddingLearned(16)):
        torch.testing.assert_close(script(pos)(feature_map), pos(feature_map), rtol=0, atol=0)
    samples = padded_batch()
    joiner = Joiner(Backbone("resnet18", True, True, False), PositionEmbeddingSine(16, normalize=True))
    scripted = script(joiner)
    assert scripted.num_channels == 512
    (features, pos), (ref_features, ref_pos) = scripted(samples), joiner(samples)
    assert len(features) == len(ref_features) == 4
    for got, ref in zip(features, ref_features):
        torch.testing.assert_close(got.tensors, ref.tensors, rtol=0, atol=0)
        assert torch.equal(got.mask, ref.mask)
    for got, ref in zip(pos, ref_pos):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_scripted_bucket_ids_equal_reference():
    scripted = script(compute_bucket_ids)
    for name, entry in load_reference("bucket_ids.pt.xz").items():
        method, ratio, size, skip = name.split("-")
        height, width = map(int, size.split("x"))
        ids = scripted(method, float(ratio), height, width, int(skip[len("skip"):]), None)
        assert torch.equal(ids, entry["ids"].long()), name


# every method; ctx and bias; q, k and v
SCRIPT_SETTINGS = ["", "rpe-2.0-product-ctx-1-k", "rpe-1.9-euc-ctx-0-qkv", "rpe-2.0-quant-bias-1-qk",
                   "rpe-2.5-cross-ctx-0-qkv", "rpe-1.5-cross-bias-0-q"]


def assert_outputs_equal(got, ref):
    """Bit for bit (torch.equal), as DETR's own tests check scripted models."""
    assert set(got) == set(ref)
    for key in ref:
        if key == "aux_outputs":
            for got_aux, ref_aux in zip(got[key], ref[key]):
                assert_outputs_equal(got_aux, ref_aux)
        else:
            assert got[key].equal(ref[key]), (key, (got[key] - ref[key]).abs().max().item())


@pytest.mark.parametrize("enc_rpe2d", SCRIPT_SETTINGS)
def test_scripted_detr_equals_eager_bit_for_bit(enc_rpe2d):
    """Eval mode: the scripted model calls the eager model's kernels (the fused attention kernel,
    channels-last convolutions for images of >= 400 pixels a side), so that outputs are equal, not
    close: on the first call with gradients enabled (as DETR's test_all.py checks) and on every
    call under no_grad (TorchScript's graph optimiser rewrites differentiable graphs from the
    second call on with gradients enabled)."""
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args(enc_rpe2d))
    with torch.no_grad():  # non-zero tables, so that every encoding changes the logits
        for name, parameter in model.named_parameters():
            if "lookup_table" in name:
                parameter.normal_(0, 0.2)
    model.eval()
    scripted = script(model)
    samples = padded_batch()
    assert_outputs_equal(scripted(samples), model(samples))
    images = [torch.rand(3, 64, 96), torch.rand(3, 80, 64)]  # a list, as eager models take it
    large = padded_batch(((416, 448), (400, 430)))  # channels-last in the backbone
    with torch.no_grad():
        for _ in range(3):  # past the graph optimiser's profiling runs
            assert_outputs_equal(scripted(images), model(images))
        assert_outputs_equal(scripted(large), model(large))


def test_scripted_segmentation_model_equals_eager_bit_for_bit():
    torch.manual_seed(0)
    args = tiny_args("rpe-2.0-product-ctx-1-k")
    args.masks, args.hidden_dim, args.nheads, args.num_classes = True, 128, 8, 5
    args.is_thing_map = {0: True, 1: True, 2: False, 3: False, 4: False}
    model = build_model(args)[0].eval()
    scripted = script(model)
    samples = padded_batch()
    got, ref = scripted(samples), model(samples)
    assert "pred_masks" in ref
    assert_outputs_equal(got, ref)
    with torch.no_grad():
        for _ in range(3):
            assert_outputs_equal(scripted(samples), model(samples))


def test_scripted_detr_trains_like_eager():
    """Gradients through the scripted model (the rpe_ops operators' autograd from TorchScript):
    the same kernels as eager, so the same gradients bit for bit."""
    torch.manual_seed(0)
    args = tiny_args("rpe-1.9-product-ctx-0-qkv")
    args.dropout, args.lr_backbone = 0.0, 1e-5
    model, criterion, _ = build_model(args)
    scripted = script(model)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])},
               {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2],
                                                                      [0.7, 0.6, 0.3, 0.4]])}]
    grads = []
    for net in (model, scripted):
        net.zero_grad()
        with torch.jit.optimized_execution(False):
            losses = criterion(net(padded_batch()), targets)
        sum(losses[k] * w for k, w in criterion.weight_dict.items()).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert any("rpe_v" in n for n in grads[0])
    for name in grads[0]:
        assert grads[1][name].equal(grads[0][name]), name


_FALLBACK_SCRIPT = """
import sys, torch, rpe_ops
from models.rpe_attention import RPEMultiheadAttention, parse_rpe_string
assert rpe_ops.backend("cpu") == "fallback"
torch.manual_seed(0)
layer = RPEMultiheadAttention(16, 2, rpe_config=parse_rpe_string("rpe-1.9-product-ctx-0-qkv")).eval()
with torch.no_grad():
    for p in layer.parameters():
        p.normal_()
x = torch.randn(12, 2, 16)
scripted = torch.jit.script(layer)
torch.save({"state_dict": layer.state_dict(), "x": x, "eager": layer(x, x, x, hw=(3, 4))[0],
            "scripted": scripted(x, x, x, hw=(3, 4))[0]}, sys.argv[1])
"""


def test_scripted_attention_runs_on_the_fallback_too(tmp_path):
    """Without the compiled extension rpe_ops registers the same operators in Python; scripted code
    calls them, and gets the numbers of the extension."""
    out = tmp_path / "out.pt"
    env = dict(os.environ, RPE_OPS_FALLBACK="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = torch.load(out, weights_only=True)
    layer = RPEMultiheadAttention(16, 2, rpe_config=parse_rpe_string("rpe-1.9-product-ctx-0-qkv"))
    layer.load_state_dict(result["state_dict"])
    x = result["x"]
    here = script(layer.eval())(x, x, x, hw=(3, 4))[0]
    torch.testing.assert_close(result["scripted"], result["eager"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(result["scripted"], here, rtol=1e-5, atol=1e-5)


def test_scripted_attention_layer_keeps_the_map_size_checks():
    layer = script(RPEMultiheadAttention(16, 2, rpe_config=parse_rpe_string("rpe-2.0-euc-ctx-1-k")))
    x = torch.randn(12, 1, 16)
    with pytest.raises(Exception, match="3x5 map"):
        layer(x, x, x, hw=(3, 5))
    with pytest.raises(Exception, match="pass hw"):
        layer(x, x, x)
    assert layer(x, x, x, hw=(4, 3))[0].shape == x.shape
