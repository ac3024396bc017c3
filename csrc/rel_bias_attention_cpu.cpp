// rel_bias_attention on the CPU: softmax(q k^T * scale + bias) v, the bias gathered from the
// relative-position table by offset.
//
// The two products go to BLAS (at::matmul over the whole batch); what eager does between them
// in several passes over [B, heads, N, N] (scale, add the gathered bias, softmax) is one fused
// pass here, row by row, reading a bias gathered once per call for all images. The backward recomputes the
// probabilities from the saved log-sum-exp instead of keeping them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cmath>
#include <limits>

#include "cpu_kernels.h"

namespace coatnet_fast_ext {
namespace {

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& table, int64_t height, int64_t width) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be a 4-D [B, heads, N, d] tensor; got shape ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), op, ": k must have q's shape ", q.sizes(), "; got ", k.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), op, ": v must have q's shape ", q.sizes(), "; got ", v.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": q must be floating point; got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": k and v must have q's dtype ", q.scalar_type(), "; got ", k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(height > 0 && width > 0 && height * width == q.size(2), op, ": window (", height, ", ", width,
              ") must have H*W == N = ", q.size(2));
  const int64_t rows = (2 * height - 1) * (2 * width - 1);
  TORCH_CHECK(table.dim() == 2 && table.size(0) == rows && table.size(1) == q.size(1), op,
              ": table must have shape [(2H-1)(2W-1), heads] = [", rows, ", ", q.size(1), "]; got ", table.sizes());
  TORCH_CHECK(table.scalar_type() == q.scalar_type() || table.scalar_type() == at::kFloat, op,
              ": table must have q's dtype or float32; got ", table.scalar_type());
  for (const at::Tensor* t : {&q, &k, &v, &table}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": expected CPU tensors; got one on ", t->device());
  }
}

// The bias as [heads, N, N], gathered from the table once per call: it does not depend on
// the batch, so the B-fold larger score pass then reads it as contiguous rows that stay in
// cache from one image to the next.
at::Tensor gather_bias(const at::Tensor& table, int64_t height, int64_t width, at::ScalarType acc) {
  const int64_t heads = table.size(1), n = height * width;
  const at::Tensor by_head = table.to(acc).t().contiguous();  // [heads, rows]
  at::Tensor bias = at::empty({heads, n, n}, by_head.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "rel_bias_attention_gather_bias_cpu", [&] {
    const scalar_t* t = by_head.data_ptr<scalar_t>();
    scalar_t* b = bias.data_ptr<scalar_t>();
    const int64_t rows = by_head.size(1);
    at::parallel_for(0, heads * n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t hi = begin; hi < end; ++hi) {
        const int64_t head = hi / n, i = hi % n, yi = i / width, xi = i % width;
        const scalar_t* th = t + head * rows;
        scalar_t* out = b + hi * n;
        for (int64_t yj = 0; yj < height; ++yj) {
          // Keys along a window row step the table row down by one.
          const scalar_t* run = th + (yi - yj + height - 1) * (2 * width - 1) + (xi + width - 1);
          for (int64_t xj = 0; xj < width; ++xj) out[yj * width + xj] = run[-xj];
        }
      }
    });
  });
  return bias;
}

// NaN-propagating max, like torch.max: a NaN score must not vanish from the softmax.
template <typename acc_t>
inline acc_t nan_max(acc_t a, acc_t b) {
  return (b > a || std::isnan(b)) ? b : a;
}

// Turns one row of raw scores q_i . k_j into probabilities; returns the log-sum-exp.
template <typename acc_t>
acc_t softmax_row(acc_t* s, const acc_t* bias, int64_t n, acc_t scale) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kV = Vec::size();
  const Vec vscale(scale);
  Vec vmax(-std::numeric_limits<acc_t>::infinity());
  int64_t j = 0;
  for (; j + kV <= n; j += kV) {
    const Vec a = at::vec::fmadd(Vec::loadu(s + j), vscale, Vec::loadu(bias + j));
    a.store(s + j);
    vmax = at::vec::maximum(vmax, a);
  }
  acc_t m = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (; j < n; ++j) {
    s[j] = s[j] * scale + bias[j];
    m = nan_max(m, s[j]);
  }
  // A row whose scores are all -inf gives NaN, as torch.softmax does.
  const Vec vm(m);
  Vec vsum(0);
  for (j = 0; j + kV <= n; j += kV) {
    const Vec e = (Vec::loadu(s + j) - vm).exp();
    e.store(s + j);
    vsum = vsum + e;
  }
  acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  const acc_t inv = acc_t(1) / sum;
  at::vec::map([inv](Vec a) { return a * Vec(inv); }, s, s, n);
  return m + std::log(sum);
}

// p_ij = exp(s_ij * scale + bias_ij - lse_i) in place over the raw scores s, and
// ds_ij = p_ij (dp_ij - delta_i) in place over dp.
template <typename acc_t>
void softmax_backward_row(acc_t* s, acc_t* dp, const acc_t* bias, int64_t n, acc_t scale, acc_t lse, acc_t delta) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kV = Vec::size();
  const Vec vscale(scale), vlse(lse), vdelta(delta);
  int64_t j = 0;
  for (; j + kV <= n; j += kV) {
    const Vec p = (at::vec::fmadd(Vec::loadu(s + j), vscale, Vec::loadu(bias + j)) - vlse).exp();
    p.store(s + j);
    (p * (Vec::loadu(dp + j) - vdelta)).store(dp + j);
  }
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] * scale + bias[j] - lse);
    dp[j] = s[j] * (dp[j] - delta);
  }
}

