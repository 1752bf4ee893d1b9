"""Host synchronisations: the inference path (forward + PostProcess) reads nothing back from the
device, and a training step reads nothing back between its optimizer step and the next forward,
so that the host queues the next step's work while the GPU still runs the backward.

On the CPU the reads are counted as the operators that make them on a GPU (a tensor's value as a
Python number: .item(), .tolist(), bool(); data-dependent shapes: nonzero); on CUDA,
torch.cuda.set_sync_debug_mode raises on every synchronising call, copies from pageable memory
included.
"""
import collections
import contextlib
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine
import main
import util.misc as utils
from models import build_model
from tests.conftest import ROOT
from tests.test_main import TINY

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE_READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "_unique2",
                "unique_consecutive", "equal"}


def _progress_statistics():
    # the progress line's medians and averages: of Python numbers, in host tensors on any device
    return any(frame.f_code.co_name in ("median", "avg")
               and frame.f_code.co_filename.endswith(os.path.join("util", "misc.py"))
               for frame, _ in traceback.walk_stack(None))


class DeviceReads(TorchDispatchMode):
    """Counts the operators that read a tensor's values back to the host, while `counting`, by
    the line of this repository that asked for them."""

    def __init__(self):
        super().__init__()
        self.counting = True
        self.reads = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if self.counting and name in DEVICE_READS and not _progress_statistics():
            ours = [f for f in traceback.extract_stack() if f.filename.startswith(ROOT)
                    and "site-packages" not in f.filename and f.filename != __file__]
            self.reads[f"{name} at {ours[-1].filename[len(ROOT) + 1:]}:{ours[-1].lineno}"
                       if ours else name] += 1
        return func(*args, **(kwargs or {}))


def tiny_model(device, rpe="rpe-2.0-product-ctx-1-k"):
    args = main.get_args_parser().parse_args(
        [*TINY, "--enc_rpe2d", rpe, "--coco_path", "unused", "--device", device, "--num_classes", "91"])
    torch.manual_seed(0)
    model, criterion, postprocessors = build_model(args)
    return model.to(device), criterion.to(device), postprocessors


def images(device):
    return utils.nested_tensor_from_tensor_list([torch.randn(3, 96, 128, device=device),
                                                 torch.randn(3, 80, 100, device=device)])


@pytest.mark.parametrize("fused", [True, False])
def test_inference_reads_nothing_from_the_device(fused):
    model, _, postprocessors = tiny_model("cpu")
    model.eval()
    for module in model.modules():
        if hasattr(module, "use_fused_kernels"):
            module.use_fused_kernels = fused
    sizes = torch.tensor([[96, 128], [80, 100]])
    with torch.no_grad():
        model(images("cpu"))  # bucket ids made and cached
        with DeviceReads() as census:
            postprocessors["bbox"](model(images("cpu")), sizes)
    assert not census.reads, dict(census.reads)


def toy_loader(n=3, pin=False):
    torch.manual_seed(1)
    data = [(torch.randn(3, 64 + 8 * i, 80), {"labels": torch.tensor([1 + i, 2]),
                                               "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3],
                                                                      [0.3, 0.6, 0.1, 0.2]])})
            for i in range(2 * n)]
    return torch.utils.data.DataLoader(data, batch_size=2, collate_fn=utils.collate_fn,
                                       pin_memory=pin)


@contextlib.contextmanager
def between_step_and_forward(model, optimizer, start, stop):
    """start() after every optimizer step, stop() before every forward of `model`."""
    hooks = [optimizer.register_step_post_hook(lambda *args: start()),
             model.register_forward_pre_hook(lambda *args: stop())]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def test_training_reads_nothing_between_the_optimizer_step_and_the_next_forward():
    model, criterion, _ = tiny_model("cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as main.py
    census = DeviceReads()
    census.counting = False

    def start():
        census.counting = True

    def stop():
        census.counting = False
    with census, between_step_and_forward(model, optimizer, start, stop):
        stats = engine.train_one_epoch(model, criterion, toy_loader(), optimizer, "cpu", 0,
                                       max_norm=0.1, print_freq=1)
    assert not census.reads, dict(census.reads)
    assert stats["loss"] > 0 and "loss_ce_unscaled" in stats and "class_error" in stats


@CUDA
def test_inference_on_cuda_does_not_synchronise():
    model, _, postprocessors = tiny_model("cuda")
    model.eval()
    sizes = torch.tensor([[96, 128], [80, 100]], device="cuda")
    with torch.no_grad():
        model(images("cuda"))
        batch = images("cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            postprocessors["bbox"](model(batch), sizes)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@CUDA
def test_training_on_cuda_does_not_synchronise_between_the_step_and_the_next_forward():
    model, criterion, _ = tiny_model("cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    with between_step_and_forward(model, optimizer, lambda: torch.cuda.set_sync_debug_mode("error"),
                                  lambda: torch.cuda.set_sync_debug_mode("default")):
        try:
            engine.train_one_epoch(model, criterion, toy_loader(pin=True), optimizer, "cuda", 0,
                                   max_norm=0.1, print_freq=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
