// Operator schemas, argument checks and the CPU kernels of rpe_ops.
#include "rpe_index.h"
#include "cpu_cache.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

namespace rpe_ops {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf ||
      t == at::kBFloat16;
}

bool is_supported_index(at::ScalarType t) {
  return t == at::kInt || t == at::kLong;
}

// Rank, dtype and device of the 4-D float operand `name` (laid out as
// `layout`) and of index.
void check_operands(const char* op, const char* name, const char* layout,
                    const at::Tensor& tensor, const at::Tensor& index) {
  TORCH_CHECK(
      tensor.dim() == 4,
      op, ": ", name, " must be a 4-D tensor ", layout, ", got a ",
      tensor.dim(), "-D tensor");
  TORCH_CHECK(
      index.dim() == 2,
      op, ": index must be a 2-D tensor (Lq, Lk), got a ", index.dim(),
      "-D tensor");
  TORCH_CHECK(
      is_supported_index(index.scalar_type()),
      op, ": index must be int32 or int64, got ", index.scalar_type());
  TORCH_CHECK(
      is_supported_float(tensor.scalar_type()),
      op, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
      tensor.scalar_type());
  TORCH_CHECK(
      tensor.device() == index.device(),
      op, ": ", name, " and index must be on the same device, got ",
      tensor.device(), " and ", index.device());
}

} // namespace

void check_rpe_index_args(const at::Tensor& input, const at::Tensor& index) {
  constexpr const char* op = "rpe_index";
  check_operands(op, "input", "(B, H, Lq, num_buckets)", input, index);
  TORCH_CHECK(
      index.size(0) == input.size(2),
      op, ": index has ", index.size(0),
      " rows but input has Lq = input.size(2) = ", input.size(2));
}

void check_rpe_index_backward_args(
    const at::Tensor& grad_output,
    const at::Tensor& index,
    int64_t num_buckets) {
  constexpr const char* op = "rpe_index_backward";
  check_operands(op, "grad_output", "(B, H, Lq, Lk)", grad_output, index);
  TORCH_CHECK(
      index.size(0) == grad_output.size(2) &&
          index.size(1) == grad_output.size(3),
      op, ": index shape ", index.sizes(),
      " must equal the last two dims (Lq, Lk) of grad_output, got ",
      grad_output.sizes());
  TORCH_CHECK(
      num_buckets >= 0, op, ": num_buckets must be non-negative, got ",
      num_buckets);
}

void check_index_range(
    const char* op,
    const at::Tensor& index,
    int64_t num_buckets) {
  if (index.numel() == 0) {
    return;
  }
  // One plain pass over a host copy: no reduction kernel is launched on the
  // index's device, and a CUDA index costs one copy (with its synchronisation).
  const at::Tensor host = index.to(at::kCPU).contiguous();
  int64_t min_value = 0;
  int64_t max_value = 0;
  AT_DISPATCH_INDEX_TYPES(host.scalar_type(), "check_index_range", [&] {
    const index_t* data = host.const_data_ptr<index_t>();
    index_t lo = data[0];
    index_t hi = data[0];
    for (int64_t i = 1; i < host.numel(); ++i) {
      lo = std::min(lo, data[i]);
      hi = std::max(hi, data[i]);
    }
    min_value = lo;
    max_value = hi;
  });
  TORCH_CHECK(
      min_value >= 0 && max_value < num_buckets,
      op, ": index values must lie in [0, num_buckets) = [0, ", num_buckets,
      "), got values in [", min_value, ", ", max_value, "]");
}

bool index_check_requested() {
  const char* value = std::getenv("RPE_OPS_CHECK_INDEX");
  return value != nullptr && value[0] != '\0' &&
      !(value[0] == '0' && value[1] == '\0');
}

