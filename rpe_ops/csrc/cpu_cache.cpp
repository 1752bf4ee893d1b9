// See cpu_cache.h.
#include "cpu_cache.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

namespace rpe_ops {
namespace {

constexpr size_t kMinBytes = size_t{1} << 20;
constexpr size_t kRound = size_t{2} << 20;

struct Cache {
  std::mutex mutex;
  std::multimap<size_t, void*> kept;  // freed blocks by size
  size_t kept_bytes = 0;
  size_t live_bytes = 0;
  size_t limit;

  Cache() {
    const char* v = std::getenv("RPE_OPS_CPU_CACHE_MB");
    long long mb = 1024;
    if (v != nullptr && *v != '\0') {
      char* end = nullptr;
      mb = std::strtoll(v, &end, 10);
      TORCH_CHECK(end != nullptr && *end == '\0' && mb >= 0,
                  "RPE_OPS_CPU_CACHE_MB must be a whole number of megabytes (0 turns the "
                  "cache of rpe_ops' CPU results off), not '", v, "'");
    }
    limit = static_cast<size_t>(mb) << 20;
  }
};

// Never destroyed: tensors may be freed while the process exits.
Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

void give_back(void* block, size_t bytes) {
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    c.live_bytes -= bytes;
    if (c.kept_bytes + bytes <= c.limit) {
      c.kept.emplace(bytes, block);
      c.kept_bytes += bytes;
      return;
    }
  }
  c10::free_cpu(block);
}

} // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t need = c10::multiply_integers(sizes) * options.dtype().itemsize();
  Cache& c = cache();
  if (need < kMinBytes || c.limit == 0 || options.device().type() != c10::DeviceType::CPU ||
      options.pinned_memory()) {
    return at::empty(sizes, options);
  }
  const size_t bytes = (need + kRound - 1) / kRound * kRound;
  void* block = nullptr;
  size_t got = bytes;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.kept.lower_bound(bytes);
    if (it != c.kept.end() && it->first <= 2 * bytes) {
      got = it->first;
      block = it->second;
      c.kept.erase(it);
      c.kept_bytes -= got;
    }
    c.live_bytes += got;
  }
  if (block == nullptr) {
    try {
      block = c10::alloc_cpu(got);
    } catch (...) {
      std::lock_guard<std::mutex> lock(c.mutex);
      c.live_bytes -= got;
      throw;
    }
  }
  return at::from_blob(
      block, sizes, [got](void* p) { give_back(p, got); },
      options.memory_format(std::nullopt));
}

std::tuple<int64_t, int64_t> cpu_cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return {static_cast<int64_t>(c.live_bytes), static_cast<int64_t>(c.kept_bytes)};
}

void cpu_cache_clear() {
  Cache& c = cache();
  std::multimap<size_t, void*> kept;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    kept.swap(c.kept);
    c.kept_bytes = 0;
  }
  for (auto& entry : kept) {
    c10::free_cpu(entry.second);
  }
}

namespace {

// cached_empty for Python callers: a contiguous CPU tensor of `size` and `dtype`.
at::Tensor cached_empty_op(at::IntArrayRef size, at::ScalarType dtype) {
  return cached_empty(size, at::TensorOptions().dtype(dtype).device(c10::DeviceType::CPU));
}

} // namespace

TORCH_LIBRARY_FRAGMENT(rpe_ops, m) {
  m.def("cached_empty(int[] size, ScalarType dtype) -> Tensor", &cached_empty_op);
  m.def("cpu_cache_stats() -> (int, int)", &cpu_cache_stats);
  m.def("cpu_cache_clear() -> ()", &cpu_cache_clear);
}

} // namespace rpe_ops
