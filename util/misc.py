"""Batching, distributed helpers and metric logging shared by the model, data and training code."""
import builtins
import datetime
import functools
import logging
import os
import subprocess
import sys
import time
from collections import defaultdict, deque
from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor

from util.checkpoint import save_atomic

logger = logging.getLogger(__name__)

# the normalisation of the model's images (datasets/transforms.py applies it, pictures undo it)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NestedTensor:
    """Images `tensors` (B, C, H, W) and `mask` (B, H, W), True on padding; a pytree node."""

    def __init__(self, tensors: Tensor, mask: Optional[Tensor]):
        self.tensors = tensors
        self.mask = mask

    def to(self, device: torch.device, non_blocking: bool = False) -> "NestedTensor":
        mask = self.mask
        mask = None if mask is None else mask.to(device, non_blocking=non_blocking)
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask)

    def pin_memory(self) -> "NestedTensor":
        """In page-locked memory (DataLoader(pin_memory=True) calls it)."""
        mask = self.mask
        mask = None if mask is None else mask.pin_memory()
        return NestedTensor(self.tensors.pin_memory(), mask)

    def decompose(self) -> Tuple[Tensor, Optional[Tensor]]:
        return self.tensors, self.mask

    def __repr__(self) -> str:
        return f"NestedTensor(tensors={self.tensors.shape}, mask={self.mask is not None})"


def _nested_tensor_children(x):
    return [(pytree.GetAttrKey("tensors"), x.tensors), (pytree.GetAttrKey("mask"), x.mask)], None


pytree.register_pytree_node(
    NestedTensor, lambda x: ([x.tensors, x.mask], None), lambda children, _: NestedTensor(*children),
    serialized_type_name="util.misc.NestedTensor", flatten_with_keys_fn=_nested_tensor_children)
# torch.export.save keeps the example inputs; torch.export.load reads them with weights_only
torch.serialization.add_safe_globals([NestedTensor])


def nested_tensor_from_tensor_list(tensor_list: Union[Tensor, List[Tensor]]) -> NestedTensor:
    """Pad (C, H_i, W_i) images bottom/right to the largest H and W; a (B, C, H, W) batch as is."""
    if isinstance(tensor_list, Tensor):
        if tensor_list.dim() != 4:
            raise ValueError(f"expected a batch of images (B, C, H, W) or a list of (C, H, W) "
                             f"images, got a tensor of shape {tensor_list.shape}")
        batch, height, width = tensor_list.shape[0], tensor_list.shape[2], tensor_list.shape[3]
        return NestedTensor(tensor_list, torch.zeros((batch, height, width), dtype=torch.bool,
                                                     device=tensor_list.device))
    if len(tensor_list) == 0:
        raise ValueError("nested_tensor_from_tensor_list needs at least one image")
    for t in tensor_list:
        if t.dim() != 3:
            raise ValueError(f"expected images of shape (C, H, W), got one of shape {t.shape}")
    first = tensor_list[0]
    height = max([t.shape[1] for t in tensor_list])
    width = max([t.shape[2] for t in tensor_list])
    tensors = first.new_zeros((len(tensor_list), first.shape[0], height, width))
    mask = torch.ones((len(tensor_list), height, width), dtype=torch.bool, device=first.device)
    for i, img in enumerate(tensor_list):
        tensors[i, :, : img.shape[1], : img.shape[2]].copy_(img)
        mask[i, : img.shape[1], : img.shape[2]] = False
    return NestedTensor(tensors, mask)


def interpolate(input: Tensor, size: Optional[List[int]] = None,
                scale_factor: Optional[float] = None, mode: str = "nearest",
                align_corners: Optional[bool] = None) -> Tensor:
    """F.interpolate under DETR's name and signature (F.interpolate now takes empty batches)."""
    return F.interpolate(input, size, scale_factor, mode, align_corners)


def pad_masks(masks, height, width):
    """Zero-pad (N, h, w) masks bottom/right to (N, height, width), as images are in a batch."""
    return torch.nn.functional.pad(masks, (0, width - masks.shape[-1], 0, height - masks.shape[-2]))


