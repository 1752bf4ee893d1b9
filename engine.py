"""One training epoch, one evaluation pass, and what each epoch leaves in the output folder."""
import json
import logging
import math
import os

import torch

import util.misc as utils
from util import amp
from util.checkpoint import rng_states_kept, save_atomic
from util.visualize import write_run_pictures
from datasets.coco_eval import CocoEvaluator
from datasets.panoptic_eval import PanopticEvaluator, format_table


logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a loss (or predictions) that is inf or nan."""


def _non_finite_message(loss, epoch, iteration, detail):
    return (f"the loss is {loss} at epoch {epoch}, iteration {iteration}; {detail}. Training "
            f"stopped; the last checkpoint was left as it was. Try a lower --lr or "
            f"--clip_max_norm > 0, and resume from the last checkpoint.")


def logged_losses(loss_dict, weight_dict):
    """(losses reduced over processes, {name: float} of their sum, weighted and unweighted), the
    floats read from the device in one transfer (one host sync)."""
    reduced = utils.reduce_dict(loss_dict)
    scaled = {k: v * weight_dict[k] for k, v in reduced.items() if k in weight_dict}
    unscaled = {f"{k}_unscaled": v for k, v in reduced.items()}
    logged = {"loss": sum(scaled.values()), **scaled, **unscaled,
              "class_error": reduced["class_error"]}
    values = torch.stack([v.detach().float().reshape(()) for v in logged.values()]).tolist()
    return reduced, dict(zip(logged, values))


def predictions_are_finite(outputs):
    """Whether every prediction (aux outputs included) is finite, on every process alike (before
    the loss: scipy's matcher fails on non-finite costs with a message that hides divergence)."""
    layers = [outputs, *outputs.get("aux_outputs", [])]
    finite = torch.stack([torch.isfinite(layer[k]).all() for layer in layers
                          for k in ("pred_logits", "pred_boxes")]).all().float()
    if utils.is_dist_avail_and_initialized():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, max_norm=0.0,
                    print_freq=10, amp_dtype=None, scaler=None):
    """Train one pass over `data_loader`; returns the averaged statistics. NonFiniteLossError
    before the optimizer steps on non-finite predictions or loss."""
    model.train()
    criterion.train()
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    metric_logger.add_meter("class_error", utils.SmoothedValue(window_size=1, fmt="{value:.2f}"))
    header = f"Epoch: [{epoch}]"

    for iteration, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, header)):
        # asynchronous from pinned memory: the host queues this step's forward without waiting
        samples = samples.to(device, non_blocking=True)
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]

        outputs = amp.forward(model, samples, device, amp_dtype)
        if not predictions_are_finite(outputs):
            raise NonFiniteLossError(_non_finite_message(
                "nan", epoch, iteration, "the model's predictions are not finite (it diverged)"))
        loss_dict = criterion(outputs, targets)
        weight_dict = criterion.weight_dict
        losses = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)

        # read now, with the loss, in one transfer: nothing after the backward waits for the GPU
        loss_dict_reduced, logged = logged_losses(loss_dict, weight_dict)
        loss_value = logged["loss"]
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(_non_finite_message(
                loss_value, epoch, iteration,
                f"the losses were { {k: round(v.item(), 4) for k, v in loss_dict_reduced.items()} }"))

        optimizer.zero_grad()
        if scaler is None:
            losses.backward()
            if max_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
        else:
            scaler.scale(losses).backward()
            if max_norm > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            scaler.step(optimizer)
            scaler.update()

        metric_logger.update(**logged, lr=optimizer.param_groups[0]["lr"])

    metric_logger.synchronize_between_processes()
    utils.logger.info(f"Averaged stats: {metric_logger}")
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@torch.no_grad()
def evaluate(model, criterion, postprocessors, data_loader, base_ds, device, output_dir=None,
             print_freq=10, coco_eval_backend="pycocotools", amp_dtype=None):
    """(stats, coco_evaluator): averaged losses, 'coco_eval_bbox' (COCOeval.stats) and with 'segm'
    and 'panoptic' postprocessors 'coco_eval_masks', 'PQ_all', 'PQ_th', 'PQ_st', 'PQ_per_class'."""
    model.eval()
    criterion.eval()
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.add_meter("class_error", utils.SmoothedValue(window_size=1, fmt="{value:.2f}"))
    iou_types = tuple(k for k in ("bbox", "segm") if k in postprocessors)
    coco_evaluator = CocoEvaluator(base_ds, iou_types, backend=coco_eval_backend)
    panoptic_evaluator = None
    if "panoptic" in postprocessors:
        panoptic_evaluator = PanopticEvaluator.from_dataset(data_loader.dataset)

    for samples, targets in metric_logger.log_every(data_loader, print_freq, "Test:"):
        samples = samples.to(device, non_blocking=True)
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        outputs = amp.forward(model, samples, device, amp_dtype)
        if not predictions_are_finite(outputs):
            raise NonFiniteLossError("the model's predictions are not finite in evaluation: its "
                                     "weights are broken (a diverged run?); evaluate another "
                                     "checkpoint")
        metric_logger.update(**logged_losses(criterion(outputs, targets), criterion.weight_dict)[1])

        orig_target_sizes = torch.stack([t["orig_size"] for t in targets], dim=0)
        target_sizes = torch.stack([t["size"] for t in targets], dim=0)
        results = postprocessors["bbox"](outputs, orig_target_sizes)
        if "segm" in postprocessors:
            results = postprocessors["segm"](results, outputs, orig_target_sizes, target_sizes)
        coco_evaluator.update({int(t["image_id"].item()): r for t, r in zip(targets, results)})
        if panoptic_evaluator is not None:
            panoptic = postprocessors["panoptic"](outputs, target_sizes, orig_target_sizes)
            for prediction, target in zip(panoptic, targets):
                prediction["image_id"] = int(target["image_id"].item())
            panoptic_evaluator.update(panoptic)

    metric_logger.synchronize_between_processes()
    utils.logger.info(f"Averaged stats: {metric_logger}")
    coco_evaluator.synchronize_between_processes()
    coco_evaluator.accumulate()
    utils.logger.info("COCO evaluation:\n%s", coco_evaluator.summarize())
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    stats["coco_eval_bbox"] = coco_evaluator.coco_eval["bbox"].stats.tolist()
    if "segm" in coco_evaluator.coco_eval:
        stats["coco_eval_masks"] = coco_evaluator.coco_eval["segm"].stats.tolist()
    if panoptic_evaluator is not None:
        panoptic_evaluator.synchronize_between_processes()
        results = panoptic_evaluator.summarize()
        utils.logger.info("Panoptic quality (%%):\n%s", format_table(results))
        stats.update(PQ_all=results["All"], PQ_th=results["Things"], PQ_st=results["Stuff"],
                     PQ_per_class=results["per_class"])
    return stats, coco_evaluator


