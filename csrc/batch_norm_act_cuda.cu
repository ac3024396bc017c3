// CUDA kernels of batch_norm_act: y = residual + s[b] * act((x - mean) * scale + beta) per channel,
// act exact GELU or the identity; the batch statistics of x; and the backward, which recomputes
// xhat and the GELU input from x instead of saving them.
//
// x is [B, C, P] (P = H * W) in NCHW or channels_last. The reduction kernels (statistics, the
// backward's sums) give each block one image, some channels and one split of the image's
// positions (blockIdx.y), so that per-(image, split, channel) sums are block reductions in a fixed
// tree order:
//  * NCHW:          one channel per block, blockDim.x (a power of two <= 256) threads walk the
//                   split's positions, consecutive threads on consecutive positions.
//  * channels_last: 32 consecutive channels per block (threadIdx.x), 8 position lanes
//                   (threadIdx.y), so a warp reads 32 adjacent channels of one pixel.
// Splits depend on the shape alone; per-channel totals are then merged over (image, split) in
// order by small kernels. The elementwise kernels (forward, the training dx) walk the tensor in
// memory order. Nothing uses atomics: every result is bit-identical run to run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_launch_common.cuh"
#include "cuda_launchers.h"

namespace coatnet_fast_cuda {
namespace {

// Positions per split of an image; more when an image would need more than kMaxSplits.
constexpr int64_t kSplitPositions = 4096;

// Element offset of (b, c, p) in a [batch, channels, positions] tensor of either layout.
template <bool CL>
__device__ __forceinline__ int64_t offset3(int64_t b, int64_t c, int64_t p, int64_t channels,
                                           int64_t positions) {
  return CL ? (b * positions + p) * channels + c : (b * channels + c) * positions + p;
}

// (image, channel) of element idx of a tensor walked in memory order.
template <bool CL>
__device__ __forceinline__ void image_channel(int64_t idx, int64_t channels, int64_t positions,
                                              int64_t& b, int64_t& c) {
  c = CL ? idx % channels : (idx / positions) % channels;
  b = idx / (positions * channels);
}

// Which image, channel, split and positions this thread handles (see the header comment).
struct SplitWork : ChannelWork {
  int64_t split;
  int64_t p_begin, p_end;
};

template <bool CL>
__device__ __forceinline__ SplitWork split_work(const SplitGeom& g) {
  SplitWork w;
  static_cast<ChannelWork&>(w) = channel_work<CL>(g.channels);
  w.split = blockIdx.y;
  w.p_begin = w.split * g.split;
  w.p_end = min(g.positions, w.p_begin + g.split);
  return w;
}

// ------------------------------------------------------------------------------------------
// Batch statistics, step 1: per (image, split, channel) Welford moments of x - shift[c], where
// shift[c] is x[0, c, 0] (the same value in every block). Centring keeps the running means small,
// so a channel whose mean is large against its spread loses nothing.
// ------------------------------------------------------------------------------------------
template <typename T, bool CL>
__global__ void __launch_bounds__(kMaxThreads)
    bn_stats_partial_kernel(const T* __restrict__ x, SplitGeom g,
                            typename Cvt<T>::acc* __restrict__ part_mean,
                            typename Cvt<T>::acc* __restrict__ part_m2,
                            typename Cvt<T>::acc* __restrict__ shift_out) {
  using A = typename Cvt<T>::acc;
  const SplitWork w = split_work<CL>(g);

  int n = 0;
  A mean = A(0), m2 = A(0), shift = A(0);
  if (w.active) {
    shift = Cvt<T>::load(x[offset3<CL>(0, w.c, 0, g.channels, g.positions)]);
    for (int64_t p = w.p_begin + w.lane_p; p < w.p_end; p += w.num_p) {
      welford_add(n, mean, m2, Cvt<T>::load(x[offset3<CL>(w.b, w.c, p, g.channels, g.positions)]) - shift);
    }
  }

  block_merge_moments(n, mean, m2, w);
  if (w.active && w.lane_p == 0) {
    const int64_t row = w.b * g.splits + w.split;
    part_mean[row * g.channels + w.c] = mean;
    part_m2[row * g.channels + w.c] = m2;
    if (w.b == 0 && w.split == 0) shift_out[w.c] = shift;
  }
}

// Batch statistics, step 2: moments_final_kernel (cuda_launch_common.cuh).

// ------------------------------------------------------------------------------------------
// Forward: y = residual + s[b] * act((x - mean[c]) * scale[c] + beta[c]), in y's dtype O (the
// promoted dtype of x and the residual; the residual is O too). Centred before scaling: folding
// the mean into a shift (x * scale + shift) cancels at large means.
// ------------------------------------------------------------------------------------------
template <typename T, typename O, bool CL>
__global__ void __launch_bounds__(kMaxThreads)
    bn_apply_kernel(const T* __restrict__ x, const typename Cvt<T>::acc* __restrict__ mean,
                    const typename Cvt<T>::acc* __restrict__ scale,
                    const typename Cvt<T>::acc* __restrict__ beta, const O* __restrict__ residual,
                    const typename Cvt<T>::acc* __restrict__ branch_scale, O* __restrict__ y,
                    int64_t batch, int64_t channels, int64_t positions, bool gelu_on) {
  using A = typename Cvt<T>::acc;
  using AO = typename Cvt<O>::acc;
  const int64_t total = batch * channels * positions;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t b, c;
    image_channel<CL>(idx, channels, positions, b, c);
    A u = (Cvt<T>::load(x[idx]) - mean[c]) * scale[c] + beta[c];
    if (gelu_on) u = gelu(u);
    if (branch_scale != nullptr) u *= branch_scale[b];
    AO out = static_cast<AO>(u);
    if (residual != nullptr) out += Cvt<O>::load(residual[idx]);
    y[idx] = Cvt<O>::store(out);
  }
}

// ------------------------------------------------------------------------------------------
// Backward. du = dy * s[b] * gelu'(u) (no gelu': dy * s[b]) is the gradient at the BatchNorm's
// output u = xhat * gamma + beta; d(beta) = sum du, d(gamma) = sum du * xhat.
// ------------------------------------------------------------------------------------------
template <typename A>
struct BnChannel {
  A gamma, beta, mean, rstd;
};

template <typename T, typename A>
__device__ __forceinline__ void du_at(const T* __restrict__ x, const T* __restrict__ dy, int64_t off,
                                      const BnChannel<A>& ch, A s, bool gelu_on, A& du, A& xhat) {
  xhat = (Cvt<T>::load(x[off]) - ch.mean) * ch.rstd;
  du = Cvt<T>::load(dy[off]) * s;
  if (gelu_on) du *= gelu_grad(xhat * ch.gamma + ch.beta);
}

// part[row][0][c] = sum du, part[row][1][c] = sum du * xhat over the split (row = image * splits
// + split). WRITE_DX (eval, running statistics): also dx = gamma * rstd * du, which needs no totals.
template <typename T, bool CL, bool WRITE_DX>
__global__ void __launch_bounds__(kMaxThreads)
    bn_backward_sums_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                            const typename Cvt<T>::acc* __restrict__ gamma,
                            const typename Cvt<T>::acc* __restrict__ beta,
                            const typename Cvt<T>::acc* __restrict__ mean,
                            const typename Cvt<T>::acc* __restrict__ rstd,
                            const typename Cvt<T>::acc* __restrict__ branch_scale, SplitGeom g,
                            bool gelu_on, typename Cvt<T>::acc* __restrict__ part,
                            T* __restrict__ dx) {
  using A = typename Cvt<T>::acc;
  __shared__ A buf[kMaxThreads];
  const SplitWork w = split_work<CL>(g);

  A sum_du = A(0), sum_dux = A(0);
  if (w.active) {
    const BnChannel<A> ch{gamma[w.c], beta[w.c], mean[w.c], rstd[w.c]};
    const A s = branch_scale != nullptr ? branch_scale[w.b] : A(1);
    const A coef = ch.gamma * ch.rstd;
    for (int64_t p = w.p_begin + w.lane_p; p < w.p_end; p += w.num_p) {
      const int64_t off = offset3<CL>(w.b, w.c, p, g.channels, g.positions);
      A du, xhat;
      du_at(x, dy, off, ch, s, gelu_on, du, xhat);
      sum_du += du;
      sum_dux += du * xhat;
      if (WRITE_DX) dx[off] = Cvt<T>::store(coef * du);
    }
  }
  const A total_du = block_sum(sum_du, buf, w);
  const A total_dux = block_sum(sum_dux, buf, w);
  if (w.active && w.lane_p == 0) {
    const int64_t row = w.b * g.splits + w.split;
    part[(row * 2 + 0) * g.channels + w.c] = total_du;
    part[(row * 2 + 1) * g.channels + w.c] = total_dux;
  }
}

