"""torch.hub entry points: the iRPE-DETR model zoo and DETR's own ResNet-50 detector.

    model = torch.hub.load("path/to/this/repository", "detr_resnet50_rpe_2_0_product_ctx_1_k",
                           source="local", pretrained=True)

pretrained=False builds the architecture with random weights, offline; pretrained=True loads the
published checkpoint, downloaded once into torch's hub cache. return_postprocessor=True also
returns the PostProcess that turns the outputs into boxes in image pixels.
"""
import os

import torch

# modules only, so that every public callable here is an entry point
from models import backbone, detr, position_encoding, transformer
from util import checkpoint as checkpoints

dependencies = ["torch", "torchvision", "scipy"]

_IRPE_ZOO = "https://github.com/wkcn/iRPE-model-zoo/releases/download/1.0/"
_COCO_CLASSES = 91


def _make_detr(backbone_name, enc_rpe2d="", num_classes=_COCO_CLASSES):
    """DETR's architecture at its defaults (hidden 256, 6 + 6 layers, 100 queries), with iRPE
    `enc_rpe2d` in the encoder."""
    hidden_dim = 256
    resnet = backbone.Backbone(backbone_name, train_backbone=True, return_interm_layers=False,
                               dilation=False)
    joiner = backbone.Joiner(resnet, position_encoding.PositionEmbeddingSine(hidden_dim // 2,
                                                                             normalize=True))
    encoder_decoder = transformer.Transformer(d_model=hidden_dim, return_intermediate_dec=True,
                                              rpe_config=enc_rpe2d)
    return detr.DETR(joiner, encoder_decoder, num_classes=num_classes, num_queries=100)


def _published_checkpoint(url, num_classes):
    """The checkpoint at `url`, from torch's hub cache, downloaded there first if missing."""
    if num_classes != _COCO_CLASSES:
        raise ValueError(f"pretrained=True loads the COCO model, with num_classes={_COCO_CLASSES}; "
                         f"for num_classes={num_classes} use pretrained=False")
    name = os.path.basename(url)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if not os.path.isfile(path):
        try:
            path = checkpoints.cached_download(url)
        except checkpoints.CheckpointError as err:
            raise RuntimeError(
                f"pretrained=True needs {name}, which is not in torch's hub cache and could not be "
                f"downloaded from {url} ({err.__cause__ or err}). Download it where there is "
                f"network and put it at {path}, or use pretrained=False") from None
    return checkpoints.load_checkpoint(path)


def _entry_point(enc_rpe2d, url, doc):
    """A torch.hub entry point of the ResNet-50 model with iRPE `enc_rpe2d`, published at `url`."""
    def entry(pretrained=False, num_classes=_COCO_CLASSES, return_postprocessor=False):
        checkpoint = _published_checkpoint(url, num_classes) if pretrained else None
        model = _make_detr("resnet50", enc_rpe2d, num_classes)
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"], strict=True)
        return (model, detr.PostProcess()) if return_postprocessor else model
    entry.__doc__ = doc
    return entry


detr_resnet50 = _entry_point(
    "", "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth",
    "DETR R50 without iRPE (DETR's own checkpoint, 500 epochs, box AP 0.420 on COCO val2017).")
detr_resnet50_rpe_1_9_product_ctx_1_k = _entry_point(
    "rpe-1.9-product-ctx-1-k", _IRPE_ZOO + "rpe-1.9-product-ctx-1-k.pth",
    "DETR R50 with iRPE rpe-1.9-product-ctx-1-k (7x7 buckets), 150 epochs, box AP 0.409.")
detr_resnet50_rpe_2_0_product_ctx_1_k = _entry_point(
    "rpe-2.0-product-ctx-1-k", _IRPE_ZOO + "rpe-2.0-product-ctx-1-k.pth",
    "DETR R50 with iRPE rpe-2.0-product-ctx-1-k (9x9 buckets), 150 epochs, box AP 0.410.")
detr_resnet50_rpe_2_0_product_ctx_1_k_300ep = _entry_point(
    "rpe-2.0-product-ctx-1-k", _IRPE_ZOO + "rpe-2.0-product-ctx-1-k_300epochs.pth",
    "DETR R50 with iRPE rpe-2.0-product-ctx-1-k (9x9 buckets), 300 epochs, box AP 0.422.")
