// CPU kernels of dwconv_bn_gelu: 3x3 depthwise conv (padding 1, stride 1 or 2, no bias), a
// per-channel affine (the BatchNorm), exact GELU; the batch statistics; the backward.
//
// Two native layouts:
// - NCHW: one work item per (image, channel) plane. The plane is first copied into a zero-padded
//   buffer in acc precision, so that every tap of a run of outputs is a plain vector load over the
//   output width with no bounds checks (stride 2 stores each padded row's even columns before its
//   odd ones, which keeps those loads contiguous too). Reduced-precision inputs are converted once,
//   in that copy. The conv fills a compact [Ho, Wo] buffer in whole vectors, and everything after
//   it (affine, GELU, its gradient) runs over the plane as one contiguous run.
// - channels_last: one work item per output row, vectorised over the contiguous channels. The
//   bounds are resolved once per row, into a table of nine tap pointers per pixel in which taps in
//   the padding point at zeros.
// Every reduction is written per work item (plane, row or fixed block of rows) and merged
// afterwards in a fixed order, so results are deterministic whatever at::parallel_for's split.

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

// Upper bound on the channels_last weight-gradient partials ([blocks, 9, C]); bounds memory, and
// being a constant keeps the blocking (hence the summation order) independent of the thread count.
constexpr int64_t kMaxWeightGradBlocks = 16;

struct Geometry {
  int64_t batch, channels, height, width, out_h, out_w, stride;
  bool channels_last;
};

at::MemoryFormat memory_format(const Geometry& g) {
  return g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

Geometry check_geometry(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t stride) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D [B, C, H, W] tensor; got shape ", x.sizes());
  check_floating(op, "x", x);
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, op, ": x must have H >= 1 and W >= 1; got shape ", x.sizes());
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2; got ", stride);
  const int64_t channels = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == channels && weight.size(1) == 1 && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              op, ": weight must have shape [C, 1, 3, 3] = [", channels, ", 1, 3, 3]; got ", weight.sizes());
  check_floating(op, "weight", weight);
  Geometry g;
  g.batch = x.size(0);
  g.channels = channels;
  g.height = x.size(2);
  g.width = x.size(3);
  g.out_h = (g.height - 1) / stride + 1;
  g.out_w = (g.width - 1) / stride + 1;
  g.stride = stride;
  g.channels_last = is_channels_last(x);
  return g;
}

at::Tensor in_layout(const at::Tensor& t, const Geometry& g) {
  return t.contiguous(memory_format(g));
}

// The depthwise kernel as [C, 9] (NCHW: nine scalars per plane) or [9, C] (channels_last: one
// contiguous vector of channels per tap).
at::Tensor kernel_taps(const at::Tensor& weight, const Geometry& g, at::ScalarType acc) {
  at::Tensor w = weight.to(acc).reshape({g.channels, 9});
  return g.channels_last ? w.t().contiguous() : w.contiguous();
}

// ---- moments ----------------------------------------------------------------------------------

// Mean and sum of squared deviations of n contiguous values by the corrected two-pass algorithm:
// the deviations from a first-pass mean are small, so their sums stay accurate in fp32 even when
// |mean| >> std, and their sum corrects that first mean's rounding. Lanes sum at most kBlock
// values in acc precision before adding into double, which bounds the rounding of long planes.
template <typename acc_t>
void moments(const acc_t* z, int64_t n, double& mean, double& m2) {
  using V = Vectorized<acc_t>;
  constexpr int64_t kV = V::size();
  constexpr int64_t kBlock = 64 * kV;
  double total = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t stop = std::min(n, start + kBlock);
    V sum(0);
    for (int64_t i = start; i < stop; i += kV) {
      sum += V::loadu(z + i, std::min(kV, stop - i));
    }
    total += lane_sum(sum);
  }
  const V first(static_cast<acc_t>(total / n));
  double dev_total = 0;
  double sq_total = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t stop = std::min(n, start + kBlock);
    V dev_sum(0), dev_sq(0);
    for (int64_t i = start; i < stop; i += kV) {
      const int64_t count = std::min(kV, stop - i);
      const V dev = first_lanes(V::loadu(z + i, count) - first, count);
      dev_sum += dev;
      dev_sq = at::vec::fmadd(dev, dev, dev_sq);
    }
    dev_total += lane_sum(dev_sum);
    sq_total += lane_sum(dev_sq);
  }
  mean = static_cast<acc_t>(total / n) + dev_total / n;
  m2 = std::max(0.0, sq_total - dev_total * dev_total / n);
}

// Merges groups of `count` values each, given their means and M2s at stride `step`. For equal
// counts Chan et al.'s pairwise update reduces to: mean of the means, and the M2s plus the spread
// of the means.
void merge_moments(const double* mean, const double* m2, int64_t groups, int64_t step, int64_t count,
                   double& out_mean, double& out_m2) {
  double sum = 0;
  for (int64_t i = 0; i < groups; ++i) {
    sum += mean[i * step];
  }
  const double mu = sum / groups;
  double within = 0;
  double spread = 0;
  for (int64_t i = 0; i < groups; ++i) {
    within += m2[i * step];
    const double d = mean[i * step] - mu;
    spread += d * d;
  }
  out_mean = mu;
  out_m2 = within + count * spread;
}

// ---- NCHW helpers -----------------------------------------------------------------------------

