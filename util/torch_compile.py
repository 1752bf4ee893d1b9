"""--compile: the model through torch.compile, for training and evaluation.

On the CPU every image size gets graphs of its own (dynamic=False): with torch 2.14.1 a recompiled
dynamic-shape training graph gave backbone gradients 3% off the eager ones.
"""
import functools
import importlib.util
import os
import shutil

import torch


def check_supported(device):
    """Raise ValueError saying what is missing when torch.compile cannot run on `device` here."""
    if not torch._dynamo.is_dynamo_supported():
        raise ValueError("--compile: torch.compile does not run with this Python and PyTorch; run "
                         "without --compile")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ValueError("--compile on CUDA needs Triton, which is not installed (pip install "
                         "triton, the version your PyTorch names); or run without --compile")
    if device.type == "cpu":
        compilers = [os.environ.get("CXX"), "g++", "clang++", "c++"]
        if not any(name and shutil.which(name) for name in compilers):
            raise ValueError("--compile on the CPU needs a C++ compiler (g++ or clang++ on PATH, "
                             "or CXX); install one or run without --compile")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--compile runs on cpu and cuda devices, not {device.type}; run without "
                         f"--compile")


def build(args, device):
    """A function model -> model: torch.compile with --compile (checked here), else identity."""
    if not getattr(args, "compile", False):
        return lambda model: model
    check_supported(device)
    if device.type == "cpu":
        return functools.partial(torch.compile, dynamic=False)
    return torch.compile
