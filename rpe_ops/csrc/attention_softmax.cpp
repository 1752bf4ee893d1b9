// Fused attention weights on the CPU: the contextual iRPE lookup, the key
// padding mask, the softmax and dropout in one pass over each row of logits,
// and the matching backward with the bucket sum of the lookup's gradient.
//
//   attention_softmax(logits, lookup?, index?, key_bias?, dropout_p, seed)
//       -> (weights, keep)
//     logits  (B, H, L, S) float32 / float64, contiguous; overwritten with the
//             softmax probabilities P of
//               logits[b,h,i,j] + lookup[b,h,i,index[i,j]] + key_bias[b,j]
//             (lookup may broadcast over B and H: size 1 there, any strides)
//     weights P with dropout: P * keep / (1 - p); the same tensor as logits
//             when dropout_p == 0
//     keep    the dropout keep-mask (B, H, L, S) bool; empty when dropout_p == 0
//
//   attention_softmax_backward(grad, probs, keep, dropout_p, index?, num_buckets)
//       -> (grad_logits, grad_lookup)
//     grad_logits = P * (g - sum_j P g) with g = grad * keep / (1 - p)
//     grad_lookup (B, H, L, num_buckets): bucket sums of grad_logits over index
//     (empty when index is not given)
//
//   attention_weights(q, k, lookup?, index?, extra?, key_bias?, dropout_p)
//       -> weights
//     the two above with the logits q @ k^T (+ extra) and the gradients of q,
//     k, lookup and extra: one operator with its autograd in C++, so that eager
//     code and TorchScript call the same kernels (and get the same numbers).
//     The dropout seed is drawn from PyTorch's default CPU generator.
//
// The keep-mask is Bernoulli(1 - p) per weight, drawn from a counter-based
// generator: each row's key is the SplitMix64 finaliser of seed + row * 2^64/phi,
// each weight's 32-bit draw u a keyed hash of its column (keep_draw), and u
// keeps the weight when u < (1 - p) 2^32.  The seed is drawn from PyTorch's
// generator by the caller, so torch.manual_seed makes runs repeatable.
#include "rpe_index.h"
#include "cpu_cache.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/matmul.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace rpe_ops {
namespace {

constexpr int64_t kGrainElements = 1 << 16;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  return h ^ (h >> 16);
}

// The uniform 32-bit draw of column j in the row whose key is row_key: two
// keyed rounds of the MurmurHash3 finaliser, a bijection of j for each key, in
// 32-bit arithmetic that the compiler vectorises.
inline uint32_t keep_draw(uint64_t row_key, uint32_t j) {
  const uint32_t h = mix32(j * 0x9e3779b1u ^ static_cast<uint32_t>(row_key));
  return mix32(h ^ static_cast<uint32_t>(row_key >> 32));
}

// exp(x) for x <= 0 in float, written so that the compiler vectorises the loop
// that calls it: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial for exp(r) (about 1 ulp) and 2^n built in the exponent bits.
// Below -87.3 (where exp(x) is no longer a normal float) the result is 0.
inline float exp_nonpositive(float x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float xc = x < -87.3f ? -87.3f : x;
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits = (bits - 0x4B400000 + 127) << 23;  // n + 127 in the exponent field
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : p * scale;
}

inline double exp_nonpositive(double x) {
  return std::exp(x);
}

// Reductions over a row with kLanes independent partial results, which the
// compiler keeps in vector registers (a single running result would serialise
// the loop, and may not be reordered without -ffast-math).
constexpr int kLanes = 8;

// The maximum of x, not counting NaNs: a NaN (like a row masked everywhere,
// where x - max is NaN) reaches every weight of the row through the sum, as in
// torch.softmax.
template <typename scalar_t>
scalar_t row_max(const scalar_t* x, int64_t n) {
  scalar_t m[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    m[l] = -std::numeric_limits<scalar_t>::infinity();
  }
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      m[l] = x[j + l] > m[l] ? x[j + l] : m[l];
    }
  }
  for (; j < n; ++j) {
    m[0] = x[j] > m[0] ? x[j] : m[0];
  }
  scalar_t result = m[0];
  for (int l = 1; l < kLanes; ++l) {
    result = m[l] > result ? m[l] : result;
  }
  return result;
}

template <typename scalar_t>
scalar_t row_sum(const scalar_t* x, int64_t n) {
  scalar_t s[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      s[l] += x[j + l];
    }
  }
  for (; j < n; ++j) {
    s[0] += x[j];
  }
  scalar_t result = 0;
  for (int l = 0; l < kLanes; ++l) {
    result += s[l];
  }
  return result;
}

