// CUDA kernels of dwconv_bn_gelu: 3x3 depthwise conv (padding 1, stride 1 or 2), then a
// per-channel affine, then the exact GELU; the batch statistics of the conv output; and the
// backward pass, which recomputes the conv from x instead of saving it.
//
// Per-plane kernels (stats, forward, the two backward reduction passes) give each block the
// output positions of one image and some channels, so that per-(image, channel) sums are
// block reductions in a fixed tree order:
//  * NCHW:          one channel per block, blockDim.x (a power of two <= 256) threads walk the
//                   positions of the plane, consecutive threads on consecutive columns.
//  * channels_last: 32 consecutive channels per block (threadIdx.x), 8 position lanes
//                   (threadIdx.y), so a warp reads 32 adjacent channels of one pixel.
// Per-channel totals over the batch are then summed over images in order by small kernels.
// Nothing uses atomics: every result is bit-identical run to run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_launch_common.cuh"
#include "cuda_launchers.h"

namespace coatnet_fast_cuda {
namespace {

struct ConvGeom {
  int64_t batch;
  int64_t channels;
  int height, width;  // input
  int out_h, out_w;   // output
  int stride;
};

// Element offset of (b, c, y, x) in a [batch, channels, rows, cols] tensor of either layout.
template <bool CL>
__device__ __forceinline__ int64_t offset4(int64_t b, int64_t c, int64_t y, int64_t x,
                                           int64_t channels, int64_t rows, int64_t cols) {
  return CL ? ((b * rows + y) * cols + x) * channels + c : ((b * channels + c) * rows + y) * cols + x;
}

// The 9 input values under output (oh, ow), kh * 3 + kw order, zero in the padding.
template <typename T, bool CL, typename A>
__device__ __forceinline__ void load_taps(const T* __restrict__ x, const ConvGeom& g, int64_t b,
                                          int64_t c, int oh, int ow, A (&taps)[9]) {
#pragma unroll
  for (int kh = 0; kh < 3; ++kh) {
    const int ih = oh * g.stride + kh - 1;
#pragma unroll
    for (int kw = 0; kw < 3; ++kw) {
      const int iw = ow * g.stride + kw - 1;
      const bool inside = ih >= 0 && ih < g.height && iw >= 0 && iw < g.width;
      taps[kh * 3 + kw] =
          inside ? Cvt<T>::load(x[offset4<CL>(b, c, ih, iw, g.channels, g.height, g.width)]) : A(0);
    }
  }
}

template <typename A>
__device__ __forceinline__ A conv9(const A (&taps)[9], const A (&w)[9]) {
  A z = A(0);
#pragma unroll
  for (int t = 0; t < 9; ++t) z += taps[t] * w[t];
  return z;
}

template <typename A>
__device__ __forceinline__ void load_weights(const A* __restrict__ weight, int64_t c, A (&w)[9]) {
#pragma unroll
  for (int t = 0; t < 9; ++t) w[t] = weight[c * 9 + t];
}

// ------------------------------------------------------------------------------------------
// Batch statistics, step 1: per (image, channel) Welford moments of z - shift[c], where
// shift[c] is z at the centre of image 0 (the same value in every block). Centring keeps the
// running means small, so a channel whose mean is large against its spread loses nothing.
// ------------------------------------------------------------------------------------------
template <typename T, bool CL>
__global__ void __launch_bounds__(kMaxThreads)
    dw_stats_partial_kernel(const T* __restrict__ x, const typename Cvt<T>::acc* __restrict__ weight,
                            ConvGeom g, typename Cvt<T>::acc* __restrict__ part_mean,
                            typename Cvt<T>::acc* __restrict__ part_m2,
                            typename Cvt<T>::acc* __restrict__ shift_out) {
  using A = typename Cvt<T>::acc;
  const ChannelWork w = channel_work<CL>(g.channels);
  const int plane = g.out_h * g.out_w;

  int n = 0;
  A mean = A(0), m2 = A(0), shift = A(0);
  if (w.active) {
    A wt[9], taps[9];
    load_weights(weight, w.c, wt);
    load_taps<T, CL>(x, g, 0, w.c, g.out_h / 2, g.out_w / 2, taps);
    shift = conv9(taps, wt);
    for (int p = w.lane_p; p < plane; p += w.num_p) {
      load_taps<T, CL>(x, g, w.b, w.c, p / g.out_w, p % g.out_w, taps);
      welford_add(n, mean, m2, conv9(taps, wt) - shift);
    }
  }

  block_merge_moments(n, mean, m2, w);
  if (w.active && w.lane_p == 0) {
    part_mean[w.b * g.channels + w.c] = mean;
    part_m2[w.b * g.channels + w.c] = m2;
    if (w.b == 0) shift_out[w.c] = shift;
  }
}

// Batch statistics, step 2: moments_final_kernel (cuda_launch_common.cuh), with one split per
// image (see plane_split).

// ------------------------------------------------------------------------------------------
// Forward: y = gelu(z * scale[c] + shift[c]) (scale == nullptr: 1), and, when sums is given,
// sums[b][c] = sum over the plane of y in acc precision.
// ------------------------------------------------------------------------------------------
template <typename T, bool CL>
__global__ void __launch_bounds__(kMaxThreads)
    dw_forward_kernel(const T* __restrict__ x, const typename Cvt<T>::acc* __restrict__ weight,
                      const typename Cvt<T>::acc* __restrict__ scale,
                      const typename Cvt<T>::acc* __restrict__ shift, T* __restrict__ y,
                      typename Cvt<T>::acc* __restrict__ sums, ConvGeom g) {
  using A = typename Cvt<T>::acc;
  __shared__ A buf[kMaxThreads];
  const ChannelWork w = channel_work<CL>(g.channels);
  const int plane = g.out_h * g.out_w;

  A local = A(0);
  if (w.active) {
    A wt[9], taps[9];
    load_weights(weight, w.c, wt);
    const A sc = scale != nullptr ? scale[w.c] : A(1);
    const A sh = shift[w.c];
    for (int p = w.lane_p; p < plane; p += w.num_p) {
      const int oh = p / g.out_w, ow = p % g.out_w;
      load_taps<T, CL>(x, g, w.b, w.c, oh, ow, taps);
      const A out = gelu(conv9(taps, wt) * sc + sh);
      y[offset4<CL>(w.b, w.c, oh, ow, g.channels, g.out_h, g.out_w)] = Cvt<T>::store(out);
      local += out;
    }
  }
  if (sums != nullptr) {  // uniform over the block, so the barriers inside are safe
    const A total = block_sum(local, buf, w);
    if (w.active && w.lane_p == 0) sums[w.b * g.channels + w.c] = total;
  }
}

// ------------------------------------------------------------------------------------------
// Backward.
// ------------------------------------------------------------------------------------------
template <typename A>
struct BnChannel {
  A wt[9];
  A gamma, beta, mean, rstd;
  A grad_sum;  // grad_sums[b][c], 0 without pooling
};

template <typename A>
__device__ __forceinline__ BnChannel<A> load_bn_channel(const A* weight, const A* gamma,
                                                        const A* beta, const A* mean,
                                                        const A* rstd, const A* grad_sums,
                                                        const ChannelWork& w, int64_t channels) {
  BnChannel<A> ch;
  load_weights(weight, w.c, ch.wt);
  ch.gamma = gamma[w.c];
  ch.beta = beta[w.c];
  ch.mean = mean[w.c];
  ch.rstd = rstd[w.c];
  ch.grad_sum = grad_sums != nullptr ? grad_sums[w.b * channels + w.c] : A(0);
  return ch;
}

// g = dL/du at output (oh, ow) and xhat there; also leaves the conv taps in `taps`.
template <typename T, bool CL, typename A>
__device__ __forceinline__ void grad_at(const T* __restrict__ x, const T* __restrict__ grad_y,
                                        const ConvGeom& g, const BnChannel<A>& ch,
                                        const ChannelWork& w, int oh, int ow, A (&taps)[9],
                                        A& grad_u, A& xhat) {
  load_taps<T, CL>(x, g, w.b, w.c, oh, ow, taps);
  xhat = (conv9(taps, ch.wt) - ch.mean) * ch.rstd;
  const A u = xhat * ch.gamma + ch.beta;
  const A gy =
      Cvt<T>::load(grad_y[offset4<CL>(w.b, w.c, oh, ow, g.channels, g.out_h, g.out_w)]) + ch.grad_sum;
  grad_u = gy * gelu_grad(u);
}

// Pass 1: part[b][0][c] = sum g, part[b][1][c] = sum g * xhat over the plane.
template <typename T, bool CL>
__global__ void __launch_bounds__(kMaxThreads)
    dw_backward_bn_kernel(const T* __restrict__ grad_y,
                          const typename Cvt<T>::acc* __restrict__ grad_sums,
                          const T* __restrict__ x, const typename Cvt<T>::acc* __restrict__ weight,
                          const typename Cvt<T>::acc* __restrict__ gamma,
                          const typename Cvt<T>::acc* __restrict__ beta,
                          const typename Cvt<T>::acc* __restrict__ mean,
                          const typename Cvt<T>::acc* __restrict__ rstd, ConvGeom g,
                          typename Cvt<T>::acc* __restrict__ part) {
  using A = typename Cvt<T>::acc;
  __shared__ A buf[kMaxThreads];
  const ChannelWork w = channel_work<CL>(g.channels);
  const int plane = g.out_h * g.out_w;

  A sum_g = A(0), sum_gx = A(0);
  if (w.active) {
    const BnChannel<A> ch = load_bn_channel(weight, gamma, beta, mean, rstd, grad_sums, w, g.channels);
    A taps[9];
    for (int p = w.lane_p; p < plane; p += w.num_p) {
      A gu, xhat;
      grad_at<T, CL>(x, grad_y, g, ch, w, p / g.out_w, p % g.out_w, taps, gu, xhat);
      sum_g += gu;
      sum_gx += gu * xhat;
    }
  }
  const A total_g = block_sum(sum_g, buf, w);
  const A total_gx = block_sum(sum_gx, buf, w);
  if (w.active && w.lane_p == 0) {
    part[(w.b * 2 + 0) * g.channels + w.c] = total_g;
    part[(w.b * 2 + 1) * g.channels + w.c] = total_gx;
  }
}

// Pass 2: dz into dz_ws (laid out like the output), and the per-image weight gradient
// part_w[b][c][tap] = sum over the plane of dz * tap.
template <typename T, bool CL>
__global__ void __launch_bounds__(kMaxThreads)
    dw_backward_dz_kernel(const T* __restrict__ grad_y,
                          const typename Cvt<T>::acc* __restrict__ grad_sums,
                          const T* __restrict__ x, const typename Cvt<T>::acc* __restrict__ weight,
                          const typename Cvt<T>::acc* __restrict__ gamma,
                          const typename Cvt<T>::acc* __restrict__ beta,
                          const typename Cvt<T>::acc* __restrict__ mean,
                          const typename Cvt<T>::acc* __restrict__ rstd,
                          const typename Cvt<T>::acc* __restrict__ dgamma,
                          const typename Cvt<T>::acc* __restrict__ dbeta, ConvGeom g,
                          bool training, typename Cvt<T>::acc* __restrict__ dz_ws,
                          typename Cvt<T>::acc* __restrict__ part_w) {
  using A = typename Cvt<T>::acc;
  __shared__ A buf[kMaxThreads];
  const ChannelWork w = channel_work<CL>(g.channels);
  const int plane = g.out_h * g.out_w;

  A sum_w[9];
#pragma unroll
  for (int t = 0; t < 9; ++t) sum_w[t] = A(0);
  if (w.active) {
    const BnChannel<A> ch = load_bn_channel(weight, gamma, beta, mean, rstd, grad_sums, w, g.channels);
    const A coef = ch.gamma * ch.rstd;
    // In training the batch statistics depend on z too: subtract the mean of g and the
    // projection of g on xhat (both over the M = batch * plane outputs of the channel).
    const A count = A(g.batch) * A(plane);
    const A mean_g = training ? dbeta[w.c] / count : A(0);
    const A mean_gx = training ? dgamma[w.c] / count : A(0);
    A taps[9];
    for (int p = w.lane_p; p < plane; p += w.num_p) {
      const int oh = p / g.out_w, ow = p % g.out_w;
      A gu, xhat;
      grad_at<T, CL>(x, grad_y, g, ch, w, oh, ow, taps, gu, xhat);
      const A dz = coef * (gu - mean_g - xhat * mean_gx);
      dz_ws[offset4<CL>(w.b, w.c, oh, ow, g.channels, g.out_h, g.out_w)] = dz;
#pragma unroll
      for (int t = 0; t < 9; ++t) sum_w[t] += dz * taps[t];
    }
  }
#pragma unroll
  for (int t = 0; t < 9; ++t) {
    const A total = block_sum(sum_w[t], buf, w);
    if (w.active && w.lane_p == 0) part_w[(w.b * g.channels + w.c) * 9 + t] = total;
  }
}

// dx = transposed depthwise conv of dz: input (ih, iw) gathers the outputs (oh, ow) with
// oh * stride + kh - 1 = ih and ow * stride + kw - 1 = iw. One thread per input element, in
// memory order of the layout, so the linear index is also dx's offset.
template <typename T, bool CL>
__global__ void __launch_bounds__(kMaxThreads)
    dw_backward_dx_kernel(const typename Cvt<T>::acc* __restrict__ dz_ws,
                          const typename Cvt<T>::acc* __restrict__ weight, ConvGeom g,
                          T* __restrict__ dx) {
  using A = typename Cvt<T>::acc;
  const int64_t total = g.batch * g.channels * g.height * g.width;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t b, c, rest;
    int ih, iw;
    if (CL) {
      c = idx % g.channels;
      rest = idx / g.channels;
      iw = static_cast<int>(rest % g.width);
      rest /= g.width;
      ih = static_cast<int>(rest % g.height);
      b = rest / g.height;
    } else {
      iw = static_cast<int>(idx % g.width);
      rest = idx / g.width;
      ih = static_cast<int>(rest % g.height);
      rest /= g.height;
      c = rest % g.channels;
      b = rest / g.channels;
    }
    A sum = A(0);
#pragma unroll
    for (int kh = 0; kh < 3; ++kh) {
      const int th = ih + 1 - kh;
      if (th < 0 || th % g.stride != 0) continue;
      const int oh = th / g.stride;
      if (oh >= g.out_h) continue;
#pragma unroll
      for (int kw = 0; kw < 3; ++kw) {
        const int tw = iw + 1 - kw;
        if (tw < 0 || tw % g.stride != 0) continue;
        const int ow = tw / g.stride;
        if (ow >= g.out_w) continue;
        sum += dz_ws[offset4<CL>(b, c, oh, ow, g.channels, g.out_h, g.out_w)] * weight[c * 9 + kh * 3 + kw];
      }
    }
    dx[idx] = Cvt<T>::store(sum);
  }
}

// ------------------------------------------------------------------------------------------
// Host side (the helpers both BatchNorm files use are in cuda_launch_common.cuh).
// ------------------------------------------------------------------------------------------
int64_t out_size(int64_t in, int64_t stride) { return (in - 1) / stride + 1; }

// Shapes the kernels index with int positions and int64 offsets.
bool valid_geometry(int64_t batch, int64_t channels, int64_t height, int64_t width,
                    int64_t stride) {
  return batch >= 0 && channels >= 0 && height >= 1 && width >= 1 && (stride == 1 || stride == 2) &&
         height <= INT_MAX / 4 && width <= INT_MAX / 4 && height * width <= INT_MAX / 4;
}

ConvGeom make_geom(int64_t batch, int64_t channels, int64_t height, int64_t width,
                   int64_t stride) {
  ConvGeom g;
  g.batch = batch;
  g.channels = channels;
  g.height = static_cast<int>(height);
  g.width = static_cast<int>(width);
  g.out_h = static_cast<int>(out_size(height, stride));
  g.out_w = static_cast<int>(out_size(width, stride));
  g.stride = static_cast<int>(stride);
  return g;
}

// The conv outputs as [batch, channels, out_h * out_w], one split per image: the per-plane
// kernels reduce a whole output plane per block.
SplitGeom plane_split(const ConvGeom& g) {
  const int64_t plane = static_cast<int64_t>(g.out_h) * g.out_w;
  return {g.batch, g.channels, plane, plane, 1};
}

// Launch shape of the per-plane kernels (see ChannelWork).
ChannelLaunch plane_launch(const ConvGeom& g, bool channels_last) {
  const SplitGeom s = plane_split(g);
  return channel_launch(s.batch, s.channels, s.split, s.splits, channels_last);
}

}  // namespace