namespace {

// Number of (b, h) rows that share one row of index and are processed
// together by lookup_block and bucket_sum_block (tuned on an AMD EPYC).
constexpr int64_t kLookupRows = 4;
constexpr int64_t kSumRows = 8;
// Approximate number of elements one parallel task should at least touch.
constexpr int64_t kGrainElements = 1 << 15;
// Bytes of index rows kept in cache while they are applied to all (b, h).
constexpr int64_t kIndexTileBytes = 128 * 1024;

// Runs worker(i, r0, r1) for every index row i and block [r0, r1) of at most
// block_rows (b, h) rows, in parallel.  Work item w is (block w / n_tiles,
// tile w % n_tiles) of index rows, so the items of one task cover adjacent
// (b, h) rows: each thread writes its own stretch of the output, and the
// first-touch page faults of fresh outputs do not contend between threads.
// Within a task the tiles are the outer loop, so an index tile stays in cache
// while all of the task's blocks use it; a block walks i upwards, visiting its
// rows of the (B, H, Lq, .) tensors in memory order.  Each parallel task calls
// make_worker() once; the worker it returns may own scratch memory.
template <typename MakeWorker>
void for_each_row_block(int64_t bh, int64_t lq, int64_t block_rows,
                        int64_t index_row_bytes, int64_t row_cost,
                        const MakeWorker& make_worker) {
  const int64_t tile = std::clamp<int64_t>(
      kIndexTileBytes / std::max<int64_t>(1, index_row_bytes), 1, lq);
  const int64_t n_tiles = (lq + tile - 1) / tile;
  const int64_t n_blocks = (bh + block_rows - 1) / block_rows;
  const int64_t item_cost = std::max<int64_t>(
      1, tile * std::min(bh, block_rows) * row_cost);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / item_cost);
  at::parallel_for(0, n_blocks * n_tiles, grain, [&](int64_t begin, int64_t end) {
    auto worker = make_worker();
    const int64_t first_block = begin / n_tiles;
    const int64_t last_block = (end - 1) / n_tiles;
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t i0 = t * tile;
      const int64_t i1 = std::min(lq, i0 + tile);
      for (int64_t b = first_block; b <= last_block; ++b) {
        const int64_t w = b * n_tiles + t;
        if (w < begin || w >= end) {
          continue;
        }
        const int64_t r0 = b * block_rows;
        const int64_t r1 = std::min(bh, r0 + block_rows);
        for (int64_t i = i0; i < i1; ++i) {
          worker(i, r0, r1);
        }
      }
    }
  });
}

// Lookup for a block of rows sharing one index row:
//   y[r][j] = x[r][idx[j]] for r < n_rows, j < lk.
// j is the outer loop, so idx[j] is loaded once per block.  kRows > 0 fixes
// n_rows at compile time (full blocks) so that the r loop unrolls.
template <int64_t kRows, typename scalar_t, typename index_t>
void lookup_block(const scalar_t* const* x, scalar_t* const* y,
                  int64_t n_rows, const index_t* idx, int64_t lk) {
  const int64_t n = kRows > 0 ? kRows : n_rows;
  for (int64_t j = 0; j < lk; ++j) {
    const index_t k = idx[j];
    for (int64_t r = 0; r < n; ++r) {
      y[r][j] = x[r][k];
    }
  }
}

// Bucket sum for a block of rows sharing one index row:
//   acc[r * nb + idx[j]] += rows[r][j] for r < n_rows, j < lk.
// The n_rows accumulator arrays are independent, so a run of equal buckets
// does not serialise into one chain of dependent read-modify-writes.
template <int64_t kRows, typename scalar_t, typename index_t, typename acc_t>
void bucket_sum_block(const scalar_t* const* rows, int64_t n_rows,
                      const index_t* idx, int64_t lk, int64_t nb,
                      acc_t* acc) {
  const int64_t n = kRows > 0 ? kRows : n_rows;
  for (int64_t j = 0; j < lk; ++j) {
    acc_t* a = acc + idx[j];
    for (int64_t r = 0; r < n; ++r) {
      a[r * nb] += static_cast<acc_t>(rows[r][j]);
    }
  }
}

// The kernels below expect index values in [0, nb), checked by the caller.
template <typename scalar_t, typename index_t>
void lookup_cpu(const scalar_t* input, const index_t* index, scalar_t* out,
                int64_t bh, int64_t lq, int64_t lk, int64_t nb) {
  for_each_row_block(bh, lq, kLookupRows, lk * sizeof(index_t), lk, [&] {
    return [&](int64_t i, int64_t r0, int64_t r1) {
      const index_t* idx = index + i * lk;
      const scalar_t* x[kLookupRows];
      scalar_t* y[kLookupRows];
      const int64_t n_rows = r1 - r0;
      for (int64_t r = 0; r < n_rows; ++r) {
        x[r] = input + ((r0 + r) * lq + i) * nb;
        y[r] = out + ((r0 + r) * lq + i) * lk;
      }
      if (n_rows == kLookupRows) {
        lookup_block<kLookupRows>(x, y, n_rows, idx, lk);
      } else {
        lookup_block<0>(x, y, n_rows, idx, lk);
      }
    };
  });
}