// One zero-padded input plane in acc precision, laid out so that output column ow's tap kw of
// padded row r is at row(r) + offset[kw] + ow for every ow (see the file comment). A vector of
// slack at the end lets a row's last vector of taps load whole vectors: the lanes past the row
// read the next row (or the slack), and only feed outputs that are overwritten or dropped.
template <typename acc_t>
class PaddedPlane {
 public:
  PaddedPlane(int64_t height, int64_t width, int64_t stride)
      : height_(height),
        width_(width),
        stride_(stride),
        pitch_(width + 2),
        data_((height + 2) * (width + 2) + Vectorized<acc_t>::size(), acc_t(0)) {
    const int64_t evens = (width + 3) / 2;  // padded columns 0, 2, 4, ... stored first
    offset_[0] = 0;
    offset_[1] = stride == 1 ? 1 : evens;
    offset_[2] = stride == 1 ? 2 : 1;
    odd_start_ = evens;
  }

  // Overwrites the interior with src ([height, width]); the zero border is never written.
  template <typename scalar_t>
  void fill(const scalar_t* src) {
    for (int64_t ih = 0; ih < height_; ++ih) {
      const scalar_t* in = src + ih * width_;
      acc_t* out = data_.data() + (ih + 1) * pitch_;
      if (stride_ == 1) {
        std::transform(in, in + width_, out + 1, [](scalar_t v) { return static_cast<acc_t>(v); });
      } else {
        // Input column iw is padded column iw + 1: even input columns are the odd padded ones,
        // odd input columns the even ones after the border.
        int64_t iw = 0;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          using V = Vectorized<acc_t>;
          for (; iw + 2 * V::size() <= width_; iw += 2 * V::size()) {
            const auto [even, odd] = at::vec::deinterleave2(V::loadu(in + iw), V::loadu(in + iw + V::size()));
            even.store(out + odd_start_ + iw / 2);
            odd.store(out + 1 + iw / 2);
          }
        }
        for (; iw < width_; ++iw) {
          out[iw % 2 == 0 ? odd_start_ + iw / 2 : (iw + 1) / 2] = static_cast<acc_t>(in[iw]);
        }
      }
    }
  }

  // Pointers to the nine taps of output row oh (kernel index kh * 3 + kw).
  void taps(int64_t oh, const acc_t* out[9]) const {
    for (int kh = 0; kh < 3; ++kh) {
      const acc_t* row = data_.data() + (oh * stride_ + kh) * pitch_;
      for (int kw = 0; kw < 3; ++kw) {
        out[kh * 3 + kw] = row + offset_[kw];
      }
    }
  }

 private:
  int64_t height_, width_, stride_, pitch_, odd_start_;
  int64_t offset_[3];
  std::vector<acc_t> data_;
};

// The nine-tap conv of n lanes starting at element `at` of each tap. NCHW: taps are padded rows
// and lanes are output columns; channels_last: taps are pixels and lanes are channels.
template <typename T, typename acc_t>
inline Vectorized<acc_t> conv9(const T* const taps[9], const Vectorized<acc_t> w[9], int64_t at, int64_t n) {
  Vectorized<acc_t> z = load_acc<T, acc_t>(taps[0] + at, n) * w[0];
  for (int k = 1; k < 9; ++k) {
    z = at::vec::fmadd(load_acc<T, acc_t>(taps[k] + at, n), w[k], z);
  }
  return z;
}

template <typename acc_t>
void broadcast_kernel(const acc_t* w9, Vectorized<acc_t> out[9]) {
  for (int k = 0; k < 9; ++k) {
    out[k] = Vectorized<acc_t>(w9[k]);
  }
}

// ---- channels_last helpers --------------------------------------------------------------------

// channels_last loops run channel vectors outermost and pixels innermost: the nine kernel
// vectors (and the per-channel constants) stay in registers across a row, and neighbouring pixels
// re-read the same input lines from L1.

// The nine taps of every output pixel of row oh, as pointers into a channels_last image ([9] per
// pixel); taps in the padding point at a row of zeros, so every pixel runs the same nine
// multiply-adds with the same kernel vectors.
template <typename T>
void conv_row_taps(const Geometry& g, const T* image, const T* zeros, int64_t oh, std::vector<const T*>& taps) {
  taps.resize(g.out_w * 9);
  for (int64_t ow = 0; ow < g.out_w; ++ow) {
    for (int kh = 0; kh < 3; ++kh) {
      const int64_t ih = oh * g.stride + kh - 1;
      for (int kw = 0; kw < 3; ++kw) {
        const int64_t iw = ow * g.stride + kw - 1;
        const bool inside = ih >= 0 && ih < g.height && iw >= 0 && iw < g.width;
        taps[ow * 9 + kh * 3 + kw] = inside ? image + (ih * g.width + iw) * g.channels : zeros;
      }
    }
  }
}

// The transposed conv in gather form: for every input pixel of row ih, the output pixels of an
// [Ho, Wo, C] image that it fed and the kernel index of each. Only real taps are listed (one to
// four per pixel at stride 2), which would otherwise be mostly multiplies by zero.
template <typename T>
struct GatherTaps {
  std::vector<const T*> pixel;  // [W, 9]
  std::vector<int> kernel;      // [W, 9]
  std::vector<int> count;       // [W]
};