size_t dwconv_bn_stats_workspace_bytes(DType dtype, int64_t batch, int64_t channels) {
  if (batch < 0 || channels <= 0) return 0;
  return moments_workspace_bytes(dtype, batch, channels);
}

cudaError_t dwconv_bn_stats_launch(
    DType dtype, const void* x, const void* weight, void* mean, void* var, void* workspace,
    size_t workspace_bytes, int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t stride, bool channels_last, cudaStream_t stream) {
  if (!valid_geometry(batch, channels, height, width, stride)) return cudaErrorInvalidValue;
  if (workspace_bytes < dwconv_bn_stats_workspace_bytes(dtype, batch, channels))
    return cudaErrorInvalidValue;
  if (channels == 0) return cudaSuccess;
  const ConvGeom g = make_geom(batch, channels, height, width, stride);
  const ChannelLaunch pl = plane_launch(g, channels_last);
  if (!pl.ok) return cudaErrorInvalidConfiguration;

  return dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    using A = typename Cvt<T>::acc;
    const MomentsWorkspace<A> ws = moments_workspace<A>(workspace, batch, channels);
    if (batch > 0) {
      const cudaError_t err = with_layout(channels_last, [&](auto cl) -> cudaError_t {
        dw_stats_partial_kernel<T, decltype(cl)::value><<<pl.grid, pl.block, 0, stream>>>(
            static_cast<const T*>(x), static_cast<const A*>(weight), g, ws.part_mean, ws.part_m2,
            ws.shift);
        return cudaGetLastError();
      });
      if (err != cudaSuccess) return err;
    }
    return launch_moments_final(ws, plane_split(g), mean, var, stream);
  });
}

