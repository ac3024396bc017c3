// CUDA implementations of the coatnet_fast_ext ops (schemas in ops.cpp).
//
// This file is the only one that sees both torch and CUDA: it checks the arguments, converts
// the small tensors (bias table, conv weight, per-channel vectors) to contiguous tensors of
// the accumulation type, allocates outputs and workspaces with the caching allocator, and
// calls the torch-free launchers of cuda_launchers.h on the current stream. Compiled only
// when torch has CUDA.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "cpu_kernels.h"  // new_output: outputs start as NaN under COATNET_FAST_POISON_OUTPUTS=1
#include "cuda_launchers.h"

namespace {

using coatnet_fast_ext::new_output;

namespace cf = coatnet_fast_cuda;

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

cf::DType launcher_dtype(at::ScalarType t) {
  if (t == at::kDouble) return cf::DType::Float64;
  if (t == at::kHalf) return cf::DType::Float16;
  if (t == at::kBFloat16) return cf::DType::BFloat16;
  TORCH_CHECK(t == at::kFloat, "coatnet_fast_ext: unsupported dtype ", t);
  return cf::DType::Float32;
}

// float64 data accumulates in float64, everything else in float32.
at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_device(const at::Tensor& t, const char* op, const char* name, const at::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor; got one on ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), ", expected ", device);
}

void check_floating(const at::Tensor& t, const char* op, const char* name,
                    const at::Device& device) {
  check_device(t, op, name, device);
  TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, float64, float16 or bfloat16; got ", t.scalar_type());
}

void check_data_tensor(const at::Tensor& t, const char* op, const char* name,
                       const at::Device& device, at::ScalarType dtype) {
  check_device(t, op, name, device);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, "; got ",
              t.scalar_type());
}

// The bias table (q's dtype or float32) as a contiguous acc-typed tensor.
at::Tensor table_to_acc(const at::Tensor& table, const char* op, const at::Tensor& q) {
  TORCH_CHECK(table.scalar_type() == q.scalar_type() || table.scalar_type() == at::kFloat, op,
              ": table must have q's dtype or float32; got ", table.scalar_type());
  return table.to(acc_type(q.scalar_type())).contiguous();
}

// A per-channel [C] tensor (any supported floating dtype, like the CPU kernels) in acc type.
at::Tensor channel_param_to_acc(const at::Tensor& t, const char* op, const char* name,
                                const at::Device& device, at::ScalarType data_dtype,
                                int64_t channels) {
  check_floating(t, op, name, device);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": ", name, " must have shape [C] = [",
              channels, "]; got ", t.sizes());
  return t.to(acc_type(data_dtype)).contiguous();
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// ---------------------------------------------------------------------------------------------
// rel_bias_attention
// ---------------------------------------------------------------------------------------------

cf::AttnStrides attn_strides(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Checks q/k/v/table against each other and the window (messages worded as the CPU
// kernels'); returns the table in acc type.
at::Tensor check_attention(const char* op, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& table, int64_t height,
                           int64_t width) {
  check_floating(q, op, "q", q.device());
  TORCH_CHECK(q.dim() == 4, op, ": q must be a 4-D [B, heads, N, d] tensor; got shape ",
              q.sizes());
  check_data_tensor(k, op, "k", q.device(), q.scalar_type());
  check_data_tensor(v, op, "v", q.device(), q.scalar_type());
  TORCH_CHECK(k.sizes() == q.sizes(), op, ": k must have q's shape ", q.sizes(), "; got ",
              k.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), op, ": v must have q's shape ", q.sizes(), "; got ",
              v.sizes());
  TORCH_CHECK(height > 0 && width > 0 && height * width == q.size(2), op, ": window (", height,
              ", ", width, ") must have H*W == N = ", q.size(2));
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= cf::kMaxAttnHeadDim, op,
              ": the CUDA kernels support head dims d = q.size(3) from 1 to ",
              cf::kMaxAttnHeadDim, "; got ", q.size(3));
  check_device(table, op, "table", q.device());
  const int64_t rows = (2 * height - 1) * (2 * width - 1);
  TORCH_CHECK(table.dim() == 2 && table.size(0) == rows && table.size(1) == q.size(1), op,
              ": table must have shape [(2H-1)(2W-1), heads] = [", rows, ", ", q.size(1),
              "]; got ", table.sizes());
  return table_to_acc(table, op, q);
}

