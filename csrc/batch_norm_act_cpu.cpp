// CPU kernels of batch_norm_act: y = residual + s[b] * act((x - mean) * scale + beta) per channel,
// act GELU or the identity; the batch statistics of x; and the backward, from x alone (xhat and
// the GELU input are recomputed, never saved).
//
// Two native layouts, as in dwconv_bn_gelu_cpu.cpp:
// - NCHW: a work item is a segment of at most kSegment positions of one (image, channel) plane, so
//   the per-channel constants are broadcast once and the loops run over contiguous positions.
//   Splitting planes keeps a few large planes (a small batch at a high resolution) parallel.
// - channels_last: a work item is a fixed block of rows (pixels) of C contiguous channels, and the
//   loops run over channel vectors.
// Work items depend on the shape alone, never on the thread count; every reduction is written per
// item and merged afterwards in item order, so results are bit-identical from run to run.
//
// Statistics: an item is reduced in chunks small enough to stay in L1 by the corrected two-pass
// algorithm (the sum, then the deviations from the chunk's mean, whose sum corrects that mean),
// and chunks and items are merged by Chan et al.'s update in double. No sum of squares of raw
// values is ever formed, so a channel with mean 1e3 and std 1 keeps its variance.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "cpu_kernels.h"

namespace coatnet_fast_ext {
namespace {

using namespace cpu;

// NCHW: positions of a plane per work item.
constexpr int64_t kSegment = 1 << 14;
// NCHW: values of a two-pass chunk (and of a backward chunk, whose sums then go into double): 8 KiB
// of fp32, so that the second pass over it stays in L1.
constexpr int64_t kChunk = 1 << 11;
// channels_last: rows of a chunk, rows * C near kClChunkElements (64 KiB of fp32: the second pass
// reads it from L2) and at most kClChunkRows, which bounds how many values an fp32 lane sums
// before the chunk goes into double.
constexpr int64_t kClChunkElements = 1 << 14;
constexpr int64_t kClChunkRows = 256;
// channels_last: values (rows * C) per work item, in whole chunks.
constexpr int64_t kBlockElements = 1 << 16;

// x as [B, C, P] (P = H * W) in one of the two layouts, and its division into work items.
struct Layout {
  int64_t batch, channels, positions;
  bool channels_last;
  int64_t segments;    // NCHW: work items per plane
  int64_t rows;        // channels_last: B * P
  int64_t block_rows;  // channels_last: rows per work item
  int64_t chunk_rows;  // channels_last: rows per chunk
  int64_t items;

