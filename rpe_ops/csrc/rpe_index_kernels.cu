// CUDA kernels of rpe_ops and their launches.
//
// One thread block handles one row (b, h, i) at a time (grid-stride over
// rows).  Out-of-range index values never cause out-of-bounds accesses: the
// lookup yields 0 for them and the bucket sum ignores them.  Set
// RPE_OPS_CHECK_INDEX=1 to have them reported as errors instead.
#include "rpe_index.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace rpe_ops {
namespace {

constexpr int64_t kMaxBlocks = 1 << 20;
// Largest shared-memory tile of accumulators per block, in bytes (below the
// 48 KiB available without opting in).
constexpr int64_t kMaxSharedBytes = 32 * 1024;

// Threads per block: enough warps to cover a row of length n, at most 256.
int threads_for(int64_t n) {
  const int64_t warps = std::min<int64_t>(8, std::max<int64_t>(1, (n + 31) / 32));
  return static_cast<int>(warps * 32);
}

template <typename scalar_t, typename index_t>
__global__ void rpe_index_forward_kernel(
    const scalar_t* __restrict__ input,
    const index_t* __restrict__ index,
    scalar_t* __restrict__ out,
    int64_t rows,
    int64_t lq,
    int64_t lk,
    int64_t nb) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const scalar_t* x = input + row * nb;
    const index_t* idx = index + (row % lq) * lk;
    scalar_t* y = out + row * lk;
    for (int64_t j = threadIdx.x; j < lk; j += blockDim.x) {
      const int64_t k = idx[j];
      y[j] = (k >= 0 && k < nb) ? x[k] : static_cast<scalar_t>(0);
    }
  }
}

// Sums one row of grad_output into its buckets in shared memory.  Buckets are
// processed in tiles of `tile` accumulators, so any num_buckets works; the
// common case (num_buckets <= tile) is a single pass over the row.
template <typename scalar_t, typename index_t>
__global__ void rpe_index_backward_kernel(
    const scalar_t* __restrict__ grad_out,
    const index_t* __restrict__ index,
    scalar_t* __restrict__ grad_in,
    int64_t rows,
    int64_t lq,
    int64_t lk,
    int64_t nb,
    int64_t tile) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(8) unsigned char shared_bytes[];
  acc_t* acc = reinterpret_cast<acc_t*>(shared_bytes);

  // Loop bounds depend on blockIdx only, so __syncthreads is reached by all
  // threads of the block.
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const scalar_t* g = grad_out + row * lk;
    const index_t* idx = index + (row % lq) * lk;
    scalar_t* out = grad_in + row * nb;
    for (int64_t k0 = 0; k0 < nb; k0 += tile) {
      const int64_t width = nb - k0 < tile ? nb - k0 : tile;
      for (int64_t t = threadIdx.x; t < width; t += blockDim.x) {
        acc[t] = acc_t(0);
      }
      __syncthreads();
      for (int64_t j = threadIdx.x; j < lk; j += blockDim.x) {
        const int64_t k = static_cast<int64_t>(idx[j]) - k0;
        if (k >= 0 && k < width) {
          atomicAdd(acc + k, static_cast<acc_t>(g[j]));
        }
      }
      __syncthreads();
      for (int64_t t = threadIdx.x; t < width; t += blockDim.x) {
        out[k0 + t] = static_cast<scalar_t>(acc[t]);
      }
      __syncthreads(); // acc is reused by the next tile or row
    }
  }
}

} // namespace

void rpe_index_forward_cuda_launch(
    const at::Tensor& input,
    const at::Tensor& index,
    const at::Tensor& out) {
  const int64_t rows = input.size(0) * input.size(1) * input.size(2);
  const int64_t lq = input.size(2);
  const int64_t nb = input.size(3);
  const int64_t lk = index.size(1);
  const int threads = threads_for(lk);
  const int blocks = static_cast<int>(std::min(rows, kMaxBlocks));
  // Same stream as at::cuda::getCurrentCUDAStream().
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "rpe_index_cuda", [&] {
        AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "rpe_index_cuda", [&] {
          rpe_index_forward_kernel<scalar_t, index_t>
              <<<blocks, threads, 0, stream>>>(
                  input.const_data_ptr<scalar_t>(),
                  index.const_data_ptr<index_t>(),
                  out.mutable_data_ptr<scalar_t>(), rows, lq, lk, nb);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
}

void rpe_index_backward_cuda_launch(
    const at::Tensor& grad_output,
    const at::Tensor& index,
    const at::Tensor& grad_input) {
  const int64_t rows =
      grad_output.size(0) * grad_output.size(1) * grad_output.size(2);
  const int64_t lq = grad_output.size(2);
  const int64_t lk = grad_output.size(3);
  const int64_t nb = grad_input.size(3);
  const int threads = threads_for(std::max(lk, nb));
  const int blocks = static_cast<int>(std::min(rows, kMaxBlocks));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_output.scalar_type(),
      "rpe_index_backward_cuda", [&] {
        AT_DISPATCH_INDEX_TYPES(
            index.scalar_type(), "rpe_index_backward_cuda", [&] {
              using acc_t = at::opmath_type<scalar_t>;
              const int64_t tile = std::min<int64_t>(
                  nb, kMaxSharedBytes / static_cast<int64_t>(sizeof(acc_t)));
              const size_t shared = static_cast<size_t>(tile) * sizeof(acc_t);
              rpe_index_backward_kernel<scalar_t, index_t>
                  <<<blocks, threads, shared, stream>>>(
                      grad_output.const_data_ptr<scalar_t>(),
                      index.const_data_ptr<index_t>(),
                      grad_input.mutable_data_ptr<scalar_t>(), rows, lq, lk,
                      nb, tile);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
      });
}

} // namespace rpe_ops
