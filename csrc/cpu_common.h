// What the CPU kernel files share: tensor checks, work-item grain, ATen-vector helpers in the
// accumulation type ("acc": double for float64 data, float otherwise), and the parts of
// BatchNorm's backward that do not depend on the op. Compiled into every CPU translation unit
// with the same flags (ext.cpu_flags), so the inline definitions agree.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"

namespace coatnet_fast_ext {
namespace cpu {

using at::vec::Vectorized;

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

inline bool is_channels_last(const at::Tensor& x) {
  // A tensor contiguous both ways (C == 1, or H == W == 1) counts as NCHW, as the Python side's
  // fake kernels decide the output format the same way.
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor; got device ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ",
              name, " must be float32, float64, float16 or bfloat16; got ", dtype);
}

// A [C] per-channel tensor as a contiguous acc-dtype one.
inline at::Tensor channel_param(const char* op, const char* name, const at::Tensor& t, int64_t channels,
                                at::ScalarType acc) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": ", name, " must have shape [C] = [", channels,
              "]; got ", t.sizes());
  check_floating(op, name, t);
  return t.to(acc).contiguous();
}

// Copies double results into an acc-dtype output tensor of the given shape.
inline at::Tensor to_output(const at::Tensor& like, const std::vector<double>& values, at::IntArrayRef shape,
                            at::ScalarType acc) {
  at::Tensor out = new_output(like, shape, acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "to_output", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    for (size_t i = 0; i < values.size(); ++i) dst[i] = static_cast<scalar_t>(values[i]);
  });
  return out;
}

// Elements of work per parallel_for item below which another thread costs more than it saves.
constexpr int64_t kGrainElements = 1 << 15;

inline int64_t grain(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

// ---- vector helpers --------------------------------------------------------------------------

// n lanes of p (n <= size), the rest zero, in acc precision.
template <typename scalar_t, typename acc_t>
inline Vectorized<acc_t> load_acc(const scalar_t* p, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<acc_t>::loadu(p, n);
  } else {
    if (n == Vectorized<acc_t>::size()) {
      Vectorized<acc_t> v;
      at::vec::load_to_float(p, v);
      return v;
    }
    acc_t lanes[Vectorized<acc_t>::size()] = {};
    for (int64_t i = 0; i < n; ++i) {
      lanes[i] = static_cast<acc_t>(p[i]);
    }
    return Vectorized<acc_t>::loadu(lanes);
  }
}

// Writes the first n lanes of v to p, rounding to scalar_t.
template <typename scalar_t, typename acc_t>
inline void store_acc(scalar_t* p, const Vectorized<acc_t>& v, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p, n);
  } else {
    acc_t lanes[Vectorized<acc_t>::size()];
    v.store(lanes);
    for (int64_t i = 0; i < n; ++i) {
      p[i] = static_cast<scalar_t>(lanes[i]);
    }
  }
}

// v with lanes n.. zeroed: tail lanes must not leak into sums (GELU of a zero conv is not zero).
template <typename acc_t>
inline Vectorized<acc_t> first_lanes(const Vectorized<acc_t>& v, int64_t n) {
  return n < Vectorized<acc_t>::size() ? Vectorized<acc_t>::set(Vectorized<acc_t>(0), v, n) : v;
}

// Sum of the lanes in a fixed order, in double.
template <typename acc_t>
inline double lane_sum(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  double sum = 0;
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) {
    sum += lanes[i];
  }
  return sum;
}

