// Reuse of the large CPU buffers that the operators return.
//
// An (N, H, L, L) attention-sized tensor is tens of megabytes: glibc's malloc
// hands such a block out as a fresh memory mapping and unmaps it when freed,
// so every new one is faulted in page by page, which costs more than the work
// done on it.  cached_empty() keeps the blocks of the tensors it made, once
// they are freed, and hands them out again: after the first training step
// their memory is reused without faults.  Only these operators' results use
// it; the rest of the process allocates as before.
//
// Blocks are rounded up to 2 MiB and a request takes the smallest cached block
// that fits it and is at most twice its size.  Freed blocks are kept up to
// RPE_OPS_CPU_CACHE_MB megabytes in all (default 1024; 0 turns the cache off,
// every result then being a plain at::empty); beyond that they are returned to
// the system.  Requests below 1 MiB always go to at::empty.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace rpe_ops {

// A contiguous tensor of these sizes and options (CPU, any dtype), its
// contents uninitialised, as at::empty.
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// (bytes held by live tensors from the cache, bytes of freed blocks kept)
std::tuple<int64_t, int64_t> cpu_cache_stats();

// Returns the kept blocks to the system; live tensors are untouched.
void cpu_cache_clear();

} // namespace rpe_ops
