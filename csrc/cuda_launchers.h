// Launchers of the CUDA kernels of coatnet_fast_ext.
//
// The kernels (*.cu) see only the CUDA runtime, never torch: a CPU build of torch ships no
// usable c10/cuda headers, and keeping torch out of nvcc's way keeps the kernels buildable
// and testable on their own. ops_cuda.cpp is the only caller: it validates the tensors,
// converts small per-channel / table tensors to the accumulation type, allocates outputs and
// workspaces, and passes raw pointers here.
//
// Conventions for every launcher:
//  * `dtype` is the element type of the big tensors (q/k/v/out/grad_out, x/y/grad_y/dx).
//  * "acc" pointers hold the accumulation type: double when dtype is Float64, float otherwise.
//  * Launches go on `stream`; the return value is cudaGetLastError() after the last launch
//    (cudaErrorInvalidValue / cudaErrorInvalidConfiguration for arguments the kernels cannot
//    handle). Nothing is launched, and cudaSuccess returned, when there is no work.
//  * Every result is deterministic: reductions use fixed-order trees and partial buffers,
//    never floating-point atomics.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace coatnet_fast_cuda {

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// Element strides of a [batch, heads, tokens, channels] tensor.
struct AttnStrides {
  int64_t batch;
  int64_t head;
  int64_t token;
  int64_t channel;
};

// Largest head dimension the attention kernels support.
constexpr int64_t kMaxAttnHeadDim = 128;

// ---------------------------------------------------------------------------------------------
// Relative-position-bias attention over one height x width window, N = height * width tokens.
//   q, k, v:  [batch, heads, N, head_dim] of `dtype`, any strides.
//   table:    acc, contiguous [(2*height-1)*(2*width-1), heads].
//   out:      dtype, contiguous [batch, heads, N, head_dim].
//   lse:      acc, contiguous [batch, heads, N] (natural log-sum-exp of each score row).
// ---------------------------------------------------------------------------------------------
cudaError_t rel_bias_attention_forward_launch(
    DType dtype, const void* q, AttnStrides q_strides, const void* k, AttnStrides k_strides,
    const void* v, AttnStrides v_strides, const void* table, void* out, void* lse,
    int64_t batch, int64_t heads, int64_t height, int64_t width, int64_t head_dim,
    double scale, cudaStream_t stream);

// Bytes of device workspace rel_bias_attention_backward_launch needs (the dS scores of every
// (batch, head) plus the partial sums of the table gradient).
size_t rel_bias_attention_backward_workspace_bytes(
    DType dtype, int64_t batch, int64_t heads, int64_t height, int64_t width);