// Training: dx = gamma * rstd * (du - mean(du) - xhat * mean(du * xhat)), the means over the
// B * P values of the channel, from the totals d(beta) and d(gamma).
template <typename T, bool CL>
__global__ void __launch_bounds__(kMaxThreads)
    bn_backward_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                          const typename Cvt<T>::acc* __restrict__ gamma,
                          const typename Cvt<T>::acc* __restrict__ beta,
                          const typename Cvt<T>::acc* __restrict__ mean,
                          const typename Cvt<T>::acc* __restrict__ rstd,
                          const typename Cvt<T>::acc* __restrict__ branch_scale,
                          const typename Cvt<T>::acc* __restrict__ dgamma,
                          const typename Cvt<T>::acc* __restrict__ dbeta, int64_t batch,
                          int64_t channels, int64_t positions, bool gelu_on, T* __restrict__ dx) {
  using A = typename Cvt<T>::acc;
  const int64_t total = batch * channels * positions;
  const A count = A(batch) * A(positions);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t b, c;
    image_channel<CL>(idx, channels, positions, b, c);
    const BnChannel<A> ch{gamma[c], beta[c], mean[c], rstd[c]};
    const A s = branch_scale != nullptr ? branch_scale[b] : A(1);
    A du, xhat;
    du_at(x, dy, idx, ch, s, gelu_on, du, xhat);
    dx[idx] = Cvt<T>::store(ch.gamma * ch.rstd * (du - dbeta[c] / count - xhat * (dgamma[c] / count)));
  }
}