template <typename scalar_t, typename index_t>
void bucket_sum_cpu(const scalar_t* grad_out, const index_t* index,
                    scalar_t* grad_in, int64_t bh, int64_t lq, int64_t lk,
                    int64_t nb) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row_cost = std::max(lk, nb);
  for_each_row_block(bh, lq, kSumRows, lk * sizeof(index_t), row_cost, [&] {
    // Accumulators of one block of rows, private to the task: the scatter
    // needs neither atomics nor locks.
    return [&, acc = std::vector<acc_t>(kSumRows * nb)](
               int64_t i, int64_t r0, int64_t r1) mutable {
      const index_t* idx = index + i * lk;
      const int64_t n_rows = r1 - r0;
      std::fill(acc.begin(), acc.begin() + n_rows * nb, acc_t(0));
      const scalar_t* rows[kSumRows];
      for (int64_t r = 0; r < n_rows; ++r) {
        rows[r] = grad_out + ((r0 + r) * lq + i) * lk;
      }
      if (n_rows == kSumRows) {
        bucket_sum_block<kSumRows>(rows, n_rows, idx, lk, nb, acc.data());
      } else {
        bucket_sum_block<0>(rows, n_rows, idx, lk, nb, acc.data());
      }
      for (int64_t r = 0; r < n_rows; ++r) {
        scalar_t* g = grad_in + ((r0 + r) * lq + i) * nb;
        const acc_t* a = acc.data() + r * nb;
        for (int64_t k = 0; k < nb; ++k) {
          g[k] = static_cast<scalar_t>(a[k]);
        }
      }
    };
  });
}

at::Tensor rpe_index_cpu(const at::Tensor& input, const at::Tensor& index) {
  check_rpe_index_args(input, index);
  const at::Tensor x = input.contiguous();
  const at::Tensor idx = index.contiguous();
  const int64_t bh = x.size(0) * x.size(1);
  const int64_t lq = x.size(2);
  const int64_t nb = x.size(3);
  const int64_t lk = idx.size(1);
  at::Tensor out = cached_empty({x.size(0), x.size(1), lq, lk}, x.options());
  if (out.numel() == 0) {
    return out;
  }
  check_index_range("rpe_index", idx, nb);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "rpe_index_cpu", [&] {
        AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "rpe_index_cpu", [&] {
          lookup_cpu(x.const_data_ptr<scalar_t>(),
                     idx.const_data_ptr<index_t>(),
                     out.mutable_data_ptr<scalar_t>(), bh, lq, lk, nb);
        });
      });
  return out;
}

at::Tensor rpe_index_backward_cpu(const at::Tensor& grad_output,
                                  const at::Tensor& index,
                                  int64_t num_buckets) {
  check_rpe_index_backward_args(grad_output, index, num_buckets);
  const at::Tensor g = grad_output.contiguous();
  const at::Tensor idx = index.contiguous();
  const int64_t bh = g.size(0) * g.size(1);
  const int64_t lq = g.size(2);
  const int64_t lk = g.size(3);
  at::Tensor grad_input =
      at::empty({g.size(0), g.size(1), lq, num_buckets}, g.options());
  if (grad_input.numel() == 0) {
    return grad_input;
  }
  check_index_range("rpe_index_backward", idx, num_buckets);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, g.scalar_type(), "rpe_index_backward_cpu", [&] {
        AT_DISPATCH_INDEX_TYPES(
            idx.scalar_type(), "rpe_index_backward_cpu", [&] {
              bucket_sum_cpu(g.const_data_ptr<scalar_t>(),
                             idx.const_data_ptr<index_t>(),
                             grad_input.mutable_data_ptr<scalar_t>(), bh, lq,
                             lk, num_buckets);
            });
      });
  return grad_input;
}

} // namespace

TORCH_LIBRARY(rpe_ops, m) {
  m.def("rpe_index(Tensor input, Tensor index) -> Tensor");
  m.def(
      "rpe_index_backward(Tensor grad_output, Tensor index, int num_buckets)"
      " -> Tensor");
}

TORCH_LIBRARY_IMPL(rpe_ops, CPU, m) {
  m.impl("rpe_index", &rpe_index_cpu);
  m.impl("rpe_index_backward", &rpe_index_backward_cpu);
}

} // namespace rpe_ops
