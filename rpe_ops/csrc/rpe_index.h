// Shared declarations of the rpe_ops operators.
//
//   rpe_index(input, index) -> out
//       input  (B, H, Lq, num_buckets)  float32 / float64 / float16 / bfloat16
//       index  (Lq, Lk)                 int32 / int64, values in [0, num_buckets)
//       out    (B, H, Lq, Lk)           out[b, h, i, j] = input[b, h, i, index[i, j]]
//
//   rpe_index_backward(grad_output, index, num_buckets) -> grad_input
//       grad_output (B, H, Lq, Lk), index (Lq, Lk)
//       grad_input  (B, H, Lq, num_buckets)
//       grad_input[b, h, i, k] = sum_j grad_output[b, h, i, j] * (index[i, j] == k)
//
// Both kernels see the data as BH = B * H stacked (Lq, .) matrices; a "row" is
// one (b, h, i) triple.  Every row of the result depends on one row of the
// argument and one row of index, so rows can be processed independently.
#pragma once

#include <ATen/core/Tensor.h>

namespace rpe_ops {

// Argument checks shared by the CPU and CUDA entry points.  They raise
// c10::Error (RuntimeError in Python) with a message naming the operator.
void check_rpe_index_args(const at::Tensor& input, const at::Tensor& index);
void check_rpe_index_backward_args(
    const at::Tensor& grad_output,
    const at::Tensor& index,
    int64_t num_buckets);

// Range check of index against [0, num_buckets): a separate pass over index
// (on CUDA followed by a device synchronisation).
void check_index_range(
    const char* op,
    const at::Tensor& index,
    int64_t num_buckets);

// True when the environment variable RPE_OPS_CHECK_INDEX is set to a value
// other than "" or "0".  The CPU operators always check index (one cheap pass
// over it); the CUDA operators do so only in this mode.
bool index_check_requested();

#ifdef RPE_OPS_WITH_CUDA
// Implemented in rpe_index_kernels.cu.  Arguments are checked, contiguous and on
// the same CUDA device; out is allocated (contiguous) by the caller.
void rpe_index_forward_cuda_launch(
    const at::Tensor& input,
    const at::Tensor& index,
    const at::Tensor& out);
void rpe_index_backward_cuda_launch(
    const at::Tensor& grad_output,
    const at::Tensor& index,
    const at::Tensor& grad_input);
#endif

} // namespace rpe_ops
