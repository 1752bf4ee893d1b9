#!/usr/bin/env bash
# The checks that need a GPU, in one go (fits one 10-minute call on an H200):
#
#   bash tools/gpu_check.sh [PUBLISHED]
#
#   step (time limit)                                             took on an H200
#   1. build rpe_ops with its CUDA kernels, in place (90 s)          24 s
#   2. the CUDA, SDPA, flex attention, host-synchronisation and --amp tests (150 s)
#   3. the rpe_ops benchmark on CUDA (20 s)
#   4. benchmarks/attention_paths.py: flex attention against SDPA with the bias, per setting,
#      forward and backward, which decides flex_attention.USE_FLEX (45 s)
#   5. benchmarks/casts_and_syncs.py: the casts and host synchronisations of one --amp training
#      step and of inference (30 s)
#   6. build the published code's rpe_ops in PUBLISHED (argument or   92 s, in the background
#      $PUBLISHED), if given, from the start (300 s)                    during 1-5
#   7. benchmarks/vs_published.py on CUDA, if PUBLISHED is given (250 s): plain DETR, the
#      published code (with its extension and on its PyTorch path) and ours, float32 and bf16
#      autocast, training step at batch 4, inference at batch 1 and 8, the attention layer and
#      the iRPE module, with peak memory; no target starts after 150 s of it
#
# A failing step is recorded and the next one runs; the summary at the end gives each step's
# result and time and the vs_published table, and the exit status is 1 if any step failed. Logs
# go to $GPU_CHECK_OUT (default ./gpu_check_out). Wheels in .whl/ at the repository root
# (packages the machine lacks: pycocotools; easydict, which the published code imports) are
# installed into /tmp/site first. Honours PYTHON (default python3), TORCH_CUDA_ARCH_LIST and
# MAX_JOBS (default 16).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
PUBLISHED="${1:-${PUBLISHED:-}}"
OUT_DIR="${GPU_CHECK_OUT:-gpu_check_out}"
OUT_DIR="$(mkdir -p "$OUT_DIR" && cd "$OUT_DIR" && pwd)"
export MAX_JOBS="${MAX_JOBS:-16}"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
                            | head -n 1 | tr -d ' ')"
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
fi
export TORCH_CUDA_ARCH_LIST

names=() results=() seconds=()

# step NAME TIMEOUT_S COMMAND...: runs COMMAND, its output on the console and in OUT_DIR/NAME.log
step() {
    local name="$1" limit="$2"
    shift 2
    echo
    echo "=== [$(( ${#names[@]} + 1 ))] $name: $* ==="
    local start=$SECONDS status
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    status=${PIPESTATUS[0]}
    names+=("$name") seconds+=($(( SECONDS - start )))
    if [ "$status" -eq 0 ]; then
        results+=("pass")
    elif [ "$status" -eq 124 ]; then
        results+=("FAIL (timed out after ${limit} s)")
    else
        results+=("FAIL (exit $status)")
    fi
}

# not_run NAME RESULT: a step that did not run, and why
not_run() {
    names+=("$1") seconds+=(0) results+=("$2")
}

echo "=== setup ==="
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
                                 'GPU', torch.cuda.is_available())"
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS logs: $OUT_DIR"

# The published code's rpe_ops builds in the background meanwhile (--force: a library built
# without CUDA may be there already, newer than its sources); its step is recorded below.
if [ -n "$PUBLISHED" ] && [ -d "$PUBLISHED/rpe_ops" ]; then
    PUBLISHED="$(cd "$PUBLISHED" && pwd)"
    published_start=$SECONDS
    (cd "$PUBLISHED/rpe_ops" && timeout 300 "$PYTHON" setup.py build_ext --inplace --force) \
        > "$OUT_DIR/build_published.log" 2>&1 &
    published_build=$!
fi
# sources newer than any library already in place, so that a CPU-only build there is not taken
# for an up-to-date one
touch rpe_ops/csrc/*
step build_rpe_ops 90 env FORCE_CUDA=1 PYTHON="$PYTHON" bash rpe_ops/build.sh
# RPE_OPS_REQUIRE_EXTENSION=1: the tests of the compiled kernels fail, not skip, without them
step cuda_tests 150 env RPE_OPS_REQUIRE_EXTENSION=1 \
    "$PYTHON" -m pytest tests -q -k "cuda or sdpa or amp or flex or host_syncs" \
    -p no:cacheprovider -rs
step rpe_ops_benchmark 20 "$PYTHON" -m rpe_ops.benchmark --device cuda --repeat 10
step attention_paths 45 "$PYTHON" benchmarks/attention_paths.py --device cuda \
    --settings "rpe-2.0-product-ctx-1-k,rpe-2.0-product-bias-1-k," --repeats 10
step casts_and_syncs 30 "$PYTHON" benchmarks/casts_and_syncs.py --device cuda --repeats 5
if [ -z "$PUBLISHED" ]; then
    not_run build_published "skipped: no published folder given (argument or \$PUBLISHED)"
    not_run vs_published "skipped: no published folder given"
elif [ ! -d "$PUBLISHED/rpe_ops" ]; then
    not_run build_published "FAIL ($PUBLISHED has no rpe_ops folder: not the DETR-with-iRPE folder)"
    not_run vs_published "FAIL (no published code)"
else
    echo
    echo "=== build_published (in the background since the start) ==="
    wait "$published_build"
    status=$?
    tail -n 3 "$OUT_DIR/build_published.log"
    names+=(build_published) seconds+=($(( SECONDS - published_start )))
    if [ "$status" -eq 0 ]; then results+=("pass"); else results+=("FAIL (exit $status)"); fi
    step vs_published 250 "$PYTHON" benchmarks/vs_published.py --published "$PUBLISHED" \
        --device cuda --threads 16 --plain --amp --train-batch 4 --infer-batch 1,8 \
        --rounds 1 --warmup 3 --repeats 10 --deadline 150 \
        --targets train_step,inference,attention,irpe_k --json "$OUT_DIR/vs_published.json"
fi

echo
echo "=== summary (logs in $OUT_DIR) ==="
failed=0
printf '%-20s %8s  %s\n' step seconds result
for i in "${!names[@]}"; do
    printf '%-20s %8s  %s\n' "${names[$i]}" "${seconds[$i]}" "${results[$i]}"
    case "${results[$i]}" in FAIL*) failed=1 ;; esac
done
if [ -f "$OUT_DIR/cuda_tests.log" ]; then
    echo "tests: $(grep -E '[0-9]+ (passed|failed)' "$OUT_DIR/cuda_tests.log" | tail -n 1)"
fi
if grep -q '^target ' "$OUT_DIR/vs_published.log" 2>/dev/null; then
    echo  # the table and the goals
    sed -n '/^target /,$p' "$OUT_DIR/vs_published.log"
fi
exit "$failed"