  // NCHW item i: plane i / segments (image * C + channel), positions [begin, begin + length).
  int64_t plane(int64_t i) const { return i / segments; }
  int64_t begin(int64_t i) const { return (i % segments) * kSegment; }
  int64_t length(int64_t i) const { return std::min(kSegment, positions - begin(i)); }
  // channels_last item k: rows [row_begin, row_end).
  int64_t row_begin(int64_t k) const { return k * block_rows; }
  int64_t row_end(int64_t k) const { return std::min(rows, (k + 1) * block_rows); }
  int64_t item_elements() const { return channels_last ? block_rows * channels : std::min(kSegment, positions); }
};

at::MemoryFormat memory_format(const Layout& l) {
  return l.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

Layout check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D [B, C, H, W] tensor; got shape ", x.sizes());
  check_floating(op, "x", x);
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, op, ": x must have H >= 1 and W >= 1; got shape ", x.sizes());
  Layout l;
  l.batch = x.size(0);
  l.channels = x.size(1);
  l.positions = x.size(2) * x.size(3);
  l.channels_last = is_channels_last(x);
  l.segments = (l.positions + kSegment - 1) / kSegment;
  l.rows = l.batch * l.positions;
  const int64_t c = std::max<int64_t>(1, l.channels);
  l.chunk_rows = std::min(kClChunkRows, std::max<int64_t>(1, kClChunkElements / c));
  // Whole chunks per block, so that every block but the last has the same chunking.
  l.block_rows = std::max<int64_t>(1, kBlockElements / c / l.chunk_rows) * l.chunk_rows;
  if (l.channels_last) {
    l.items = l.channels == 0 ? 0 : (l.rows + l.block_rows - 1) / l.block_rows;
  } else {
    l.items = l.batch * l.channels * l.segments;
  }
  return l;
}

// The per-image factor [B], rounded to x's dtype first as eager's y * branch_scale.to(y.dtype) is,
// then in acc precision.
at::Tensor image_scale(const char* op, const std::optional<at::Tensor>& branch_scale, const at::Tensor& x,
                       at::ScalarType acc) {
  if (!branch_scale.has_value() || !branch_scale->defined()) {
    return at::Tensor();
  }
  const at::Tensor& s = *branch_scale;
  TORCH_CHECK(s.dim() == 1 && s.size(0) == x.size(0), op, ": branch_scale must have shape [B] = [", x.size(0),
              "]; got ", s.sizes());
  check_floating(op, "branch_scale", s);
  return s.to(x.scalar_type()).to(acc).contiguous();
}

// ---- statistics -------------------------------------------------------------------------------

// Chan et al.'s update of (count, mean, M2) by another group's.
inline void merge_into(double& n, double& mean, double& m2, double nb, double mean_b, double m2_b) {
  if (nb == 0) return;
  if (n == 0) {
    n = nb;
    mean = mean_b;
    m2 = m2_b;
    return;
  }
  const double total = n + nb;
  const double delta = mean_b - mean;
  const double fb = nb / total;
  mean += delta * fb;
  m2 += m2_b + delta * delta * n * fb;
  n = total;
}

// Mean and M2 of n contiguous values (one NCHW item).
template <typename scalar_t>
void contiguous_moments(const scalar_t* x, int64_t n, double& out_mean, double& out_m2) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kV = V::size();
  double count = 0, mean = 0, m2 = 0;
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t len = std::min(kChunk, n - start);
    const scalar_t* p = x + start;
    V sum(0);
    for (int64_t i = 0; i < len; i += kV) {
      sum += load_acc<scalar_t, acc_t>(p + i, std::min(kV, len - i));  // tail lanes load as 0
    }
    const acc_t first = static_cast<acc_t>(lane_sum(sum) / len);
    const V mu(first);
    V dev_sum(0), dev_sq(0);
    for (int64_t i = 0; i < len; i += kV) {
      const int64_t count_i = std::min(kV, len - i);
      const V dev = first_lanes(load_acc<scalar_t, acc_t>(p + i, count_i) - mu, count_i);
      dev_sum += dev;
      dev_sq = at::vec::fmadd(dev, dev, dev_sq);
    }
    const double d = lane_sum(dev_sum);
    merge_into(count, mean, m2, static_cast<double>(len), static_cast<double>(first) + d / len,
               std::max(0.0, lane_sum(dev_sq) - d * d / len));
  }
  out_mean = mean;
  out_m2 = m2;
}

// Per-channel mean and M2 of rows [r0, r1) of a channels_last [rows, C] tensor (one item). Rows
// outermost, channel vectors within, so that x streams in memory order; the per-channel sums of a
// chunk live in `scratch` ([3, C], acc, L1) and each chunk is merged into the item per channel.
template <typename scalar_t>
void row_moments(const Layout& l, const scalar_t* x, int64_t r0, int64_t r1, std::vector<at::opmath_type<scalar_t>>& scratch,
                 double* mean, double* m2) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kV = V::size();
  const int64_t C = l.channels;
  scratch.resize(3 * C);
  acc_t* mu = scratch.data();
  acc_t* dev_sum = mu + C;
  acc_t* dev_sq = dev_sum + C;
  std::fill(mean, mean + C, 0.0);
  std::fill(m2, m2 + C, 0.0);
  double count = 0;
  for (int64_t start = r0; start < r1; start += l.chunk_rows) {
    const int64_t stop = std::min(r1, start + l.chunk_rows);
    const double len = static_cast<double>(stop - start);
    std::fill(scratch.begin(), scratch.end(), acc_t(0));
    for (int64_t r = start; r < stop; ++r) {
      const scalar_t* row = x + r * C;
      for (int64_t c = 0; c < C; c += kV) {
        const int64_t n = std::min(kV, C - c);
        (V::loadu(mu + c, n) + load_acc<scalar_t, acc_t>(row + c, n)).store(mu + c, n);
      }
    }
    const V inv_len(static_cast<acc_t>(1.0 / len));
    for (int64_t c = 0; c < C; c += kV) {
      const int64_t n = std::min(kV, C - c);
      (V::loadu(mu + c, n) * inv_len).store(mu + c, n);
    }
    for (int64_t r = start; r < stop; ++r) {
      const scalar_t* row = x + r * C;
      for (int64_t c = 0; c < C; c += kV) {
        const int64_t n = std::min(kV, C - c);
        const V dev = load_acc<scalar_t, acc_t>(row + c, n) - V::loadu(mu + c, n);
        (V::loadu(dev_sum + c, n) + dev).store(dev_sum + c, n);
        at::vec::fmadd(dev, dev, V::loadu(dev_sq + c, n)).store(dev_sq + c, n);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const double d = dev_sum[c];
      double n_c = count;  // every channel has seen the same rows
      merge_into(n_c, mean[c], m2[c], len, mu[c] + d / len, std::max(0.0, dev_sq[c] - d * d / len));
    }
    count += len;
  }
}

