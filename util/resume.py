"""Where a run starts (--resume, --auto_resume, --finetune, --frozen_weights), and its saves."""
import json
import logging
import math
import os
import signal
from pathlib import Path

import util.misc as utils
from util.checkpoint import (CheckpointError, check_compatible, load_checkpoint, load_for_finetuning,
                             save_atomic, set_rng_states)

logger = logging.getLogger(__name__)


def resolve_auto_resume(args):
    """--auto_resume (on after torchrun restarts): OUTPUT_DIR/checkpoint.pth becomes --resume."""
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
    if args.finetune and args.resume:
        logger.info("--finetune %s gave this run its first start only: continuing from %s",
                    args.finetune, args.resume)
        args.finetune = ""


def interruption_message(stop, args, started):
    """What an interrupted run (started at `started`) left on disk, for the user to restart it."""
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


def finetune(model, args):
    """--finetune FILE: its weights into `model`, but the classifier (see load_for_finetuning)."""
    loaded, fresh = load_for_finetuning(model, load_checkpoint(args.finetune), args)
    logger.info("fine-tuning from %s: %d tensors loaded; %d re-initialised (the file's are "
                "skipped): %s", args.finetune, len(loaded), len(fresh),
                "; ".join(f"{name} {shape}" for name, shape in fresh.items()))


def load_frozen_detector(detector, args):
    """DETR's second stage: --frozen_weights FILE's model into the segmentation's detector."""
    frozen = load_checkpoint(args.frozen_weights)
    check_compatible(detector, frozen, args)
    detector.load_state_dict(frozen["model"], strict=True)
    logger.info("detector loaded from %s and frozen", args.frozen_weights)


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
    """The checkpoint's training statistics when its epoch has no line in log.txt, else None."""
    own = Path(args.output_dir) / "checkpoint.pth" if args.output_dir else None
    missing = (utils.is_main_process() and own is not None and Path(args.resume) == own
               and "train_stats" in checkpoint
               and checkpoint["epoch"] not in logged_epochs(own.with_name("log.txt")))
    return checkpoint["train_stats"] if utils.all_gather(missing)[0] else None


def resume(args, model, optimizer, lr_scheduler, scaler, generators):
    """--resume FILE: the model and the training state; returns unevaluated_training(...)."""
    checkpoint = load_checkpoint(args.resume)
    check_compatible(model, checkpoint, args, name=args.resume)
    model.load_state_dict(checkpoint["model"], strict=True)
    unevaluated = None
    if not args.eval and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        for option, given, resumed in (("--lr", args.lr, lr_scheduler.base_lrs[0]),
                                       ("--lr_backbone", args.lr_backbone, lr_scheduler.base_lrs[1])):
            if not math.isclose(given, resumed, rel_tol=1e-9, abs_tol=0.0):
                logger.warning("%s %g differs from the checkpoint's %g: the checkpoint's is used "
                               "(its optimizer and schedule are resumed, as DETR does); to train "
                               "with %g, start from the weights of a model-only copy of the "
                               "checkpoint", option, given, resumed, given)
        args.start_epoch = checkpoint["epoch"] + 1
        unevaluated = unevaluated_training(args, checkpoint)
        if scaler is not None and "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
        elif scaler is not None:
            logger.info("the checkpoint has no gradient scaler state (it was not trained with "
                        "--amp_dtype float16): the loss scale starts at %g", scaler.get_scale())
        rng = checkpoint.get("rng_states")
        if rng is not None and len(rng) == utils.get_world_size():
            set_rng_states(rng[utils.get_rank()], *generators)
        elif rng is not None:
            logger.warning("the checkpoint was written by %d processes, this run has %d: random "
                           "states are not restored", len(rng), utils.get_world_size())
    logger.info("resumed from %s (epoch %s)", args.resume, checkpoint.get("epoch", "-"))
    return unevaluated


def save_checkpoint(output_dir, args, epoch, model, optimizer, lr_scheduler, scaler, rng_states,
                    train_stats):
    """OUTPUT_DIR/checkpoint.pth, and checkpoint{epoch:04}.pth before lr drops and every 100."""
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": args,
                  "rng_states": rng_states, "train_stats": train_stats}
    if scaler is not None:
        checkpoint["scaler"] = scaler.state_dict()
    save_atomic(checkpoint, output_dir / "checkpoint.pth")
    if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % 100 == 0:
        save_atomic(checkpoint, output_dir / f"checkpoint{epoch:04}.pth")