template <typename T>
void transposed_row_taps(const Geometry& g, const T* image, int64_t ih, GatherTaps<T>& taps) {
  taps.pixel.resize(g.width * 9);
  taps.kernel.resize(g.width * 9);
  taps.count.assign(g.width, 0);
  for (int64_t iw = 0; iw < g.width; ++iw) {
    for (int kh = 0; kh < 3; ++kh) {
      const int64_t r = ih + 1 - kh;
      if (r < 0 || r % g.stride != 0 || r / g.stride >= g.out_h) continue;
      for (int kw = 0; kw < 3; ++kw) {
        const int64_t q = iw + 1 - kw;
        if (q < 0 || q % g.stride != 0 || q / g.stride >= g.out_w) continue;
        const int64_t slot = iw * 9 + taps.count[iw]++;
        taps.pixel[slot] = image + ((r / g.stride) * g.out_w + q / g.stride) * g.channels;
        taps.kernel[slot] = kh * 3 + kw;
      }
    }
  }
}

// The kernel vectors of channels [c, c + n) from a [9, C] kernel.
template <typename acc_t>
void load_kernel(const acc_t* kernel, int64_t channels, int64_t c, int64_t n, Vectorized<acc_t> out[9]) {
  for (int k = 0; k < 9; ++k) {
    out[k] = Vectorized<acc_t>::loadu(kernel + k * channels + c, n);
  }
}

// ---- forward ----------------------------------------------------------------------------------

// The conv of a padded plane into z ([Ho, Wo] plus a vector of slack) in whole vectors: a row's
// last vector spills into the next row, which is written after it, or into the slack.
template <typename acc_t>
void conv_plane(const PaddedPlane<acc_t>& pad, const Vectorized<acc_t> w[9], int64_t out_h, int64_t out_w, acc_t* z) {
  constexpr int64_t kV = Vectorized<acc_t>::size();
  const acc_t* taps[9];
  for (int64_t oh = 0; oh < out_h; ++oh) {
    pad.taps(oh, taps);
    for (int64_t ow = 0; ow < out_w; ow += kV) {
      conv9(taps, w, ow, kV).store(z + oh * out_w + ow);
    }
  }
}

template <typename scalar_t>
void forward_nchw(const Geometry& g, const scalar_t* x, const at::opmath_type<scalar_t>* w9,
                  const at::opmath_type<scalar_t>* scale, const at::opmath_type<scalar_t>* shift, scalar_t* y,
                  at::opmath_type<scalar_t>* sums) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kV = V::size();
  const int64_t in_plane = g.height * g.width;
  const int64_t out_plane = g.out_h * g.out_w;
  at::parallel_for(0, g.batch * g.channels, grain(in_plane + out_plane), [&](int64_t begin, int64_t end) {
    PaddedPlane<acc_t> pad(g.height, g.width, g.stride);
    std::vector<acc_t> z(out_plane + kV);
    V w[9];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % g.channels;
      pad.fill(x + p * in_plane);
      broadcast_kernel(w9 + c * 9, w);
      conv_plane(pad, w, g.out_h, g.out_w, z.data());
      // The affine and GELU over the plane as one contiguous run: one partial vector per plane.
      const V a(scale[c]);
      const V b(shift[c]);
      V pooled(0);
      scalar_t* out = y + p * out_plane;
      for (int64_t i = 0; i < out_plane; i += kV) {
        const int64_t n = std::min(kV, out_plane - i);
        const V act = gelu(at::vec::fmadd(V::loadu(z.data() + i), a, b));
        store_acc(out + i, act, n);
        pooled += first_lanes(act, n);
      }
      if (sums != nullptr) {
        sums[p] = static_cast<acc_t>(lane_sum(pooled));
      }
    }
  });
}

template <typename scalar_t>
void forward_channels_last(const Geometry& g, const scalar_t* x, const at::opmath_type<scalar_t>* w_t,
                           const at::opmath_type<scalar_t>* scale, const at::opmath_type<scalar_t>* shift, scalar_t* y,
                           at::opmath_type<scalar_t>* sums) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kV = V::size();
  const int64_t C = g.channels;
  const int64_t rows = g.batch * g.out_h;
  const std::vector<scalar_t> zeros(C, scalar_t(0));
  // Per-row channel sums, added up per image afterwards in row order.
  std::vector<acc_t> row_sums(sums != nullptr ? rows * C : 0);
  at::parallel_for(0, rows, grain(g.out_w * C * 2), [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> taps;
    V w[9];
    for (int64_t r = begin; r < end; ++r) {
      conv_row_taps(g, x + (r / g.out_h) * g.height * g.width * C, zeros.data(), r % g.out_h, taps);
      scalar_t* out = y + r * g.out_w * C;
      for (int64_t c = 0; c < C; c += kV) {
        const int64_t n = std::min(kV, C - c);
        load_kernel(w_t, C, c, n, w);
        const V a = V::loadu(scale + c, n);
        const V b = V::loadu(shift + c, n);
        V pooled(0);
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          const V act = gelu(at::vec::fmadd(conv9(taps.data() + ow * 9, w, c, n), a, b));
          store_acc(out + ow * C + c, act, n);
          pooled += act;
        }
        if (sums != nullptr) pooled.store(row_sums.data() + r * C + c, n);
      }
    }
  });
  if (sums != nullptr) {
    at::parallel_for(0, g.batch * C, grain(g.out_h), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / C;
        const int64_t c = i % C;
        double sum = 0;
        for (int64_t oh = 0; oh < g.out_h; ++oh) {
          sum += row_sums[(b * g.out_h + oh) * C + c];
        }
        sums[i] = static_cast<acc_t>(sum);
      }
    });
  }
}

