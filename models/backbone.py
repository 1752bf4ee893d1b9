"""The CNN backbone: a torchvision ResNet with frozen batch norm, and its join with the position
encoding."""
import os
import urllib.error
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

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
        self.fold = True  # in after_conv

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # ImageNet checkpoints come from a regular BatchNorm2d, which has this counter
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def scale_shift(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """The affine map y = x * scale + shift this layer computes, in `dtype`."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return scale.to(dtype), shift.to(dtype)

    def forward(self, x):
        # in the input's dtype: under autocast the activations are not promoted to float32
        scale, shift = self.scale_shift(x.dtype)
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    def after_conv(self, x: Tensor, weight: Tensor, stride: Tuple[int, int],
                   padding: Tuple[int, int], dilation: Tuple[int, int], groups: int,
                   relu: bool = False, residual: Optional[Tensor] = None,
                   residual_is_scratch: bool = False) -> Tensor:
        """self(conv2d(x, weight, ...)) (+ residual, in place) (then relu) as one convolution whose
        kernel and bias carry the affine map: the same values up to float rounding, two passes
        over the output fewer. With self.fold False: the convolution, then this layer's call.
        Without autograd on the CPU, conv (+ residual) (+ relu) is one oneDNN call that writes
        into the residual where the caller no longer needs it (residual_is_scratch), else into
        a reused buffer: no fresh output, two passes fewer (_conv_in_place)."""
        if not self.fold:
            y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
            y = self.forward(y) if torch.jit.is_scripting() else self(y)
        else:
            scale, shift = self.scale_shift(weight.dtype)
            weight = weight * scale[:, None, None, None]
            if (residual is None or residual_is_scratch) and not torch.jit.is_scripting():
                fused = _conv_in_place(x, weight, shift, residual, relu, stride, padding,
                                       dilation, groups)
                if fused is not None:
                    return fused
            y = F.conv2d(x, weight, shift, stride, padding, dilation, groups)
        if residual is not None:
            y += residual
        if relu:
            y = F.relu_(y)
        return y

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


@torch.jit.unused
def _eager() -> bool:
    """Not traced, compiled or exported: the graphs those make keep one code path (scripted
    code does not call this)."""
    return not torch.compiler.is_compiling() and not torch.jit.is_tracing()


@torch.jit.unused
def _conv_in_place(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor],
                   relu: bool, stride: Tuple[int, int], padding: Tuple[int, int],
                   dilation: Tuple[int, int], groups: int) -> Optional[Tensor]:
    """conv2d(x, weight, bias) (+ residual) (then relu) by one oneDNN call that writes into the
    residual, or without one into zeros in a buffer of rpe_ops' CPU cache (no fresh pages to
    fault in), where that applies: eager float32 on the CPU in channels-last, nothing recording
    gradients, no autocast (which would run the convolution in another dtype); else None."""
    if not _eager() or not torch.backends.mkldnn.is_available():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (residual is not None and residual.requires_grad)):
        return None
    if not (x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and x.dtype == weight.dtype == torch.float32
            and x.is_contiguous(memory_format=torch.channels_last)):
        return None
    if residual is None:
        if not hasattr(torch.ops.rpe_ops, "cached_empty"):
            return None
        size = [(x.shape[i + 2] + 2 * padding[i] - dilation[i] * (weight.shape[i + 2] - 1) - 1)
                // stride[i] + 1 for i in range(2)]
        residual = torch.ops.rpe_ops.cached_empty([x.shape[0], *size, weight.shape[0]],
                                                  torch.float32).permute(0, 3, 1, 2).zero_()
    elif not (residual.dtype == torch.float32
              and residual.is_contiguous(memory_format=torch.channels_last)):
        return None
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        residual, x, weight, bias, padding, stride, dilation, groups, "add", 1.0,
        "relu" if relu else None, [], "")


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
    """Initialise `resnet` from 'imagenet', 'none' (random) or a torchvision state dict's path."""
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


class _Shortcut:
    def _identity(self, x: Tensor) -> Tensor:
        """The block's shortcut: x, or its downsampling convolution with the batch norm folded."""
        if self.downsample is None:
            return x
        return self.downsample[1].after_conv(
            x, self.downsample[0].weight, self.downsample[0].stride, self.downsample[0].padding,
            self.downsample[0].dilation, self.downsample[0].groups)


