"""The CNN backbone: a torchvision ResNet with frozen batch norm, and its join with the position
encoding."""
import os
import urllib.error

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from util.misc import NestedTensor

from .position_encoding import build_position_encoding

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers (no num_batches_tracked)."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # ImageNet checkpoints come from a regular BatchNorm2d, which has this counter
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class ResNetBody(nn.Module):
    """The ResNet stem and stages, returning the outputs of the stages asked for."""

    def __init__(self, resnet, return_layers=("layer4",)):
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))
        self.return_layers = tuple(return_layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            if name in self.return_layers:
                out[name] = x
        return out


class BackboneWeightsError(RuntimeError):
    """The backbone's starting weights could not be had."""


def _imagenet_weights(name):
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        return torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", progress=False,
                                                  weights_only=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise BackboneWeightsError(
            f"could not get the ImageNet weights of {name} ({err}). Without network, put the file "
            f"{os.path.basename(weights.url)} (from {weights.url}) at {cache}, or pass "
            f"--backbone_weights PATH to a local torchvision {name} state dict, or "
            f"--backbone_weights none to start from random weights (e.g. before --resume)") from err


def load_backbone_weights(resnet, name, weights):
    """Initialise `resnet` from 'imagenet' (torchvision's weights, cached or downloaded), 'none'
    (keep the random start) or the path of a torchvision ResNet state dict."""
    if weights in (None, "", "none"):
        return
    if weights == "imagenet":
        state_dict = _imagenet_weights(name)
    elif os.path.isfile(weights):
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        state_dict = state_dict.get("model", state_dict) if isinstance(state_dict, dict) else state_dict
    else:
        raise BackboneWeightsError(
            f"--backbone_weights {weights!r} is neither 'imagenet', 'none' nor an existing file")
    # the classifier (fc) is not part of the detector
    expected = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    state_dict = {k: v for k, v in state_dict.items()
                  if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    reshaped = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        raise BackboneWeightsError(
            f"--backbone_weights {weights!r} does not fit {name}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, other shapes {reshaped[:3]} (expected a torchvision "
            f"{name} state dict)")
    resnet.load_state_dict(state_dict, strict=False)


class Backbone(nn.Module):
    """A ResNet with frozen batch norm. Only layer2..layer4 train, and only if train_backbone."""

    def __init__(self, name, train_backbone, return_interm_layers, dilation, weights="none"):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown --backbone {name!r}; expected one of {', '.join(RESNETS)}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"--dilation needs a bottleneck ResNet (resnet50, resnet101), not {name}")
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation],
            norm_layer=FrozenBatchNorm2d)
        load_backbone_weights(resnet, name, weights)
        for param_name, param in resnet.named_parameters():
            trainable = train_backbone and param_name.startswith(("layer2", "layer3", "layer4"))
            param.requires_grad_(trainable)
        if return_interm_layers:
            self.strides, return_layers = [4, 8, 16, 32], ("layer1", "layer2", "layer3", "layer4")
        else:
            self.strides, return_layers = [32], ("layer4",)
        self.body = ResNetBody(resnet, return_layers)
        self.num_channels = 512 if name in ("resnet18", "resnet34") else 2048

    def forward(self, tensor_list):
        out = {}
        for name, x in self.body(tensor_list.tensors).items():
            mask = F.interpolate(tensor_list.mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            out[name] = NestedTensor(x, mask)
        return out


@torch.no_grad()
def calibrate_frozen_batchnorm(module, images):
    """Set the statistics of every FrozenBatchNorm2d in `module` to those of its input on `images`.

    For backbones that start from random weights: frozen batch norm cannot adapt, and at its
    identity start the activations of a deep ResNet grow by orders of magnitude. One forward
    pass, layer by layer (each layer already sees normalised inputs), fixes the scale.
    """
    def set_statistics(bn, inputs):
        x = inputs[0]
        bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    hooks = [m.register_forward_pre_hook(set_statistics) for m in module.modules()
             if isinstance(m, FrozenBatchNorm2d)]
    try:
        module(images)
    finally:
        for hook in hooks:
            hook.remove()


class Joiner(nn.Sequential):
    """backbone (index 0) then position encoding (index 1) of every returned feature map."""

    def __init__(self, backbone, position_embedding):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, tensor_list):
        features = list(self[0](tensor_list).values())
        pos = [self[1](x).to(x.tensors.dtype) for x in features]
        return features, pos


def build_backbone(args):
    position_embedding = build_position_encoding(args)
    backbone = Backbone(args.backbone, args.lr_backbone > 0, args.masks, args.dilation,
                        weights=getattr(args, "backbone_weights", "none"))
    return Joiner(backbone, position_embedding)
