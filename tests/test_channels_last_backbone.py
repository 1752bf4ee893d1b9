"""On the CPU the backbone runs large images in channels-last layout (a speed path): the same
features and gradients as torchvision's ResNet in its default layout, and the same state_dict."""
import copy

import torch
import torchvision

from models.backbone import Backbone, FrozenBatchNorm2d
from util.misc import nested_tensor_from_tensor_list

from .test_folded_batchnorm import away_from_identity


def test_channels_last_backbone_equals_the_default_layout_in_values_and_gradients():
    torch.manual_seed(0)
    backbone = Backbone("resnet18", train_backbone=True, return_interm_layers=True, dilation=False)
    away_from_identity(backbone)  # frozen statistics as in a trained model
    reference = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
    missing, unexpected = reference.load_state_dict(
        {k[len("body."):]: v for k, v in backbone.state_dict().items()}, strict=False)
    assert unexpected == [] and missing == ["fc.weight", "fc.bias"]

    images = [torch.randn(3, 70, 90), torch.randn(3, 64, 61)]
    small = backbone(nested_tensor_from_tensor_list(images))  # below 400 pixels: default layout
    assert all(f.tensors.is_contiguous() for f in small.values())
    backbone.channels_last_min_side = 60
    features = backbone(nested_tensor_from_tensor_list(images))
    assert all(f.tensors.is_contiguous(memory_format=torch.channels_last)
               for f in features.values())
    x = nested_tensor_from_tensor_list(images).tensors
    expected = []
    x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
    for layer in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
        x = layer(x)
        expected.append(x)
    weights = [torch.randn_like(e) for e in expected]
    sum((f.tensors * w).sum() for f, w in zip(features.values(), weights)).backward()
    sum((e * w).sum() for e, w in zip(expected, weights)).backward()
    for f, e in zip(features.values(), expected):  # float rounding relative to the map's scale
        assert (f.tensors - e).abs().max() <= 1e-5 * e.abs().max()
    named = dict(reference.named_parameters())
    for name, p in backbone.body.named_parameters():
        if p.grad is not None:
            assert (p.grad - named[name].grad).abs().max() <= 1e-5 * named[name].grad.abs().max()
    assert backbone.body.layer2[0].conv1.weight.grad is not None  # layers 2-4 train


def test_inference_fuses_the_residual_into_the_convolution_and_leaves_inputs_alone():
    """Without autograd, channels-last blocks write conv + residual + relu into the shortcut
    tensor in one oneDNN call: the features equal torchvision's, the images, the returned layers
    and a tensor passed to a block by its caller stay as they were."""
    torch.manual_seed(0)
    for name in ("resnet18", "resnet50"):
        backbone = Backbone(name, train_backbone=True, return_interm_layers=True, dilation=False)
        away_from_identity(backbone)
        backbone.channels_last_min_side = 60
        backbone.eval()
        reference = getattr(torchvision.models, name)(norm_layer=FrozenBatchNorm2d).eval()
        reference.load_state_dict({k[len("body."):]: v for k, v in backbone.state_dict().items()},
                                  strict=False)
        images = nested_tensor_from_tensor_list([torch.randn(3, 96, 80), torch.randn(3, 64, 90)])
        kept = images.tensors.clone()
        with torch.no_grad():
            features = [f.tensors for f in backbone(images).values()]
            x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(images.tensors))))
            for layer, feature in zip((reference.layer1, reference.layer2, reference.layer3,
                                       reference.layer4), features):
                x = layer(x)
                assert (feature - x).abs().max() <= 1e-5 * x.abs().max()
        assert torch.equal(images.tensors, kept)

        block = backbone.body.layer1[1]  # its shortcut is its input
        x = torch.randn(1, block.conv1.in_channels, 20, 24).contiguous(
            memory_format=torch.channels_last)
        x_before = x.clone()
        with torch.no_grad():
            out = block(x)
            assert torch.equal(x, x_before)  # the caller's tensor
            expected = reference.layer1[1](x)
            fused = block(x, x_is_scratch=True)
        assert fused.data_ptr() == x.data_ptr()  # written into the shortcut: the fused call
        for y in (out, fused):
            assert (y - expected).abs().max() <= 1e-5 * expected.abs().max()