cudaError_t dwconv_bn_gelu_forward_launch(
    DType dtype, const void* x, const void* weight, const void* scale, const void* shift,
    void* y, void* sums, int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t stride, bool channels_last, cudaStream_t stream) {
  if (!valid_geometry(batch, channels, height, width, stride)) return cudaErrorInvalidValue;
  if (batch == 0 || channels == 0) return cudaSuccess;
  const ConvGeom g = make_geom(batch, channels, height, width, stride);
  const ChannelLaunch pl = plane_launch(g, channels_last);
  if (!pl.ok) return cudaErrorInvalidConfiguration;

  return dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    using A = typename Cvt<T>::acc;
    return with_layout(channels_last, [&](auto cl) -> cudaError_t {
      dw_forward_kernel<T, decltype(cl)::value><<<pl.grid, pl.block, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const A*>(weight), static_cast<const A*>(scale),
          static_cast<const A*>(shift), static_cast<T*>(y), static_cast<A*>(sums), g);
      return cudaGetLastError();
    });
  });
}

size_t dwconv_bn_gelu_backward_workspace_bytes(
    DType dtype, int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t stride) {
  if (batch <= 0 || channels <= 0 || height <= 0 || width <= 0 || stride <= 0) return 0;
  const int64_t outputs = batch * channels * out_size(height, stride) * out_size(width, stride);
  const size_t a = acc_size(dtype);
  return align_up(a * static_cast<size_t>(outputs)) +
         align_up(a * static_cast<size_t>(batch * channels * 2)) +
         a * static_cast<size_t>(batch * channels * 9);
}