class _FoldedBasicBlock(_Shortcut, BasicBlock):
    """torchvision's BasicBlock with each frozen batch norm folded into the conv before it.
    x_is_scratch: the caller will not read x again (_ResNetBody passes it between blocks)."""

    def forward(self, x: Tensor, x_is_scratch: bool = False) -> Tensor:
        identity = self._identity(x)
        out = self.bn1.after_conv(x, self.conv1.weight, self.conv1.stride, self.conv1.padding,
                                  self.conv1.dilation, self.conv1.groups, relu=True)
        return self.bn2.after_conv(out, self.conv2.weight, self.conv2.stride, self.conv2.padding,
                                   self.conv2.dilation, self.conv2.groups, relu=True,
                                   residual=identity, residual_is_scratch=identity is not x
                                   or x_is_scratch)


class _FoldedBottleneck(_Shortcut, Bottleneck):
    """torchvision's Bottleneck with its frozen batch norms folded, as _FoldedBasicBlock."""

    def forward(self, x: Tensor, x_is_scratch: bool = False) -> Tensor:
        identity = self._identity(x)
        out = self.bn1.after_conv(x, self.conv1.weight, self.conv1.stride, self.conv1.padding,
                                  self.conv1.dilation, self.conv1.groups, relu=True)
        out = self.bn2.after_conv(out, self.conv2.weight, self.conv2.stride, self.conv2.padding,
                                  self.conv2.dilation, self.conv2.groups, relu=True)
        return self.bn3.after_conv(out, self.conv3.weight, self.conv3.stride, self.conv3.padding,
                                   self.conv3.dilation, self.conv3.groups, relu=True,
                                   residual=identity, residual_is_scratch=identity is not x
                                   or x_is_scratch)


_FOLDED = {BasicBlock: _FoldedBasicBlock, Bottleneck: _FoldedBottleneck}


class _ResNetBody(IntermediateLayerGetter):
    """IntermediateLayerGetter of a ResNet whose stem convolution carries its frozen batch norm;
    it tells the blocks after a layer's first that their input is its own scratch tensor."""

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for name, module in self.items():
            if name == "conv1":  # conv1, bn1 and relu in one
                x = self.bn1.after_conv(x, self.conv1.weight, self.conv1.stride,
                                        self.conv1.padding, self.conv1.dilation, self.conv1.groups,
                                        relu=True)
            elif name.startswith("layer") and not torch.jit.is_scripting():
                x = self._blocks(name, x)
            elif (name == "maxpool" and x.device.type == "cpu" and x.is_contiguous()
                  and not torch.jit.is_scripting() and _eager()):
                # PyTorch's CPU max pooling is about 5x faster in channels-last (the same values)
                x = module(x.contiguous(memory_format=torch.channels_last)).contiguous()
            elif name not in ("bn1", "relu"):
                x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out

    @torch.jit.unused
    def _blocks(self, name: str, x: Tensor) -> Tensor:
        """The layer `name`, each block after the first told that its input is scratch."""
        for i, block in enumerate(getattr(self, name)):
            x = block(x, x_is_scratch=i > 0)
        return x


def _foldable(resnet: nn.Module) -> bool:
    """A torchvision ResNet of BasicBlock / Bottleneck blocks with frozen batch norm throughout."""
    blocks = [m for m in resnet.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    return (isinstance(resnet, ResNet) and isinstance(resnet.conv1, nn.Conv2d) and bool(blocks)
            and all(type(b) in _FOLDED or type(b) in _FOLDED.values() for b in blocks)
            and not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in resnet.modules())
            and all(b.downsample is None or len(b.downsample) == 2 for b in blocks))


def set_batchnorm_folding(module: nn.Module, fold: bool) -> None:
    """Fold the frozen batch norms into their convolutions (the default), or run each as a layer
    of its own (fold=False: its hooks then fire)."""
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.fold = fold