std::tuple<at::Tensor, at::Tensor> rel_bias_attention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
    int64_t height, int64_t width, double scale) {
  constexpr const char* op = "rel_bias_attention_forward";
  check_device(q, op, "q", q.device());  // a CUDA tensor, before the guard takes its device
  c10::cuda::CUDAGuard device_guard(q.device());
  const at::Tensor table_acc = check_attention(op, q, k, v, table, height, width);
  const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2), d = q.size(3);
  const auto acc = acc_type(q.scalar_type());

  at::Tensor out = new_output(q, {batch, heads, n, d}, q.scalar_type());
  at::Tensor lse = new_output(q, {batch, heads, n}, acc);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check_launch(cf::rel_bias_attention_forward_launch(
                   launcher_dtype(q.scalar_type()), q.data_ptr(), attn_strides(q), k.data_ptr(),
                   attn_strides(k), v.data_ptr(), attn_strides(v), table_acc.data_ptr(),
                   out.data_ptr(), lse.data_ptr(), batch, heads, height, width, d, scale, stream),
               op);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rel_bias_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& table, const at::Tensor& out, const at::Tensor& lse, int64_t height,
    int64_t width, double scale) {
  constexpr const char* op = "rel_bias_attention_backward";
  check_device(q, op, "q", q.device());  // a CUDA tensor, before the guard takes its device
  c10::cuda::CUDAGuard device_guard(q.device());
  const at::Tensor table_acc = check_attention(op, q, k, v, table, height, width);
  const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2), d = q.size(3);
  const auto acc = acc_type(q.scalar_type());
  // Like the CPU kernels, accept gradients of another floating dtype.
  check_floating(grad_out, op, "grad_out", q.device());
  check_floating(out, op, "out", q.device());
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
              ": grad_out and out must have q's shape ", q.sizes(), "; got ", grad_out.sizes(),
              " and ", out.sizes());
  check_floating(lse, op, "lse", q.device());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == batch && lse.size(1) == heads && lse.size(2) == n,
              op, ": lse must have shape [B, heads, N] = [", batch, ", ", heads, ", ", n,
              "]; got ", lse.sizes());
  const at::Tensor go = grad_out.to(q.scalar_type());  // no copy when the dtype matches
  const at::Tensor out_c = out.to(q.scalar_type()).contiguous();
  const at::Tensor lse_acc = lse.to(acc).contiguous();

  at::Tensor dq = new_output(q, {batch, heads, n, d}, q.scalar_type());
  at::Tensor dk = new_output(q, {batch, heads, n, d}, q.scalar_type());
  at::Tensor dv = new_output(q, {batch, heads, n, d}, q.scalar_type());
  at::Tensor dtable_acc = new_output(q, {table.size(0), heads}, acc);
  const cf::DType dtype = launcher_dtype(q.scalar_type());
  const size_t ws_bytes =
      cf::rel_bias_attention_backward_workspace_bytes(dtype, batch, heads, height, width);
  at::Tensor ws = workspace(ws_bytes, q);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check_launch(cf::rel_bias_attention_backward_launch(
                   dtype, go.data_ptr(), attn_strides(go), q.data_ptr(),
                   attn_strides(q), k.data_ptr(), attn_strides(k), v.data_ptr(), attn_strides(v),
                   table_acc.data_ptr(), out_c.data_ptr(), lse_acc.data_ptr(), dq.data_ptr(),
                   dk.data_ptr(), dv.data_ptr(), dtable_acc.data_ptr(), ws.data_ptr(), ws_bytes,
                   batch, heads, height, width, d, scale, stream),
               op);
  return {dq, dk, dv, dtable_acc.to(table.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// dwconv_bn_gelu
// ---------------------------------------------------------------------------------------------

struct ConvInput {
  at::Tensor x;        // NCHW- or channels_last-contiguous
  bool channels_last;  // which of the two layouts the kernels index x (and outputs) with
  at::Tensor weight;   // acc, contiguous [C, 1, 3, 3]
  int64_t out_h, out_w;
};

int64_t conv_out_size(int64_t in, int64_t stride) { return (in - 1) / stride + 1; }

ConvInput check_conv(const char* op, const at::Tensor& x_in, const at::Tensor& weight,
                     int64_t stride) {
  check_floating(x_in, op, "x", x_in.device());
  TORCH_CHECK(x_in.dim() == 4, op, ": x must be a 4-D [B, C, H, W] tensor; got shape ",
              x_in.sizes());
  TORCH_CHECK(x_in.size(2) >= 1 && x_in.size(3) >= 1, op,
              ": x must have H >= 1 and W >= 1; got shape ", x_in.sizes());
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2; got ", stride);
  const int64_t channels = x_in.size(1);
  check_floating(weight, op, "weight", x_in.device());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == channels && weight.size(1) == 1 &&
                  weight.size(2) == 3 && weight.size(3) == 3,
              op, ": weight must have shape [C, 1, 3, 3] = [", channels, ", 1, 3, 3]; got ",
              weight.sizes());

  ConvInput in;
  // A tensor contiguous both ways (C == 1, or H == W == 1) counts as NCHW: the CPU kernels
  // and the Python fake kernels choose the output format by the same rule.
  in.channels_last = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  in.x = in.channels_last ? x_in : x_in.contiguous();
  in.weight = weight.to(acc_type(x_in.scalar_type())).contiguous();
  in.out_h = conv_out_size(x_in.size(2), stride);
  in.out_w = conv_out_size(x_in.size(3), stride);
  return in;
}

at::MemoryFormat memory_format(const ConvInput& in) {
  return in.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

std::tuple<at::Tensor, at::Tensor> dwconv_bn_stats_cuda(const at::Tensor& x,
                                                        const at::Tensor& weight, int64_t stride) {
  constexpr const char* op = "dwconv_bn_stats";
  check_device(x, op, "x", x.device());  // a CUDA tensor, before the guard takes its device
  c10::cuda::CUDAGuard device_guard(x.device());
  const ConvInput in = check_conv(op, x, weight, stride);
  const int64_t batch = x.size(0), channels = x.size(1);
  TORCH_CHECK(batch * in.out_h * in.out_w > 0, op,
              ": batch statistics need at least one conv output per channel; got x of shape ",
              x.sizes());
  const auto acc = acc_type(x.scalar_type());
  const cf::DType dtype = launcher_dtype(x.scalar_type());

  at::Tensor mean = new_output(x, {channels}, acc);
  at::Tensor var = new_output(x, {channels}, acc);
  const size_t ws_bytes = cf::dwconv_bn_stats_workspace_bytes(dtype, batch, channels);
  at::Tensor ws = workspace(ws_bytes, x);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check_launch(cf::dwconv_bn_stats_launch(dtype, in.x.data_ptr(), in.weight.data_ptr(),
                                          mean.data_ptr(), var.data_ptr(), ws.data_ptr(), ws_bytes,
                                          batch, channels, x.size(2), x.size(3), stride,
                                          in.channels_last, stream),
               op);
  return {mean, var};
}

// y = gelu(conv(x, weight) * scale + shift), scale == None when BN is folded into weight;
// sums = per-image channel sums of y when pool.
std::tuple<at::Tensor, at::Tensor> dwconv_bn_gelu_apply_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
    const at::Tensor& shift, int64_t stride, bool pool) {
  constexpr const char* op = "dwconv_bn_gelu_apply";
  check_device(x, op, "x", x.device());  // a CUDA tensor, before the guard takes its device
  c10::cuda::CUDAGuard device_guard(x.device());
  const ConvInput in = check_conv(op, x, weight, stride);
  const int64_t batch = x.size(0), channels = x.size(1);
  const auto acc = acc_type(x.scalar_type());
  at::Tensor scale_acc;
  if (scale.has_value() && scale->defined())
    scale_acc = channel_param_to_acc(*scale, op, "scale", x.device(), x.scalar_type(), channels);
  const at::Tensor shift_acc =
      channel_param_to_acc(shift, op, "shift", x.device(), x.scalar_type(), channels);

  at::Tensor y = new_output(in.x, {batch, channels, in.out_h, in.out_w}, x.scalar_type(),
                            memory_format(in));
  at::Tensor sums = pool ? new_output(in.x, {batch, channels}, acc) : new_output(in.x, {0}, acc);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check_launch(cf::dwconv_bn_gelu_forward_launch(
                   launcher_dtype(x.scalar_type()), in.x.data_ptr(), in.weight.data_ptr(),
                   scale_acc.defined() ? scale_acc.data_ptr() : nullptr, shift_acc.data_ptr(),
                   y.data_ptr(), pool ? sums.data_ptr() : nullptr, batch, channels, x.size(2),
                   x.size(3), stride, in.channels_last, stream),
               op);
  return {y, sums};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_gelu_backward_cuda(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_sums, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const at::Tensor& mean, const at::Tensor& rstd, int64_t stride, bool training) {
  constexpr const char* op = "dwconv_bn_gelu_backward";
  check_device(x, op, "x", x.device());  // a CUDA tensor, before the guard takes its device
  c10::cuda::CUDAGuard device_guard(x.device());
  const ConvInput in = check_conv(op, x, weight, stride);
  const int64_t batch = x.size(0), channels = x.size(1);
  const auto acc = acc_type(x.scalar_type());
  const auto dev = x.device();

  check_floating(grad_y, op, "grad_y", dev);
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.size(0) == batch && grad_y.size(1) == channels &&
                  grad_y.size(2) == in.out_h && grad_y.size(3) == in.out_w,
              op, ": grad_y must have the output's shape [B, C, Ho, Wo] = [", batch, ", ",
              channels, ", ", in.out_h, ", ", in.out_w, "]; got ", grad_y.sizes());
  const at::Tensor grad_y_c = grad_y.to(x.scalar_type()).contiguous(memory_format(in));
  at::Tensor grad_sums_acc;
  if (grad_sums.has_value() && grad_sums->defined()) {
    check_floating(*grad_sums, op, "grad_sums", dev);
    TORCH_CHECK(grad_sums->dim() == 2 && grad_sums->size(0) == batch &&
                    grad_sums->size(1) == channels,
                op, ": grad_sums must have shape [B, C] = [", batch, ", ", channels, "]; got ",
                grad_sums->sizes());
    grad_sums_acc = grad_sums->to(acc).contiguous();
  }
  const auto dt = x.scalar_type();
  const at::Tensor gamma = channel_param_to_acc(bn_weight, op, "bn_weight", dev, dt, channels);
  const at::Tensor beta = channel_param_to_acc(bn_bias, op, "bn_bias", dev, dt, channels);
  const at::Tensor mean_acc = channel_param_to_acc(mean, op, "mean", dev, dt, channels);
  const at::Tensor rstd_acc = channel_param_to_acc(rstd, op, "rstd", dev, dt, channels);

  at::Tensor dx = new_output(in.x, x.sizes(), dt, memory_format(in));
  at::Tensor dweight = new_output(in.x, {channels, 1, 3, 3}, acc);
  at::Tensor dgamma = new_output(in.x, {channels}, acc);
  at::Tensor dbeta = new_output(in.x, {channels}, acc);
  const cf::DType dtype = launcher_dtype(dt);
  const size_t ws_bytes = cf::dwconv_bn_gelu_backward_workspace_bytes(
      dtype, batch, channels, x.size(2), x.size(3), stride);
  at::Tensor ws = workspace(ws_bytes, x);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check_launch(cf::dwconv_bn_gelu_backward_launch(
                   dtype, grad_y_c.data_ptr(),
                   grad_sums_acc.defined() ? grad_sums_acc.data_ptr() : nullptr, in.x.data_ptr(),
                   in.weight.data_ptr(), gamma.data_ptr(), beta.data_ptr(), mean_acc.data_ptr(),
                   rstd_acc.data_ptr(), dx.data_ptr(), dweight.data_ptr(), dgamma.data_ptr(),
                   dbeta.data_ptr(), ws.data_ptr(), ws_bytes, batch, channels, x.size(2),
                   x.size(3), stride, training, in.channels_last, stream),
               op);
  return {dx, dweight.to(weight.scalar_type()), dgamma.to(bn_weight.scalar_type()),
          dbeta.to(bn_bias.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// batch_norm_act
// ---------------------------------------------------------------------------------------------

struct BnInput {
  at::Tensor x;        // NCHW- or channels_last-contiguous
  bool channels_last;  // which of the two layouts the kernels index x (and outputs) with
  int64_t positions;   // H * W
};

BnInput check_bn_input(const char* op, const at::Tensor& x_in) {
  check_floating(x_in, op, "x", x_in.device());
  TORCH_CHECK(x_in.dim() == 4, op, ": x must be a 4-D [B, C, H, W] tensor; got shape ",
              x_in.sizes());
  TORCH_CHECK(x_in.size(2) >= 1 && x_in.size(3) >= 1, op,
              ": x must have H >= 1 and W >= 1; got shape ", x_in.sizes());
  BnInput in;
  // A tensor contiguous both ways counts as NCHW, as for the conv above.
  in.channels_last = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  in.x = in.channels_last ? x_in : x_in.contiguous();
  in.positions = x_in.size(2) * x_in.size(3);
  return in;
}

at::MemoryFormat memory_format(const BnInput& in) {
  return in.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The per-image factor [B] rounded to x's dtype (as eager's y * branch_scale.to(y.dtype)), then in
// acc type; undefined when absent.
at::Tensor branch_scale_to_acc(const std::optional<at::Tensor>& branch_scale, const char* op,
                               const at::Tensor& x) {
  if (!branch_scale.has_value() || !branch_scale->defined()) return at::Tensor();
  check_floating(*branch_scale, op, "branch_scale", x.device());
  TORCH_CHECK(branch_scale->dim() == 1 && branch_scale->size(0) == x.size(0), op,
              ": branch_scale must have shape [B] = [", x.size(0), "]; got ", branch_scale->sizes());
  return branch_scale->to(x.scalar_type()).to(acc_type(x.scalar_type())).contiguous();
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& x) {
  constexpr const char* op = "batch_norm_stats";
  check_device(x, op, "x", x.device());  // a CUDA tensor, before the guard takes its device
  c10::cuda::CUDAGuard device_guard(x.device());
  const BnInput in = check_bn_input(op, x);
  const int64_t batch = x.size(0), channels = x.size(1);
  TORCH_CHECK(batch * in.positions > 0, op,
              ": batch statistics need at least one value per channel; got x of shape ", x.sizes());
  const auto acc = acc_type(x.scalar_type());
  const cf::DType dtype = launcher_dtype(x.scalar_type());

  at::Tensor mean = new_output(x, {channels}, acc);
  at::Tensor var = new_output(x, {channels}, acc);
  const size_t ws_bytes = cf::batch_norm_stats_workspace_bytes(dtype, batch, channels, in.positions);
  at::Tensor ws = workspace(ws_bytes, x);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check_launch(cf::batch_norm_stats_launch(dtype, in.x.data_ptr(), mean.data_ptr(), var.data_ptr(),
                                           ws.data_ptr(), ws_bytes, batch, channels, in.positions,
                                           in.channels_last, stream),
               op);
  return {mean, var};
}

// y = residual + branch_scale[b] * act((x - mean) * scale + beta), in the promoted dtype of x and
// residual, in x's layout.
at::Tensor batch_norm_act_apply_cuda(const at::Tensor& x, const at::Tensor& mean,
                                     const at::Tensor& scale, const at::Tensor& beta, bool gelu,
                                     const std::optional<at::Tensor>& residual,
                                     const std::optional<at::Tensor>& branch_scale) {
  constexpr const char* op = "batch_norm_act_apply";
  check_device(x, op, "x", x.device());  // a CUDA tensor, before the guard takes its device
  c10::cuda::CUDAGuard device_guard(x.device());
  const BnInput in = check_bn_input(op, x);
  const int64_t batch = x.size(0), channels = x.size(1);
  const auto dev = x.device();
  const auto dt = x.scalar_type();
  const at::Tensor mean_acc = channel_param_to_acc(mean, op, "mean", dev, dt, channels);
  const at::Tensor scale_acc = channel_param_to_acc(scale, op, "scale", dev, dt, channels);
  const at::Tensor beta_acc = channel_param_to_acc(beta, op, "beta", dev, dt, channels);
  const at::Tensor scale_b = branch_scale_to_acc(branch_scale, op, x);
  at::ScalarType out_dtype = dt;
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    check_floating(*residual, op, "residual", dev);
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual must have x's shape ", x.sizes(),
                "; got ", residual->sizes());
    out_dtype = at::promote_types(dt, residual->scalar_type());
    // In y's dtype and x's layout, so that the kernel walks x, the residual and y with one index.
    res = residual->to(out_dtype).contiguous(memory_format(in));
  }

  at::Tensor y = new_output(in.x, x.sizes(), out_dtype, memory_format(in));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check_launch(cf::batch_norm_act_forward_launch(
                   launcher_dtype(dt), launcher_dtype(out_dtype), in.x.data_ptr(),
                   mean_acc.data_ptr(), scale_acc.data_ptr(), beta_acc.data_ptr(),
                   res.defined() ? res.data_ptr() : nullptr,
                   scale_b.defined() ? scale_b.data_ptr() : nullptr, y.data_ptr(), batch, channels,
                   in.positions, gelu, in.channels_last, stream),
               op);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& rstd, bool gelu,
    const std::optional<at::Tensor>& branch_scale, bool training) {
  constexpr const char* op = "batch_norm_act_backward";
  check_device(x, op, "x", x.device());  // a CUDA tensor, before the guard takes its device
  c10::cuda::CUDAGuard device_guard(x.device());
  const BnInput in = check_bn_input(op, x);
  const int64_t batch = x.size(0), channels = x.size(1);
  const auto acc = acc_type(x.scalar_type());
  const auto dev = x.device();
  const auto dt = x.scalar_type();

  check_floating(grad_y, op, "grad_y", dev);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have x's shape ", x.sizes(),
              "; got ", grad_y.sizes());
  // In x's dtype, as eager's promoting add hands the branch its gradient, and in x's layout.
  const at::Tensor grad_y_c = grad_y.to(dt).contiguous(memory_format(in));
  const at::Tensor gamma = channel_param_to_acc(bn_weight, op, "bn_weight", dev, dt, channels);
  const at::Tensor beta = channel_param_to_acc(bn_bias, op, "bn_bias", dev, dt, channels);
  const at::Tensor mean_acc = channel_param_to_acc(mean, op, "mean", dev, dt, channels);
  const at::Tensor rstd_acc = channel_param_to_acc(rstd, op, "rstd", dev, dt, channels);
  const at::Tensor scale_b = branch_scale_to_acc(branch_scale, op, x);

  at::Tensor dx = new_output(in.x, x.sizes(), dt, memory_format(in));
  at::Tensor dgamma = new_output(in.x, {channels}, acc);
  at::Tensor dbeta = new_output(in.x, {channels}, acc);
  const cf::DType dtype = launcher_dtype(dt);
  const size_t ws_bytes =
      cf::batch_norm_act_backward_workspace_bytes(dtype, batch, channels, in.positions);
  at::Tensor ws = workspace(ws_bytes, x);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check_launch(cf::batch_norm_act_backward_launch(
                   dtype, grad_y_c.data_ptr(), in.x.data_ptr(), gamma.data_ptr(), beta.data_ptr(),
                   mean_acc.data_ptr(), rstd_acc.data_ptr(),
                   scale_b.defined() ? scale_b.data_ptr() : nullptr, dx.data_ptr(),
                   dgamma.data_ptr(), dbeta.data_ptr(), ws.data_ptr(), ws_bytes, batch, channels,
                   in.positions, gelu, training, in.channels_last, stream),
               op);
  return {dx, dgamma.to(bn_weight.scalar_type()), dbeta.to(bn_bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(coatnet_fast_ext, CUDA, m) {
  m.impl("rel_bias_attention_forward", &rel_bias_attention_forward_cuda);
  m.impl("rel_bias_attention_backward", &rel_bias_attention_backward_cuda);
  m.impl("dwconv_bn_stats", &dwconv_bn_stats_cuda);
  m.impl("dwconv_bn_gelu_apply", &dwconv_bn_gelu_apply_cuda);
  m.impl("dwconv_bn_gelu_backward", &dwconv_bn_gelu_backward_cuda);
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("batch_norm_act_apply", &batch_norm_act_apply_cuda);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_cuda);
}