def validate(model, criterion, postprocessors, data_loader, base_ds, device, args, amp_dtype,
             generators=()):
    """evaluate() as main.py runs it, the random states (and `generators`') kept as they were."""
    with rng_states_kept(*generators, data_loader.generator):
        result = evaluate(model, criterion, postprocessors, data_loader, base_ds, device,
                          print_freq=args.print_freq, coco_eval_backend=args.coco_eval_backend,
                          amp_dtype=amp_dtype)
    log_skipped_images(data_loader.dataset, "validation")
    return result


def log_skipped_images(dataset, name):
    """With --skip_bad_images: how many unreadable images were skipped so far, over all processes."""
    counter = getattr(dataset, "skipped", None)
    if counter is not None:
        count = sum(utils.all_gather(counter.value))
        if count:
            logger.warning("%s images skipped so far as unreadable (--skip_bad_images): %d, "
                           "counting each time one was due", name, count)


def save_evaluation(stats, coco_evaluator, bbox_path, panoptic_path):
    """COCOeval.eval of the boxes, and the panoptic quality as json where it was computed."""
    save_atomic(coco_evaluator.coco_eval["bbox"].eval, bbox_path)
    if "PQ_all" in stats:
        tmp = panoptic_path.with_name(panoptic_path.name + ".tmp")
        tmp.write_text(json.dumps({k: stats[k] for k in ("PQ_all", "PQ_th", "PQ_st", "PQ_per_class")}))
        os.replace(tmp, panoptic_path)


def record_epoch(output_dir, epoch, train_stats, test_stats, coco_evaluator, n_parameters):
    """The epoch's line of OUTPUT_DIR/log.txt and its evaluation files (main process)."""
    log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                 **{f"test_{k}": v for k, v in test_stats.items() if k != "PQ_per_class"},
                 "epoch": epoch, "n_parameters": n_parameters}
    with (output_dir / "log.txt").open("a") as f:
        f.write(json.dumps(log_stats) + "\n")
    (output_dir / "eval").mkdir(exist_ok=True)
    save_evaluation(test_stats, coco_evaluator, output_dir / "eval" / "latest.pth",
                    output_dir / "eval" / "panoptic_latest.json")
    if epoch % 50 == 0:
        save_atomic(coco_evaluator.coco_eval["bbox"].eval, output_dir / "eval" / f"{epoch:03}.pth")


def write_pictures(args, output_dir, model, postprocessors, dataset, coco_api, device, curves):
    """The end-of-run pictures (util.visualize.write_run_pictures); a failure is only logged."""
    # the data's own names (panoptic data: stuff too), else those of the box ground truth
    class_names = (getattr(args, "category_names", None)
                   or {i: category["name"] for i, category in coco_api.cats.items()})
    try:
        written = write_run_pictures(output_dir, model, postprocessors["bbox"], dataset, class_names,
                                     device, args.vis_images, curves=curves,
                                     panoptic_postprocessor=postprocessors.get("panoptic"))
    except (OSError, ValueError, ImportError) as err:
        logger.warning("could not write the pictures into %s: %s", output_dir, err)
        return
    logger.info("pictures: %s", ", ".join(str(p) for p in written))
