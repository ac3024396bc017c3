// CUDA kernels of rel_bias_attention: softmax(scale * q k^T + bias) v over one H x W window,
// the bias gathered from a [(2H-1)(2W-1), heads] table by relative offset.
//
// Layout of the work (all kernels, 256 threads = 8 warps):
//  * Tiles are 32 tokens, so that lane j of a warp owns token j of a tile when scores are
//    formed, and each of the 8 warps owns 4 rows of the 32-row tile it accumulates.
//  * Lane l owns channels l, l+32, l+64, l+96 of the accumulators (NT = ceil(d/32) of them),
//    which is why head_dim is limited to 128.
//  * Shared-memory tiles are stored in the accumulation type. A tile read by all lanes at
//    different rows (lane = row) gets an odd row pitch, so those reads hit distinct banks.
//
// forward: block per (batch*head, 32-query tile); keys in 32-key tiles, online softmax.
// backward: dq kernel (block per query tile) writes dS = P * (dP - delta) for every (i, j) to a
//   workspace; dk/dv kernel (block per key tile) reads it back and recomputes P; the table
//   gradient sums dS over batch and over the (i, j) pairs of each relative offset in a fixed
//   order (two kernels). No atomics anywhere, so gradients are bit-identical run to run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "cuda_common.cuh"
#include "cuda_launchers.h"

