"""Where --amp casts, what stays float32 under it, and where the host waits for the device: a
census of one DETR-R50 + iRPE training step and one inference pass (forward + PostProcess).

    python benchmarks/casts_and_syncs.py --device cuda
    python benchmarks/casts_and_syncs.py --device cpu --scale 0.25 --repeats 1

For float32 and bf16 autocast, 'train' and 'inference' each print their median time and operator
count, then the dtype casts and the large float32 outputs under autocast by source line, and on
CUDA the calls that made the host wait (torch.cuda.set_sync_debug_mode). Random weights; --scale
shrinks the images.
"""
import argparse
import collections
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import main as detr_main  # noqa: E402
import util.misc as utils  # noqa: E402
from models import build_model  # noqa: E402
from util import amp  # noqa: E402

IMAGE_SIZES = {"train": [(800, 1199), (800, 1066)], "inference": [(800, 1199)]}


def repository_line():
    """The innermost frame of this repository's code (not this file), as 'path:line'."""
    here = Path(__file__).resolve()
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path != here and ROOT in path.parents and "site-packages" not in frame.filename:
            return f"{path.relative_to(ROOT)}:{frame.lineno}"
    return "backward"


class Census(TorchDispatchMode):
    def __init__(self, device_type, min_elements):
        super().__init__()
        self.device_type, self.min_elements = device_type, min_elements
        self.ops = 0
        self.casts = collections.defaultdict(lambda: [0, 0])
        self.float32 = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        name = func.__name__.split(".")[0]
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if (name in ("_to_copy", "to") and source is not None and isinstance(out, torch.Tensor)
                and out.dtype != source.dtype):
            entry = self.casts[(f"{source.dtype} -> {out.dtype}".replace("torch.", ""),
                                repository_line())]
            entry[0] += 1
            entry[1] += source.numel()
        elif (torch.is_autocast_enabled(self.device_type) and isinstance(out, torch.Tensor)
              and out.dtype == torch.float32 and out.numel() >= self.min_elements):
            self.float32[(name, repository_line())] += 1
        return out


def build(opts):
    args = detr_main.get_args_parser().parse_args(
        ["--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--backbone_weights", "none",
         "--num_classes", "91", "--device", opts.device, "--coco_path", "unused"])
    torch.manual_seed(0)
    model, criterion, postprocessors = build_model(args)
    model.to(opts.device)
    criterion.to(opts.device)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4,
        fused=opts.device in ("cpu", "cuda"))
    return model, criterion, postprocessors, optimizer


def steps(opts, model, criterion, postprocessors, optimizer, dtype):
    device = opts.device
    images = {k: [torch.randn(3, int(h * opts.scale), int(w * opts.scale), device=device)
                  for h, w in sizes] for k, sizes in IMAGE_SIZES.items()}
    targets = [{"labels": torch.randint(1, 91, (n,), device=device),
                "boxes": torch.cat([torch.rand(n, 2) * 0.6 + 0.2,
                                    torch.rand(n, 2) * 0.3 + 0.05], 1).to(device)}
               for n in (7, 4)]
    sizes = torch.tensor(IMAGE_SIZES["inference"], device=device)

    def train():
        model.train()
        outputs = amp.forward(model, utils.nested_tensor_from_tensor_list(images["train"]),
                              device, dtype)
        losses = criterion(outputs, targets)
        total = sum(losses[k] * criterion.weight_dict[k] for k in losses
                    if k in criterion.weight_dict)
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()

    def inference():
        model.eval()
        with torch.no_grad():
            outputs = amp.forward(model, utils.nested_tensor_from_tensor_list(images["inference"]),
                                  device, dtype)
            postprocessors["bbox"](outputs, sizes)
    return {"train": train, "inference": inference}


def sync_sites(fn):
    """Run fn with CUDA's sync debug mode on: {line: synchronising calls}."""
    sites = collections.Counter()
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            sites[repository_line()] += 1
        else:
            show(message, category, filename, lineno, file, line)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = show
    return sites


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="image size factor")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs (after 2 warm-ups)")
    parser.add_argument("--min-elements", type=int, default=1 << 16)
    parser.add_argument("--top", type=int, default=12, help="lines shown per list")
    opts = parser.parse_args(argv)
    built = build(opts)
    device_type = torch.device(opts.device).type
    for dtype in (None, torch.bfloat16):
        for target, fn in steps(opts, *built, dtype).items():
            fn()
            fn()  # warm-up: kernels chosen, bucket ids cached
            ms = timed(fn, opts.device, opts.repeats)
            census = Census(device_type, opts.min_elements)
            with census:
                fn()
            name = "bf16 autocast" if dtype else "float32"
            print(f"\n=== {target}, {name}: {ms:.1f} ms (median of {opts.repeats}), "
                  f"{census.ops} operators, {sum(c for c, _ in census.casts.values())} casts")
            for (kind, line), (calls, elements) in sorted(census.casts.items(),
                                                           key=lambda kv: -kv[1][1])[:opts.top]:
                print(f"  cast   {kind:<22} {calls:>5} calls {elements:>12} elements  {line}")
            for (op, line), calls in census.float32.most_common(opts.top):
                print(f"  fp32   {op:<22} {calls:>5} calls  {line}")
            if device_type == "cuda":
                sites = sync_sites(fn)
                print(f"  syncs: {sum(sites.values())}")
                for line, calls in sites.most_common(opts.top):
                    print(f"  sync   {calls:>5} calls  {line}")


if __name__ == "__main__":
    main()
