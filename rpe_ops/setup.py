"""Builds the rpe_ops package and its compiled extension rpe_ops._C (see docs/rpe_ops.md for the
commands and the environment variables: FORCE_CUDA, TORCH_CUDA_ARCH_LIST, CUDA_HOME, MAX_JOBS)."""
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

os.chdir(os.path.dirname(os.path.abspath(__file__)))  # paths below are relative
DEFAULT_ARCH_LIST = "7.5;8.0;9.0+PTX"


def _nvcc_toolkit_root():
    """Toolkit root of the nvcc on PATH, also when nvcc is a wrapper script."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull],
                             capture_output=True, text=True, timeout=60)
        match = re.search(r"^#\$ TOP=(.*)$", dry.stdout + dry.stderr, re.M)
    except (OSError, subprocess.SubprocessError):
        match = None
    return os.path.realpath(match.group(1).strip()) if match else None


if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    root = _nvcc_toolkit_root()
    if root:
        os.environ["CUDA_HOME"] = root

import torch  # noqa: E402  (CUDA_HOME must be settled first)
from torch.utils import cpp_extension  # noqa: E402

force = os.environ.get("FORCE_CUDA")
if force == "1" and cpp_extension.CUDA_HOME is None:
    sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found: put nvcc on PATH or set CUDA_HOME")
with_cuda = force == "1" or (
    force != "0" and cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None)

sources = ["csrc/rpe_index.cpp", "csrc/attention_softmax.cpp", "csrc/cpu_cache.cpp"]
# -fno-trapping-math lets the compiler turn the selects of the attention kernel's loops into
# vector blends (no floating-point exception flags are read anywhere)
cxx_flags = ["-O3", "-fno-trapping-math"]
kwargs = {}
if sys.platform.startswith("linux"):
    # at::parallel_for is header code: without OpenMP it runs single-threaded.
    cxx_flags.append("-fopenmp")
    kwargs["extra_link_args"] = ["-fopenmp"]
if with_cuda:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    sources += ["csrc/rpe_index_cuda.cpp", "csrc/rpe_index_kernels.cu"]
    cxx_flags.append("-DRPE_OPS_WITH_CUDA")
    kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": ["-O3", "-DRPE_OPS_WITH_CUDA"]}
    Extension = cpp_extension.CUDAExtension
else:
    kwargs["extra_compile_args"] = {"cxx": cxx_flags}
    Extension = cpp_extension.CppExtension

setup(
    name="rpe_ops",
    version="1.0.0",
    description="Bucket lookup / bucket sum operators for contextual iRPE (CPU and CUDA)",
    packages=["rpe_ops"],
    package_dir={"rpe_ops": "."},
    ext_modules=[Extension("rpe_ops._C", sources, **kwargs)],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.9",
)