namespace coatnet_fast_cuda {
namespace {

constexpr int kTile = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = kTile / kWarps;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kDefaultSmemLimit = 48 * 1024;

// Butterfly reductions: every lane ends with the same bits (each step adds the same pair in
// either order, and + / fmax are commutative), so warp-uniform decisions stay uniform.
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}
template <typename A> __device__ __forceinline__ A warp_max(A v) {
  for (int m = 16; m > 0; m >>= 1) v = fmax(v, __shfl_xor_sync(kFullMask, v, m));
  return v;
}

template <typename A> __device__ __forceinline__ A neg_inf() { return -static_cast<A>(INFINITY); }

// Odd pitch for tiles read with lane = row (conflict-free banks).
__host__ __device__ __forceinline__ int odd_pitch(int d) { return d | 1; }

struct Window {
  int n;       // tokens, height * width
  int height;
  int width;
};

// Row of the bias table for query i and key j (row-major token numbering).
__device__ __forceinline__ int64_t table_row(int yi, int xi, int yj, int xj, const Window& w) {
  return static_cast<int64_t>(yi - yj + w.height - 1) * (2 * w.width - 1) + (xi - xj + w.width - 1);
}

// Stages rows [row0, row0 + kTile) of one (batch, head) slice into dst[kTile][pitch]; rows
// past the end are zero so that they add nothing (never NaN garbage) to any product.
// The caller synchronizes.
template <typename T, typename A>
__device__ __forceinline__ void load_tile(A* dst, int pitch, const T* __restrict__ src,
                                          const AttnStrides& s, int64_t b, int64_t h, int row0,
                                          int n, int d) {
  const T* base = src + b * s.batch + h * s.head;
  for (int e = threadIdx.x; e < kTile * d; e += kThreads) {
    const int r = e / d;
    const int c = e - r * d;
    const int row = row0 + r;
    A val = A(0);
    if (row < n) val = Cvt<T>::load(base[row * s.token + c * s.channel]);
    dst[r * pitch + c] = val;
  }
}

// ------------------------------------------------------------------------------------------
// Forward. Block: one (batch*head, 32-query tile). Warp w owns query rows w + 8r (r < 4).
// Shared: q_s[32][d], k_s[32][odd d], v_s[32][d] (acc).
// ------------------------------------------------------------------------------------------
template <typename T, int NT>
__global__ void __launch_bounds__(kThreads)
    attn_forward_kernel(const T* __restrict__ q, AttnStrides qs, const T* __restrict__ k,
                        AttnStrides ks, const T* __restrict__ v, AttnStrides vs,
                        const typename Cvt<T>::acc* __restrict__ table, T* __restrict__ out,
                        typename Cvt<T>::acc* __restrict__ lse, int64_t heads, Window win,
                        int d, typename Cvt<T>::acc scale, int64_t num_q_tiles) {
  using A = typename Cvt<T>::acc;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int kp = odd_pitch(d);
  A* q_s = reinterpret_cast<A*>(smem_raw);
  A* k_s = q_s + kTile * d;
  A* v_s = k_s + kTile * kp;

  const int64_t bh = blockIdx.x / num_q_tiles;
  const int q0 = static_cast<int>(blockIdx.x % num_q_tiles) * kTile;
  const int64_t b = bh / heads;
  const int64_t h = bh % heads;
  const int n = win.n;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  load_tile<T, A>(q_s, d, q, qs, b, h, q0, n, d);

  int yi[kRowsPerWarp], xi[kRowsPerWarp];
  bool row_ok[kRowsPerWarp];
  A m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][NT];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = q0 + warp + kWarps * r;
    row_ok[r] = i < n;
    yi[r] = i / win.width;
    xi[r] = i % win.width;
    m[r] = neg_inf<A>();
    l[r] = A(0);
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[r][t] = A(0);
  }

  for (int k0 = 0; k0 < n; k0 += kTile) {
    __syncthreads();  // everyone is done with the previous k/v tile
    load_tile<T, A>(k_s, kp, k, ks, b, h, k0, n, d);
    load_tile<T, A>(v_s, d, v, vs, b, h, k0, n, d);
    __syncthreads();

    // Scores of this warp's rows against key j = k0 + lane.
    const int j = k0 + lane;
    const bool col_ok = j < n;
    const int yj = j / win.width;
    const int xj = j % win.width;
    A s[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) s[r] = A(0);
    for (int c = 0; c < d; ++c) {
      const A kc = k_s[lane * kp + c];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) s[r] += q_s[(warp + kWarps * r) * d + c] * kc;
    }

    // Online softmax. m_use replaces a still -inf running max by 0, so that no -inf - -inf
    // is ever formed: exp(-inf - 0) = 0 for the masked scores and for the rescale factor.
    A p[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      A sr = neg_inf<A>();
      if (col_ok) {
        const A bias = row_ok[r] ? table[table_row(yi[r], xi[r], yj, xj, win) * heads + h] : A(0);
        sr = scale * s[r] + bias;
      }
      const A m_new = fmax(m[r], warp_max(sr));
      const A m_use = (m_new == neg_inf<A>()) ? A(0) : m_new;
      const A alpha = acc_exp(m[r] - m_use);
      p[r] = acc_exp(sr - m_use);
      l[r] = l[r] * alpha + warp_sum(p[r]);
      m[r] = m_new;
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[r][t] *= alpha;
    }

    // acc += P V, p of key jj broadcast from lane jj.
    const int kn = min(kTile, n - k0);
    for (int jj = 0; jj < kn; ++jj) {
      A pj[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) pj[r] = __shfl_sync(kFullMask, p[r], jj);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int c = lane + 32 * t;
        if (c < d) {
          const A vc = v_s[jj * d + c];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) acc[r][t] += pj[r] * vc;
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    if (!row_ok[r]) continue;
    const int64_t row = bh * n + (q0 + warp + kWarps * r);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int c = lane + 32 * t;
      if (c < d) out[row * d + c] = Cvt<T>::store(acc[r][t] / l[r]);
    }
    if (lane == 0) lse[row] = m[r] + acc_log(l[r]);
  }
}

