"""Train and evaluate DETR with iRPE in the encoder (more commands in README.md and docs/).

    python main.py --coco_path /path/to/coco --enc_rpe2d rpe-2.0-product-ctx-1-k --output_dir out
"""
import argparse
import datetime
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

import util.cpu_allocator  # noqa: F401  (keeps freed memory for reuse: see there)
import util.misc as utils
from datasets import build_datasets, build_loaders, class_setup, get_coco_api_from_dataset
from datasets.coco import BadImageError, DatasetNotFoundError
from datasets.coco_eval_backends import COCO_EVAL_BACKENDS, get_backend as get_coco_eval_backend
from engine import (NonFiniteLossError, log_skipped_images, record_epoch, save_evaluation,
                    train_one_epoch, validate, write_pictures)
from models import build_model
from models.backbone import BackboneWeightsError, calibrate_frozen_batchnorm
from models.rpe_attention.irpe import parse_rpe_string
from util import amp, torch_compile
from util.checkpoint import CheckpointError, get_rng_states
from util.interrupt import Interrupted, stop_signals_raise
from util.resume import (finetune, interruption_message, load_frozen_detector, resolve_auto_resume,
                         resume, save_checkpoint)

logger = logging.getLogger("detr")
# whether main() got past reading its input: tells input errors from failures of the run
_run_state = {"started": False}