//   grad_out: dtype [batch, heads, N, head_dim], any strides.
//   out:      dtype, contiguous (the forward output); lse: acc, contiguous [batch, heads, N].
//   dq, dk, dv: dtype, contiguous [batch, heads, N, head_dim].
//   dtable:   acc, contiguous [(2*height-1)*(2*width-1), heads].
cudaError_t rel_bias_attention_backward_launch(
    DType dtype, const void* grad_out, AttnStrides grad_out_strides, const void* q,
    AttnStrides q_strides, const void* k, AttnStrides k_strides, const void* v,
    AttnStrides v_strides, const void* table, const void* out, const void* lse, void* dq,
    void* dk, void* dv, void* dtable, void* workspace, size_t workspace_bytes, int64_t batch,
    int64_t heads, int64_t height, int64_t width, int64_t head_dim, double scale,
    cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// 3x3 depthwise conv (padding 1, stride 1 or 2) + per-channel affine + exact GELU.
//   x:  dtype [batch, channels, height, width], NCHW-contiguous (channels_last == false) or
//       channels_last-contiguous (channels_last == true). Outputs shaped like x use the same
//       layout, with Ho = (height-1)/stride + 1, Wo = (width-1)/stride + 1.
//   weight: acc, contiguous [channels, 9] (kh * 3 + kw). Per-channel vectors: acc [channels].
// ---------------------------------------------------------------------------------------------

size_t dwconv_bn_stats_workspace_bytes(DType dtype, int64_t batch, int64_t channels);

// mean, var: acc [channels], the batch mean and biased variance of the conv output.
cudaError_t dwconv_bn_stats_launch(
    DType dtype, const void* x, const void* weight, void* mean, void* var, void* workspace,
    size_t workspace_bytes, int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t stride, bool channels_last, cudaStream_t stream);

// scale: acc [channels] or nullptr (BN folded into weight). y: dtype, layout of x.
// sums: acc [batch, channels], per-image sums of y over the output plane, or nullptr to skip.
cudaError_t dwconv_bn_gelu_forward_launch(
    DType dtype, const void* x, const void* weight, const void* scale, const void* shift,
    void* y, void* sums, int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t stride, bool channels_last, cudaStream_t stream);

size_t dwconv_bn_gelu_backward_workspace_bytes(
    DType dtype, int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t stride);

// grad_y: dtype, layout of x, output-sized. grad_sums: acc [batch, channels] or nullptr.
// dx: dtype, layout of x. dweight: acc [channels, 9]; dgamma, dbeta: acc [channels].
cudaError_t dwconv_bn_gelu_backward_launch(
    DType dtype, const void* grad_y, const void* grad_sums, const void* x, const void* weight,
    const void* bn_weight, const void* bn_bias, const void* mean, const void* rstd, void* dx,
    void* dweight, void* dgamma, void* dbeta, void* workspace, size_t workspace_bytes,
    int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t stride,
    bool training, bool channels_last, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// BatchNorm (per-channel affine of the centred x) + exact GELU or identity, then an optional
// per-image scale and residual add.
//   x: dtype [batch, channels, positions] (positions = H * W), NCHW-contiguous
//      (channels_last == false) or channels_last-contiguous. Outputs shaped like x use the same
//      layout. Per-channel vectors: acc [channels]; branch_scale: acc [batch] or nullptr.
// ---------------------------------------------------------------------------------------------

size_t batch_norm_stats_workspace_bytes(DType dtype, int64_t batch, int64_t channels, int64_t positions);

// mean, var: acc [channels], the batch mean and biased variance of x.
cudaError_t batch_norm_stats_launch(
    DType dtype, const void* x, void* mean, void* var, void* workspace, size_t workspace_bytes,
    int64_t batch, int64_t channels, int64_t positions, bool channels_last, cudaStream_t stream);

// y = residual + branch_scale[b] * act((x - mean) * scale + beta), act GELU when gelu.
// y and residual (or nullptr): out_dtype, which is dtype, Float32 or Float64 (the promoted dtype
// of x and the residual), layout of x.
cudaError_t batch_norm_act_forward_launch(
    DType dtype, DType out_dtype, const void* x, const void* mean, const void* scale,
    const void* beta, const void* residual, const void* branch_scale, void* y, int64_t batch,
    int64_t channels, int64_t positions, bool gelu, bool channels_last, cudaStream_t stream);

size_t batch_norm_act_backward_workspace_bytes(DType dtype, int64_t batch, int64_t channels,
                                               int64_t positions);

// grad_y, dx: dtype, layout of x. bn_weight, bn_bias, mean, rstd: acc [channels];
// dgamma, dbeta: acc [channels]. training: mean and rstd are the batch's statistics (BatchNorm's
// training backward), else running statistics (no terms through them).
cudaError_t batch_norm_act_backward_launch(
    DType dtype, const void* grad_y, const void* x, const void* bn_weight, const void* bn_bias,
    const void* mean, const void* rstd, const void* branch_scale, void* dx, void* dgamma,
    void* dbeta, void* workspace, size_t workspace_bytes, int64_t batch, int64_t channels,
    int64_t positions, bool gelu, bool training, bool channels_last, cudaStream_t stream);

}  // namespace coatnet_fast_cuda