// ------------------------------------------------------------------------------------------
// Backward, dq and dS. Block: one (batch*head, 32-query tile); warp w owns rows w + 8r.
// Shared: q_s[32][d], go_s[32][d], k_s[32][odd d], v_s[32][odd d] (acc).
// dS[bh][i][j] goes to ds_ws (acc) for the dk/dv and table-gradient kernels.
// ------------------------------------------------------------------------------------------
template <typename T, int NT>
__global__ void __launch_bounds__(kThreads)
    attn_backward_dq_kernel(const T* __restrict__ go, AttnStrides gos, const T* __restrict__ q,
                            AttnStrides qs, const T* __restrict__ k, AttnStrides ks,
                            const T* __restrict__ v, AttnStrides vs,
                            const typename Cvt<T>::acc* __restrict__ table,
                            const T* __restrict__ out, const typename Cvt<T>::acc* __restrict__ lse,
                            T* __restrict__ dq, typename Cvt<T>::acc* __restrict__ ds_ws,
                            int64_t heads, Window win, int d, typename Cvt<T>::acc scale,
                            int64_t num_q_tiles) {
  using A = typename Cvt<T>::acc;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int kp = odd_pitch(d);
  A* q_s = reinterpret_cast<A*>(smem_raw);
  A* go_s = q_s + kTile * d;
  A* k_s = go_s + kTile * d;
  A* v_s = k_s + kTile * kp;

  const int64_t bh = blockIdx.x / num_q_tiles;
  const int q0 = static_cast<int>(blockIdx.x % num_q_tiles) * kTile;
  const int64_t b = bh / heads;
  const int64_t h = bh % heads;
  const int n = win.n;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  load_tile<T, A>(q_s, d, q, qs, b, h, q0, n, d);
  load_tile<T, A>(go_s, d, go, gos, b, h, q0, n, d);
  __syncthreads();

  // Per row: lse and delta = grad_out . out (warp-uniform values).
  int yi[kRowsPerWarp], xi[kRowsPerWarp];
  bool row_ok[kRowsPerWarp];
  A row_lse[kRowsPerWarp], delta[kRowsPerWarp], dq_acc[kRowsPerWarp][NT];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = q0 + warp + kWarps * r;
    row_ok[r] = i < n;
    yi[r] = i / win.width;
    xi[r] = i % win.width;
    const int64_t row = bh * n + i;
    A dot = A(0);
    if (row_ok[r]) {
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int c = lane + 32 * t;
        if (c < d) dot += go_s[(warp + kWarps * r) * d + c] * Cvt<T>::load(out[row * d + c]);
      }
    }
    delta[r] = warp_sum(dot);
    row_lse[r] = row_ok[r] ? lse[row] : A(0);