// ---- batch statistics -------------------------------------------------------------------------

// Per-work-item means and M2s (groups of `count` conv outputs each, [groups, C]) merged per channel.
template <typename acc_t>
void finish_stats(const std::vector<double>& part_mean, const std::vector<double>& part_m2, int64_t groups,
                  int64_t count, int64_t channels, acc_t* mean, acc_t* var) {
  at::parallel_for(0, channels, grain(groups), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double mu, m2;
      merge_moments(part_mean.data() + c, part_m2.data() + c, groups, channels, count, mu, m2);
      mean[c] = static_cast<acc_t>(mu);
      var[c] = static_cast<acc_t>(m2 / (groups * count));
    }
  });
}

template <typename scalar_t>
void stats_nchw(const Geometry& g, const scalar_t* x, const at::opmath_type<scalar_t>* w9,
                at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* var) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kV = V::size();
  const int64_t in_plane = g.height * g.width;
  const int64_t planes = g.batch * g.channels;
  std::vector<double> part_mean(planes), part_m2(planes);
  at::parallel_for(0, planes, grain(in_plane + g.out_h * g.out_w), [&](int64_t begin, int64_t end) {
    PaddedPlane<acc_t> pad(g.height, g.width, g.stride);
    std::vector<acc_t> z(g.out_h * g.out_w + kV);
    V w[9];
    for (int64_t p = begin; p < end; ++p) {
      pad.fill(x + p * in_plane);
      broadcast_kernel(w9 + (p % g.channels) * 9, w);
      conv_plane(pad, w, g.out_h, g.out_w, z.data());
      moments(z.data(), g.out_h * g.out_w, part_mean[p], part_m2[p]);
    }
  });
  finish_stats(part_mean, part_m2, g.batch, g.out_h * g.out_w, g.channels, mean, var);
}

template <typename scalar_t>
void stats_channels_last(const Geometry& g, const scalar_t* x, const at::opmath_type<scalar_t>* w_t,
                         at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* var) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kV = V::size();
  const int64_t C = g.channels;
  const int64_t rows = g.batch * g.out_h;
  const std::vector<scalar_t> zeros(C, scalar_t(0));
  std::vector<double> part_mean(rows * C), part_m2(rows * C);
  at::parallel_for(0, rows, grain(g.out_w * C * 2), [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> taps;
    std::vector<acc_t> z(g.out_w * kV);  // one channel vector of the row's outputs
    acc_t first[kV], dev_sum[kV], dev_sq[kV];
    V w[9];
    for (int64_t r = begin; r < end; ++r) {
      conv_row_taps(g, x + (r / g.out_h) * g.height * g.width * C, zeros.data(), r % g.out_h, taps);
      for (int64_t c = 0; c < C; c += kV) {
        const int64_t n = std::min(kV, C - c);
        load_kernel(w_t, C, c, n, w);
        // The corrected two-pass moments of `moments`, per channel over the row's Wo outputs.
        V sum(0);
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          const V zv = conv9(taps.data() + ow * 9, w, c, n);
          zv.store(z.data() + ow * kV);
          sum += zv;
        }
        const V mu = sum / V(acc_t(g.out_w));
        V ds(0), dq(0);
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          const V dev = V::loadu(z.data() + ow * kV) - mu;
          ds += dev;
          dq = at::vec::fmadd(dev, dev, dq);
        }
        mu.store(first);
        ds.store(dev_sum);
        dq.store(dev_sq);
        for (int64_t i = 0; i < n; ++i) {
          const double d = dev_sum[i];
          part_mean[r * C + c + i] = first[i] + d / g.out_w;
          part_m2[r * C + c + i] = std::max(0.0, dev_sq[i] - d * d / g.out_w);
        }
      }
    }
  });
  finish_stats(part_mean, part_m2, rows, g.out_w, C, mean, var);
}

// ---- backward ---------------------------------------------------------------------------------

// The per-channel inputs of the backward, in acc precision.
template <typename acc_t>
struct BackwardParams {
  const acc_t* kernel;  // [C, 9] (NCHW) or [9, C] (channels_last)
  const acc_t* gamma;
  const acc_t* beta;
  const acc_t* mean;
  const acc_t* rstd;
  const acc_t* grad_sums;  // [B, C] or null
};

// g (the gradient at the BatchNorm output u, through GELU) and xhat from the conv output z.
template <typename acc_t>
inline void grad_at_u(const Vectorized<acc_t>& z, const Vectorized<acc_t>& grad_y, const Vectorized<acc_t>& mean,
                      const Vectorized<acc_t>& rstd, const Vectorized<acc_t>& gamma, const Vectorized<acc_t>& beta,
                      int64_t n, Vectorized<acc_t>& g, Vectorized<acc_t>& xhat) {
  xhat = (z - mean) * rstd;
  g = first_lanes(grad_y * gelu_grad(at::vec::fmadd(xhat, gamma, beta)), n);
}