template <typename scalar_t>
scalar_t row_dot(const scalar_t* x, const scalar_t* y, int64_t n) {
  scalar_t s[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      s[l] += x[j + l] * y[j + l];
    }
  }
  for (; j < n; ++j) {
    s[0] += x[j] * y[j];
  }
  scalar_t result = 0;
  for (int l = 0; l < kLanes; ++l) {
    result += s[l];
  }
  return result;
}

// A draw u keeps its weight when u < threshold: probability
// round((1 - p) 2^32) / 2^32, within 2^-33 of 1 - p.
inline uint32_t keep_threshold(double dropout_p) {
  const double t = std::nearbyint((1.0 - dropout_p) * 4294967296.0);
  return t >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(t);
}

struct Lookup {
  // element (b, h, i, k) of the lookup tensor is at
  // data + b * sb + h * sh + i * si + k * sk (sb / sh are 0 where it broadcasts)
  const void* data = nullptr;
  int64_t sb = 0, sh = 0, si = 0, sk = 0;
};

template <typename scalar_t>
struct RowsForward {
  scalar_t* logits;
  scalar_t* weights;  // == logits without dropout
  uint8_t* keep;      // nullptr without dropout
  Lookup lookup;
  const void* index;  // (L, S), int32 or int64
  bool index_is_long;
  const scalar_t* key_bias;  // (B, S) or nullptr
  int64_t H, L, S;
  double dropout_p;
  uint64_t seed;

  template <typename index_t>
  void add_lookup(scalar_t* x, int64_t b, int64_t h, int64_t i) const {
    const scalar_t* t = static_cast<const scalar_t*>(lookup.data) + b * lookup.sb +
        h * lookup.sh + i * lookup.si;
    const index_t* idx = static_cast<const index_t*>(index) + i * S;
    const int64_t sk = lookup.sk;
    for (int64_t j = 0; j < S; ++j) {
      x[j] += t[static_cast<int64_t>(idx[j]) * sk];
    }
  }

  void row(int64_t r) const {
    const int64_t i = r % L;
    const int64_t h = (r / L) % H;
    const int64_t b = r / (L * H);
    scalar_t* x = logits + r * S;
    if (lookup.data != nullptr) {
      if (index_is_long) {
        add_lookup<int64_t>(x, b, h, i);
      } else {
        add_lookup<int32_t>(x, b, h, i);
      }
    }
    if (key_bias != nullptr) {
      const scalar_t* kb = key_bias + b * S;
      for (int64_t j = 0; j < S; ++j) {
        x[j] += kb[j];
      }
    }
    const scalar_t m = row_max(x, S);
    for (int64_t j = 0; j < S; ++j) {
      x[j] = exp_nonpositive(static_cast<scalar_t>(x[j] - m));
    }
    const scalar_t inv = static_cast<scalar_t>(1) / row_sum(x, S);
    for (int64_t j = 0; j < S; ++j) {
      x[j] *= inv;
    }
    if (keep == nullptr) {
      return;
    }
    const uint32_t threshold = keep_threshold(dropout_p);
    const scalar_t scale = static_cast<scalar_t>(1.0 / (1.0 - dropout_p));
    scalar_t* w = weights + r * S;
    uint8_t* __restrict__ k = keep + r * S;
    const uint64_t row_key = mix64(seed + static_cast<uint64_t>(r) * 0x9e3779b97f4a7c15ULL);
    const int64_t n = S;  // a local: stores through k (a char type) could alias this->S
    for (int64_t j = 0; j < n; ++j) {
      k[j] = keep_draw(row_key, static_cast<uint32_t>(j)) < threshold;
    }
    for (int64_t j = 0; j < n; ++j) {
      w[j] = x[j] * (scale * static_cast<scalar_t>(k[j]));
    }
  }
};

template <typename scalar_t>
struct RowsBackward {
  const scalar_t* grad;
  const scalar_t* probs;
  const uint8_t* keep;  // nullptr without dropout
  scalar_t* grad_logits;
  scalar_t* grad_lookup;  // (rows, nb) or nullptr
  const void* index;
  bool index_is_long;
  int64_t L, S, nb;
  double dropout_p;

  template <typename index_t>
  void bucket_sum(const scalar_t* g, int64_t r, std::vector<scalar_t>& acc) const {
    const index_t* idx = static_cast<const index_t*>(index) + (r % L) * S;
    std::fill(acc.begin(), acc.end(), static_cast<scalar_t>(0));
    for (int64_t j = 0; j < S; ++j) {
      acc[idx[j]] += g[j];
    }
    std::copy(acc.begin(), acc.end(), grad_lookup + r * nb);
  }