// erf in fp32 as the odd rational minimax fit on [-4, 4] that Eigen and XLA use (beyond it erf
// rounds to +-1): about 1e-7 absolute error like Vectorized<float>::erf, but a clamp, eleven FMAs
// and one division instead of a Sleef exp, which makes GELU the cheaper half of the forward.
// fp64 keeps Sleef's erf.
template <typename acc_t>
inline Vectorized<acc_t> vec_erf(const Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, float>) {
    using V = Vectorized<float>;
    const V x = at::vec::clamp(v, V(-4.f), V(4.f));
    const V x2 = x * x;
    V p = at::vec::fmadd(x2, V(-2.72614225801306e-10f), V(2.77068142495902e-08f));
    p = at::vec::fmadd(x2, p, V(-2.10102402082508e-06f));
    p = at::vec::fmadd(x2, p, V(-5.69250639462346e-05f));
    p = at::vec::fmadd(x2, p, V(-7.34990630326855e-04f));
    p = at::vec::fmadd(x2, p, V(-2.95459980854025e-03f));
    p = at::vec::fmadd(x2, p, V(-1.60960333262415e-02f));
    V q = at::vec::fmadd(x2, V(-1.45660718464996e-05f), V(-2.13374055278905e-04f));
    q = at::vec::fmadd(x2, q, V(-1.68282697438203e-03f));
    q = at::vec::fmadd(x2, q, V(-7.37332916720468e-03f));
    q = at::vec::fmadd(x2, q, V(-1.42647390514189e-02f));
    return x * p / q;
  } else {
    return v.erf();
  }
}

template <typename acc_t>
inline Vectorized<acc_t> gelu(const Vectorized<acc_t>& u) {
  using V = Vectorized<acc_t>;
  return u * V(acc_t(0.5)) * (V(acc_t(1)) + vec_erf(u * V(acc_t(kInvSqrt2))));
}

// d gelu / du = Phi(u) + u * phi(u).
template <typename acc_t>
inline Vectorized<acc_t> gelu_grad(const Vectorized<acc_t>& u) {
  using V = Vectorized<acc_t>;
  const V cdf = V(acc_t(0.5)) * (V(acc_t(1)) + vec_erf(u * V(acc_t(kInvSqrt2))));
  const V arg = u * u * V(acc_t(-0.5));
  // fp32: ATen's inline exp (20 ulp), not Sleef's out-of-line one, whose call spills every vector
  // register of the backward loops.
  V pdf;
  if constexpr (std::is_same_v<acc_t, float>) {
    pdf = arg.exp_u20() * V(acc_t(kInvSqrt2Pi));
  } else {
    pdf = arg.exp() * V(acc_t(kInvSqrt2Pi));
  }
  return at::vec::fmadd(u, pdf, cdf);
}

// ---- BatchNorm backward -----------------------------------------------------------------------

// Per channel, in double, the sums of [items, channels] partials, in item order: d(beta) and
// d(gamma) from their per-item parts.
inline void sum_parts(const std::vector<double>& parts, int64_t items, int64_t channels, std::vector<double>& out) {
  out.assign(channels, 0.0);
  for (int64_t i = 0; i < items; ++i) {
    for (int64_t c = 0; c < channels; ++c) {
      out[c] += parts[i * channels + c];
    }
  }
}

// The gradient at BatchNorm's input is k1 * g + k2 + k3 * xhat per channel, g the gradient at
// its output; the batch-statistics terms (k2, k3) only in training, where they need the channel
// totals d(beta) = sum g and d(gamma) = sum g * xhat over the `count` values of a channel.
template <typename acc_t>
struct BnGradCoefficients {
  std::vector<acc_t> k1, k2, k3;
};

template <typename acc_t>
BnGradCoefficients<acc_t> bn_grad_coefficients(const acc_t* gamma, const acc_t* rstd, const std::vector<double>& dbeta,
                                               const std::vector<double>& dgamma, int64_t channels, int64_t count,
                                               bool training) {
  BnGradCoefficients<acc_t> k{std::vector<acc_t>(channels), std::vector<acc_t>(channels, acc_t(0)),
                              std::vector<acc_t>(channels, acc_t(0))};
  for (int64_t c = 0; c < channels; ++c) {
    const double k1 = static_cast<double>(gamma[c]) * rstd[c];
    k.k1[c] = static_cast<acc_t>(k1);
    if (training) {
      k.k2[c] = static_cast<acc_t>(-k1 * dbeta[c] / count);
      k.k3[c] = static_cast<acc_t>(-k1 * dgamma[c] / count);
    }
  }
  return k;
}

}  // namespace cpu
}  // namespace coatnet_fast_ext
