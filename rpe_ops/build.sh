#!/usr/bin/env bash
# Builds rpe_ops._C in place (next to rpe_ops/__init__.py) and checks that it
# loads.  CPU kernels always; CUDA kernels too when a CUDA toolkit is found.
#
#   bash rpe_ops/build.sh                                   # default build
#   TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1 bash rpe_ops/build.sh   # CI: CUDA for sm_90
#
# Honours FORCE_CUDA, TORCH_CUDA_ARCH_LIST, CUDA_HOME, MAX_JOBS (default 2)
# and PYTHON (default: python).
set -euo pipefail
PYTHON="${PYTHON:-python}"
case "$PYTHON" in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac
cd "$(dirname "${BASH_SOURCE[0]}")"
export MAX_JOBS="${MAX_JOBS:-2}"

start=$(date +%s)
"$PYTHON" setup.py build_ext --inplace
echo "rpe_ops: build took $(( $(date +%s) - start )) s"

cd ..
env -u RPE_OPS_FALLBACK "$PYTHON" - <<'PY'
import os
import torch
import rpe_ops

assert rpe_ops.EXTENSION_AVAILABLE, f"rpe_ops._C does not load: {rpe_ops._LOAD_ERROR}"
cuda = rpe_ops.backend("cuda") == "extension"
print(f"rpe_ops: loaded {rpe_ops.EXTENSION_PATH}; CPU kernels: yes; CUDA kernels: {'yes' if cuda else 'no'}")
if os.environ.get("FORCE_CUDA") == "1":
    assert cuda, "FORCE_CUDA=1 but the extension has no CUDA kernels"
x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
index = torch.randint(0, 7, (5, 6))
torch.testing.assert_close(rpe_ops.rpe_index(x, index), rpe_ops._fallback.rpe_index(x, index))
PY