  void row(int64_t r, std::vector<scalar_t>& acc) const {
    const scalar_t* gd = grad + r * S;
    const scalar_t* p = probs + r * S;
    scalar_t* out = grad_logits + r * S;
    if (keep != nullptr) {
      const scalar_t scale = static_cast<scalar_t>(1.0 / (1.0 - dropout_p));
      const uint8_t* k = keep + r * S;
      for (int64_t j = 0; j < S; ++j) {
        out[j] = gd[j] * (scale * static_cast<scalar_t>(k[j]));
      }
    } else {
      std::copy(gd, gd + S, out);
    }
    const scalar_t dot = row_dot(p, out, S);
    for (int64_t j = 0; j < S; ++j) {
      out[j] = p[j] * (out[j] - dot);
    }
    if (grad_lookup != nullptr) {
      if (index_is_long) {
        bucket_sum<int64_t>(out, r, acc);
      } else {
        bucket_sum<int32_t>(out, r, acc);
      }
    }
  }
};

void check_index(const at::Tensor& index, int64_t L, int64_t S) {
  TORCH_CHECK(index.dim() == 2 && index.size(0) == L && index.size(1) == S,
              "attention_softmax: index must be (L, S) = (", L, ", ", S, "), got ",
              index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong,
              "attention_softmax: index must be int32 or int64, got ", index.scalar_type());
  TORCH_CHECK(index.device().is_cpu(), "attention_softmax: index must be a CPU tensor");
}

std::tuple<at::Tensor, at::Tensor> attention_softmax_cpu(
    at::Tensor& logits, const std::optional<at::Tensor>& lookup,
    const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& key_bias,
    double dropout_p, int64_t seed) {
  TORCH_CHECK(logits.dim() == 4 && logits.is_contiguous(),
              "attention_softmax: logits must be a contiguous (B, H, L, S) tensor");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "attention_softmax: logits must be float32 or float64, got ", logits.scalar_type());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0,
              "attention_softmax: dropout_p must be in [0, 1), got ", dropout_p);
  const int64_t B = logits.size(0), H = logits.size(1), L = logits.size(2), S = logits.size(3);
  TORCH_CHECK(lookup.has_value() == index.has_value(),
              "attention_softmax: lookup and index go together");
  Lookup lk;
  int64_t nb = 0;
  if (lookup.has_value()) {
    const at::Tensor& t = *lookup;
    check_index(*index, L, S);
    TORCH_CHECK(t.dim() == 4 && (t.size(0) == B || t.size(0) == 1) &&
                    (t.size(1) == H || t.size(1) == 1) && t.size(2) == L,
                "attention_softmax: lookup must be (B or 1, H or 1, L, num_buckets), got ",
                t.sizes());
    TORCH_CHECK(t.scalar_type() == logits.scalar_type(),
                "attention_softmax: lookup must have the dtype of logits");
    nb = t.size(3);
    lk.data = t.const_data_ptr();
    lk.sb = t.size(0) == 1 ? 0 : t.stride(0);
    lk.sh = t.size(1) == 1 ? 0 : t.stride(1);
    lk.si = t.stride(2);
    lk.sk = t.stride(3);
  }
  at::Tensor kb;
  if (key_bias.has_value()) {
    kb = key_bias->contiguous();
    TORCH_CHECK(kb.dim() == 2 && kb.size(0) == B && kb.size(1) == S &&
                    kb.scalar_type() == logits.scalar_type(),
                "attention_softmax: key_bias must be (B, S) of the dtype of logits");
  }
  at::Tensor idx;
  if (index.has_value()) {
    idx = index->contiguous();
    check_index_range("attention_softmax", idx, nb);
  }
  const bool dropout = dropout_p > 0.0;
  at::Tensor weights = dropout ? cached_empty(logits.sizes(), logits.options()) : logits;
  at::Tensor keep = cached_empty({dropout ? B : 0, H, L, S}, logits.options().dtype(at::kBool));
  const int64_t rows = B * H * L;
  if (rows == 0 || S == 0) {
    return {weights, keep};
  }
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "attention_softmax_cpu", [&] {
    RowsForward<scalar_t> f{logits.mutable_data_ptr<scalar_t>(),
                            weights.mutable_data_ptr<scalar_t>(),
                            dropout ? reinterpret_cast<uint8_t*>(keep.mutable_data_ptr<bool>()) : nullptr,
                            lk,
                            idx.defined() ? idx.const_data_ptr() : nullptr,
                            idx.defined() && idx.scalar_type() == at::kLong,
                            kb.defined() ? kb.const_data_ptr<scalar_t>() : nullptr,
                            H, L, S, dropout_p,
                            static_cast<uint64_t>(seed)};
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / S),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r) {
                         f.row(r);
                       }
                     });
  });
  return {weights, keep};
}