template <typename scalar_t>
void batch_stats(const Layout& l, const scalar_t* x, at::opmath_type<scalar_t>* mean_out,
                 at::opmath_type<scalar_t>* var_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = l.channels;
  const int64_t per_item = l.channels_last ? C : 1;
  std::vector<double> part_mean(l.items * per_item), part_m2(l.items * per_item);
  at::parallel_for(0, l.items, grain(l.item_elements()), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch;
    for (int64_t i = begin; i < end; ++i) {
      if (l.channels_last) {
        row_moments(l, x, l.row_begin(i), l.row_end(i), scratch, part_mean.data() + i * C, part_m2.data() + i * C);
      } else {
        contiguous_moments(x + l.plane(i) * l.positions + l.begin(i), l.length(i), part_mean[i], part_m2[i]);
      }
    }
  });
  const int64_t merges = l.channels_last ? l.items : l.batch * l.segments;  // per channel
  at::parallel_for(0, C, grain(merges), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double n = 0, mean = 0, m2 = 0;
      if (l.channels_last) {
        for (int64_t k = 0; k < l.items; ++k) {
          merge_into(n, mean, m2, static_cast<double>(l.row_end(k) - l.row_begin(k)), part_mean[k * C + c],
                     part_m2[k * C + c]);
        }
      } else {
        for (int64_t b = 0; b < l.batch; ++b) {
          for (int64_t s = 0; s < l.segments; ++s) {
            const int64_t i = (b * C + c) * l.segments + s;
            merge_into(n, mean, m2, static_cast<double>(l.length(i)), part_mean[i], part_m2[i]);
          }
        }
      }
      mean_out[c] = static_cast<acc_t>(mean);
      var_out[c] = static_cast<acc_t>(m2 / n);
    }
  });
}

// ---- forward ----------------------------------------------------------------------------------

// Writes residual + v to n elements of y, in y's dtype (the promoted dtype of x and the residual).
template <typename acc_t, typename out_t>
inline void store_out(out_t* y, const out_t* residual, Vectorized<acc_t> v, int64_t n) {
  if constexpr (std::is_same_v<at::opmath_type<out_t>, acc_t>) {
    if (residual != nullptr) v = v + load_acc<out_t, acc_t>(residual, n);
    store_acc(y, v, n);
  } else {
    // A float64 residual onto a lower-precision x: the add in float64, as eager's promotion does.
    acc_t lanes[Vectorized<acc_t>::size()];
    v.store(lanes);
    for (int64_t i = 0; i < n; ++i) {
      y[i] = static_cast<out_t>(lanes[i]) + (residual != nullptr ? residual[i] : out_t(0));
    }
  }
}

template <typename acc_t>
struct ApplyParams {
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* beta;
  const acc_t* branch_scale;  // [B] or null
  bool gelu;
};

template <typename acc_t>
inline Vectorized<acc_t> activate(const Vectorized<acc_t>& x, const Vectorized<acc_t>& mean,
                                  const Vectorized<acc_t>& scale, const Vectorized<acc_t>& beta,
                                  const Vectorized<acc_t>& s, bool gelu_on, bool scaled) {
  // Centred before scaling: folding the mean into a shift (x * scale + shift) cancels at large means.
  Vectorized<acc_t> u = at::vec::fmadd(x - mean, scale, beta);
  if (gelu_on) u = gelu(u);
  return scaled ? u * s : u;
}

