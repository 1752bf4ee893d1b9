"""Train and evaluate DETR with iRPE in the encoder.

    python main.py --coco_path /path/to/coco --enc_rpe2d rpe-2.0-product-ctx-1-k --output_dir out
    python main.py --coco_path /path/to/coco --enc_rpe2d rpe-2.0-product-ctx-1-k --eval \
        --resume rpe-2.0-product-ctx-1-k.pth
    python main.py --dataset_file toy --output_dir toy_out ...   (see README.md)
    python main.py --train_ann train.json --train_images train.zip --val_ann val.json \
        --val_images val/ --finetune rpe-2.0-product-ctx-1-k.pth --enc_rpe2d rpe-2.0-product-ctx-1-k
"""
import argparse
import datetime
import json
import logging
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

import util.cpu_allocator  # noqa: F401  (keeps freed memory for reuse: see there)
import util.misc as utils
from datasets import (build_dataset, dataset_categories, get_coco_api_from_dataset,
                      is_thing_map_for, num_classes_for, uses_own_files)
from datasets.coco import BadImageError, DatasetNotFoundError
from datasets.coco_eval_backends import COCO_EVAL_BACKENDS, get_backend as get_coco_eval_backend
from engine import NonFiniteLossError, evaluate, train_one_epoch
from models import build_model
from models.backbone import BackboneWeightsError, calibrate_frozen_batchnorm
from models.rpe_attention.irpe import parse_rpe_string
from util import amp, torch_compile
from util.checkpoint import (CheckpointError, check_compatible, get_rng_states, load_checkpoint,
                             load_for_finetuning, rng_states_kept, save_atomic, set_rng_states)
from util.interrupt import Interrupted, stop_signals_raise
from util.visualize import write_run_pictures

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
                        help="'imagenet' (torchvision's ImageNet weights, from the local cache or "
                             "downloaded), 'none', or the path of a torchvision ResNet state dict. "
                             "Not used with --resume or --eval")
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
                        help="iRPE of the encoder self-attention, "
                             "rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on}, e.g. "
                             "rpe-2.0-product-ctx-1-k; '' for none")
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

    # Your own data and fine-tuning (README.md: "Your own data", "Fine-tuning")
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
                        help="library computing the COCO AP numbers: pycocotools, or "
                             "faster_coco_eval (pip install faster-coco-eval; the same numbers, "
                             "several times faster)")

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

    # Mixed precision and torch.compile (README.md: "GPU")
    parser.add_argument("--amp", action="store_true",
                        help="run the model's forward under torch.autocast (losses, matcher and "
                             "post-processing stay in float32)")
    parser.add_argument("--amp_dtype", default="bfloat16", choices=tuple(amp.DTYPES),
                        help="autocast dtype of --amp; float16 adds loss scaling (GradScaler, "
                             "saved in the checkpoint)")
    parser.add_argument("--compile", action="store_true",
                        help="run the model through torch.compile (training and evaluation); "
                             "the first steps at new image sizes compile, for minutes")

    # Interruptions and restarts
    parser.add_argument("--auto_resume", action="store_true",
                        help="continue from OUTPUT_DIR/checkpoint.pth when it exists, else from "
                             "--resume (or from scratch), so a stopped run restarts with the same "
                             "command; on by default in runs torchrun restarted")
    return parser


# ----------------------------------------------------------------------------------------------

def setup_logging(output_dir):
    """Log INFO on the main process (console and OUTPUT_DIR/run.log); errors only elsewhere.

    Records with extra={"file_only": True} (a failure's traceback, which Python prints to the
    console anyway) go to run.log only.
    """
    level = logging.INFO if utils.is_main_process() else logging.ERROR
    handlers = [logging.StreamHandler(sys.stdout)]
    handlers[0].addFilter(lambda record: not getattr(record, "file_only", False))
    if output_dir and utils.is_main_process():
        handlers.append(logging.FileHandler(Path(output_dir) / "run.log"))
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        handlers=handlers, force=True)