std::tuple<at::Tensor, at::Tensor> attention_softmax_backward_cpu(
    const at::Tensor& grad, const at::Tensor& probs, const at::Tensor& keep,
    double dropout_p, const std::optional<at::Tensor>& index, int64_t num_buckets) {
  TORCH_CHECK(probs.dim() == 4 && probs.is_contiguous(),
              "attention_softmax_backward: probs must be a contiguous (B, H, L, S) tensor");
  TORCH_CHECK(grad.sizes() == probs.sizes() && grad.scalar_type() == probs.scalar_type(),
              "attention_softmax_backward: grad must match probs");
  const int64_t B = probs.size(0), H = probs.size(1), L = probs.size(2), S = probs.size(3);
  const bool dropout = dropout_p > 0.0;
  if (dropout) {
    TORCH_CHECK(keep.sizes() == probs.sizes() && keep.scalar_type() == at::kBool &&
                    keep.is_contiguous(),
                "attention_softmax_backward: keep does not fit probs");
  }
  const at::Tensor g = grad.contiguous();
  at::Tensor grad_logits = cached_empty(probs.sizes(), probs.options());
  at::Tensor idx;
  if (index.has_value()) {
    check_index(*index, L, S);
    idx = index->contiguous();
    check_index_range("attention_softmax_backward", idx, num_buckets);
  }
  at::Tensor grad_lookup =
      at::empty({idx.defined() ? B : 0, H, L, idx.defined() ? num_buckets : 0}, probs.options());
  const int64_t rows = B * H * L;
  if (rows == 0 || S == 0) {
    if (idx.defined()) {
      grad_lookup.zero_();
    }
    return {grad_logits, grad_lookup};
  }
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "attention_softmax_backward_cpu", [&] {
    RowsBackward<scalar_t> f{g.const_data_ptr<scalar_t>(),
                             probs.const_data_ptr<scalar_t>(),
                             dropout ? reinterpret_cast<const uint8_t*>(keep.const_data_ptr<bool>()) : nullptr,
                             grad_logits.mutable_data_ptr<scalar_t>(),
                             idx.defined() ? grad_lookup.mutable_data_ptr<scalar_t>() : nullptr,
                             idx.defined() ? idx.const_data_ptr() : nullptr,
                             idx.defined() && idx.scalar_type() == at::kLong,
                             L, S, num_buckets, dropout_p};
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / S),
                     [&](int64_t begin, int64_t end) {
                       std::vector<scalar_t> acc(std::max<int64_t>(num_buckets, 1));
                       for (int64_t r = begin; r < end; ++r) {
                         f.row(r, acc);
                       }
                     });
  });
  return {grad_logits, grad_lookup};
}

// The forward of attention_weights: (weights, keep, probs).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_weights_forward(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& lookup,
    const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& extra,
    const std::optional<at::Tensor>& key_bias, double dropout_p) {
  TORCH_CHECK(q.is_cpu() && k.is_cpu(), "attention_weights: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4,
              "attention_weights: q and k must be (B, H, L, D) and (B, H, S, D)");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "attention_weights: q (B, H, L, D) and k (B, H, S, D) do not fit");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), S = k.size(2);
  at::Tensor logits = cached_empty({B, H, L, S}, q.options());
  at::Tensor logits3 = logits.view({B * H, L, S});
  at::bmm_out(logits3, q.reshape({B * H, L, q.size(3)}),
              k.reshape({B * H, S, k.size(3)}).transpose(1, 2));
  if (extra.has_value()) {
    logits.add_(*extra);
  }
  std::optional<at::Tensor> kb;
  if (key_bias.has_value()) {
    kb = key_bias->to(q.scalar_type());
  }
  int64_t seed = 0;
  if (dropout_p > 0.0) {
    seed = at::empty({}, q.options().dtype(at::kLong)).random_().item<int64_t>();
  }
  auto [weights, keep] = attention_softmax_cpu(logits, lookup, index, kb, dropout_p, seed);
  return {weights, keep, logits};
}

