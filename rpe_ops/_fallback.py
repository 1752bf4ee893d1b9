"""Pure-PyTorch versions of the rpe_ops operators and their argument checks: the reference
semantics of the compiled kernels, on every device, used when the extension is not available."""
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _check(cond, message):
    # torch._check raises RuntimeError like TORCH_CHECK in C++, and records a
    # runtime assertion instead of a guard when cond involves symbolic sizes.
    torch._check(cond, lambda: message)


def _check_operands(op, name, layout, tensor, index):
    """Rank, dtype and device of the 4-D float operand `name` and of index."""
    _check(tensor.dim() == 4, f"{op}: {name} must be a 4-D tensor {layout}, got a {tensor.dim()}-D tensor")
    _check(index.dim() == 2,
           f"{op}: index must be a 2-D tensor (Lq, Lk), got a {index.dim()}-D tensor")
    _check(index.dtype in INDEX_DTYPES, f"{op}: index must be int32 or int64, got {index.dtype}")
    _check(tensor.dtype in FLOAT_DTYPES,
           f"{op}: {name} must be float32, float64, float16 or bfloat16, got {tensor.dtype}")
    _check(tensor.device == index.device,
           f"{op}: {name} and index must be on the same device, got {tensor.device} and {index.device}")


def check_rpe_index_args(input, index):
    op = "rpe_index"
    _check_operands(op, "input", "(B, H, Lq, num_buckets)", input, index)
    _check(index.shape[0] == input.shape[2],
           f"{op}: index has {index.shape[0]} rows but input has Lq = input.size(2) = {input.shape[2]}")


def check_rpe_index_backward_args(grad_output, index, num_buckets):
    op = "rpe_index_backward"
    _check_operands(op, "grad_output", "(B, H, Lq, Lk)", grad_output, index)
    _check(index.shape[0] == grad_output.shape[2] and index.shape[1] == grad_output.shape[3],
           f"{op}: index shape {list(index.shape)} must equal the last two dims (Lq, Lk) "
           f"of grad_output, got {list(grad_output.shape)}")
    _check(num_buckets >= 0, f"{op}: num_buckets must be non-negative, got {num_buckets}")


def check_index_range(op, index, num_buckets, output_size=1):
    """Raises unless every value of index lies in [0, num_buckets), where wanted: as in the
    compiled kernels, always on the CPU, elsewhere only on request (it synchronises), and only
    for a non-empty output."""
    on_request = os.environ.get("RPE_OPS_CHECK_INDEX", "") not in ("", "0")
    if not (index.device.type == "cpu" or on_request) or output_size == 0 or index.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(index))
    _check(lo >= 0 and hi < num_buckets,
           f"{op}: index values must lie in [0, num_buckets) = [0, {num_buckets}), "
           f"got values in [{lo}, {hi}]")


def lookup(input, index):
    """out[b, h, i, j] = input[b, h, i, index[i, j]] with torch.gather, unchecked: standard ops
    only, so that torch.export and the ONNX exporter (GatherElements) take it as it is."""
    batch, heads, lq, _ = input.shape
    return torch.gather(input, -1, index.long().expand(batch, heads, lq, index.shape[1]))


def bucket_sum(grad_output, index, num_buckets):
    """The transpose of `lookup` with scatter_add (ONNX ScatterElements, reduction add), unchecked;
    float16 / bfloat16 are accumulated in float32."""
    batch, heads, lq, lk = grad_output.shape
    acc_dtype = torch.float32 if grad_output.dtype in (torch.float16, torch.bfloat16) else grad_output.dtype
    out = grad_output.new_zeros((batch, heads, lq, num_buckets), dtype=acc_dtype)
    out.scatter_add_(-1, index.long().expand(batch, heads, lq, lk), grad_output.to(acc_dtype))
    return out.to(grad_output.dtype)


def rpe_index(input, index):
    """out[b, h, i, j] = input[b, h, i, index[i, j]], via torch.gather."""
    check_rpe_index_args(input, index)
    batch, heads, lq, num_buckets = input.shape
    check_index_range("rpe_index", index, num_buckets, batch * heads * lq)
    return lookup(input, index).contiguous()


def rpe_index_backward(grad_output, index, num_buckets):
    """grad_input[b, h, i, k] = sum of grad_output[b, h, i, j] over j with index[i, j] == k,
    via scatter_add (float32 accumulation for float16 / bfloat16)."""
    check_rpe_index_backward_args(grad_output, index, num_buckets)
    batch, heads, lq, _ = grad_output.shape
    check_index_range("rpe_index_backward", index, num_buckets, batch * heads * lq * num_buckets)
    return bucket_sum(grad_output, index, num_buckets)