def resolve_auto_resume(args):
    """--auto_resume: OUTPUT_DIR/checkpoint.pth, when it exists, becomes --resume.

    It wins over a --resume given as well (that file only gives the first start). On by default
    when torchrun's elastic agent restarted the workers. The main process decides for all.
    """
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if restarts > 0 and not args.auto_resume:
        if not args.output_dir:
            logger.warning("restart %d by torchrun, but without --output_dir there is no "
                           "checkpoint to continue from: starting again", restarts)
            return
        logger.info("restart %d by torchrun: --auto_resume is on", restarts)
        args.auto_resume = True
    if not args.auto_resume:
        return
    if not args.output_dir:
        raise SystemExit("--auto_resume continues from OUTPUT_DIR/checkpoint.pth: pass --output_dir")
    own = Path(args.output_dir) / "checkpoint.pth"
    if utils.all_gather(own.is_file())[0]:
        if args.resume and Path(args.resume) != own:
            logger.info("--auto_resume: %s exists and is used instead of --resume %s", own, args.resume)
        args.resume = str(own)
    else:
        logger.info("--auto_resume: no %s yet, starting %s", own,
                    f"from --resume {args.resume}" if args.resume else "from scratch")


def interruption_message(stop, args, started):
    """What an interrupted run left on disk, for the user who restarts it.

    An epoch counts as finished once its checkpoint is written; the file on disk is this run's
    when it was written after `started` or is the one this run resumed from.
    """
    name = signal.Signals(stop.signum).name
    if args.eval or not args.output_dir:
        return f"stopped by {name}; nothing was saved"
    path = Path(args.output_dir) / "checkpoint.pth"
    ours = path.is_file() and (path.stat().st_mtime >= started or Path(args.resume or "") == path)
    if not ours:
        return (f"stopped by {name} before the first epoch of this run finished: nothing was saved; "
                f"run the same command again")
    try:
        epoch = load_checkpoint(path).get("epoch")
    except CheckpointError as err:
        return f"stopped by {name}: {err}"
    return (f"stopped by {name}: the last finished epoch, {epoch}, is saved intact in {path}; run "
            f"the same command again with --auto_resume to continue from it")


def build_loaders(args, dataset_train, dataset_val):
    """DataLoaders whose randomness comes from their own generators, saved with each checkpoint.

    On CUDA they hand out batches in pinned memory, which the engine copies asynchronously."""
    pin = torch.device(args.device).type == "cuda"
    sampler_val = (DistributedSampler(dataset_val, shuffle=False) if args.distributed
                   else torch.utils.data.SequentialSampler(dataset_val))
    data_loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False,
                                 collate_fn=utils.collate_fn, num_workers=args.num_workers,
                                 generator=torch.Generator().manual_seed(args.seed),
                                 pin_memory=pin)
    if dataset_train is None:
        return None, data_loader_val, None, ()
    sampler_generator = torch.Generator().manual_seed(args.seed + utils.get_rank())
    loader_generator = torch.Generator().manual_seed(args.seed + 1000 + utils.get_rank())
    sampler_train = (DistributedSampler(dataset_train, seed=args.seed) if args.distributed
                     else torch.utils.data.RandomSampler(dataset_train, generator=sampler_generator))
    batch_sampler_train = torch.utils.data.BatchSampler(sampler_train, args.batch_size, drop_last=True)
    if len(batch_sampler_train) == 0:
        raise SystemExit(f"the training set ({len(dataset_train)} images) gives no full batch of "
                         f"--batch_size {args.batch_size} per process")
    data_loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler_train,
                                   collate_fn=utils.collate_fn, num_workers=args.num_workers,
                                   generator=loader_generator, pin_memory=pin)
    return data_loader_train, data_loader_val, sampler_train, (sampler_generator, loader_generator)


def save_panoptic_eval(stats, path):
    """PQ, SQ, RQ (all, things, stuff, per class) as json, when the evaluation computed them."""
    if "PQ_all" in stats:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({k: stats[k] for k in ("PQ_all", "PQ_th", "PQ_st", "PQ_per_class")}))
        os.replace(tmp, path)