class AttentionWeights : public torch::autograd::Function<AttentionWeights> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                            const at::Tensor& k, const std::optional<at::Tensor>& lookup,
                            const std::optional<at::Tensor>& index,
                            const std::optional<at::Tensor>& extra,
                            const std::optional<at::Tensor>& key_bias, double dropout_p) {
    auto [weights, keep, probs] =
        attention_weights_forward(q, k, lookup, index, extra, key_bias, dropout_p);
    ctx->save_for_backward({q, k, probs, keep, index.value_or(at::Tensor())});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["lookup_shape"] =
        lookup.has_value() ? lookup->sizes().vec() : std::vector<int64_t>{};
    ctx->saved_data["extra_shape"] =
        extra.has_value() ? extra->sizes().vec() : std::vector<int64_t>{};
    // the autograd edges of the inputs given (None is not an input there): q, k, then lookup,
    // index, extra and key_bias where given
    int64_t edge = 2;
    ctx->saved_data["lookup_edge"] = lookup.has_value() ? edge++ : int64_t{-1};
    edge += index.has_value() ? 1 : 0;
    ctx->saved_data["extra_edge"] = extra.has_value() ? edge : int64_t{-1};
    return weights;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& q = saved[0];
    const at::Tensor& k = saved[1];
    const int64_t lookup_edge = ctx->saved_data["lookup_edge"].toInt();
    const int64_t extra_edge = ctx->saved_data["extra_edge"].toInt();
    const bool need_lookup = lookup_edge >= 0 && ctx->needs_input_grad(lookup_edge);
    const bool need_extra = extra_edge >= 0 && ctx->needs_input_grad(extra_edge);
    const auto lookup_shape = ctx->saved_data["lookup_shape"].toIntVector();
    const auto extra_shape = ctx->saved_data["extra_shape"].toIntVector();
    std::optional<at::Tensor> index;
    if (need_lookup) {
      index = saved[4];
    }
    auto [grad_logits, grad_lookup] = attention_softmax_backward_cpu(
        grads[0], saved[2], saved[3], ctx->saved_data["dropout_p"].toDouble(), index,
        need_lookup ? lookup_shape.back() : 0);
    at::Tensor grad_q, grad_k, grad_extra;
    if (ctx->needs_input_grad(0)) {
      grad_q = at::matmul(grad_logits, k);
    }
    if (ctx->needs_input_grad(1)) {
      grad_k = at::matmul(grad_logits.transpose(-2, -1), q);
    }
    if (need_lookup) {
      grad_lookup = grad_lookup.sum_to_size(lookup_shape);
    } else {
      grad_lookup = at::Tensor();
    }
    if (need_extra) {
      grad_extra = grad_logits.sum_to_size(extra_shape);
    }
    return {grad_q, grad_k, grad_lookup, at::Tensor(), grad_extra, at::Tensor(), at::Tensor()};
  }
};

at::Tensor attention_weights_autograd(const at::Tensor& q, const at::Tensor& k,
                                      const std::optional<at::Tensor>& lookup,
                                      const std::optional<at::Tensor>& index,
                                      const std::optional<at::Tensor>& extra,
                                      const std::optional<at::Tensor>& key_bias,
                                      double dropout_p) {
  return AttentionWeights::apply(q, k, lookup, index, extra, key_bias, dropout_p);
}

// Below autograd (inference mode): the forward alone.
at::Tensor attention_weights_cpu(const at::Tensor& q, const at::Tensor& k,
                                 const std::optional<at::Tensor>& lookup,
                                 const std::optional<at::Tensor>& index,
                                 const std::optional<at::Tensor>& extra,
                                 const std::optional<at::Tensor>& key_bias, double dropout_p) {
  return std::get<0>(attention_weights_forward(q, k, lookup, index, extra, key_bias, dropout_p));
}

} // namespace

TORCH_LIBRARY_FRAGMENT(rpe_ops, m) {
  m.def(
      "attention_weights(Tensor q, Tensor k, Tensor? lookup, Tensor? index, Tensor? extra,"
      " Tensor? key_bias, float dropout_p) -> Tensor");
  m.def(
      "attention_softmax(Tensor(a!) logits, Tensor? lookup, Tensor? index, Tensor? key_bias,"
      " float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def(
      "attention_softmax_backward(Tensor grad, Tensor probs, Tensor keep, float dropout_p,"
      " Tensor? index, int num_buckets) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rpe_ops, CPU, m) {
  m.impl("attention_softmax", &attention_softmax_cpu);
  m.impl("attention_softmax_backward", &attention_softmax_backward_cpu);
  m.impl("attention_weights", &attention_weights_cpu);
}

TORCH_LIBRARY_IMPL(rpe_ops, Autograd, m) {
  m.impl("attention_weights", &attention_weights_autograd);
}

} // namespace rpe_ops
