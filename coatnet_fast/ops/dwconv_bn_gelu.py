"""``dwconv_bn_gelu``: 3x3 depthwise conv (padding 1), BatchNorm, exact GELU, as one op.

Exactly ``gelu(batch_norm(conv2d(x, weight, stride=stride, padding=1, groups=C), running_mean,
running_var, bn_weight, bn_bias, training, momentum, eps))``, including the in-place update
of the running statistics in training. ``momentum`` is the update factor itself: the module
turns ``BatchNorm2d(momentum=None)`` into 1 / num_batches_tracked before calling, as
``nn.BatchNorm2d`` does.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import ext
from . import _batch_norm, _checks, dispatch

OP = "dwconv_bn_gelu"


def check_inputs(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride):
    x = _checks.tensor("x", x, dim=4, shape_doc="[B, C, H, W]")
    _checks.floating("x", x)
    if x.shape[2] < 1 or x.shape[3] < 1:  # (a batch of 0 images is fine in eval)
        raise ValueError(f"x must have H >= 1 and W >= 1 (a 3x3 conv with padding 1 has no output "
                         f"otherwise); got shape {tuple(x.shape)}")
    channels = x.shape[1]
    weight = _checks.tensor("weight", weight, dim=4, shape_doc="[C, 1, 3, 3]")
    if tuple(weight.shape) != (channels, 1, 3, 3):
        raise ValueError(
            f"weight must have shape [C, 1, 3, 3] = {[channels, 1, 3, 3]} for x with C={channels}; "
            f"got {list(weight.shape)}"
        )
    momentum, eps = _batch_norm.check_bn_args(x, channels, bn_weight, bn_bias, running_mean, running_var,
                                              training, momentum, eps)
    _checks.floating("weight", weight)
    _checks.master_dtype("weight", weight, "x", x)
    _checks.same_device([("x", x), ("weight", weight)])
    if stride not in (1, 2) or isinstance(stride, bool):
        raise ValueError(f"stride must be 1 or 2; got {stride!r}")
    batch, _, ho, wo = _out_shape(x, stride)
    _batch_norm.check_batch_count(x, training, batch * ho * wo)
    return momentum, eps, int(stride)


def dwconv_bn_gelu_eager(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride,
                         pool=False):
    """The seed's ``dw_conv`` Sequential, written as calls (weight in x's dtype, as autocast does)."""
    y = F.conv2d(x, weight.to(x.dtype), None, stride, 1, 1, x.shape[1])
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    y = F.gelu(y)
    return (y, y.sum(dim=(2, 3), dtype=torch.float32)) if pool else y


# --- triton backend: custom ops (visible to torch.compile), autograd, dispatch entry ---------

def _out_shape(x: torch.Tensor, stride: int) -> tuple:
    batch, channels, height, width = x.shape
    return batch, channels, (height - 1) // stride + 1, (width - 1) // stride + 1


def _stats_kernels(x, weight, stride: int, running=None):
    """Channel mean and biased variance of the conv output over the batch, fp32 [C] (with
    ``running``: mean and rstd, the running statistics updated in place)."""
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    return kernels.batch_stats(x, weight, stride, running)


@torch.library.custom_op("coatnet_fast::dwconv_bn_stats_triton", mutates_args=())
def _triton_stats(x: torch.Tensor, weight: torch.Tensor, stride: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return _stats_kernels(x, weight, stride)


@_triton_stats.register_fake
def _(x, weight, stride):
    stats = x.new_empty((x.shape[1],), dtype=torch.float32)
    return stats, torch.empty_like(stats)


def _forward_kernels(x, weight, bn_weight, bn_bias, mean, rstd, training: bool, stride: int, pool: bool):
    """y = gelu((conv(x) - mean) * rstd * gamma + beta), and per-image channel sums of y
    ([B, C] fp32 when ``pool``, else empty). ``training`` says mean and rstd are this batch's
    statistics, which the backward then differentiates through."""
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    return kernels.apply(x, weight, mean, rstd, bn_weight, bn_bias, stride, pool)


def _backward_kernels(dy, dsums, x, weight, bn_weight, bn_bias, mean, rstd, stride: int, training: bool):
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    dx, dweight, dgamma, dbeta = kernels.backward(dy, dsums, x, weight, bn_weight, bn_bias, mean, rstd, stride, training)
    return dx, dweight.to(weight.dtype), dgamma.to(bn_weight.dtype), dbeta.to(bn_bias.dtype)


@torch.library.custom_op("coatnet_fast::dwconv_bn_gelu_triton", mutates_args=())
def _triton_forward(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                    mean: torch.Tensor, rstd: torch.Tensor, training: bool, stride: int, pool: bool
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward_kernels(x, weight, bn_weight, bn_bias, mean, rstd, training, stride, pool)


@_triton_forward.register_fake
def _(x, weight, bn_weight, bn_bias, mean, rstd, training, stride, pool):
    sums = x.new_empty((x.shape[0], x.shape[1]) if pool else (0,), dtype=torch.float32)
    return _batch_norm.out_like(x, _out_shape(x, stride)), sums


@torch.library.custom_op("coatnet_fast::dwconv_bn_gelu_triton_backward", mutates_args=())
def _triton_backward(dy: torch.Tensor, dsums: Optional[torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                     bn_weight: torch.Tensor, bn_bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                     stride: int, training: bool
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_kernels(dy, dsums, x, weight, bn_weight, bn_bias, mean, rstd, stride, training)


@_triton_backward.register_fake
def _(dy, dsums, x, weight, bn_weight, bn_bias, mean, rstd, stride, training):
    return _batch_norm.out_like(x, tuple(x.shape)), torch.empty_like(weight), torch.empty_like(bn_weight), torch.empty_like(bn_bias)


def _dw_setup_context(ctx, inputs, output):
    x, weight, bn_weight, bn_bias, mean, rstd, training, stride, pool = inputs
    ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, rstd)  # x, not the conv output
    ctx.stride, ctx.training, ctx.pool = stride, training, pool


def _dw_backward(ctx, dy, dsums):
    x, weight, bn_weight, bn_bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dgamma, dbeta = _triton_backward(dy, dsums if ctx.pool else None, x, weight, bn_weight, bn_bias,
                                                  mean, rstd, ctx.stride, ctx.training)
    return dx, dweight, dgamma, dbeta, None, None, None, None, None


torch.library.register_autograd("coatnet_fast::dwconv_bn_gelu_triton", _dw_backward, setup_context=_dw_setup_context)


class _TritonDWConvFunction(torch.autograd.Function):
    """The eager path of the triton backend: the same launchers as the custom ops above,
    without their per-call dispatch cost (see ``dispatch.eager_fast_path``)."""

    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, mean, rstd, training, stride, pool):
        inputs = (x, weight, bn_weight, bn_bias, mean, rstd, training, stride, pool)
        y, sums = _forward_kernels(*inputs)
        _dw_setup_context(ctx, inputs, (y, sums))
        if not pool:
            ctx.mark_non_differentiable(sums)
        return y, sums

    @staticmethod
    def backward(ctx, dy, dsums):
        dispatch.no_double_backward(OP)
        x, weight, bn_weight, bn_bias, mean, rstd = ctx.saved_tensors
        grads = _backward_kernels(dy, dsums if ctx.pool else None, x, weight, bn_weight, bn_bias, mean, rstd,
                                  ctx.stride, ctx.training)
        return *grads, None, None, None, None, None


def _autocast(x: torch.Tensor) -> torch.Tensor:
    # What autocast does to the eager conv's input; parameters stay fp32 masters.
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def _normalisation(stats, x, weight, running_mean, running_var, training, momentum, eps, stride,
                   stats_update_running=False):
    """(mean, rstd) to normalise with; in training, batch statistics from ``stats``, and the
    running ones updated (by ``stats`` itself with ``stats_update_running``)."""
    batch, _, ho, wo = _out_shape(x, stride)
    return _batch_norm.normalisation(lambda *running: stats(x.detach(), weight.detach(), stride, *running), x,
                                     batch * ho * wo, running_mean, running_var, training, momentum, eps,
                                     stats_update_running)


def dwconv_bn_gelu_triton(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride,
                          pool=False):
    x = _autocast(x)
    fast = dispatch.eager_fast_path(x, weight, bn_weight, bn_bias, running_mean, running_var)
    # The eager path updates the running statistics inside the merge kernel; the custom op (what
    # torch.compile traces) declares no mutation, so its graph keeps the update as torch ops.
    mean, rstd = _normalisation(_stats_kernels if fast else _triton_stats, x, weight, running_mean, running_var,
                                training, momentum, eps, stride, stats_update_running=fast)
    forward = _TritonDWConvFunction.apply if fast else _triton_forward
    # The kernels index per-channel vectors densely; contiguous() is differentiable and free when dense.
    y, sums = forward(x, weight, bn_weight.contiguous(), bn_bias.contiguous(), mean, rstd, training, stride, pool)
    return (y, sums) if pool else y


def _triton_reasons(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride) -> List[str]:
    why = dispatch.triton_device_reasons(x)
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        why.append(f"dtype {dtype} is not supported (float32, float16, bfloat16)")
    return why


dispatch.register(OP, "eager", dwconv_bn_gelu_eager)
dispatch.register(OP, "triton", dwconv_bn_gelu_triton, available=dispatch.triton_available, reasons=_triton_reasons)


# --- ext backend: torch.ops.coatnet_fast_ext (csrc/), built on first use ---------------------
# Schemas and CPU/CUDA kernels are registered in C++; fake kernels and the autograd formula
# of ``dwconv_bn_gelu_forward`` (the BatchNorm training backward, in the C++ backward op) are
# added here once the library is loaded.

def _ext_fake_stats(x, weight, stride):
    stats = x.new_empty((x.shape[1],), dtype=ext.acc_dtype(x.dtype))
    return stats, torch.empty_like(stats)


def _ext_fake_apply(x, weight, scale, shift, stride, pool):
    sums = x.new_empty((x.shape[0], x.shape[1]) if pool else (0,), dtype=ext.acc_dtype(x.dtype))
    return _batch_norm.out_like(x, _out_shape(x, stride)), sums


def _ext_fake_forward(x, weight, bn_weight, bn_bias, mean, rstd, training, stride, pool):
    return _ext_fake_apply(x, weight, None, None, stride, pool)


def _ext_fake_backward(dy, dsums, x, weight, bn_weight, bn_bias, mean, rstd, stride, training):
    return (_batch_norm.out_like(x, tuple(x.shape)), weight.new_empty(weight.shape), bn_weight.new_empty(bn_weight.shape),
            bn_bias.new_empty(bn_bias.shape))


def _ext_backward(ctx, dy, dsums):
    # The C++ backward op has no autograd formula: under create_graph=True autograd's fallback
    # would give gradients of it that are silently zero, so it raises instead.
    dispatch.no_double_backward(OP)
    x, weight, bn_weight, bn_bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dgamma, dbeta = torch.ops.coatnet_fast_ext.dwconv_bn_gelu_backward(
        dy, dsums if ctx.pool else None, x, weight, bn_weight, bn_bias, mean, rstd, ctx.stride, ctx.training)
    return dx, dweight, dgamma, dbeta, None, None, None, None, None


def _register_ext_python_parts() -> None:
    ns = "coatnet_fast_ext::"
    torch.library.register_fake(ns + "dwconv_bn_stats")(_ext_fake_stats)
    torch.library.register_fake(ns + "dwconv_bn_gelu_apply")(_ext_fake_apply)
    torch.library.register_fake(ns + "dwconv_bn_gelu_forward")(_ext_fake_forward)
    torch.library.register_fake(ns + "dwconv_bn_gelu_backward")(_ext_fake_backward)
    torch.library.register_autograd(ns + "dwconv_bn_gelu_forward", _ext_backward, setup_context=_dw_setup_context)


ext.on_load(_register_ext_python_parts)


def dwconv_bn_gelu_ext(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride,
                       pool=False):
    if not ext.is_loaded():
        ext.load()
    x = _autocast(x)
    mean, rstd = _normalisation(torch.ops.coatnet_fast_ext.dwconv_bn_stats, x, weight, running_mean, running_var,
                                training, momentum, eps, stride)
    y, sums = torch.ops.coatnet_fast_ext.dwconv_bn_gelu_forward(x, weight, bn_weight, bn_bias, mean, rstd, training,
                                                                stride, pool)
    return (y, sums) if pool else y


def _ext_reasons(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride) -> List[str]:
    why = ext.device_reasons(x)
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if dtype not in ext.DTYPES:
        why.append(f"dtype {dtype} is not supported ({', '.join(str(t) for t in ext.DTYPES)})")
    return why


dispatch.register(OP, "ext", dwconv_bn_gelu_ext, available=ext.unavailable_reason, reasons=_ext_reasons,
                  prepare=ext.load)


def dwconv_bn_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Depthwise 3x3 conv + BatchNorm + exact GELU.

    Args:
        x: [B, C, H, W] (NCHW or channels_last).
        weight: [C, 1, 3, 3] depthwise kernel.
        bn_weight, bn_bias, running_mean, running_var: [C]; x's dtype or float32.
        training: batch statistics and an in-place running-statistics update when True,
            running statistics when False.
        momentum: running-statistics update factor in [0, 1].
        eps: added to the variance.
        stride: 1 or 2.
        backend: "auto", "eager", "triton" or "ext".
    """
    impl, args = _select(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride,
                         backend)
    return impl.impl(*args)


