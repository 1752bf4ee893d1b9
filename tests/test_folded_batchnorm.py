"""The backbone folds each frozen batch norm into the convolution before it (models/backbone.py,
FrozenBatchNorm2d.after_conv): the same features and gradients as torchvision's ResNet running
the batch norms as layers, bottleneck blocks and downsampling included, in train and eval mode;
the batch norm layers are then not called; calibration still sees each one's input."""
import torch
import torchvision
from torchvision.models.resnet import Bottleneck, ResNet

from models.backbone import BackboneBase, FrozenBatchNorm2d, calibrate_frozen_batchnorm
from util.misc import nested_tensor_from_tensor_list


def away_from_identity(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)


def counting_calls(module):
    calls = []
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_folded_bottleneck_resnet_equals_torchvision_in_values_and_gradients():
    torch.manual_seed(0)
    resnet = ResNet(Bottleneck, [1, 2, 1, 1], norm_layer=FrozenBatchNorm2d)
    away_from_identity(resnet)
    reference = ResNet(Bottleneck, [1, 2, 1, 1], norm_layer=FrozenBatchNorm2d)
    reference.load_state_dict(resnet.state_dict())
    backbone = BackboneBase(resnet, train_backbone=True, num_channels=2048,
                            return_interm_layers=False)
    assert [k[len("body."):] for k in backbone.state_dict()] == [
        k for k in reference.state_dict() if not k.startswith("fc.")]
    calls = counting_calls(backbone)
    images = [torch.randn(3, 70, 90), torch.randn(3, 64, 61)]
    for train in (True, False):
        backbone.train(train)
        reference.train(train)
        backbone.zero_grad()
        reference.zero_grad()
        out = backbone(nested_tensor_from_tensor_list(images))["0"].tensors
        x = nested_tensor_from_tensor_list(images).tensors
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(x))))
        assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
        weight = torch.randn_like(expected)
        (out * weight).sum().backward()
        (expected * weight).sum().backward()
        named = dict(reference.named_parameters())
        grads = {n: p.grad for n, p in backbone.body.named_parameters() if p.grad is not None}
        assert "layer2.1.conv3.weight" in grads and "layer2.0.downsample.0.weight" in grads
        for name, grad in grads.items():
            assert (grad - named[name].grad).abs().max() <= 1e-5 * named[name].grad.abs().max()
    assert calls == []  # folded: no batch norm layer ran on its own


def test_calibration_sees_each_batch_norm_input_and_folding_resumes():
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = BackboneBase(resnet, train_backbone=False, num_channels=512,
                            return_interm_layers=False)
    images = torch.randn(2, 3, 64, 64)
    calibrate_frozen_batchnorm(backbone.body, images)
    conv1 = resnet.conv1(images)
    torch.testing.assert_close(resnet.bn1.running_mean, conv1.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(resnet.bn1.running_var, conv1.var(dim=(0, 2, 3), unbiased=False))
    # a later layer too: its input is normalised by the layers before it
    stem = resnet.maxpool(resnet.relu(resnet.bn1(conv1)))
    inner = resnet.layer1[0].conv1(stem)
    torch.testing.assert_close(resnet.layer1[0].bn1.running_mean, inner.mean(dim=(0, 2, 3)),
                               rtol=1e-4, atol=1e-5)
    calls = counting_calls(backbone)
    backbone(nested_tensor_from_tensor_list(list(images)))
    assert calls == []