def log_resumed_learning_rates(args, base_lrs):
    """Say once which learning rates a resumed run uses when the options ask for others."""
    for option, given, resumed in (("--lr", args.lr, base_lrs[0]), ("--lr_backbone", args.lr_backbone,
                                                                    base_lrs[1])):
        if not math.isclose(given, resumed, rel_tol=1e-9, abs_tol=0.0):
            logger.warning("%s %g differs from the checkpoint's %g: the checkpoint's is used (its "
                           "optimizer and schedule are resumed, as DETR does); to train with %g, "
                           "start from the weights of a model-only copy of the checkpoint",
                           option, given, resumed, given)


def log_skipped_images(dataset, name):
    """With --skip_bad_images: how many unreadable images were skipped so far, over all processes."""
    counter = getattr(dataset, "skipped", None)
    if counter is not None:
        count = sum(utils.all_gather(counter.value))
        if count:
            logger.warning("%s images skipped so far as unreadable (--skip_bad_images): %d, "
                           "counting each time one was due", name, count)

def resume_scaler(scaler, checkpoint):
    """The loss scale of --amp_dtype float16 continues from the checkpoint's; a checkpoint saved
    without it (bfloat16 or float32 training, older files) starts a fresh scaler."""
    if scaler is None:
        return
    if "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    else:
        logger.info("the checkpoint has no gradient scaler state (it was not trained with "
                    "--amp_dtype float16): the loss scale starts at %g", scaler.get_scale())


def set_classes(args, dataset):
    """What the model takes from the data (args.num_classes, args.is_thing_map), and the data's
    category names in args (so in every checkpoint). For your own files the classifier follows
    the categories (largest id + 1) unless --num_classes says otherwise."""
    args.category_names = dataset_categories(dataset)
    largest = max(args.category_names, default=0)
    if args.num_classes is None and uses_own_files(args):
        args.num_classes = largest + 1
        logger.info("num_classes %d: the largest category id + 1 of the annotation file "
                    "(categories %s)", args.num_classes, args.category_names)
    args.num_classes = num_classes = args.num_classes or num_classes_for(args.dataset_file)
    args.is_thing_map = is_thing_map_for(args.dataset_file)
    if largest >= num_classes:
        raise ValueError(f"the data has category id {largest}, but the classifier has ids "
                         f"0..{num_classes - 1} (--num_classes {num_classes}): pass --num_classes "
                         f"{largest + 1} or more, or leave it out to follow the categories")


def record_epoch(output_dir, epoch, train_stats, test_stats, coco_evaluator, n_parameters):
    """The epoch's line of OUTPUT_DIR/log.txt and its evaluation files (main process)."""
    log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                 **{f"test_{k}": v for k, v in test_stats.items() if k != "PQ_per_class"},
                 "epoch": epoch, "n_parameters": n_parameters}
    with (output_dir / "log.txt").open("a") as f:
        f.write(json.dumps(log_stats) + "\n")
    (output_dir / "eval").mkdir(exist_ok=True)
    save_atomic(coco_evaluator.coco_eval["bbox"].eval, output_dir / "eval" / "latest.pth")
    save_panoptic_eval(test_stats, output_dir / "eval" / "panoptic_latest.json")
    if epoch % 50 == 0:
        save_atomic(coco_evaluator.coco_eval["bbox"].eval, output_dir / "eval" / f"{epoch:03}.pth")


def logged_epochs(log):
    """The epochs of the lines of a log.txt; a line that is not JSON (cut short) counts for none."""
    epochs = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            epochs.append(json.loads(line).get("epoch"))
        except ValueError:
            pass
    return epochs


def unevaluated_training(args, checkpoint):
    """The training statistics of the run's own checkpoint when its epoch has no line in log.txt
    (the run stopped during that epoch's evaluation), else None. The main process decides."""
    own = Path(args.output_dir) / "checkpoint.pth" if args.output_dir else None
    missing = (utils.is_main_process() and own is not None and Path(args.resume) == own
               and "train_stats" in checkpoint
               and checkpoint["epoch"] not in logged_epochs(own.with_name("log.txt")))
    return checkpoint["train_stats"] if utils.all_gather(missing)[0] else None