template <typename scalar_t>
void backward_nchw(const Geometry& g, const scalar_t* grad_y, const scalar_t* x,
                   const BackwardParams<at::opmath_type<scalar_t>>& p, bool training, scalar_t* dx,
                   std::vector<double>& dweight, std::vector<double>& dgamma, std::vector<double>& dbeta) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kV = V::size();
  const int64_t C = g.channels;
  const int64_t in_plane = g.height * g.width;
  const int64_t out_plane = g.out_h * g.out_w;
  const int64_t planes = g.batch * C;
  const int64_t item_grain = grain(2 * in_plane + 2 * out_plane);
  std::vector<double> part_g(planes), part_gx(planes), part_w(planes * 9);

  // The conv output of one plane, z ([Ho * Wo] plus slack), turned into g: its channel sums go to
  // the plane's partials, and with `k` set z is overwritten with dz.
  auto grad_plane = [&](int64_t plane, PaddedPlane<acc_t>& pad, acc_t* z, const BnGradCoefficients<acc_t>* k) {
    const int64_t c = plane % C;
    V w[9];
    broadcast_kernel(p.kernel + c * 9, w);
    pad.fill(x + plane * in_plane);
    conv_plane(pad, w, g.out_h, g.out_w, z);
    const V mean(p.mean[c]), rstd(p.rstd[c]), gamma(p.gamma[c]), beta(p.beta[c]);
    const V pool_grad(p.grad_sums != nullptr ? p.grad_sums[plane] : acc_t(0));
    const V k1(k != nullptr ? k->k1[c] : acc_t(0)), k2(k != nullptr ? k->k2[c] : acc_t(0)),
        k3(k != nullptr ? k->k3[c] : acc_t(0));
    const scalar_t* gy = grad_y + plane * out_plane;
    V sum_g(0), sum_gx(0);
    for (int64_t i = 0; i < out_plane; i += kV) {
      const int64_t n = std::min(kV, out_plane - i);
      V gu, xhat;
      grad_at_u(V::loadu(z + i), load_acc<scalar_t, acc_t>(gy + i, n) + pool_grad, mean, rstd, gamma, beta, n, gu,
                xhat);
      sum_g += gu;
      sum_gx = at::vec::fmadd(gu, xhat, sum_gx);
      if (k != nullptr) at::vec::fmadd(k3, xhat, at::vec::fmadd(k1, gu, k2)).store(z + i);
    }
    part_g[plane] = lane_sum(sum_g);
    part_gx[plane] = lane_sum(sum_gx);
  };

  if (training) {  // dz needs the channel totals of g and g * xhat first
    at::parallel_for(0, planes, item_grain, [&](int64_t begin, int64_t end) {
      PaddedPlane<acc_t> pad(g.height, g.width, g.stride);
      std::vector<acc_t> z(out_plane + kV);
      for (int64_t plane = begin; plane < end; ++plane) grad_plane(plane, pad, z.data(), nullptr);
    });
    sum_parts(part_g, g.batch, C, dbeta);
    sum_parts(part_gx, g.batch, C, dgamma);
  }
  const auto k = bn_grad_coefficients(p.gamma, p.rstd, dbeta, dgamma, C, g.batch * out_plane, training);
  at::parallel_for(0, planes, item_grain, [&](int64_t begin, int64_t end) {
    PaddedPlane<acc_t> pad(g.height, g.width, g.stride);
    std::vector<acc_t> dz(out_plane + kV);
    // dz again with a zero border of one (and slack), so that the transposed conv below reads
    // whole vectors with no bounds checks.
    const int64_t pitch = g.out_w + 2;
    std::vector<acc_t> dz_pad((g.out_h + 2) * pitch + 2 * kV, acc_t(0));
    std::vector<acc_t> row(g.width + kV), even((g.width + 1) / 2 + kV), odd(g.width / 2 + kV);
    const acc_t* taps[9];
    V w[9], dw[9];
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % C;
      grad_plane(plane, pad, dz.data(), &k);
      broadcast_kernel(p.kernel + c * 9, w);

      // dweight[k] = sum dz * (the input under tap k); the lanes past a row's end are zeroed.
      for (int i = 0; i < 9; ++i) dw[i] = V(0);
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        pad.taps(oh, taps);
        const acc_t* dz_row = dz.data() + oh * g.out_w;
        std::copy(dz_row, dz_row + g.out_w, dz_pad.data() + (oh + 1) * pitch + 1);
        for (int64_t ow = 0; ow < g.out_w; ow += kV) {
          const V dzv = first_lanes(V::loadu(dz_row + ow), g.out_w - ow);
          for (int i = 0; i < 9; ++i) dw[i] = at::vec::fmadd(dzv, V::loadu(taps[i] + ow), dw[i]);
        }
      }
      for (int i = 0; i < 9; ++i) part_w[plane * 9 + i] = lane_sum(dw[i]);

      scalar_t* out = dx + plane * in_plane;
      for (int64_t ih = 0; ih < g.height; ++ih) {
        scalar_t* dst = out + ih * g.width;
        if (g.stride == 1) {
          // dx[ih, iw] = sum w[kh, kw] * dz[ih + 1 - kh, iw + 1 - kw]: the padded dz convolved with
          // the flipped kernel, in whole vectors into a row buffer.
          for (int kh = 0; kh < 3; ++kh) {
            for (int kw = 0; kw < 3; ++kw) {
              taps[kh * 3 + kw] = dz_pad.data() + (ih + 2 - kh) * pitch + (2 - kw);
            }
          }
          for (int64_t iw = 0; iw < g.width; iw += kV) conv9(taps, w, iw, kV).store(row.data() + iw);
          std::transform(row.data(), row.data() + g.width, dst, [](acc_t v) { return static_cast<scalar_t>(v); });
        } else {
          // Stride 2: dz row r feeds input rows 2r - 1 + kh. Even input columns 2j get dz column j
          // (padded j + 1) through kw = 1; odd ones 2j + 1 get columns j + 1 (kw = 0) and j (kw = 2).
          // Two contiguous runs, then interleaved.
          const int64_t n_even = (g.width + 1) / 2;
          const int64_t n_odd = g.width / 2;
          std::fill(even.begin(), even.end(), acc_t(0));
          std::fill(odd.begin(), odd.end(), acc_t(0));
          for (int kh = 0; kh < 3; ++kh) {
            const int64_t r = ih + 1 - kh;
            if (r < 0 || r % 2 != 0) continue;
            const acc_t* src = dz_pad.data() + (r / 2 + 1) * pitch;  // the zero border row when r / 2 == Ho
            const V* wk = w + kh * 3;
            for (int64_t j = 0; j < n_even; j += kV) {
              at::vec::fmadd(wk[1], V::loadu(src + j + 1), V::loadu(even.data() + j)).store(even.data() + j);
            }
            for (int64_t j = 0; j < n_odd; j += kV) {
              const V sum = at::vec::fmadd(wk[0], V::loadu(src + j + 2), V::loadu(odd.data() + j));
              at::vec::fmadd(wk[2], V::loadu(src + j + 1), sum).store(odd.data() + j);
            }
          }
          int64_t j = 0;
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            for (; j + kV <= n_odd; j += kV) {
              const auto [first, second] = at::vec::interleave2(V::loadu(even.data() + j), V::loadu(odd.data() + j));
              first.store(dst + 2 * j);
              second.store(dst + 2 * j + kV);
            }
          }
          for (int64_t i = j; i < n_even; ++i) dst[2 * i] = static_cast<scalar_t>(even[i]);
          for (int64_t i = j; i < n_odd; ++i) dst[2 * i + 1] = static_cast<scalar_t>(odd[i]);
        }
      }
    }
  });
  if (!training) {
    sum_parts(part_g, g.batch, C, dbeta);
    sum_parts(part_gx, g.batch, C, dgamma);
  }
  sum_parts(part_w, g.batch, C * 9, dweight);
}