def plain_message(err):
    """The message of an error, without the traceback text a DataLoader worker wraps it in."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(f"{type(err).__name__}: ", 1)[-1]
    return text


def _rpe_setting(text):
    """argparse type of --enc_rpe2d: the string itself, once it parses."""
    try:
        parse_rpe_string(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def get_args_parser():
    parser = argparse.ArgumentParser("DETR with iRPE: training and evaluation", add_help=False)
    parser.add_argument("--lr", default=1e-4, type=float)
    parser.add_argument("--lr_backbone", default=1e-5, type=float)
    parser.add_argument("--batch_size", default=2, type=int, help="images per process")
    parser.add_argument("--weight_decay", default=1e-4, type=float)
    parser.add_argument("--epochs", default=300, type=int)
    parser.add_argument("--lr_drop", default=200, type=int, help="epochs between lr drops (x0.1)")
    parser.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm")

    # Model
    parser.add_argument("--frozen_weights", type=str, default=None,
                        help="with --masks: a trained detector's checkpoint, loaded and frozen; "
                             "only the mask head trains")
    parser.add_argument("--backbone", default="resnet50", type=str,
                        help="resnet18, resnet34, resnet50 or resnet101")
    parser.add_argument("--backbone_weights", default="imagenet", type=str,
                        help="'imagenet' (torchvision's, cached or downloaded), 'none', or the "
                             "path of a torchvision ResNet state dict; not with --resume or --eval")
    parser.add_argument("--dilation", action="store_true",
                        help="replace the stride of the last stage by a dilation (DC5)")
    parser.add_argument("--position_embedding", default="sine", type=str, choices=("sine", "learned"))
    parser.add_argument("--enc_layers", default=6, type=int)
    parser.add_argument("--dec_layers", default=6, type=int)
    parser.add_argument("--dim_feedforward", default=2048, type=int)
    parser.add_argument("--hidden_dim", default=256, type=int)
    parser.add_argument("--dropout", default=0.1, type=float)
    parser.add_argument("--nheads", default=8, type=int)
    parser.add_argument("--num_queries", default=100, type=int)
    parser.add_argument("--pre_norm", action="store_true")
    parser.add_argument("--enc_rpe2d", default="", type=_rpe_setting,
                        help="iRPE of the encoder self-attention, rpe-{ratio}-{method}-{mode}-"
                             "{shared_head}-{rpe_on}, e.g. rpe-2.0-product-ctx-1-k; '' for none")
    parser.add_argument("--num_classes", default=None, type=int,
                        help="classes + 1 of the classifier; default by dataset (coco 91)")
    parser.add_argument("--masks", action="store_true",
                        help="train the segmentation (mask) head; panoptic with *_panoptic data")

    # Loss
    parser.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                        help="no losses at every decoder layer")
    parser.add_argument("--set_cost_class", default=1, type=float)
    parser.add_argument("--set_cost_bbox", default=5, type=float)
    parser.add_argument("--set_cost_giou", default=2, type=float)
    parser.add_argument("--mask_loss_coef", default=1, type=float)
    parser.add_argument("--dice_loss_coef", default=1, type=float)
    parser.add_argument("--bbox_loss_coef", default=5, type=float)
    parser.add_argument("--giou_loss_coef", default=2, type=float)
    parser.add_argument("--eos_coef", default=0.1, type=float, help="weight of the no-object class")

    # Data
    parser.add_argument("--dataset_file", default="coco",
                        choices=("coco", "coco_panoptic", "toy", "toy_panoptic"))
    parser.add_argument("--coco_path", type=str)
    parser.add_argument("--coco_panoptic_path", type=str)
    parser.add_argument("--remove_difficult", action="store_true")
    parser.add_argument("--toy_path", type=str, default=None,
                        help="folder of the toy data (made there once); default OUTPUT_DIR/toy_data")
    parser.add_argument("--toy_num_train", type=int, default=None,
                        help="toy training images (default 1000); a new count needs a new --toy_path")
    parser.add_argument("--toy_num_val", type=int, default=None, help="toy validation images (default 100)")

    # Your own data and fine-tuning (docs/data.md, docs/fine-tuning.md)
    parser.add_argument("--train_ann", type=str, default=None,
                        help="COCO-format annotation json of your training images (instead of --coco_path)")
    parser.add_argument("--train_images", type=str, default=None,
                        help="folder or zip of the images that --train_ann names")
    parser.add_argument("--val_ann", type=str, default=None,
                        help="COCO-format annotation json of your validation images")
    parser.add_argument("--val_images", type=str, default=None,
                        help="folder or zip of the images that --val_ann names")
    parser.add_argument("--finetune", type=str, default="",
                        help="checkpoint (path or URL) whose weights start a new training run; its "
                             "classifier and, if their number differs, its queries start fresh")

    # Run
    parser.add_argument("--output_dir", default="", help="where to save; empty for no saving")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", default=42, type=int)
    parser.add_argument("--resume", default="", help="checkpoint path or http(s) URL")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N")
    parser.add_argument("--eval", action="store_true")
    parser.add_argument("--num_workers", default=2, type=int)
    parser.add_argument("--print_freq", default=10, type=int, help="iterations between log lines")

    # COCO evaluation
    parser.add_argument("--coco_eval_backend", default="pycocotools", choices=COCO_EVAL_BACKENDS,
                        help="library of the COCO AP numbers: pycocotools, or faster_coco_eval "
                             "(pip install faster-coco-eval: the same, several times faster)")

    # Failures
    parser.add_argument("--skip_bad_images", action="store_true",
                        help="skip images that cannot be read (counted in the log) instead of "
                             "stopping with a message naming the file")

    # Pictures at the end of a run
    parser.add_argument("--vis_images", default=8, type=int,
                        help="validation images drawn with their predictions into "
                             "OUTPUT_DIR/predictions.png at the end of a run (training runs also plot "
                             "OUTPUT_DIR/curves.png from log.txt); 0 for no pictures")

    # Distributed
    parser.add_argument("--world_size", default=1, type=int, help="number of processes")
    parser.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    parser.add_argument("--local_rank", "--local-rank", default=-1, type=int,
                        help="set by torch.distributed.launch without --use_env")

    # Mixed precision and torch.compile (docs/speed-and-gpu.md)
    parser.add_argument("--amp", action="store_true",
                        help="the model's forward under torch.autocast (the rest in float32)")
    parser.add_argument("--amp_dtype", default="bfloat16", choices=tuple(amp.DTYPES),
                        help="autocast dtype of --amp; float16 adds loss scaling (GradScaler)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model; new image sizes compile, for minutes")

    # Interruptions and restarts
    parser.add_argument("--auto_resume", action="store_true",
                        help="continue from OUTPUT_DIR/checkpoint.pth when it exists, else from "
                             "--resume (or from scratch), so a stopped run restarts with the same "
                             "command; on by default in runs torchrun restarted")
    return parser


def check_options(args):
    """Combinations of options that contradict each other, and what they imply."""
    if args.finetune and (args.resume or args.eval):
        raise SystemExit("--finetune FILE starts a new training run from FILE's weights, "
                         "without its optimizer or epoch; --resume FILE continues FILE's own run and "
                         "--eval --resume FILE evaluates it. Give one of them, not both")
    if args.frozen_weights is not None and not args.masks:
        raise SystemExit("--frozen_weights trains a mask head on a frozen detector: add --masks")
    get_coco_eval_backend(args.coco_eval_backend)  # a missing package is named before any work


def main(args):
    _run_state["started"] = False
    utils.init_distributed_mode(args)
    utils.setup_logging(args.output_dir)
    logger.info("git: %s", utils.get_sha())
    logger.info("options: %s", vars(args))
    check_options(args)
    resolve_auto_resume(args)
    if (args.resume or args.eval or args.finetune or args.frozen_weights) and args.backbone_weights != "none":
        logger.info("--resume/--eval/--finetune/--frozen_weights given: the backbone starts "
                    "from the checkpoint, so no --backbone_weights are loaded")
        args.backbone_weights = "none"
    if args.eval and not args.resume:
        logger.warning("--eval without --resume evaluates an untrained model")
    world_size, nodes = utils.get_world_size(), utils.num_nodes()
    logger.info("world size %d on %d node%s, %d images per process, effective batch %d, lr %g "
                "(backbone %g; not scaled with the batch)", world_size, nodes, "s" * (nodes != 1),
                args.batch_size, args.batch_size * world_size, args.lr, args.lr_backbone)

    device = torch.device(args.device)
    amp_dtype, scaler = amp.build(args, device)
    compile_model = torch_compile.build(args, device)
    seed = args.seed + utils.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    dataset_train, dataset_val = build_datasets(args)
    data_loader_train, data_loader_val, sampler_train, generators = build_loaders(
        args, dataset_train, dataset_val)
    base_ds = get_coco_api_from_dataset(dataset_val)
    args.num_classes, args.is_thing_map, args.category_names = class_setup(
        args, dataset_train if dataset_train is not None else dataset_val)

    model, criterion, postprocessors = build_model(args)
    model.to(device)
    detector = model.detr if args.masks else model
    if args.finetune:
        finetune(model, args)
    if args.frozen_weights:
        load_frozen_detector(detector, args)
    elif dataset_train is not None and not (args.resume or args.finetune) and args.backbone_weights == "none":
        # a random backbone under frozen batch norm: give its statistics a sensible scale
        images = utils.collate_fn([dataset_train[i] for i in range(min(len(dataset_train), 8))])[0]
        calibrate_frozen_batchnorm(detector.backbone[0], images.to(device))
        logger.info("random backbone: frozen batch-norm statistics calibrated on %d training "
                    "images", len(images.tensors))

    model_without_ddp = model
    if args.distributed:  # also makes every process start from the main process's weights
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None)
    model = compile_model(model)  # --compile; model_without_ddp stays the module that is saved
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("number of trainable parameters: %d", n_parameters)

    trainable = [(n, p) for n, p in model_without_ddp.named_parameters() if p.requires_grad]
    param_dicts = [{"params": [p for n, p in trainable if "backbone" not in n]},
                   {"params": [p for n, p in trainable if "backbone" in n], "lr": args.lr_backbone}]
    # the fused kernel computes the same update as the default loop, several times faster
    optimizer = torch.optim.AdamW(param_dicts, lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)

    output_dir = Path(args.output_dir) if args.output_dir else None
    unevaluated = None  # the training statistics of a resumed epoch whose evaluation was cut short
    if args.resume:
        unevaluated = resume(args, model_without_ddp, optimizer, lr_scheduler, scaler, generators)
    _run_state["started"] = True  # from here on, an error is a failure of the run, not of its input

    def run_validation():
        return validate(model, criterion, postprocessors, data_loader_val, base_ds, device, args,
                        amp_dtype, generators)

    if args.eval:
        test_stats, coco_evaluator = run_validation()
        if output_dir and utils.is_main_process():
            save_evaluation(test_stats, coco_evaluator, output_dir / "eval.pth",
                            output_dir / "panoptic_eval.json")
            if args.vis_images > 0:
                write_pictures(args, output_dir, model_without_ddp, postprocessors, dataset_val,
                               base_ds, device, curves=False)
        return test_stats

    logger.info("start training")
    start_time = time.time()
    test_stats = {}
    if unevaluated is not None:  # so that log.txt and eval/ are those of a run never stopped
        logger.info("the evaluation of epoch %d did not finish before the run stopped: it runs now",
                    args.start_epoch - 1)
        test_stats, coco_evaluator = run_validation()
        if utils.is_main_process():
            record_epoch(output_dir, args.start_epoch - 1, unevaluated, test_stats, coco_evaluator,
                         n_parameters)
    for epoch in range(args.start_epoch, args.epochs):
        if args.distributed:
            sampler_train.set_epoch(epoch)
        try:
            train_stats = train_one_epoch(model, criterion, data_loader_train, optimizer, device,
                                          epoch, args.clip_max_norm, print_freq=args.print_freq,
                                          amp_dtype=amp_dtype, scaler=scaler)
        except NonFiniteLossError as err:
            raise SystemExit(str(err)) from None
        lr_scheduler.step()
        log_skipped_images(dataset_train, "training")
        # saved before evaluation, so a failure there does not lose the epoch's training
        rng_states = utils.all_gather(get_rng_states(*generators))
        if output_dir and utils.is_main_process():
            save_checkpoint(output_dir, args, epoch, model_without_ddp, optimizer, lr_scheduler,
                            scaler, rng_states, train_stats)
        test_stats, coco_evaluator = run_validation()
        if output_dir and utils.is_main_process():
            record_epoch(output_dir, epoch, train_stats, test_stats, coco_evaluator, n_parameters)

    logger.info("training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))
    if output_dir and utils.is_main_process() and args.vis_images > 0:
        write_pictures(args, output_dir, model_without_ddp, postprocessors, dataset_val, base_ds,
                       device, curves=True)
    return test_stats


def run(argv=None):
    parser = argparse.ArgumentParser("DETR with iRPE: training and evaluation",
                                     parents=[get_args_parser()])
    return run_parsed(parser.parse_args(argv))


def run_parsed(args):
    """main(args) with the messages, exit statuses and clean-up of the command line."""
    started = time.time()
    try:
        with stop_signals_raise():
            return main(args)
    except Interrupted as stop:
        if utils.is_main_process():
            logger.error("%s", interruption_message(stop, args, started))
        raise SystemExit(128 + stop.signum) from None
    except (NonFiniteLossError, DatasetNotFoundError, BadImageError) as err:
        raise SystemExit(f"error: {plain_message(err)}") from None
    except Exception as err:
        input_error = isinstance(err, (CheckpointError, BackboneWeightsError, OSError, ValueError))
        if input_error and not _run_state["started"]:
            # problems of the input (options, files, data): one message, no traceback
            raise SystemExit(f"error: {err}") from None
        # a failure of the run itself: Python prints the traceback, run.log keeps it
        logger.error("the run failed", exc_info=True, extra={"file_only": True})
        raise
    finally:
        if utils.is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run()