def collate_fn(batch):
    """DataLoader collate: (image, target) pairs -> (NestedTensor, targets), 'masks' padded."""
    images, targets = zip(*batch)
    samples = nested_tensor_from_tensor_list(list(images))
    if any(t is not None and "masks" in t for t in targets):
        height, width = samples.tensors.shape[-2:]
        targets = tuple(dict(t, masks=pad_masks(t["masks"], height, width)) for t in targets)
    return samples, targets


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def setup_for_distributed(is_master):
    """Silence print() but on the main process; print(..., force=True) still prints."""
    original = getattr(builtins.print, "__wrapped__", builtins.print)  # no wrapper around a wrapper

    @functools.wraps(original)
    def print_on_master(*args, force=False, **kwargs):
        if is_master or force:
            original(*args, **kwargs)

    builtins.print = print_on_master


def init_distributed_mode(args):
    """Join the process group a launcher set up; sets args.distributed, rank, world_size, gpu."""
    layout = distributed_env(getattr(args, "local_rank", None))
    if layout is None:
        args.distributed = False
        args.rank, args.gpu = 0, None
        return
    args.rank, args.world_size, args.gpu = layout
    args.distributed = True
    if str(args.device).startswith("cuda"):
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
        args.dist_backend = "nccl"
    else:
        args.dist_backend = "gloo"
    launcher_address = "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ
    if args.dist_url == "env://" and not launcher_address:
        raise SystemExit("distributed run without MASTER_ADDR and MASTER_PORT in the environment "
                         "(as under SLURM): export both, or pass --dist_url tcp://HOST:PORT")
    store = restart_store(args.world_size) if args.dist_url == "env://" else None
    dist.init_process_group(backend=args.dist_backend, init_method=None if store else args.dist_url,
                            store=store, world_size=args.world_size, rank=args.rank)
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def save_on_master(obj, f, *args, **kwargs):
    """torch.save(obj, f, ...) on the main process only; a path is written atomically."""
    if not is_main_process():
        return
    if isinstance(f, (str, os.PathLike)):
        save_atomic(obj, f, *args, **kwargs)
    else:
        torch.save(obj, f, *args, **kwargs)


def all_gather(data):
    """Gather any picklable object from every process; returns a list with one entry per rank."""
    if get_world_size() == 1:
        return [data]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, data)
    return gathered


def reduce_dict(input_dict, average=True):
    """Sum (or average) a dict of scalar tensors over all processes; every process gets the result."""
    world_size = get_world_size()
    if world_size < 2:
        return input_dict
    with torch.no_grad():
        names = sorted(input_dict.keys())
        values = torch.stack([input_dict[k] for k in names])
        dist.all_reduce(values)
        if average:
            values /= world_size
        return dict(zip(names, values))


def distributed_env(local_rank_arg=None):
    """(rank, world_size, local_rank) from torchrun's or Slurm's variables; None for one process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size, local_name = int(env["RANK"]), int(env["WORLD_SIZE"]), "LOCAL_RANK"
        if local_rank_arg is not None and local_rank_arg >= 0 and local_name not in env:
            return rank, world_size, local_rank_arg
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local_name = "SLURM_LOCALID"
    else:
        return None
    return rank, world_size, int(env.get(local_name, rank % max(torch.cuda.device_count(), 1)))


def restart_store(world_size):
    """Under torchrun, this restart's key space in the agent's store (shared by all restarts)."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in env:
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size, is_master=False,
                          timeout=dist.constants.default_pg_timeout)
    return dist.PrefixStore(f"detr/attempt_{env['TORCHELASTIC_RESTART_COUNT']}", store)