cudaError_t dwconv_bn_gelu_backward_launch(
    DType dtype, const void* grad_y, const void* grad_sums, const void* x, const void* weight,
    const void* bn_weight, const void* bn_bias, const void* mean, const void* rstd, void* dx,
    void* dweight, void* dgamma, void* dbeta, void* workspace, size_t workspace_bytes,
    int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t stride,
    bool training, bool channels_last, cudaStream_t stream) {
  if (!valid_geometry(batch, channels, height, width, stride)) return cudaErrorInvalidValue;
  if (workspace_bytes <
      dwconv_bn_gelu_backward_workspace_bytes(dtype, batch, channels, height, width, stride))
    return cudaErrorInvalidValue;
  if (channels == 0) return cudaSuccess;
  const ConvGeom g = make_geom(batch, channels, height, width, stride);
  const ChannelLaunch pl = plane_launch(g, channels_last);
  if (!pl.ok) return cudaErrorInvalidConfiguration;

  return dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    using A = typename Cvt<T>::acc;
    // Same layout as dwconv_bn_gelu_backward_workspace_bytes.
    const int64_t outputs = batch * channels * g.out_h * g.out_w;
    unsigned char* ws = static_cast<unsigned char*>(workspace);
    A* dz_ws = reinterpret_cast<A*>(ws);
    ws += align_up(sizeof(A) * static_cast<size_t>(outputs));
    A* part_bn = reinterpret_cast<A*>(ws);
    ws += align_up(sizeof(A) * static_cast<size_t>(batch * channels * 2));
    A* part_w = reinterpret_cast<A*>(ws);

    const T* gy = static_cast<const T*>(grad_y);
    const A* gs = static_cast<const A*>(grad_sums);
    const T* xx = static_cast<const T*>(x);
    const A* wt = static_cast<const A*>(weight);
    const A* gamma = static_cast<const A*>(bn_weight);
    const A* beta = static_cast<const A*>(bn_bias);
    const A* mu = static_cast<const A*>(mean);
    const A* rs = static_cast<const A*>(rstd);
    A* dg = static_cast<A*>(dgamma);
    A* db = static_cast<A*>(dbeta);
    A* dw = static_cast<A*>(dweight);
    cudaError_t err;

    if (batch > 0) {
      err = with_layout(channels_last, [&](auto cl) -> cudaError_t {
        dw_backward_bn_kernel<T, decltype(cl)::value><<<pl.grid, pl.block, 0, stream>>>(
            gy, gs, xx, wt, gamma, beta, mu, rs, g, part_bn);
        return cudaGetLastError();
      });
      if (err != cudaSuccess) return err;
    }
    // With an empty batch these write the zero gradients.
    if ((err = launch_bn_param_grads(part_bn, batch, channels, db, dg, stream)) != cudaSuccess) return err;

    if (batch > 0) {
      err = with_layout(channels_last, [&](auto cl) -> cudaError_t {
        constexpr bool CL = decltype(cl)::value;
        dw_backward_dz_kernel<T, CL><<<pl.grid, pl.block, 0, stream>>>(
            gy, gs, xx, wt, gamma, beta, mu, rs, dg, db, g, training, dz_ws, part_w);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) return e;
        const int64_t inputs = batch * channels * height * width;
        dw_backward_dx_kernel<T, CL><<<grid_stride_blocks(inputs), kMaxThreads, 0, stream>>>(
            dz_ws, wt, g, static_cast<T*>(dx));
        return cudaGetLastError();
      });
      if (err != cudaSuccess) return err;
    }
    row_sum_kernel<A><<<grid_stride_blocks(9 * channels), kMaxThreads, 0, stream>>>(
        part_w, batch, 9 * channels, 9 * channels, dw);
    return cudaGetLastError();
  });
}

}  // namespace coatnet_fast_cuda