def dwconv_bn_gelu_pool(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride: int = 1,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``dwconv_bn_gelu`` and the per-image channel mean of its output ([B, C], fp32), the
    squeeze of the SE block that follows it in MBConv; fused backends produce the mean in the
    same pass instead of re-reading the output. Every backend's ``impl`` takes ``pool=True``."""
    impl, args = _select(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride,
                         backend)
    y, sums = impl.impl(*args, pool=True)
    return y, sums / (y.shape[2] * y.shape[3])


_ARG_NAMES = ("x", "weight", "bn_weight", "bn_bias", "running_mean", "running_var", "training", "momentum", "eps", "stride")


def _select(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride, backend):
    """Validate, then pick the backend entry; returns it with the normalised arguments."""
    momentum, eps, stride = check_inputs(
        x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride
    )
    args = (x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride)
    return dispatch.select(OP, backend, dict(zip(_ARG_NAMES, args))), args


def supported_reasons(backend: str, x, weight, bn_weight, bn_bias, running_mean, running_var, *,
                      training: bool, momentum: float = 0.1, eps: float = 1e-5, stride: int = 1) -> List[str]:
    """Why ``backend`` would reject these inputs (empty when it takes them)."""
    momentum, eps, stride = check_inputs(
        x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride
    )
    args = (x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride)
    return dispatch.why_not(OP, backend, dict(zip(_ARG_NAMES, args)))