// ------------------------------------------------------------------------------------------
// Host side (the helpers both BatchNorm files use are in cuda_launch_common.cuh).
// ------------------------------------------------------------------------------------------
// Calls f(TypeTag<O>) for y's dtype: x's own (T), float32 or float64, the promoted dtypes of x
// and a residual of a dtype the kernels take.
template <typename T, typename F>
cudaError_t dispatch_out(DType dtype, DType out_dtype, F&& f) {
  if (out_dtype == dtype) return f(TypeTag<T>{});
  if (out_dtype == DType::Float32) return f(TypeTag<float>{});
  if (out_dtype == DType::Float64) return f(TypeTag<double>{});
  return cudaErrorInvalidValue;
}

bool valid_shape(int64_t batch, int64_t channels, int64_t positions) {
  return batch >= 0 && channels >= 0 && positions >= 1;
}

SplitGeom make_geom(int64_t batch, int64_t channels, int64_t positions) {
  SplitGeom g;
  g.batch = batch;
  g.channels = channels;
  g.positions = positions;
  g.split = kSplitPositions;
  if (ceil_div(positions, g.split) > kMaxSplits) g.split = ceil_div(positions, kMaxSplits);
  g.splits = ceil_div(positions, g.split);
  return g;
}

// What the reduction launchers (statistics, backward) check and plan before launching, in
// order: the shape, the workspace, whether there is anything to do, the grid's limits. `done`:
// return `status` at once (an error, or cudaSuccess with no channels).
struct ReductionPlan {
  bool done;
  cudaError_t status;
  SplitGeom g;
  ChannelLaunch launch;  // see SplitWork
};

ReductionPlan plan_reduction(int64_t batch, int64_t channels, int64_t positions, bool channels_last,
                             size_t workspace_bytes, size_t workspace_needed) {
  ReductionPlan plan{true, cudaSuccess, {}, {}};
  if (!valid_shape(batch, channels, positions) || workspace_bytes < workspace_needed) {
    plan.status = cudaErrorInvalidValue;
    return plan;
  }
  if (channels == 0) return plan;
  plan.g = make_geom(batch, channels, positions);
  plan.launch = channel_launch(batch, channels, plan.g.split, plan.g.splits, channels_last);
  if (!plan.launch.ok) {
    plan.status = cudaErrorInvalidConfiguration;
    return plan;
  }
  plan.done = false;
  return plan;
}

}  // namespace

size_t batch_norm_stats_workspace_bytes(DType dtype, int64_t batch, int64_t channels,
                                        int64_t positions) {
  if (batch < 0 || channels <= 0 || positions <= 0) return 0;
  const SplitGeom g = make_geom(batch, channels, positions);
  return moments_workspace_bytes(dtype, batch * g.splits, channels);
}

cudaError_t batch_norm_stats_launch(DType dtype, const void* x, void* mean, void* var,
                                    void* workspace, size_t workspace_bytes, int64_t batch,
                                    int64_t channels, int64_t positions, bool channels_last,
                                    cudaStream_t stream) {
  const ReductionPlan plan =
      plan_reduction(batch, channels, positions, channels_last, workspace_bytes,
                     batch_norm_stats_workspace_bytes(dtype, batch, channels, positions));
  if (plan.done) return plan.status;
  const SplitGeom& g = plan.g;

  return dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    using A = typename Cvt<T>::acc;
    const MomentsWorkspace<A> ws = moments_workspace<A>(workspace, batch * g.splits, channels);
    if (batch > 0) {
      const cudaError_t err = with_layout(channels_last, [&](auto cl) -> cudaError_t {
        bn_stats_partial_kernel<T, decltype(cl)::value><<<plan.launch.grid, plan.launch.block, 0, stream>>>(
            static_cast<const T*>(x), g, ws.part_mean, ws.part_m2, ws.shift);
        return cudaGetLastError();
      });
      if (err != cudaSuccess) return err;
    }
    return launch_moments_final(ws, g, mean, var, stream);
  });
}