class BackboneBase(nn.Module):
    """A ResNet cut after layer4: {"0": layer4} (or "0".."3": layer1..4 with return_interm_layers),
    NestedTensors with the padding mask resized. Only layer2..4 train, if train_backbone."""

    def __init__(self, backbone: nn.Module, train_backbone: bool, num_channels: int,
                 return_interm_layers: bool):
        super().__init__()
        for name, parameter in backbone.named_parameters():
            parameter.requires_grad_(train_backbone and name.startswith(("layer2", "layer3", "layer4")))
        if return_interm_layers:
            self.strides, layers = [4, 8, 16, 32], ["layer1", "layer2", "layer3", "layer4"]
        else:
            self.strides, layers = [32], ["layer4"]
        return_layers = {name: str(i) for i, name in enumerate(layers)}
        if _foldable(backbone):  # the same modules and state dict, batch norm folded
            for m in backbone.modules():
                if type(m) in _FOLDED:
                    m.__class__ = _FOLDED[type(m)]
            self.body = _ResNetBody(backbone, return_layers=return_layers)
        else:
            self.body = IntermediateLayerGetter(backbone, return_layers=return_layers)
        self.channels_last_min_side = 400  # see forward
        self.num_channels = num_channels

    def _channels_last_pays(self, images: Tensor) -> bool:
        # CPU runs, eager and scripted alike; traced / exported / compiled graphs keep one layout
        pays = (images.device.type == "cpu"
                and min(images.shape[-2], images.shape[-1]) >= self.channels_last_min_side)
        if not torch.jit.is_scripting():
            pays = pays and _eager()
        return pays

    def forward(self, tensor_list: NestedTensor) -> Dict[str, NestedTensor]:
        mask = tensor_list.mask
        if mask is None:
            raise ValueError("the backbone needs the padding mask of the NestedTensor")
        out: Dict[str, NestedTensor] = {}
        images = tensor_list.tensors
        if self._channels_last_pays(images):
            # oneDNN's convolutions then skip the layout conversions around every call (ResNet-50
            # at 800x1199: 1.1x faster in eval, 1.2x in training on 2 cores); same values up to
            # float rounding. Small images lose by it (the toy demo: 1.4x slower steps).
            images = images.contiguous(memory_format=torch.channels_last)
        for name, x in self.body(images).items():
            resized = F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            out[name] = NestedTensor(x, resized)
        return out


class Backbone(BackboneBase):
    """A ResNet with frozen batch norm, by torchvision name; weights as load_backbone_weights."""

    def __init__(self, name: str, train_backbone: bool, return_interm_layers: bool, dilation: bool,
                 weights: str = "none"):
        if name not in RESNETS:
            raise ValueError(f"unknown --backbone {name!r}; expected one of {', '.join(RESNETS)}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"--dilation needs a bottleneck ResNet (resnet50, resnet101), not {name}")
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation],
            norm_layer=FrozenBatchNorm2d)
        load_backbone_weights(resnet, name, weights)
        num_channels = 512 if name in ("resnet18", "resnet34") else 2048
        super().__init__(resnet, train_backbone, num_channels, return_interm_layers)


@torch.no_grad()
def calibrate_frozen_batchnorm(module, images):
    """Set the statistics of every FrozenBatchNorm2d in `module` to those of its input on `images`:
    at its identity start (random weights) a deep ResNet's activations grow by orders of magnitude.
    """
    def set_statistics(bn, inputs):
        x = inputs[0]
        bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    hooks = [m.register_forward_pre_hook(set_statistics) for m in module.modules()
             if isinstance(m, FrozenBatchNorm2d)]
    set_batchnorm_folding(module, False)  # each layer's input, for the hooks
    try:
        module(images)
    finally:
        set_batchnorm_folding(module, True)
        for hook in hooks:
            hook.remove()


class Joiner(nn.Sequential):
    """backbone (index 0) then position encoding (index 1) of every returned feature map."""

    def __init__(self, backbone, position_embedding):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, tensor_list: NestedTensor) -> Tuple[List[NestedTensor], List[Tensor]]:
        features = list(self[0](tensor_list).values())
        pos = [self[1](x).to(x.tensors.dtype) for x in features]
        return features, pos


def build_backbone(args):
    position_embedding = build_position_encoding(args)
    backbone = Backbone(args.backbone, args.lr_backbone > 0, args.masks, args.dilation,
                        weights=getattr(args, "backbone_weights", "none"))
    return Joiner(backbone, position_embedding)
