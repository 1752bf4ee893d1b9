"""The DETR detector, its set criterion and its post-processing."""
from typing import Dict, List, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util import box_ops
from util.misc import (NestedTensor, accuracy, get_world_size, is_dist_avail_and_initialized,
                       nested_tensor_from_tensor_list, pad_masks)

from .backbone import build_backbone
from .matcher import build_matcher
from .segmentation import (DETRsegm, PostProcessPanoptic, PostProcessSegm, dice_loss,
                           sigmoid_focal_loss)
from .transformer import build_transformer


class DETR(nn.Module):
    """Backbone + transformer + prediction heads for `num_queries` object slots."""

    def __init__(self, backbone, transformer, num_classes, num_queries, aux_loss=False):
        super().__init__()
        self.num_queries = num_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss

    def forward(self, samples: Union[NestedTensor, Tensor, List[Tensor]]
                ) -> Dict[str, Union[Tensor, List[Dict[str, Tensor]]]]:
        """samples: a NestedTensor (images (B, 3, H, W), mask (B, H, W) True on padding), a batch
        (B, 3, H, W) or a list of (3, H, W) images. Returns 'pred_logits' (B, Q, num_classes + 1),
        'pred_boxes' (B, Q, 4) normalised cxcywh, and with aux_loss 'aux_outputs', the same for
        every decoder layer but the last."""
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()
        if mask is None:
            raise ValueError("DETR needs the padding mask of the NestedTensor")
        return self.predictions(
            self.transformer(self.input_proj(src), mask, self.query_embed.weight, pos[-1])[0])

    def predictions(self, hs: Tensor) -> Dict[str, Union[Tensor, List[Dict[str, Tensor]]]]:
        """The heads' outputs (see forward) for the decoder's outputs hs (layers, B, Q, C)."""
        outputs_class = self.class_embed(hs)
        outputs_coord = self.bbox_embed(hs).sigmoid()
        out: Dict[str, Union[Tensor, List[Dict[str, Tensor]]]] = {
            "pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b}
                                  for c, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        return out


class SetCriterion(nn.Module):
    """DETR's loss: Hungarian-match predictions to targets, then classification (all slots,
    unmatched ones to "no object" with weight eos_coef) and box losses (matched slots)."""

    def __init__(self, num_classes, matcher, weight_dict, eos_coef, losses):
        super().__init__()
        unknown = set(losses) - {"labels", "cardinality", "boxes", "masks"}
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}; expected labels, cardinality, "
                             f"boxes, masks")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = losses
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True):
        logits = outputs["pred_logits"]
        idx = self._src_permutation_idx(indices)
        matched_classes = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=logits.device)
        target_classes[idx] = matched_classes
        losses = {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)}
        if log:
            losses["class_error"] = 100 - accuracy(logits[idx], matched_classes)[0]
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes):
        """Absolute error of the number of slots not predicting "no object"; logged, not trained."""
        logits = outputs["pred_logits"]
        target_lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(predicted.float(), target_lengths.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        idx = self._src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        giou = box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(src_boxes),
                                           box_ops.box_cxcywh_to_xyxy(target_boxes))
        return {"loss_bbox": loss_bbox.sum() / num_boxes,
                "loss_giou": (1 - torch.diag(giou)).sum() / num_boxes}

    def loss_masks(self, outputs, targets, indices, num_boxes):
        """Focal and dice losses of the matched queries' masks, upsampled to the padded targets."""
        idx = self._src_permutation_idx(indices)
        src_masks = outputs["pred_masks"][idx]
        height = max(t["masks"].shape[-2] for t in targets)
        width = max(t["masks"].shape[-1] for t in targets)
        target_masks = torch.cat([pad_masks(t["masks"][j], height, width)
                                  for t, (_, j) in zip(targets, indices)]).to(src_masks)
        src_masks = F.interpolate(src_masks[:, None], size=(height, width), mode="bilinear",
                                  align_corners=False)[:, 0]
        return {"loss_mask": sigmoid_focal_loss(src_masks.flatten(1), target_masks.flatten(1), num_boxes),
                "loss_dice": dice_loss(src_masks.flatten(1), target_masks.flatten(1), num_boxes)}

    @staticmethod
    def _src_permutation_idx(indices):
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def get_loss(self, loss, outputs, targets, indices, num_boxes, **kwargs):
        loss_fn = {"labels": self.loss_labels, "cardinality": self.loss_cardinality,
                   "boxes": self.loss_boxes, "masks": self.loss_masks}[loss]
        return loss_fn(outputs, targets, indices, num_boxes, **kwargs)

    def forward(self, outputs, targets):
        """outputs: the model's dict; targets: list of dicts with 'labels' and normalised 'boxes'.
        Returns the unweighted losses (weight_dict weights them); aux layer i's end in _i."""
        indices = self.matcher({k: v for k, v in outputs.items() if k != "aux_outputs"}, targets)
        # box losses are normalised by the number of target boxes, averaged over processes
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))],
                                    device=outputs["pred_logits"].device)
        if is_dist_avail_and_initialized():
            torch.distributed.all_reduce(num_boxes)
        num_boxes = torch.clamp(num_boxes / get_world_size(), min=1).item()

        losses = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, targets, indices, num_boxes))
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            indices = self.matcher(aux_outputs, targets)
            for loss in self.losses:
                if loss == "masks":  # no masks are predicted for the intermediate layers
                    continue
                kwargs = {"log": False} if loss == "labels" else {}
                aux_losses = self.get_loss(loss, aux_outputs, targets, indices, num_boxes, **kwargs)
                losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses


class PostProcess(nn.Module):
    """Model outputs -> per image 'scores', 'labels', 'boxes' (xyxy in original image pixels)."""

    @torch.no_grad()
    def forward(self, outputs, target_sizes):
        """target_sizes: (B, 2) of (height, width), the size each image should be scaled to."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes) or target_sizes.shape[1] != 2:
            raise ValueError("target_sizes must be (batch, 2) of (height, width), one per image")
        scores, labels = F.softmax(logits, -1)[..., :-1].max(-1)
        boxes = box_ops.box_cxcywh_to_xyxy(boxes)
        img_h, img_w = target_sizes.unbind(1)
        boxes = boxes * torch.stack([img_w, img_h, img_w, img_h], dim=1)[:, None, :]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]


class MLP(nn.Module):
    """A feed-forward network with ReLU between its layers."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


def build(args):
    """(model, criterion, postprocessors) from main.py's options, with two that main.py sets from
    the data: args.num_classes and, for panoptic data, args.is_thing_map."""
    num_classes = getattr(args, "num_classes", None)
    if not num_classes:
        raise ValueError("args.num_classes is not set: give --num_classes, the largest category "
                         "id + 1 of the data (91 for COCO, 250 for COCO panoptic); main.py sets it "
                         "from the data set")
    masks = getattr(args, "masks", False)
    device = torch.device(args.device)
    backbone = build_backbone(args)
    transformer = build_transformer(args)
    model = DETR(backbone, transformer, num_classes=num_classes, num_queries=args.num_queries,
                 aux_loss=args.aux_loss)
    if masks:
        model = DETRsegm(model, freeze_detr=getattr(args, "frozen_weights", None) is not None)
    base_weights = {"loss_ce": 1, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    weight_dict = dict(base_weights)
    if masks:
        weight_dict.update(loss_mask=args.mask_loss_coef, loss_dice=args.dice_loss_coef)
    if args.aux_loss:
        for i in range(args.dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base_weights.items()})
    criterion = SetCriterion(num_classes, matcher=build_matcher(args), weight_dict=weight_dict,
                             eos_coef=args.eos_coef,
                             losses=["labels", "boxes", "cardinality"] + (["masks"] if masks else []))
    criterion.to(device)
    postprocessors = {"bbox": PostProcess()}
    if masks:
        postprocessors["segm"] = PostProcessSegm()
        is_thing_map = getattr(args, "is_thing_map", None)
        if is_thing_map is not None:
            postprocessors["panoptic"] = PostProcessPanoptic(is_thing_map, threshold=0.85)
    return model, criterion, postprocessors
