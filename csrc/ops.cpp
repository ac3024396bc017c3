// Schemas of the "ext" backend's ops and their CPU kernels. The CUDA kernels register in
// ops_cuda.cpp, which is compiled only when torch has CUDA. Autograd formulas and fake
// (meta) kernels are registered from Python (coatnet_fast/ops/*.py) once the library loads.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>

#include "cpu_kernels.h"

namespace coatnet_fast_ext {

bool poison_outputs() {
  const char* flag = std::getenv("COATNET_FAST_POISON_OUTPUTS");
  return flag != nullptr && std::strcmp(flag, "1") == 0;
}

at::Tensor new_output(const at::Tensor& like, at::IntArrayRef shape, at::ScalarType dtype, at::MemoryFormat format) {
  at::Tensor out = at::empty(shape, like.options().dtype(dtype).memory_format(format));
  if (poison_outputs() && at::isFloatingType(dtype)) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

// BatchNorm as a per-channel scale and shift of the conv output; in inference the scale is
// folded into the conv weights, so the kernel does one multiply-add less per element. The
// same on every device, so it is written once over the apply op.
std::tuple<at::Tensor, at::Tensor> dwconv_bn_gelu_forward(const at::Tensor& x, const at::Tensor& weight,
                                                          const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                                          const at::Tensor& mean, const at::Tensor& rstd,
                                                          bool training, int64_t stride, bool pool) {
  static auto apply = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("coatnet_fast_ext::dwconv_bn_gelu_apply", "")
                          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                    const std::optional<at::Tensor>&,
                                                                    const at::Tensor&, int64_t, bool)>();
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  const at::Tensor scale = bn_weight.to(acc) * rstd.to(acc);
  const at::Tensor shift = bn_bias.to(acc) - mean.to(acc) * scale;
  if (training) {
    return apply.call(x, weight, scale, shift, stride, pool);
  }
  return apply.call(x, weight.to(acc) * scale.view({-1, 1, 1, 1}), std::nullopt, shift, stride, pool);
}

// BatchNorm as a per-channel scale of the centred x (scale = gamma * rstd), the same on every
// device. `training` only tells the autograd formula (registered from Python) whether mean and
// rstd are this batch's statistics, which the backward then differentiates through.
at::Tensor batch_norm_act_forward(const at::Tensor& x, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                  const at::Tensor& mean, const at::Tensor& rstd, bool /*training*/, bool gelu,
                                  const std::optional<at::Tensor>& residual,
                                  const std::optional<at::Tensor>& branch_scale) {
  static auto apply = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("coatnet_fast_ext::batch_norm_act_apply", "")
                          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, bool, const std::optional<at::Tensor>&,
                                            const std::optional<at::Tensor>&)>();
  TORCH_CHECK(bn_weight.dim() == 1 && rstd.dim() == 1 && bn_weight.size(0) == rstd.size(0),
              "batch_norm_act_forward: bn_weight and rstd must have shape [C]; got ", bn_weight.sizes(), " and ",
              rstd.sizes());
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  return apply.call(x, mean, bn_weight.to(acc) * rstd.to(acc), bn_bias, gelu, residual, branch_scale);
}

}  // namespace coatnet_fast_ext

TORCH_LIBRARY(coatnet_fast_ext, m) {
  m.def("rel_bias_attention_forward(Tensor q, Tensor k, Tensor v, Tensor table, int height, int width, "
        "float scale) -> (Tensor, Tensor)");
  m.def("rel_bias_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor table, Tensor out, "
        "Tensor lse, int height, int width, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dwconv_bn_stats(Tensor x, Tensor weight, int stride) -> (Tensor, Tensor)");
  // The kernel: y = gelu(conv(x, weight) * scale + shift) (no scale: BN folded into weight),
  // and per-image channel sums of y when pool.
  m.def("dwconv_bn_gelu_apply(Tensor x, Tensor weight, Tensor? scale, Tensor shift, int stride, bool pool) "
        "-> (Tensor, Tensor)");
  // The differentiable op: BatchNorm by (mean, rstd), batch statistics when training. Its
  // autograd formula is the BatchNorm training backward (registered from Python).
  m.def("dwconv_bn_gelu_forward(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor mean, "
        "Tensor rstd, bool training, int stride, bool pool) -> (Tensor, Tensor)");
  m.def("dwconv_bn_gelu_backward(Tensor grad_y, Tensor? grad_sums, Tensor x, Tensor weight, Tensor bn_weight, "
        "Tensor bn_bias, Tensor mean, Tensor rstd, int stride, bool training) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("batch_norm_stats(Tensor x) -> (Tensor, Tensor)");
  // The kernel: y = residual + branch_scale[b] * act((x - mean) * scale + beta), act GELU when gelu;
  // y has the promoted dtype of x and residual, and x's layout.
  m.def("batch_norm_act_apply(Tensor x, Tensor mean, Tensor scale, Tensor beta, bool gelu, Tensor? residual, "
        "Tensor? branch_scale) -> Tensor");
  // The differentiable op; its autograd formula (registered from Python) is BatchNorm's training
  // backward when training, its eval backward otherwise, from x alone.
  m.def("batch_norm_act_forward(Tensor x, Tensor bn_weight, Tensor bn_bias, Tensor mean, Tensor rstd, "
        "bool training, bool gelu, Tensor? residual, Tensor? branch_scale) -> Tensor");
  m.def("batch_norm_act_backward(Tensor grad_y, Tensor x, Tensor bn_weight, Tensor bn_bias, Tensor mean, "
        "Tensor rstd, bool gelu, Tensor? branch_scale, bool training) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(coatnet_fast_ext, CPU, m) {
  m.impl("rel_bias_attention_forward", &coatnet_fast_ext::rel_bias_attention_forward_cpu);
  m.impl("rel_bias_attention_backward", &coatnet_fast_ext::rel_bias_attention_backward_cpu);
  m.impl("dwconv_bn_stats", &coatnet_fast_ext::dwconv_bn_stats_cpu);
  m.impl("dwconv_bn_gelu_apply", &coatnet_fast_ext::dwconv_bn_gelu_apply_cpu);
  m.impl("dwconv_bn_gelu_backward", &coatnet_fast_ext::dwconv_bn_gelu_backward_cpu);
  m.impl("batch_norm_stats", &coatnet_fast_ext::batch_norm_stats_cpu);
  m.impl("batch_norm_act_apply", &coatnet_fast_ext::batch_norm_act_apply_cpu);
  m.impl("batch_norm_act_backward", &coatnet_fast_ext::batch_norm_act_backward_cpu);
}

TORCH_LIBRARY_IMPL(coatnet_fast_ext, CompositeExplicitAutograd, m) {
  m.impl("dwconv_bn_gelu_forward", &coatnet_fast_ext::dwconv_bn_gelu_forward);
  m.impl("batch_norm_act_forward", &coatnet_fast_ext::batch_norm_act_forward);
}