// The products below run in the accumulation type whatever autocast says: the caller has
// already cast q, k, v as autocast wants, and the dispatcher would otherwise cast again here.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// Grain: enough rows per task that a task does ~32K score elements.
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> rel_bias_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const at::Tensor& table,
                                                                  int64_t height, int64_t width, double scale) {
  check_inputs("rel_bias_attention_forward", q, k, v, table, height, width);
  const NoAutocast no_autocast;
  const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2);
  const at::ScalarType acc = at::toOpMathType(q.scalar_type());
  // Scores in the accumulation type, also for fp16/bf16 inputs: the softmax runs in fp32.
  at::Tensor probs = at::matmul(q.to(acc), k.to(acc).transpose(-1, -2)).contiguous();
  at::Tensor lse = new_output(q, {batch, heads, n}, acc);
  const at::Tensor bias = gather_bias(table, height, width, acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "rel_bias_attention_forward_cpu", [&] {
    scalar_t* s = probs.data_ptr<scalar_t>();
    scalar_t* l = lse.data_ptr<scalar_t>();
    const scalar_t* b = bias.data_ptr<scalar_t>();
    at::parallel_for(0, batch * heads * n, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        l[row] = softmax_row<scalar_t>(s + row * n, b + (row % (heads * n)) * n, n, static_cast<scalar_t>(scale));
      }
    });
  });
  at::Tensor out = at::matmul(probs, v.to(acc)).to(q.scalar_type()).contiguous();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rel_bias_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& table, const at::Tensor& out, const at::Tensor& lse, int64_t height, int64_t width,
    double scale) {
  check_inputs("rel_bias_attention_backward", q, k, v, table, height, width);
  const NoAutocast no_autocast;
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "rel_bias_attention_backward: grad_out and out must have q's shape ", q.sizes(), "; got ",
              grad_out.sizes(), " and ", out.sizes());
  const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == batch && lse.size(1) == heads && lse.size(2) == n,
              "rel_bias_attention_backward: lse must have shape [B, heads, N] = [", batch, ", ", heads, ", ", n,
              "]; got ", lse.sizes());
  const int64_t rows = (2 * height - 1) * (2 * width - 1);
  const at::ScalarType acc = at::toOpMathType(q.scalar_type());
  const at::Tensor qa = q.to(acc), ka = k.to(acc), va = v.to(acc), ga = grad_out.to(acc);
  at::Tensor probs = at::matmul(qa, ka.transpose(-1, -2)).contiguous();
  at::Tensor dscores = at::matmul(ga, va.transpose(-1, -2)).contiguous();
  const at::Tensor delta = (ga * out.to(acc)).sum(-1).contiguous();
  const at::Tensor lse_acc = lse.to(acc).contiguous();
  const at::Tensor bias = gather_bias(table, height, width, acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "rel_bias_attention_backward_cpu", [&] {
    scalar_t* s = probs.data_ptr<scalar_t>();
    scalar_t* ds = dscores.data_ptr<scalar_t>();
    const scalar_t* l = lse_acc.data_ptr<scalar_t>();
    const scalar_t* dl = delta.data_ptr<scalar_t>();
    const scalar_t* b = bias.data_ptr<scalar_t>();
    at::parallel_for(0, batch * heads * n, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        softmax_backward_row<scalar_t>(s + row * n, ds + row * n, b + (row % (heads * n)) * n, n,
                                       static_cast<scalar_t>(scale), l[row], dl[row]);
      }
    });
  });
  const at::ScalarType dtype = q.scalar_type();
  at::Tensor dv = at::matmul(probs.transpose(-1, -2), ga).to(dtype).contiguous();
  at::Tensor dq = at::matmul(dscores, ka).mul_(scale).to(dtype).contiguous();
  at::Tensor dk = at::matmul(dscores.transpose(-1, -2), qa).mul_(scale).to(dtype).contiguous();

  // d(table): every (i, j) pair with the same relative offset adds into one table row. Summed
  // over the batch first, then gathered per (row, head) so that each output element has one
  // writer and a fixed summation order.
  const at::Tensor dsum = dscores.sum(0).contiguous();  // [heads, N, N]
  at::Tensor dtable = new_output(table, {rows, heads}, acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "rel_bias_attention_table_grad_cpu", [&] {
    const scalar_t* g = dsum.data_ptr<scalar_t>();
    scalar_t* dt = dtable.data_ptr<scalar_t>();
    at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t row = idx / heads, head = idx % heads;
        const int64_t dy = row / (2 * width - 1) - (height - 1), dx = row % (2 * width - 1) - (width - 1);
        const scalar_t* gh = g + head * n * n;
        scalar_t total = 0;
        for (int64_t yi = std::max<int64_t>(0, dy); yi < std::min(height, height + dy); ++yi) {
          for (int64_t xi = std::max<int64_t>(0, dx); xi < std::min(width, width + dx); ++xi) {
            total += gh[(yi * width + xi) * n + (yi - dy) * width + (xi - dx)];
          }
        }
        dt[idx] = total;
      }
    });
  });
  return {dq, dk, dv, dtable.to(table.scalar_type())};
}

}  // namespace coatnet_fast_ext