#pragma unroll
    for (int t = 0; t < NT; ++t) dq_acc[r][t] = A(0);
  }

  for (int k0 = 0; k0 < n; k0 += kTile) {
    __syncthreads();  // everyone is done with the previous k/v tile
    load_tile<T, A>(k_s, kp, k, ks, b, h, k0, n, d);
    load_tile<T, A>(v_s, kp, v, vs, b, h, k0, n, d);
    __syncthreads();

    const int j = k0 + lane;
    const bool col_ok = j < n;
    const int yj = j / win.width;
    const int xj = j % win.width;
    A s[kRowsPerWarp], dp[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) s[r] = dp[r] = A(0);
    for (int c = 0; c < d; ++c) {
      const A kc = k_s[lane * kp + c];
      const A vc = v_s[lane * kp + c];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        s[r] += q_s[(warp + kWarps * r) * d + c] * kc;
        dp[r] += go_s[(warp + kWarps * r) * d + c] * vc;
      }
    }

    A ds[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      ds[r] = A(0);
      if (row_ok[r] && col_ok) {
        const A sr = scale * s[r] + table[table_row(yi[r], xi[r], yj, xj, win) * heads + h];
        const A p = acc_exp(sr - row_lse[r]);  // a -inf bias gives p = 0, hence dS = 0
        ds[r] = p * (dp[r] - delta[r]);
        ds_ws[(bh * n + (q0 + warp + kWarps * r)) * n + j] = ds[r];
      }
    }

    // dq += dS K, dS of key jj broadcast from lane jj.
    const int kn = min(kTile, n - k0);
    for (int jj = 0; jj < kn; ++jj) {
      A dsj[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) dsj[r] = __shfl_sync(kFullMask, ds[r], jj);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int c = lane + 32 * t;
        if (c < d) {
          const A kc = k_s[jj * kp + c];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) dq_acc[r][t] += dsj[r] * kc;
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    if (!row_ok[r]) continue;
    const int64_t row = bh * n + (q0 + warp + kWarps * r);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int c = lane + 32 * t;
      if (c < d) dq[row * d + c] = Cvt<T>::store(scale * dq_acc[r][t]);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Backward, dk and dv. Block: one (batch*head, 32-key tile); warp w owns keys w + 8r, and
// lane i is query i of the current query tile when P is recomputed.
// Shared: k_s[32][d], q_s[32][odd d], go_s[32][d], ds_s[32][33], lse_s[32] (acc).
// ------------------------------------------------------------------------------------------
template <typename T, int NT>
__global__ void __launch_bounds__(kThreads)
    attn_backward_dkdv_kernel(const T* __restrict__ go, AttnStrides gos, const T* __restrict__ q,
                              AttnStrides qs, const T* __restrict__ k, AttnStrides ks,
                              const typename Cvt<T>::acc* __restrict__ table,
                              const typename Cvt<T>::acc* __restrict__ lse,
                              const typename Cvt<T>::acc* __restrict__ ds_ws, T* __restrict__ dk,
                              T* __restrict__ dv, int64_t heads, Window win, int d,
                              typename Cvt<T>::acc scale, int64_t num_k_tiles) {
  using A = typename Cvt<T>::acc;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int qp = odd_pitch(d);
  constexpr int kDsPitch = kTile + 1;
  A* k_s = reinterpret_cast<A*>(smem_raw);
  A* q_s = k_s + kTile * d;
  A* go_s = q_s + kTile * qp;
  A* ds_s = go_s + kTile * d;
  A* lse_s = ds_s + kTile * kDsPitch;

  const int64_t bh = blockIdx.x / num_k_tiles;
  const int k0 = static_cast<int>(blockIdx.x % num_k_tiles) * kTile;
  const int64_t b = bh / heads;
  const int64_t h = bh % heads;
  const int n = win.n;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  load_tile<T, A>(k_s, d, k, ks, b, h, k0, n, d);

  int yj[kRowsPerWarp], xj[kRowsPerWarp];
  bool key_ok[kRowsPerWarp];
  A dk_acc[kRowsPerWarp][NT], dv_acc[kRowsPerWarp][NT];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int j = k0 + warp + kWarps * r;
    key_ok[r] = j < n;
    yj[r] = j / win.width;
    xj[r] = j % win.width;
#pragma unroll
    for (int t = 0; t < NT; ++t) dk_acc[r][t] = dv_acc[r][t] = A(0);
  }

  for (int q0 = 0; q0 < n; q0 += kTile) {
    __syncthreads();  // everyone is done with the previous query tile (and k_s is loaded)
    load_tile<T, A>(q_s, qp, q, qs, b, h, q0, n, d);
    load_tile<T, A>(go_s, d, go, gos, b, h, q0, n, d);
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int ii = e / kTile;
      const int jj = e % kTile;
      const int i = q0 + ii;
      const int j = k0 + jj;
      ds_s[ii * kDsPitch + jj] = (i < n && j < n) ? ds_ws[(bh * n + i) * n + j] : A(0);
    }
    if (threadIdx.x < kTile) {
      const int i = q0 + threadIdx.x;
      lse_s[threadIdx.x] = i < n ? lse[bh * n + i] : A(0);
    }
    __syncthreads();

    // P of query i = q0 + lane against this warp's keys.
    const int i = q0 + lane;
    const bool q_ok = i < n;
    const int yi = i / win.width;
    const int xi = i % win.width;
    A s[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) s[r] = A(0);
    for (int c = 0; c < d; ++c) {
      const A qc = q_s[lane * qp + c];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) s[r] += qc * k_s[(warp + kWarps * r) * d + c];
    }
    A p[kRowsPerWarp], ds[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      p[r] = A(0);
      if (q_ok && key_ok[r]) {
        const A sr = scale * s[r] + table[table_row(yi, xi, yj[r], xj[r], win) * heads + h];
        p[r] = acc_exp(sr - lse_s[lane]);
      }
      ds[r] = ds_s[lane * kDsPitch + warp + kWarps * r];  // zero outside the window
    }

    // dv += P^T dO, dk += dS^T Q, values of query ii broadcast from lane ii.
    const int qn = min(kTile, n - q0);
    for (int ii = 0; ii < qn; ++ii) {
      A pi[kRowsPerWarp], dsi[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        pi[r] = __shfl_sync(kFullMask, p[r], ii);
        dsi[r] = __shfl_sync(kFullMask, ds[r], ii);
      }
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int c = lane + 32 * t;
        if (c < d) {
          const A gc = go_s[ii * d + c];
          const A qc = q_s[ii * qp + c];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            dv_acc[r][t] += pi[r] * gc;
            dk_acc[r][t] += dsi[r] * qc;
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    if (!key_ok[r]) continue;
    const int64_t row = bh * n + (k0 + warp + kWarps * r);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int c = lane + 32 * t;
      if (c < d) {
        dk[row * d + c] = Cvt<T>::store(scale * dk_acc[r][t]);
        dv[row * d + c] = Cvt<T>::store(dv_acc[r][t]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Table gradient, step 1: partial[g][h][r] = sum over the batches of group g, and over the
// (i, j) pairs at relative offset r (row-major, fixed order), of dS[b][h][i][j].
// One thread per (g, h, r), grid-stride.
// ------------------------------------------------------------------------------------------
template <typename A>
__global__ void __launch_bounds__(kThreads)
    dtable_partial_kernel(const A* __restrict__ ds_ws, A* __restrict__ partial, int64_t batch,
                          int64_t heads, Window win, int64_t groups) {
  const int64_t n = win.n;
  const int64_t rows = static_cast<int64_t>(2 * win.height - 1) * (2 * win.width - 1);
  const int64_t total = groups * heads * rows;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int r = static_cast<int>(idx % rows);
    const int64_t gh = idx / rows;
    const int64_t h = gh % heads;
    const int64_t g = gh / heads;
    // The pairs with yi - yj = dy and xi - xj = dx.
    const int dy = r / (2 * win.width - 1) - (win.height - 1);
    const int dx = r % (2 * win.width - 1) - (win.width - 1);
    const int y_lo = max(0, dy), y_hi = min(win.height, win.height + dy);
    const int x_lo = max(0, dx), x_hi = min(win.width, win.width + dx);
    const int64_t b_lo = g * batch / groups;
    const int64_t b_hi = (g + 1) * batch / groups;
    A sum = A(0);
    for (int64_t b = b_lo; b < b_hi; ++b) {
      const A* slice = ds_ws + (b * heads + h) * n * n;
      for (int yi = y_lo; yi < y_hi; ++yi) {
        for (int xi = x_lo; xi < x_hi; ++xi) {
          const int64_t i = static_cast<int64_t>(yi) * win.width + xi;
          const int64_t j = static_cast<int64_t>(yi - dy) * win.width + (xi - dx);
          sum += slice[i * n + j];
        }
      }
    }
    partial[idx] = sum;
  }
}

// Table gradient, step 2: dtable[r][h] = sum over groups, in order.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    dtable_final_kernel(const A* __restrict__ partial, A* __restrict__ dtable, int64_t heads,
                        int64_t rows, int64_t groups) {
  const int64_t total = rows * heads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / heads;
    const int64_t h = idx % heads;
    A sum = A(0);
    for (int64_t g = 0; g < groups; ++g) sum += partial[(g * heads + h) * rows + r];
    dtable[idx] = sum;
  }
}

// ------------------------------------------------------------------------------------------
// Host side.
// ------------------------------------------------------------------------------------------
template <typename T> struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}, std::integral_constant<int, NT>{}) for the element type and the
// number of 32-channel slices per lane.
template <typename T, typename F>
cudaError_t dispatch_nt(int64_t head_dim, F&& f) {
  switch ((head_dim + 31) / 32) {
    case 1: return f(TypeTag<T>{}, std::integral_constant<int, 1>{});
    case 2: return f(TypeTag<T>{}, std::integral_constant<int, 2>{});
    case 3: return f(TypeTag<T>{}, std::integral_constant<int, 3>{});
    case 4: return f(TypeTag<T>{}, std::integral_constant<int, 4>{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename F>
cudaError_t dispatch(DType dtype, int64_t head_dim, F&& f) {
  switch (dtype) {
    case DType::Float32: return dispatch_nt<float>(head_dim, f);
    case DType::Float64: return dispatch_nt<double>(head_dim, f);
    case DType::Float16: return dispatch_nt<__half>(head_dim, f);
    case DType::BFloat16: return dispatch_nt<__nv_bfloat16>(head_dim, f);
  }
  return cudaErrorInvalidValue;
}

size_t acc_size(DType dtype) { return dtype == DType::Float64 ? sizeof(double) : sizeof(float); }

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Batch groups of the table-gradient reduction: enough (g, h, r) threads to fill the GPU, a
// function of the shapes only so that the summation order never changes.
int64_t dtable_groups(int64_t batch, int64_t heads, int64_t rows) {
  if (batch <= 0) return 0;
  const int64_t want = ceil_div(32768, heads * rows);
  return want < 1 ? 1 : (want > batch ? batch : want);
}

bool valid_window(int64_t heads, int64_t height, int64_t width, int64_t head_dim) {
  return heads >= 0 && height >= 1 && width >= 1 && head_dim >= 1 &&
         head_dim <= kMaxAttnHeadDim && height * width <= INT_MAX / 4;
}

// Opts a kernel into more than the default 48 KiB of dynamic shared memory when it needs it.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= kDefaultSmemLimit) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

unsigned grid_stride_blocks(int64_t total) {
  const int64_t blocks = ceil_div(total, kThreads);
  return static_cast<unsigned>(blocks < 65536 ? (blocks < 1 ? 1 : blocks) : 65536);
}

}  // namespace

cudaError_t rel_bias_attention_forward_launch(
    DType dtype, const void* q, AttnStrides q_strides, const void* k, AttnStrides k_strides,
    const void* v, AttnStrides v_strides, const void* table, void* out, void* lse,
    int64_t batch, int64_t heads, int64_t height, int64_t width, int64_t head_dim,
    double scale, cudaStream_t stream) {
  if (batch < 0 || !valid_window(heads, height, width, head_dim)) return cudaErrorInvalidValue;
  const Window win{static_cast<int>(height * width), static_cast<int>(height),
                   static_cast<int>(width)};
  const int64_t num_q_tiles = ceil_div(win.n, kTile);
  const int64_t blocks = batch * heads * num_q_tiles;
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  const int d = static_cast<int>(head_dim);

  return dispatch(dtype, head_dim, [&](auto tag, auto nt) -> cudaError_t {
    using T = typename decltype(tag)::type;
    using A = typename Cvt<T>::acc;
    constexpr int NT = decltype(nt)::value;
    const size_t smem = sizeof(A) * kTile * (2 * d + odd_pitch(d));
    auto kernel = attn_forward_kernel<T, NT>;
    cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
        static_cast<const T*>(q), q_strides, static_cast<const T*>(k), k_strides,
        static_cast<const T*>(v), v_strides, static_cast<const A*>(table), static_cast<T*>(out),
        static_cast<A*>(lse), heads, win, d, static_cast<A>(scale), num_q_tiles);
    return cudaGetLastError();
  });
}

size_t rel_bias_attention_backward_workspace_bytes(
    DType dtype, int64_t batch, int64_t heads, int64_t height, int64_t width) {
  if (batch <= 0 || heads <= 0 || height <= 0 || width <= 0) return 0;
  const int64_t n = height * width;
  const int64_t rows = (2 * height - 1) * (2 * width - 1);
  const int64_t groups = dtable_groups(batch, heads, rows);
  return align_up(acc_size(dtype) * static_cast<size_t>(batch * heads * n * n)) +
         acc_size(dtype) * static_cast<size_t>(groups * heads * rows);
}

cudaError_t rel_bias_attention_backward_launch(
    DType dtype, const void* grad_out, AttnStrides grad_out_strides, const void* q,
    AttnStrides q_strides, const void* k, AttnStrides k_strides, const void* v,
    AttnStrides v_strides, const void* table, const void* out, const void* lse, void* dq,
    void* dk, void* dv, void* dtable, void* workspace, size_t workspace_bytes, int64_t batch,
    int64_t heads, int64_t height, int64_t width, int64_t head_dim, double scale,
    cudaStream_t stream) {
  if (batch < 0 || !valid_window(heads, height, width, head_dim)) return cudaErrorInvalidValue;
  if (workspace_bytes < rel_bias_attention_backward_workspace_bytes(dtype, batch, heads, height,
                                                                     width))
    return cudaErrorInvalidValue;
  const Window win{static_cast<int>(height * width), static_cast<int>(height),
                   static_cast<int>(width)};
  const int64_t n = win.n;
  const int64_t rows = (2 * height - 1) * (2 * width - 1);
  const int64_t groups = dtable_groups(batch, heads, rows);
  const int64_t num_tiles = ceil_div(n, kTile);
  const int64_t blocks = batch * heads * num_tiles;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  const int d = static_cast<int>(head_dim);

  return dispatch(dtype, head_dim, [&](auto tag, auto nt) -> cudaError_t {
    using T = typename decltype(tag)::type;
    using A = typename Cvt<T>::acc;
    constexpr int NT = decltype(nt)::value;
    A* ds_ws = static_cast<A*>(workspace);
    // Same layout as rel_bias_attention_backward_workspace_bytes: dS, then the partials.
    A* partial = reinterpret_cast<A*>(static_cast<unsigned char*>(workspace) +
                                      align_up(sizeof(A) * static_cast<size_t>(batch * heads * n * n)));
    const A a_scale = static_cast<A>(scale);
    cudaError_t err;

    if (blocks > 0) {
      const size_t dq_smem = sizeof(A) * kTile * (2 * d + 2 * odd_pitch(d));
      auto dq_kernel = attn_backward_dq_kernel<T, NT>;
      if ((err = allow_smem(dq_kernel, dq_smem)) != cudaSuccess) return err;
      dq_kernel<<<static_cast<unsigned>(blocks), kThreads, dq_smem, stream>>>(
          static_cast<const T*>(grad_out), grad_out_strides, static_cast<const T*>(q), q_strides,
          static_cast<const T*>(k), k_strides, static_cast<const T*>(v), v_strides,
          static_cast<const A*>(table), static_cast<const T*>(out), static_cast<const A*>(lse),
          static_cast<T*>(dq), ds_ws, heads, win, d, a_scale, num_tiles);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;

      const size_t dkdv_smem =
          sizeof(A) * (kTile * (2 * d + odd_pitch(d)) + kTile * (kTile + 1) + kTile);
      auto dkdv_kernel = attn_backward_dkdv_kernel<T, NT>;
      if ((err = allow_smem(dkdv_kernel, dkdv_smem)) != cudaSuccess) return err;
      dkdv_kernel<<<static_cast<unsigned>(blocks), kThreads, dkdv_smem, stream>>>(
          static_cast<const T*>(grad_out), grad_out_strides, static_cast<const T*>(q), q_strides,
          static_cast<const T*>(k), k_strides, static_cast<const A*>(table),
          static_cast<const A*>(lse), ds_ws, static_cast<T*>(dk), static_cast<T*>(dv), heads,
          win, d, a_scale, num_tiles);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;

      const int64_t partial_total = groups * heads * rows;
      dtable_partial_kernel<A><<<grid_stride_blocks(partial_total), kThreads, 0, stream>>>(
          ds_ws, partial, batch, heads, win, groups);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    // Also runs for an empty batch, where it writes the zero gradient.
    const int64_t table_total = rows * heads;
    if (table_total > 0) {
      dtable_final_kernel<A><<<grid_stride_blocks(table_total), kThreads, 0, stream>>>(
          partial, static_cast<A*>(dtable), heads, rows, blocks == 0 ? 0 : groups);
    }
    return cudaGetLastError();
  });
}

}  // namespace coatnet_fast_cuda
