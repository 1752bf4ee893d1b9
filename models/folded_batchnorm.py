"""Frozen batch norm folded into the convolution before it: the backbone's speed path.

A FrozenBatchNorm2d after a convolution is an affine map per channel, y = s * conv(x, W) + t, which
is conv(x, s W) + t: one convolution with a bias instead of a convolution and a full pass over its
output (and another in the backward). fold_frozen_batchnorm switches the residual blocks of a
torchvision ResNet to forward functions that do this; the modules, parameters and state_dict keys
stay as they are, and the weights are folded anew at every call (they train, and checkpoints load
into the unfolded modules). Results agree with the unfolded blocks up to float rounding.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck


def conv_frozen_bn(x: Tensor, conv: nn.Conv2d, bn: nn.Module) -> Tensor:
    """bn(conv(x)) for a bias-free conv and a FrozenBatchNorm2d bn, as one convolution."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    return F.conv2d(x, conv.weight * scale[:, None, None, None].to(conv.weight.dtype),
                    shift.to(conv.weight.dtype), conv.stride, conv.padding, conv.dilation,
                    conv.groups)


class FoldedBottleneck(Bottleneck):
    """torchvision's Bottleneck with its frozen batch norms folded (while `fold` is True)."""

    fold: bool

    def forward(self, x: Tensor) -> Tensor:
        if not self.fold:
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu(out + identity)
        out = self.relu(conv_frozen_bn(x, self.conv1, self.bn1))
        out = self.relu(conv_frozen_bn(out, self.conv2, self.bn2))
        out = conv_frozen_bn(out, self.conv3, self.bn3)
        identity = x
        if self.downsample is not None:
            identity = conv_frozen_bn(x, self.downsample[0], self.downsample[1])
        return self.relu(out + identity)


class FoldedBasicBlock(BasicBlock):
    """torchvision's BasicBlock with its frozen batch norms folded (while `fold` is True)."""

    fold: bool

    def forward(self, x: Tensor) -> Tensor:
        if not self.fold:
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu(out + identity)
        out = self.relu(conv_frozen_bn(x, self.conv1, self.bn1))
        out = conv_frozen_bn(out, self.conv2, self.bn2)
        identity = x
        if self.downsample is not None:
            identity = conv_frozen_bn(x, self.downsample[0], self.downsample[1])
        return self.relu(out + identity)


_FOLDED = {Bottleneck: FoldedBottleneck, BasicBlock: FoldedBasicBlock}


def fold_frozen_batchnorm(resnet: nn.Module, frozen_bn_type: type) -> nn.Module:
    """Switch every residual block of `resnet` whose norms are all `frozen_bn_type` to its folded
    forward (in place; returns resnet)."""
    for module in resnet.modules():
        folded = _FOLDED.get(type(module))
        if folded is None:
            continue
        norms = [m for m in module.modules() if isinstance(m, (nn.BatchNorm2d, frozen_bn_type))]
        downsample = module.downsample
        if all(type(m) is frozen_bn_type for m in norms) and (
                downsample is None or (isinstance(downsample, nn.Sequential) and len(downsample) == 2
                                       and isinstance(downsample[0], nn.Conv2d)
                                       and downsample[0].bias is None)):
            module.__class__ = folded
            module.fold = True
    return resnet


def set_folding(module: nn.Module, fold: bool) -> None:
    """Turn the folded forward of every folded block in `module` on or off."""
    for m in module.modules():
        if isinstance(m, (FoldedBottleneck, FoldedBasicBlock)):
            m.fold = fold