template <typename scalar_t, typename out_t>
void apply(const Layout& l, const scalar_t* x, const ApplyParams<at::opmath_type<scalar_t>>& p,
           const out_t* residual, out_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kV = V::size();
  const int64_t C = l.channels;
  const bool scaled = p.branch_scale != nullptr;
  at::parallel_for(0, l.items, grain(l.item_elements()), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (l.channels_last) {
        for (int64_t r = l.row_begin(i); r < l.row_end(i); ++r) {
          const V s(scaled ? p.branch_scale[r / l.positions] : acc_t(1));
          const int64_t off = r * C;
          for (int64_t c = 0; c < C; c += kV) {
            const int64_t n = std::min(kV, C - c);
            const V v = activate(load_acc<scalar_t, acc_t>(x + off + c, n), V::loadu(p.mean + c, n),
                                 V::loadu(p.scale + c, n), V::loadu(p.beta + c, n), s, p.gelu, scaled);
            store_out(y + off + c, residual != nullptr ? residual + off + c : nullptr, v, n);
          }
        }
      } else {
        const int64_t plane = l.plane(i);
        const int64_t c = plane % C;
        const V mean(p.mean[c]), scale(p.scale[c]), beta(p.beta[c]);
        const V s(scaled ? p.branch_scale[plane / C] : acc_t(1));
        const int64_t off = plane * l.positions + l.begin(i);
        const int64_t len = l.length(i);
        for (int64_t j = 0; j < len; j += kV) {
          const int64_t n = std::min(kV, len - j);
          const V v = activate(load_acc<scalar_t, acc_t>(x + off + j, n), mean, scale, beta, s, p.gelu, scaled);
          store_out(y + off + j, residual != nullptr ? residual + off + j : nullptr, v, n);
        }
      }
    }
  });
}

// Calls f with a null out_t* for y's dtype: x's own, float32 or float64 (the promoted dtypes of x
// and a residual of any floating dtype the kernels take).
template <typename scalar_t, typename F>
void with_out_type(at::ScalarType out, F&& f) {
  if (out == c10::CppTypeToScalarType<scalar_t>::value) {
    f(static_cast<scalar_t*>(nullptr));
  } else if (out == at::kFloat) {
    f(static_cast<float*>(nullptr));
  } else if (out == at::kDouble) {
    f(static_cast<double*>(nullptr));
  } else {
    TORCH_CHECK(false, "batch_norm_act_apply: no kernel for x of dtype ", c10::CppTypeToScalarType<scalar_t>::value,
                " with an output of dtype ", out);
  }
}

// ---- backward ---------------------------------------------------------------------------------

template <typename acc_t>
struct BackwardParams {
  const acc_t* mean;
  const acc_t* rstd;
  const acc_t* gamma;
  const acc_t* beta;
  const acc_t* branch_scale;  // [B] or null
  bool gelu;
};

// du, the gradient at the BatchNorm output (through s[b] and GELU), and xhat; 0 in lanes past n.
template <typename acc_t>
inline void du_and_xhat(const Vectorized<acc_t>& x, const Vectorized<acc_t>& dy, const Vectorized<acc_t>& mean,
                        const Vectorized<acc_t>& rstd, const Vectorized<acc_t>& gamma,
                        const Vectorized<acc_t>& beta, const Vectorized<acc_t>& s, bool gelu_on, bool scaled,
                        int64_t n, Vectorized<acc_t>& du, Vectorized<acc_t>& xhat) {
  xhat = (x - mean) * rstd;
  du = scaled ? dy * s : dy;
  if (gelu_on) du = du * gelu_grad(at::vec::fmadd(xhat, gamma, beta));
  du = first_lanes(du, n);
  xhat = first_lanes(xhat, n);
}

// What one pass of the backward does. Training needs the channel totals of du and du * xhat
// before any dx: its first pass sums, its second writes dx. With GELU, du costs the most (GELU's
// derivative), so when x is already in acc precision the first pass parks du in dx and the second
// reads it back instead of recomputing it. Eval writes dx and sums in one pass.
enum class Pass { kSums, kSumsAndPark, kDx, kDxFromParked, kSumsAndDx };