template <typename scalar_t>
void backward_channels_last(const Geometry& g, const scalar_t* grad_y, const scalar_t* x,
                            const BackwardParams<at::opmath_type<scalar_t>>& p, bool training, scalar_t* dx,
                            std::vector<double>& dweight, std::vector<double>& dgamma, std::vector<double>& dbeta) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t kV = V::size();
  const int64_t C = g.channels;
  const int64_t rows = g.batch * g.out_h;
  const int64_t in_image = g.height * g.width * C;
  const int64_t out_image = g.out_h * g.out_w * C;
  const int64_t row_grain = grain(3 * g.out_w * C);
  const std::vector<scalar_t> zeros(C, scalar_t(0));
  std::vector<double> part_g(rows * C), part_gx(rows * C);
  // dz, [B, Ho, Wo, C] in acc precision (in training, first g): the transposed conv gathers from it
  // across rows.
  at::Tensor dz_scratch = at::empty({rows * g.out_w * C}, at::TensorOptions().dtype<acc_t>());
  acc_t* dz = dz_scratch.data_ptr<acc_t>();
  // Weight-gradient partials per fixed block of rows, [blocks, 9, C].
  const int64_t block_rows = std::max<int64_t>(1, (rows + kMaxWeightGradBlocks - 1) / kMaxWeightGradBlocks);
  const int64_t blocks = rows == 0 ? 0 : (rows + block_rows - 1) / block_rows;
  std::vector<acc_t> part_w(blocks * 9 * C, acc_t(0));

  // What one row pass does with g. Training needs the channel totals of g before any dz: its
  // first pass sums g and parks it in the dz scratch, and its second reads it back (sparing GELU's
  // derivative) and turns it into dz in place. Eval sums and makes dz in one pass.
  enum class Pass { kSumAndPark, kDzFromParked, kSumAndDz };

  // One output row. The conv of a channel vector is done for the whole row first (z, [Wo, kV]),
  // so that the kernel and the BatchNorm constants are not all live at once. Passes that make dz
  // also add the row's weight-gradient terms to w_sum ([9, C]).
  auto row_pass = [&](int64_t r, Pass pass, std::vector<const scalar_t*>& taps, std::vector<acc_t>& z,
                      const BnGradCoefficients<acc_t>* k, acc_t* w_sum) {
    const int64_t b = r / g.out_h;
    const scalar_t* gy = grad_y + r * g.out_w * C;
    acc_t* dz_row = dz + r * g.out_w * C;
    const bool sums = pass != Pass::kDzFromParked;
    conv_row_taps(g, x + b * in_image, zeros.data(), r % g.out_h, taps);
    acc_t lanes[kV];
    V w[9];
    for (int64_t c = 0; c < C; c += kV) {
      const int64_t n = std::min(kV, C - c);
      load_kernel(p.kernel, C, c, n, w);
      for (int64_t ow = 0; ow < g.out_w; ++ow) conv9(taps.data() + ow * 9, w, c, n).store(z.data() + ow * kV);
      const V mean = V::loadu(p.mean + c, n), rstd = V::loadu(p.rstd + c, n);
      const V gamma = V::loadu(p.gamma + c, n), beta = V::loadu(p.beta + c, n);
      const V pool_grad = p.grad_sums != nullptr ? V::loadu(p.grad_sums + b * C + c, n) : V(0);
      // Masked loads: dz is zero in lanes past n.
      const V k1 = k != nullptr ? V::loadu(k->k1.data() + c, n) : V(0);
      const V k2 = k != nullptr ? V::loadu(k->k2.data() + c, n) : V(0);
      const V k3 = k != nullptr ? V::loadu(k->k3.data() + c, n) : V(0);
      V sum_g(0), sum_gx(0);
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        const V zv = V::loadu(z.data() + ow * kV);
        acc_t* dst = dz_row + ow * C + c;
        V gu, xhat;
        if (sums) {
          grad_at_u(zv, load_acc<scalar_t, acc_t>(gy + ow * C + c, n) + pool_grad, mean, rstd, gamma, beta, n, gu,
                    xhat);
          sum_g += gu;
          sum_gx = at::vec::fmadd(gu, xhat, sum_gx);
        } else {
          gu = V::loadu(dst, n);
          xhat = (zv - mean) * rstd;
        }
        if (pass == Pass::kSumAndPark) {
          gu.store(dst, n);
        } else {
          at::vec::fmadd(k3, xhat, at::vec::fmadd(k1, gu, k2)).store(dst, n);
        }
      }
      if (sums) {
        sum_g.store(lanes);
        for (int64_t i = 0; i < n; ++i) part_g[r * C + c + i] = lanes[i];
        sum_gx.store(lanes);
        for (int64_t i = 0; i < n; ++i) part_gx[r * C + c + i] = lanes[i];
      }
    }
    if (pass == Pass::kSumAndPark) return;
    V dw[9];
    for (int64_t c = 0; c < C; c += kV) {
      const int64_t n = std::min(kV, C - c);
      for (int i = 0; i < 9; ++i) dw[i] = V(0);
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        const scalar_t* const* t = taps.data() + ow * 9;
        const V dzv = V::loadu(dz_row + ow * C + c, n);
        for (int i = 0; i < 9; ++i) dw[i] = at::vec::fmadd(dzv, load_acc<scalar_t, acc_t>(t[i] + c, n), dw[i]);
      }
      for (int i = 0; i < 9; ++i) {
        acc_t* dst = w_sum + i * C + c;
        (V::loadu(dst, n) + dw[i]).store(dst, n);
      }
    }
  };

  if (training) {
    at::parallel_for(0, rows, row_grain, [&](int64_t begin, int64_t end) {
      std::vector<const scalar_t*> taps;
      std::vector<acc_t> z(g.out_w * kV);
      for (int64_t r = begin; r < end; ++r) row_pass(r, Pass::kSumAndPark, taps, z, nullptr, nullptr);
    });
    sum_parts(part_g, rows, C, dbeta);
    sum_parts(part_gx, rows, C, dgamma);
  }
  const auto k = bn_grad_coefficients(p.gamma, p.rstd, dbeta, dgamma, C, rows * g.out_w, training);
  const Pass dz_pass = training ? Pass::kDzFromParked : Pass::kSumAndDz;
  at::parallel_for(0, blocks, grain(3 * block_rows * g.out_w * C), [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> taps;
    std::vector<acc_t> z(g.out_w * kV);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t last = std::min(rows, (blk + 1) * block_rows);
      for (int64_t r = blk * block_rows; r < last; ++r) {
        row_pass(r, dz_pass, taps, z, &k, part_w.data() + blk * 9 * C);
      }
    }
  });
  if (!training) {
    sum_parts(part_g, rows, C, dbeta);
    sum_parts(part_gx, rows, C, dgamma);
  }
  // dweight is [C, 9].
  dweight.assign(C * 9, 0.0);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    for (int i = 0; i < 9; ++i) {
      for (int64_t c = 0; c < C; ++c) {
        dweight[c * 9 + i] += part_w[(blk * 9 + i) * C + c];
      }
    }
  }

  at::parallel_for(0, g.batch * g.height, grain(2 * g.width * C), [&](int64_t begin, int64_t end) {
    GatherTaps<acc_t> taps;
    V w[9];
    for (int64_t r = begin; r < end; ++r) {
      transposed_row_taps(g, dz + (r / g.height) * out_image, r % g.height, taps);
      scalar_t* out = dx + r * g.width * C;
      for (int64_t c = 0; c < C; c += kV) {
        const int64_t n = std::min(kV, C - c);
        load_kernel(p.kernel, C, c, n, w);
        for (int64_t iw = 0; iw < g.width; ++iw) {
          V sum(0);
          for (int j = 0; j < taps.count[iw]; ++j) {
            sum = at::vec::fmadd(V::loadu(taps.pixel[iw * 9 + j] + c, n), w[taps.kernel[iw * 9 + j]], sum);
          }
          store_acc(out + iw * C + c, sum, n);
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dwconv_bn_stats_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                       int64_t stride) {
  constexpr const char* op = "dwconv_bn_stats";
  const Geometry g = check_geometry(op, x_in, weight, stride);
  TORCH_CHECK(g.batch * g.out_h * g.out_w > 0, op,
              ": batch statistics need at least one conv output per channel; got x of shape ", x_in.sizes());
  const at::ScalarType acc = acc_dtype(x_in.scalar_type());
  const at::Tensor x = in_layout(x_in, g);
  const at::Tensor kernel = kernel_taps(weight, g, acc);
  at::Tensor mean = new_output(x, {g.channels}, acc);
  at::Tensor var = new_output(x, {g.channels}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (g.channels_last) {
      stats_channels_last(g, x.const_data_ptr<scalar_t>(), kernel.const_data_ptr<acc_t>(), mean.data_ptr<acc_t>(),
                          var.data_ptr<acc_t>());
    } else {
      stats_nchw(g, x.const_data_ptr<scalar_t>(), kernel.const_data_ptr<acc_t>(), mean.data_ptr<acc_t>(),
                 var.data_ptr<acc_t>());
    }
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> dwconv_bn_gelu_apply_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& scale,
                                                              const at::Tensor& shift, int64_t stride, bool pool) {
  constexpr const char* op = "dwconv_bn_gelu_apply";
  const Geometry g = check_geometry(op, x_in, weight, stride);
  const at::ScalarType acc = acc_dtype(x_in.scalar_type());
  const at::Tensor x = in_layout(x_in, g);
  const at::Tensor kernel = kernel_taps(weight, g, acc);
  // Without a scale the BatchNorm is already folded into the weights; a unit scale keeps one code path.
  const at::Tensor scale_acc = scale.has_value() ? channel_param(op, "scale", *scale, g.channels, acc)
                                                 : at::ones({g.channels}, x.options().dtype(acc));
  const at::Tensor shift_acc = channel_param(op, "shift", shift, g.channels, acc);
  at::Tensor y = new_output(x, {g.batch, g.channels, g.out_h, g.out_w}, x.scalar_type(), memory_format(g));
  at::Tensor sums = pool ? new_output(x, {g.batch, g.channels}, acc) : new_output(x, {0}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* sums_ptr = pool ? sums.data_ptr<acc_t>() : nullptr;
    if (g.channels_last) {
      forward_channels_last(g, x.const_data_ptr<scalar_t>(), kernel.const_data_ptr<acc_t>(),
                            scale_acc.const_data_ptr<acc_t>(), shift_acc.const_data_ptr<acc_t>(),
                            y.data_ptr<scalar_t>(), sums_ptr);
    } else {
      forward_nchw(g, x.const_data_ptr<scalar_t>(), kernel.const_data_ptr<acc_t>(), scale_acc.const_data_ptr<acc_t>(),
                   shift_acc.const_data_ptr<acc_t>(), y.data_ptr<scalar_t>(), sums_ptr);
    }
  });
  return {y, sums};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_gelu_backward_cpu(
    const at::Tensor& grad_y_in, const std::optional<at::Tensor>& grad_sums, const at::Tensor& x_in,
    const at::Tensor& weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t stride, bool training) {
  constexpr const char* op = "dwconv_bn_gelu_backward";
  const Geometry g = check_geometry(op, x_in, weight, stride);
  const at::ScalarType acc = acc_dtype(x_in.scalar_type());
  TORCH_CHECK(grad_y_in.dim() == 4 && grad_y_in.size(0) == g.batch && grad_y_in.size(1) == g.channels &&
                  grad_y_in.size(2) == g.out_h && grad_y_in.size(3) == g.out_w,
              op, ": grad_y must have the output's shape [B, C, Ho, Wo] = [", g.batch, ", ", g.channels, ", ", g.out_h,
              ", ", g.out_w, "]; got ", grad_y_in.sizes());
  check_floating(op, "grad_y", grad_y_in);
  at::Tensor grad_sums_acc;
  if (grad_sums.has_value()) {
    TORCH_CHECK(grad_sums->dim() == 2 && grad_sums->size(0) == g.batch && grad_sums->size(1) == g.channels, op,
                ": grad_sums must have shape [B, C] = [", g.batch, ", ", g.channels, "]; got ", grad_sums->sizes());
    check_floating(op, "grad_sums", *grad_sums);
    grad_sums_acc = grad_sums->to(acc).contiguous();
  }
  const at::Tensor x = in_layout(x_in, g);
  const at::Tensor grad_y = in_layout(grad_y_in.to(x.scalar_type()), g);
  const at::Tensor kernel = kernel_taps(weight, g, acc);
  const at::Tensor gamma = channel_param(op, "bn_weight", bn_weight, g.channels, acc);
  const at::Tensor beta = channel_param(op, "bn_bias", bn_bias, g.channels, acc);
  const at::Tensor mean_acc = channel_param(op, "mean", mean, g.channels, acc);
  const at::Tensor rstd_acc = channel_param(op, "rstd", rstd, g.channels, acc);
  at::Tensor dx = new_output(x, {g.batch, g.channels, g.height, g.width}, x.scalar_type(), memory_format(g));
  std::vector<double> dweight, dgamma, dbeta;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardParams<acc_t> params{kernel.const_data_ptr<acc_t>(), gamma.const_data_ptr<acc_t>(),
                                       beta.const_data_ptr<acc_t>(), mean_acc.const_data_ptr<acc_t>(),
                                       rstd_acc.const_data_ptr<acc_t>(),
                                       grad_sums_acc.defined() ? grad_sums_acc.const_data_ptr<acc_t>() : nullptr};
    if (g.channels_last) {
      backward_channels_last(g, grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), params, training,
                             dx.data_ptr<scalar_t>(), dweight, dgamma, dbeta);
    } else {
      backward_nchw(g, grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), params, training,
                    dx.data_ptr<scalar_t>(), dweight, dgamma, dbeta);
    }
  });
  return {dx, to_output(x, dweight, {g.channels, 1, 3, 3}, acc).to(weight.scalar_type()),
          to_output(x, dgamma, {g.channels}, acc).to(bn_weight.scalar_type()),
          to_output(x, dbeta, {g.channels}, acc).to(bn_bias.scalar_type())};
}

}  // namespace coatnet_fast_ext