def num_nodes():
    """How many machines the run spans, as the launcher says (1 when it says nothing)."""
    env = os.environ
    for name in ("GROUP_WORLD_SIZE", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):  # torchrun, Slurm
        if env.get(name):
            return int(env[name])
    if env.get("LOCAL_WORLD_SIZE"):
        return max(get_world_size() // int(env["LOCAL_WORLD_SIZE"]), 1)
    return 1


def get_sha(path=None):
    """"sha: ..., status: clean | has uncommitted changes, branch: ..." of `path`'s checkout."""
    cwd = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*command):
        return subprocess.run(("git", *command), cwd=cwd, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        status = "has uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") \
            else "clean"
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, no commit yet
        sha = status = branch = "N/A"
    return f"sha: {sha}, status: {status}, branch: {branch}"


class SmoothedValue:
    """Track a series of values: a window for median/average, and the global average."""

    def __init__(self, window_size=20, fmt="{median:.4f} ({global_avg:.4f})"):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """Sum count and total over processes (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
        dist.barrier()
        dist.all_reduce(t)
        self.count = int(t[0].item())
        self.total = t[1].item()

    @property
    def median(self):
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self):
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def max(self):
        return max(self.deque)

    @property
    def value(self):
        return self.deque[-1]

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


# the compact progress lines: setup_logging gives it the console when that is a terminal
progress_logger = logging.getLogger("progress")
progress_logger.propagate = False


def setup_logging(output_dir):
    """Log INFO on the main process (console, compact on a terminal, and OUTPUT_DIR/run.log)."""
    level = logging.INFO if is_main_process() else logging.ERROR
    console = logging.StreamHandler(sys.stdout)
    live = console.stream.isatty()
    console.addFilter(lambda record: not getattr(record, "file_only", False)
                      and not (live and getattr(record, "progress", False)))
    handlers = [console]
    if output_dir and is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_dir, "run.log")))
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        handlers=handlers, force=True)
    progress_logger.handlers = [console] if live else []
    progress_logger.setLevel(level)


class MetricLogger:
    """A dict of SmoothedValues with a progress iterator that logs lines with an ETA."""

    def __init__(self, delimiter="  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[name].update(float(value))

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def __getattr__(self, attr):
        meters = self.__dict__.get("meters")
        if meters is not None and attr in meters:
            return meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def compact_line(self, header, done, total, eta, iterations_per_second):
        """One short line: progress, ETA, loss, class error, lr (where present), speed, memory."""
        parts = [f"{header} {done}/{total} ({100 * done // max(total, 1)}%)", f"eta {eta}"]
        for name, fmt in (("loss", ".4f"), ("class_error", ".2f"), ("lr", ".2e")):
            if name in self.meters:
                parts.append(f"{name} {self.meters[name].median:{fmt}}")
        parts.append(f"{iterations_per_second:.2f} it/s")
        if torch.cuda.is_available():
            parts.append(f"mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GB")
        return self.delimiter.join(parts)

    def log_every(self, iterable, print_freq, header=""):
        """Yield from `iterable`, logging the full and the compact line every `print_freq` steps."""
        total = len(iterable)
        width = len(str(total))
        start = end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [f"{header} [{i:{width}d}/{total}]", f"eta: {eta}", str(self),
                         f"time: {iter_time}", f"data: {data_time}"]
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB")
                logger.info(self.delimiter.join(parts), extra={"progress": True})
                if progress_logger.isEnabledFor(logging.INFO) and progress_logger.handlers:
                    progress_logger.info(self.compact_line(header, i + 1, total, eta,
                                                           1 / max(iter_time.avg, 1e-9)))
            end = time.time()
        total_time = datetime.timedelta(seconds=int(time.time() - start))
        logger.info(f"{header} Total time: {total_time} ({(time.time() - start) / max(total, 1):.4f} s / it)")


@torch.no_grad()
def accuracy(output, target, topk=(1,)):
    """Top-k accuracy in percent of (N, C) logits against (N,) labels."""
    if target.numel() == 0:
        return [torch.zeros([], device=output.device)]
    maxk = max(topk)
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
    return [correct[:k].reshape(-1).float().sum(0) * (100.0 / target.size(0)) for k in topk]