// One pass over every item: the per-item sums of du and du * xhat into part_du / part_dux
// ([items] for NCHW, [items, C] for channels_last) and/or dx = k1 * du + k2 + k3 * xhat.
template <typename scalar_t>
void backward_pass(const Layout& l, Pass pass, const scalar_t* dy, const scalar_t* x,
                   const BackwardParams<at::opmath_type<scalar_t>>& p,
                   const BnGradCoefficients<at::opmath_type<scalar_t>>* k, scalar_t* dx, double* part_du,
                   double* part_dux) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kV = V::size();
  const int64_t C = l.channels;
  const bool sums = pass == Pass::kSums || pass == Pass::kSumsAndPark || pass == Pass::kSumsAndDx;
  const bool parked = pass == Pass::kDxFromParked;
  const bool park = pass == Pass::kSumsAndPark;
  const bool write_dx = pass == Pass::kDx || pass == Pass::kDxFromParked || pass == Pass::kSumsAndDx;
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    TORCH_CHECK(!park && !parked, "batch_norm_act_backward: du can be parked in dx only in acc precision");
  }
  const bool scaled = p.branch_scale != nullptr;

  // du and xhat at n elements from `off`, read back from dx when parked; then dx, or du parked.
  auto element = [&](int64_t off, int64_t n, const V& mean, const V& rstd, const V& gamma, const V& beta,
                     const V& s, const V& k1, const V& k2, const V& k3, V& du, V& xhat) {
    if (parked) {
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        du = V::loadu(dx + off, n);  // zero in lanes past n
        xhat = first_lanes((load_acc<scalar_t, acc_t>(x + off, n) - mean) * rstd, n);
      }
    } else {
      du_and_xhat(load_acc<scalar_t, acc_t>(x + off, n), load_acc<scalar_t, acc_t>(dy + off, n), mean, rstd, gamma,
                  beta, s, p.gelu, scaled, n, du, xhat);
    }
    if (park) {
      store_acc(dx + off, du, n);
    } else if (write_dx) {
      store_acc(dx + off, at::vec::fmadd(k3, xhat, at::vec::fmadd(k1, du, k2)), n);
    }
  };

  at::parallel_for(0, l.items, grain(3 * l.item_elements()), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> chunk_du(l.channels_last ? C : 0), chunk_dux(l.channels_last ? C : 0);
    for (int64_t i = begin; i < end; ++i) {
      if (l.channels_last) {
        double* item_du = sums ? part_du + i * C : nullptr;
        double* item_dux = sums ? part_dux + i * C : nullptr;
        if (sums) {
          std::fill(item_du, item_du + C, 0.0);
          std::fill(item_dux, item_dux + C, 0.0);
        }
        // Rows outermost, channel vectors within (x, dy and dx stream in memory order); the sums of
        // a chunk of rows gather in acc precision in `chunk_du` / `chunk_dux`, then go into double.
        for (int64_t start = l.row_begin(i); start < l.row_end(i); start += l.chunk_rows) {
          const int64_t stop = std::min(l.row_end(i), start + l.chunk_rows);
          if (sums) {
            std::fill(chunk_du.begin(), chunk_du.end(), acc_t(0));
            std::fill(chunk_dux.begin(), chunk_dux.end(), acc_t(0));
          }
          for (int64_t r = start; r < stop; ++r) {
            const V s(scaled ? p.branch_scale[r / l.positions] : acc_t(1));
            for (int64_t c = 0; c < C; c += kV) {
              const int64_t n = std::min(kV, C - c);
              V k1(0), k2(0), k3(0);
              if (write_dx) {
                k1 = V::loadu(k->k1.data() + c, n);
                k2 = V::loadu(k->k2.data() + c, n);
                k3 = V::loadu(k->k3.data() + c, n);
              }
              V du, xhat;
              element(r * C + c, n, V::loadu(p.mean + c, n), V::loadu(p.rstd + c, n), V::loadu(p.gamma + c, n),
                      V::loadu(p.beta + c, n), s, k1, k2, k3, du, xhat);
              if (sums) {
                (V::loadu(chunk_du.data() + c, n) + du).store(chunk_du.data() + c, n);
                at::vec::fmadd(du, xhat, V::loadu(chunk_dux.data() + c, n)).store(chunk_dux.data() + c, n);
              }
            }
          }
          if (sums) {
            for (int64_t c = 0; c < C; ++c) {
              item_du[c] += chunk_du[c];
              item_dux[c] += chunk_dux[c];
            }
          }
        }
      } else {
        const int64_t plane = l.plane(i);
        const int64_t c = plane % C;
        const V mean(p.mean[c]), rstd(p.rstd[c]), gamma(p.gamma[c]), beta(p.beta[c]);
        const V s(scaled ? p.branch_scale[plane / C] : acc_t(1));
        const V k1(write_dx ? k->k1[c] : acc_t(0)), k2(write_dx ? k->k2[c] : acc_t(0)),
            k3(write_dx ? k->k3[c] : acc_t(0));
        const int64_t off = plane * l.positions + l.begin(i);
        const int64_t len = l.length(i);
        double total_du = 0, total_dux = 0;
        for (int64_t start = 0; start < len; start += kChunk) {
          const int64_t stop = std::min(len, start + kChunk);
          V sum_du(0), sum_dux(0);
          for (int64_t j = start; j < stop; j += kV) {
            V du, xhat;
            element(off + j, std::min(kV, stop - j), mean, rstd, gamma, beta, s, k1, k2, k3, du, xhat);
            sum_du += du;
            sum_dux = at::vec::fmadd(du, xhat, sum_dux);
          }
          total_du += lane_sum(sum_du);
          total_dux += lane_sum(sum_dux);
        }
        if (sums) {
          part_du[i] = total_du;
          part_dux[i] = total_dux;
        }
      }
    }
  });
}

