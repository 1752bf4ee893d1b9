// CUDA entry points of rpe_ops: checks, device guard, allocation and
// registration.  The kernels and their launches live in rpe_index_kernels.cu.
#include "rpe_index.h"

#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace rpe_ops {
namespace {

at::Tensor rpe_index_cuda(const at::Tensor& input, const at::Tensor& index) {
  check_rpe_index_args(input, index);
  const c10::cuda::CUDAGuard device_guard(input.device());
  if (index_check_requested()) {
    check_index_range("rpe_index", index, input.size(3));
  }
  const at::Tensor x = input.contiguous();
  const at::Tensor idx = index.contiguous();
  at::Tensor out =
      at::empty({x.size(0), x.size(1), x.size(2), idx.size(1)}, x.options());
  if (out.numel() > 0) {
    rpe_index_forward_cuda_launch(x, idx, out);
  }
  return out;
}

at::Tensor rpe_index_backward_cuda(const at::Tensor& grad_output,
                                   const at::Tensor& index,
                                   int64_t num_buckets) {
  check_rpe_index_backward_args(grad_output, index, num_buckets);
  const c10::cuda::CUDAGuard device_guard(grad_output.device());
  if (index_check_requested()) {
    check_index_range("rpe_index_backward", index, num_buckets);
  }
  // Sums are formed with shared-memory atomics, so their rounding depends on
  // the order in which threads arrive.
  at::globalContext().alertNotDeterministic("rpe_ops::rpe_index_backward (CUDA)");
  const at::Tensor g = grad_output.contiguous();
  const at::Tensor idx = index.contiguous();
  at::Tensor grad_input =
      at::empty({g.size(0), g.size(1), g.size(2), num_buckets}, g.options());
  if (grad_input.numel() > 0) {
    rpe_index_backward_cuda_launch(g, idx, grad_input);
  }
  return grad_input;
}

} // namespace

TORCH_LIBRARY_IMPL(rpe_ops, CUDA, m) {
  m.impl("rpe_index", &rpe_index_cuda);
  m.impl("rpe_index_backward", &rpe_index_backward_cuda);
}

} // namespace rpe_ops