def write_pictures(args, output_dir, model, postprocessors, dataset, coco_api, device, curves):
    """The end-of-run pictures (util.visualize.write_run_pictures); a failure is logged, not raised:
    the run's results are saved by then."""
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


def main(args):
    _run_state["started"] = False
    utils.init_distributed_mode(args)
    if args.output_dir and utils.is_main_process():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    setup_logging(args.output_dir)
    logger.info("git: %s", utils.get_sha())
    logger.info("options: %s", vars(args))
    if args.finetune and (args.resume or args.eval):
        raise SystemExit("--finetune FILE starts a new training run from FILE's weights, "
                         "without its optimizer or epoch; --resume FILE continues FILE's own run and "
                         "--eval --resume FILE evaluates it. Give one of them, not both")
    resolve_auto_resume(args)
    if args.finetune and args.resume:  # the run's own checkpoint, found by --auto_resume
        logger.info("--finetune %s gave this run its first start only: continuing from %s",
                    args.finetune, args.resume)
        args.finetune = ""
    world_size, nodes = utils.get_world_size(), utils.num_nodes()
    logger.info("world size %d on %d node%s, %d images per process, effective batch %d, lr %g "
                "(backbone %g; not scaled with the batch)", world_size, nodes, "s" * (nodes != 1),
                args.batch_size, args.batch_size * world_size, args.lr, args.lr_backbone)
    if args.frozen_weights is not None and not args.masks:
        raise SystemExit("--frozen_weights trains a mask head on a frozen detector: add --masks")
    if args.resume or args.eval or args.finetune or args.frozen_weights:
        if args.backbone_weights != "none":
            logger.info("--resume/--eval/--finetune/--frozen_weights given: the backbone starts "
                        "from the checkpoint, so no --backbone_weights are loaded")
        args.backbone_weights = "none"
    if args.eval and not args.resume:
        logger.warning("--eval without --resume evaluates an untrained model")
    get_coco_eval_backend(args.coco_eval_backend)  # a missing package is named before any work

    device = torch.device(args.device)
    amp_dtype, scaler = amp.build(args, device)
    compile_model = torch_compile.build(args, device)
    seed = args.seed + utils.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    if utils.is_main_process():  # the toy data is made once, by one process
        dataset_val = build_dataset(image_set="val", args=args)
    if args.distributed:
        torch.distributed.barrier()
    if not utils.is_main_process():
        dataset_val = build_dataset(image_set="val", args=args)
    dataset_train = None if args.eval else build_dataset(image_set="train", args=args)
    data_loader_train, data_loader_val, sampler_train, generators = build_loaders(
        args, dataset_train, dataset_val)
    base_ds = get_coco_api_from_dataset(dataset_val)
    set_classes(args, dataset_train if dataset_train is not None else dataset_val)

    model, criterion, postprocessors = build_model(args)
    model.to(device)
    if args.finetune:
        loaded, fresh = load_for_finetuning(model, load_checkpoint(args.finetune), args)
        logger.info("fine-tuning from %s: %d tensors loaded; %d re-initialised (the file's are "
                    "skipped): %s", args.finetune, len(loaded), len(fresh),
                    "; ".join(f"{name} {shape}" for name, shape in fresh.items()))

    detector = model.detr if args.masks else model
    if args.frozen_weights:
        # DETR's second stage: the trained detector inside the segmentation model, frozen
        frozen = load_checkpoint(args.frozen_weights)
        check_compatible(detector, frozen, args)
        detector.load_state_dict(frozen["model"], strict=True)
        logger.info("detector loaded from %s and frozen", args.frozen_weights)
    elif (dataset_train is not None and not (args.resume or args.finetune)
            and args.backbone_weights == "none"):
        # a random backbone under frozen batch norm: give its statistics a sensible scale
        images = utils.collate_fn([dataset_train[i] for i in range(min(len(dataset_train), 8))])[0]
        calibrate_frozen_batchnorm(detector.backbone[0], images.to(device))
        logger.info("random backbone: frozen batch-norm statistics calibrated on %d training "
                    "images", len(images.tensors))

    model_without_ddp = model
    if args.distributed:  # also makes every process start from the main process's weights
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None)
        model_without_ddp = model.module
    model = compile_model(model)  # --compile; model_without_ddp stays the module that is saved
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("number of trainable parameters: %d", n_parameters)

    param_dicts = [
        {"params": [p for n, p in model_without_ddp.named_parameters()
                    if "backbone" not in n and p.requires_grad]},
        {"params": [p for n, p in model_without_ddp.named_parameters()
                    if "backbone" in n and p.requires_grad], "lr": args.lr_backbone},
    ]
    # the fused kernel computes the same update as the default loop, several times faster
    optimizer = torch.optim.AdamW(param_dicts, lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)

    output_dir = Path(args.output_dir) if args.output_dir else None
    unevaluated = None  # the training statistics of a resumed epoch whose evaluation was cut short
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        check_compatible(model_without_ddp, checkpoint, args, name=args.resume)
        model_without_ddp.load_state_dict(checkpoint["model"], strict=True)
        if not args.eval and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
            optimizer.load_state_dict(checkpoint["optimizer"])
            lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
            log_resumed_learning_rates(args, lr_scheduler.base_lrs)
            args.start_epoch = checkpoint["epoch"] + 1
            unevaluated = unevaluated_training(args, checkpoint)
            resume_scaler(scaler, checkpoint)
            rng = checkpoint.get("rng_states")
            if rng is not None and len(rng) == utils.get_world_size():
                set_rng_states(rng[utils.get_rank()], *generators)
            elif rng is not None:
                logger.warning("the checkpoint was written by %d processes, this run has %d: random "
                               "states are not restored", len(rng), utils.get_world_size())
        logger.info("resumed from %s (epoch %s)", args.resume, checkpoint.get("epoch", "-"))

    _run_state["started"] = True  # from here on, an error is a failure of the run, not of its input

    def validate():
        # the random states come out of the evaluation as they went in, so the next epoch starts
        # from those the checkpoint saved before it (with --num_workers 0 the evaluation's
        # transforms run in this process: RandomResize draws from Python's random)
        with rng_states_kept(*generators, data_loader_val.generator):
            stats_and_evaluator = evaluate(model, criterion, postprocessors, data_loader_val,
                                           base_ds, device, print_freq=args.print_freq,
                                           coco_eval_backend=args.coco_eval_backend,
                                           amp_dtype=amp_dtype)
        log_skipped_images(dataset_val, "validation")
        return stats_and_evaluator

    if args.eval:
        test_stats, coco_evaluator = validate()
        if output_dir and utils.is_main_process():
            save_atomic(coco_evaluator.coco_eval["bbox"].eval, output_dir / "eval.pth")
            save_panoptic_eval(test_stats, output_dir / "panoptic_eval.json")
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
        test_stats, coco_evaluator = validate()
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
        # saved before evaluation, so a failure there does not lose the epoch's training (the
        # random states saved are those the next epoch starts from: validate keeps them)
        rng_states = utils.all_gather(get_rng_states(*generators))
        if output_dir and utils.is_main_process():
            checkpoint = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                          "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": args,
                          "rng_states": rng_states, "train_stats": train_stats}
            if scaler is not None:
                checkpoint["scaler"] = scaler.state_dict()
            save_atomic(checkpoint, output_dir / "checkpoint.pth")
            if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % 100 == 0:
                save_atomic(checkpoint, output_dir / f"checkpoint{epoch:04}.pth")
        test_stats, coco_evaluator = validate()
        if output_dir and utils.is_main_process():
            record_epoch(output_dir, epoch, train_stats, test_stats, coco_evaluator, n_parameters)

    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    logger.info("training time %s", total_time)
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
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run()
