// What the launchers of the BatchNorm kernels (dwconv_bn_gelu_cuda.cu, batch_norm_act_cuda.cu)
// share: dtype and layout dispatch, workspace layout and launch shapes, and the small kernels
// that merge per-row partials over the batch in order. CUDA headers only (see the layout rule in
// README.md).
//
// Everything here is in an anonymous namespace, as it was when each .cu defined its own copy:
// every translation unit registers its kernels with its own module, so each keeps a private
// instance of the kernels below and of the host functions that launch them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "cuda_common.cuh"
#include "cuda_launchers.h"

namespace coatnet_fast_cuda {
namespace {

template <typename T> struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}) for the element type of dtype.
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(TypeTag<float>{});
    case DType::Float64: return f(TypeTag<double>{});
    case DType::Float16: return f(TypeTag<__half>{});
    case DType::BFloat16: return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(std::bool_constant<CL>) for the layout.
template <typename F>
cudaError_t with_layout(bool channels_last, F&& f) {
  return channels_last ? f(std::true_type{}) : f(std::false_type{});
}

inline size_t acc_size(DType dtype) { return dtype == DType::Float64 ? sizeof(double) : sizeof(float); }

inline size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of kMaxThreads for a grid-stride loop over total elements.
inline unsigned grid_stride_blocks(int64_t total) {
  const int64_t blocks = ceil_div(total, kMaxThreads);
  return static_cast<unsigned>(blocks < 65536 ? (blocks < 1 ? 1 : blocks) : 65536);
}

// Splits of an image's positions at most: one per gridDim.y index.
constexpr int64_t kMaxSplits = 65535;

// Launch shape of the per-channel reduction kernels (see ChannelWork): a block per (image,
// channel) or, channels_last, per (image, kClChannels channels), for each of `splits` splits of
// the image's positions (gridDim.y), a block walking block_positions of them.
struct ChannelLaunch {
  dim3 grid, block;
  bool ok;  // within the grid's limits
};

inline ChannelLaunch channel_launch(int64_t batch, int64_t channels, int64_t block_positions,
                                    int64_t splits, bool channels_last) {
  ChannelLaunch l;
  int64_t blocks;
  if (channels_last) {
    l.block = dim3(kClChannels, kClLanes);
    blocks = batch * ceil_div(channels, kClChannels);
  } else {
    int threads = 32;
    while (threads < block_positions && threads < kMaxThreads) threads *= 2;
    l.block = dim3(threads);
    blocks = batch * channels;
  }
  l.ok = blocks <= INT_MAX && splits <= kMaxSplits;
  l.grid = dim3(static_cast<unsigned>(blocks > 0 && l.ok ? blocks : 0), static_cast<unsigned>(splits));
  return l;
}

// ------------------------------------------------------------------------------------------
// Batch statistics. Step 1 (each .cu's own kernel) writes per-(row, channel) Welford moments
// about shift[c], the same value in every block; step 2 merges the rows of each channel.
// ------------------------------------------------------------------------------------------

// The workspace of the batch statistics: the moments of each (row, channel), then the shifts.
template <typename A>
struct MomentsWorkspace {
  A* part_mean;  // [rows, channels]
  A* part_m2;    // [rows, channels]
  A* shift;      // [channels]
};

inline size_t moments_workspace_bytes(DType dtype, int64_t rows, int64_t channels) {
  const size_t per = acc_size(dtype) * static_cast<size_t>(rows * channels);
  return 2 * align_up(per) + acc_size(dtype) * static_cast<size_t>(channels);
}

template <typename A>
MomentsWorkspace<A> moments_workspace(void* workspace, int64_t rows, int64_t channels) {
  const size_t per = align_up(sizeof(A) * static_cast<size_t>(rows * channels));
  unsigned char* base = static_cast<unsigned char*>(workspace);
  return {reinterpret_cast<A*>(base), reinterpret_cast<A*>(base + per), reinterpret_cast<A*>(base + 2 * per)};
}

// Step 2: merge the (image, split) moments of each channel in order; biased variance.
template <typename A>
__global__ void __launch_bounds__(kMaxThreads)
    moments_final_kernel(const A* __restrict__ part_mean, const A* __restrict__ part_m2,
                         const A* __restrict__ shift, A* __restrict__ mean_out,
                         A* __restrict__ var_out, SplitGeom g) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < g.channels;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n = 0;
    A mean = A(0), m2 = A(0);
    for (int64_t row = 0; row < g.batch * g.splits; ++row) {
      const int64_t begin = (row % g.splits) * g.split;
      const int64_t count = min(g.split, g.positions - begin);
      chan_merge(n, mean, m2, count, part_mean[row * g.channels + c], part_m2[row * g.channels + c]);
    }
    if (n == 0) {  // empty batch: like torch's mean of nothing
      mean_out[c] = var_out[c] = acc_nan(A(0));
    } else {
      mean_out[c] = shift[c] + mean;
      var_out[c] = m2 / A(n);
    }
  }
}

template <typename A>
cudaError_t launch_moments_final(const MomentsWorkspace<A>& ws, const SplitGeom& g, void* mean,
                                 void* var, cudaStream_t stream) {
  moments_final_kernel<A><<<grid_stride_blocks(g.channels), kMaxThreads, 0, stream>>>(
      ws.part_mean, ws.part_m2, ws.shift, static_cast<A*>(mean), static_cast<A*>(var), g);
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------
// Sums of per-row partials.
// ------------------------------------------------------------------------------------------

// out[k] = sum over rows, in order, of part[row * row_stride + k].
template <typename A>
__global__ void __launch_bounds__(kMaxThreads)
    row_sum_kernel(const A* __restrict__ part, int64_t rows, int64_t count, int64_t row_stride,
                   A* __restrict__ out) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < count;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A sum = A(0);
    for (int64_t row = 0; row < rows; ++row) sum += part[row * row_stride + k];
    out[k] = sum;
  }
}

// The BatchNorm's d(beta) and d(gamma) from part = [rows][2][channels], the per-row sums of the
// gradient at its output and of that gradient times xhat. With no rows they are zero.
template <typename A>
cudaError_t launch_bn_param_grads(const A* part, int64_t rows, int64_t channels, A* dbeta, A* dgamma,
                                  cudaStream_t stream) {
  const unsigned per_channel = grid_stride_blocks(channels);
  row_sum_kernel<A><<<per_channel, kMaxThreads, 0, stream>>>(part, rows, channels, 2 * channels, dbeta);
  row_sum_kernel<A><<<per_channel, kMaxThreads, 0, stream>>>(part + channels, rows, channels,
                                                             2 * channels, dgamma);
  return cudaGetLastError();
}

}  // namespace
}  // namespace coatnet_fast_cuda