cudaError_t batch_norm_act_forward_launch(
    DType dtype, DType out_dtype, const void* x, const void* mean, const void* scale,
    const void* beta, const void* residual, const void* branch_scale, void* y, int64_t batch,
    int64_t channels, int64_t positions, bool gelu, bool channels_last, cudaStream_t stream) {
  if (!valid_shape(batch, channels, positions)) return cudaErrorInvalidValue;
  const int64_t total = batch * channels * positions;
  return dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    using A = typename Cvt<T>::acc;
    return dispatch_out<T>(dtype, out_dtype, [&](auto out_tag) -> cudaError_t {
      using O = typename decltype(out_tag)::type;
      if (total == 0) return cudaSuccess;
      return with_layout(channels_last, [&](auto cl) -> cudaError_t {
        bn_apply_kernel<T, O, decltype(cl)::value><<<grid_stride_blocks(total), kMaxThreads, 0, stream>>>(
            static_cast<const T*>(x), static_cast<const A*>(mean), static_cast<const A*>(scale),
            static_cast<const A*>(beta), static_cast<const O*>(residual),
            static_cast<const A*>(branch_scale), static_cast<O*>(y), batch, channels, positions,
            gelu);
        return cudaGetLastError();
      });
    });
  });
}

size_t batch_norm_act_backward_workspace_bytes(DType dtype, int64_t batch, int64_t channels,
                                               int64_t positions) {
  if (batch < 0 || channels <= 0 || positions <= 0) return 0;
  const SplitGeom g = make_geom(batch, channels, positions);
  return acc_size(dtype) * static_cast<size_t>(batch * g.splits * 2 * channels);
}

cudaError_t batch_norm_act_backward_launch(
    DType dtype, const void* grad_y, const void* x, const void* bn_weight, const void* bn_bias,
    const void* mean, const void* rstd, const void* branch_scale, void* dx, void* dgamma,
    void* dbeta, void* workspace, size_t workspace_bytes, int64_t batch, int64_t channels,
    int64_t positions, bool gelu, bool training, bool channels_last, cudaStream_t stream) {
  const ReductionPlan plan =
      plan_reduction(batch, channels, positions, channels_last, workspace_bytes,
                     batch_norm_act_backward_workspace_bytes(dtype, batch, channels, positions));
  if (plan.done) return plan.status;
  const SplitGeom& g = plan.g;
  const ChannelLaunch& sl = plan.launch;

  return dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    using A = typename Cvt<T>::acc;
    A* part = static_cast<A*>(workspace);
    const T* gy = static_cast<const T*>(grad_y);
    const T* xx = static_cast<const T*>(x);
    const A* gamma = static_cast<const A*>(bn_weight);
    const A* beta = static_cast<const A*>(bn_bias);
    const A* mu = static_cast<const A*>(mean);
    const A* rs = static_cast<const A*>(rstd);
    const A* bs = static_cast<const A*>(branch_scale);
    A* dg = static_cast<A*>(dgamma);
    A* db = static_cast<A*>(dbeta);
    T* dxx = static_cast<T*>(dx);
    cudaError_t err;

    if (batch > 0) {
      err = with_layout(channels_last, [&](auto cl) -> cudaError_t {
        constexpr bool CL = decltype(cl)::value;
        if (training) {
          bn_backward_sums_kernel<T, CL, false><<<sl.grid, sl.block, 0, stream>>>(
              gy, xx, gamma, beta, mu, rs, bs, g, gelu, part, dxx);
        } else {
          bn_backward_sums_kernel<T, CL, true><<<sl.grid, sl.block, 0, stream>>>(
              gy, xx, gamma, beta, mu, rs, bs, g, gelu, part, dxx);
        }
        return cudaGetLastError();
      });
      if (err != cudaSuccess) return err;
    }
    // With an empty batch these write the zero gradients.
    if ((err = launch_bn_param_grads(part, batch * g.splits, channels, db, dg, stream)) != cudaSuccess)
      return err;

    if (training && batch > 0) {
      const int64_t total = batch * channels * positions;
      err = with_layout(channels_last, [&](auto cl) -> cudaError_t {
        bn_backward_dx_kernel<T, decltype(cl)::value><<<grid_stride_blocks(total), kMaxThreads, 0, stream>>>(
            gy, xx, gamma, beta, mu, rs, bs, dg, db, batch, channels, positions, gelu, dxx);
        return cudaGetLastError();
      });
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  });
}

}  // namespace coatnet_fast_cuda
