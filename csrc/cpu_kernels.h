// CPU kernels of the "ext" backend. Each op's C++ signature follows its schema in ops.cpp
// (int -> int64_t, float -> double, Tensor? -> std::optional<Tensor>).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace coatnet_fast_ext {

std::tuple<at::Tensor, at::Tensor> rel_bias_attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
    int64_t height, int64_t width, double scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rel_bias_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& table, const at::Tensor& out, const at::Tensor& lse, int64_t height, int64_t width,
    double scale);

std::tuple<at::Tensor, at::Tensor> dwconv_bn_stats_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t stride);

std::tuple<at::Tensor, at::Tensor> dwconv_bn_gelu_apply_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale, const at::Tensor& shift,
    int64_t stride, bool pool);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_gelu_backward_cpu(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_sums, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t stride, bool training);

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& x);

at::Tensor batch_norm_act_apply_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                                    const at::Tensor& beta, bool gelu, const std::optional<at::Tensor>& residual,
                                    const std::optional<at::Tensor>& branch_scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const at::Tensor& mean, const at::Tensor& rstd, bool gelu, const std::optional<at::Tensor>& branch_scale,
    bool training);

// Tests set COATNET_FAST_POISON_OUTPUTS=1 so that outputs start as NaN: an element a kernel
// forgets to write then fails the comparison instead of passing on leftover memory.
bool poison_outputs();
at::Tensor new_output(const at::Tensor& like, at::IntArrayRef shape, at::ScalarType dtype,
                      at::MemoryFormat format = at::MemoryFormat::Contiguous);

}  // namespace coatnet_fast_ext