// Channel totals of the per-item sums, each merged in item order.
void sum_items(const Layout& l, const std::vector<double>& part, std::vector<double>& out) {
  if (l.channels_last) {  // [items, C]
    sum_parts(part, l.items, l.channels, out);
    return;
  }
  const int64_t C = l.channels;
  out.assign(C, 0.0);
  for (int64_t b = 0; b < l.batch; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t s = 0; s < l.segments; ++s) out[c] += part[(b * C + c) * l.segments + s];
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& x_in) {
  constexpr const char* op = "batch_norm_stats";
  const Layout l = check_x(op, x_in);
  TORCH_CHECK(l.rows > 0, op, ": batch statistics need at least one value per channel; got x of shape ",
              x_in.sizes());
  const at::ScalarType acc = acc_dtype(x_in.scalar_type());
  const at::Tensor x = x_in.contiguous(memory_format(l));
  at::Tensor mean = new_output(x, {l.channels}, acc);
  at::Tensor var = new_output(x, {l.channels}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    batch_stats(l, x.const_data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
  });
  return {mean, var};
}

at::Tensor batch_norm_act_apply_cpu(const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& scale,
                                    const at::Tensor& beta, bool gelu, const std::optional<at::Tensor>& residual,
                                    const std::optional<at::Tensor>& branch_scale) {
  constexpr const char* op = "batch_norm_act_apply";
  const Layout l = check_x(op, x_in);
  const at::ScalarType acc = acc_dtype(x_in.scalar_type());
  const at::Tensor x = x_in.contiguous(memory_format(l));
  const at::Tensor mean_acc = channel_param(op, "mean", mean, l.channels, acc);
  const at::Tensor scale_acc = channel_param(op, "scale", scale, l.channels, acc);
  const at::Tensor beta_acc = channel_param(op, "beta", beta, l.channels, acc);
  const at::Tensor s = image_scale(op, branch_scale, x, acc);
  at::ScalarType out_dtype = x.scalar_type();
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual must have x's shape ", x.sizes(), "; got ",
                residual->sizes());
    check_floating(op, "residual", *residual);
    out_dtype = at::promote_types(x.scalar_type(), residual->scalar_type());
    // In y's dtype and x's layout, so that the kernels walk x, the residual and y with one index.
    res = residual->to(out_dtype).contiguous(memory_format(l));
  }
  at::Tensor y = new_output(x, x.sizes(), out_dtype, memory_format(l));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ApplyParams<acc_t> params{mean_acc.const_data_ptr<acc_t>(), scale_acc.const_data_ptr<acc_t>(),
                                    beta_acc.const_data_ptr<acc_t>(),
                                    s.defined() ? s.const_data_ptr<acc_t>() : nullptr, gelu};
    with_out_type<scalar_t>(out_dtype, [&](auto* tag) {
      using out_t = std::remove_pointer_t<decltype(tag)>;
      apply<scalar_t, out_t>(l, x.const_data_ptr<scalar_t>(), params,
                             res.defined() ? res.const_data_ptr<out_t>() : nullptr, y.data_ptr<out_t>());
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const at::Tensor& mean, const at::Tensor& rstd, bool gelu, const std::optional<at::Tensor>& branch_scale,
    bool training) {
  constexpr const char* op = "batch_norm_act_backward";
  const Layout l = check_x(op, x_in);
  const at::ScalarType acc = acc_dtype(x_in.scalar_type());
  TORCH_CHECK(grad_y.sizes() == x_in.sizes(), op, ": grad_y must have x's shape ", x_in.sizes(), "; got ",
              grad_y.sizes());
  check_floating(op, "grad_y", grad_y);
  const at::Tensor x = x_in.contiguous(memory_format(l));
  // In x's dtype, as eager's promoting add hands the branch its gradient, and in x's layout.
  const at::Tensor dy = grad_y.to(x.scalar_type()).contiguous(memory_format(l));
  const at::Tensor gamma = channel_param(op, "bn_weight", bn_weight, l.channels, acc);
  const at::Tensor beta = channel_param(op, "bn_bias", bn_bias, l.channels, acc);
  const at::Tensor mean_acc = channel_param(op, "mean", mean, l.channels, acc);
  const at::Tensor rstd_acc = channel_param(op, "rstd", rstd, l.channels, acc);
  const at::Tensor s = image_scale(op, branch_scale, x, acc);
  at::Tensor dx = new_output(x, x.sizes(), x.scalar_type(), memory_format(l));
  const int64_t per_item = l.channels_last ? l.channels : 1;
  std::vector<double> part_du(l.items * per_item), part_dux(l.items * per_item), dbeta, dgamma;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardParams<acc_t> params{mean_acc.const_data_ptr<acc_t>(), rstd_acc.const_data_ptr<acc_t>(),
                                       gamma.const_data_ptr<acc_t>(), beta.const_data_ptr<acc_t>(),
                                       s.defined() ? s.const_data_ptr<acc_t>() : nullptr, gelu};
    const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    scalar_t* dx_ptr = dx.data_ptr<scalar_t>();
    if (training) {  // dx needs the channel totals of du and du * xhat first: two passes
      const bool park = gelu && std::is_same_v<scalar_t, acc_t>;
      backward_pass<scalar_t>(l, park ? Pass::kSumsAndPark : Pass::kSums, dy_ptr, x_ptr, params, nullptr, dx_ptr,
                              part_du.data(), part_dux.data());
      sum_items(l, part_du, dbeta);
      sum_items(l, part_dux, dgamma);
      const auto k = bn_grad_coefficients(params.gamma, params.rstd, dbeta, dgamma, l.channels, l.rows, true);
      backward_pass<scalar_t>(l, park ? Pass::kDxFromParked : Pass::kDx, dy_ptr, x_ptr, params, &k, dx_ptr, nullptr,
                              nullptr);
    } else {  // running statistics: dx = gamma * rstd * du, and the sums, in one pass
      const std::vector<double> unused;
      const auto k = bn_grad_coefficients(params.gamma, params.rstd, unused, unused, l.channels, l.rows, false);
      backward_pass<scalar_t>(l, Pass::kSumsAndDx, dy_ptr, x_ptr, params, &k, dx_ptr, part_du.data(),
                              part_dux.data());
      sum_items(l, part_du, dbeta);
      sum_items(l, part_dux, dgamma);
    }
  });
  return {dx, to_output(x, dgamma, {l.channels}, acc).to(bn_weight.scalar_type()),
          to_output(x, dbeta, {l.channels}, acc).to(bn_bias.scalar_type())};
}

}  // namespace coatnet_fast_ext
