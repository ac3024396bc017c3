// Device helpers shared by the CUDA kernels: element type <-> accumulation type, the math
// functions in the accumulation type, exact GELU and its derivative, Chan's merge of moments;
// and the per-channel block reductions of the BatchNorm kernels (dwconv_bn_gelu, batch_norm_act).
// CUDA headers only (see the layout rule in README.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

namespace coatnet_fast_cuda {

// Element type <-> accumulation type.
template <typename T> struct Cvt;
template <> struct Cvt<float> {
  using acc = float;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};
template <> struct Cvt<double> {
  using acc = double;
  static __device__ __forceinline__ double load(double x) { return x; }
  static __device__ __forceinline__ double store(double x) { return x; }
};
template <> struct Cvt<__half> {
  using acc = float;
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};
template <> struct Cvt<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ float acc_erf(float x) { return erff(x); }
__device__ __forceinline__ double acc_erf(double x) { return erf(x); }
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_nan(float) { return CUDART_NAN_F; }
__device__ __forceinline__ double acc_nan(double) { return CUDART_NAN; }

constexpr double kSqrtHalf = 0.70710678118654752440;     // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1 / sqrt(2 pi)

// Exact (erf) GELU.
template <typename A> __device__ __forceinline__ A gelu(A u) {
  return A(0.5) * u * (A(1) + acc_erf(u * A(kSqrtHalf)));
}

// d gelu / du = Phi(u) + u phi(u).
template <typename A> __device__ __forceinline__ A gelu_grad(A u) {
  const A cdf = A(0.5) * (A(1) + acc_erf(u * A(kSqrtHalf)));
  const A pdf = acc_exp(A(-0.5) * u * u) * A(kInvSqrt2Pi);
  return cdf + u * pdf;
}

// Chan et al. merge of (count, mean, M2) moments: (na, ma, qa) <- (na, ma, qa) + (nb, mb, qb).
template <typename N, typename A>
__device__ __forceinline__ void chan_merge(N& na, A& ma, A& qa, N nb, A mb, A qb) {
  if (nb == 0) return;
  if (na == 0) {
    na = nb;
    ma = mb;
    qa = qb;
    return;
  }
  const N n = na + nb;
  const A delta = mb - ma;
  const A fb = A(nb) / A(n);
  ma += delta * fb;
  qa += qb + delta * delta * A(na) * fb;
  na = n;
}

// Welford's update of (count, mean, M2) by one value.
template <typename A>
__device__ __forceinline__ void welford_add(int& n, A& mean, A& m2, A v) {
  ++n;
  const A d1 = v - mean;
  mean += d1 / A(n);
  m2 += d1 * (v - mean);
}

// ------------------------------------------------------------------------------------------
// Per-channel block reductions of the BatchNorm kernels. A block reduces over positions for one
// image and some channels, so that per-(image, channel) sums are block reductions in a fixed
// tree order:
//  * NCHW:          one channel per block, blockDim.x (a power of two <= kMaxThreads) threads
//                   walk the positions, consecutive threads on consecutive positions.
//  * channels_last: kClChannels consecutive channels per block (threadIdx.x), kClLanes position
//                   lanes (threadIdx.y), so a warp reads 32 adjacent channels of one pixel.
// ------------------------------------------------------------------------------------------
constexpr int kMaxThreads = 256;
constexpr int kClChannels = 32;  // channels per block, channels_last
constexpr int kClLanes = 8;      // position lanes per block, channels_last

// Which image and channel this thread handles, and its place among the block's position lanes.
struct ChannelWork {
  int64_t b, c;
  bool active;  // c < channels; inactive threads still join every block reduction
  int lane_p;   // first position lane, then steps of num_p
  int num_p;    // position lanes per channel: a power of two
  int slot;     // channel slot within the block
  int slots;
};

// blockIdx.x is image * (channel blocks) + channel block.
template <bool CL>
__device__ __forceinline__ ChannelWork channel_work(int64_t channels) {
  ChannelWork w;
  if (CL) {
    const int64_t groups = (channels + kClChannels - 1) / kClChannels;
    w.b = blockIdx.x / groups;
    w.c = (blockIdx.x % groups) * kClChannels + threadIdx.x;
    w.slot = threadIdx.x;
    w.slots = kClChannels;
    w.lane_p = threadIdx.y;
    w.num_p = blockDim.y;
  } else {
    w.b = blockIdx.x / channels;
    w.c = blockIdx.x % channels;
    w.slot = 0;
    w.slots = 1;
    w.lane_p = threadIdx.x;
    w.num_p = blockDim.x;
  }
  w.active = w.c < channels;
  return w;
}

// Sum of v over the position lanes of each channel slot, as a fixed tree; every thread gets
// its slot's total. Called by all threads of the block; buf holds kMaxThreads values.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* buf, const ChannelWork& w) {
  const int idx = w.lane_p * w.slots + w.slot;
  buf[idx] = v;
  __syncthreads();
  for (int half = w.num_p / 2; half > 0; half /= 2) {
    if (w.lane_p < half) buf[idx] += buf[idx + half * w.slots];
    __syncthreads();
  }
  const A total = buf[w.slot];
  __syncthreads();  // buf may be reused right away
  return total;
}

// Chan-merges each thread's (n, mean, M2) over the position lanes of its channel slot, as a
// fixed tree; mean and m2 become the slot's in every thread. Called by all threads of the block,
// once per kernel. The buffers are its own, not the caller's: taking them as arguments cost the
// channels_last statistics kernels up to 4 more registers.
template <typename A>
__device__ __forceinline__ void block_merge_moments(int n, A& mean, A& m2, const ChannelWork& w) {
  __shared__ int n_buf[kMaxThreads];
  __shared__ A mean_buf[kMaxThreads];
  __shared__ A m2_buf[kMaxThreads];
  const int idx = w.lane_p * w.slots + w.slot;
  n_buf[idx] = n;
  mean_buf[idx] = mean;
  m2_buf[idx] = m2;
  __syncthreads();
  for (int half = w.num_p / 2; half > 0; half /= 2) {
    if (w.lane_p < half) {
      const int other = idx + half * w.slots;
      chan_merge(n_buf[idx], mean_buf[idx], m2_buf[idx], n_buf[other], mean_buf[other], m2_buf[other]);
    }
    __syncthreads();
  }
  mean = mean_buf[w.slot];
  m2 = m2_buf[w.slot];
}

// [batch, channels, positions] reduced per (image, split of the image's positions, channel):
// the per-(image, split) results are the rows, image * splits + split, of the partials.
struct SplitGeom {
  int64_t batch, channels, positions;
  int64_t split;   // positions per split
  int64_t splits;  // splits per image
};

}  // namespace coatnet_fast_cuda
