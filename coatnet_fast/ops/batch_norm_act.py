"""``batch_norm_act``: BatchNorm, optional exact GELU, optional per-image scale and residual add.

Exactly ``residual + branch_scale.view(B, 1, 1, 1) * act(batch_norm(x, running_mean,
running_var, bn_weight, bn_bias, training, momentum, eps))``, including the in-place update of
the running statistics in training, with ``act`` GELU or the identity. It follows cuDNN's
convs: the stem's 3x3 conv layers and MBConv's expand take BatchNorm + GELU, MBConv's
projection BatchNorm with the block's stochastic-depth scale and residual add. ``momentum`` is the update factor itself, as
in ``dwconv_bn_gelu``.

Backends: "eager", "triton" and "ext" (the C++/CUDA extension).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import ext
from . import _batch_norm, _checks, dispatch

OP = "batch_norm_act"
ACTIVATIONS = ("gelu", "identity")


def check_inputs(x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, activation,
                 residual, branch_scale):
    x = _checks.tensor("x", x, dim=4, shape_doc="[B, C, H, W]")
    _checks.floating("x", x)
    batch, channels, height, width = x.shape
    if height == 0 or width == 0:
        raise ValueError(f"x must have positive H and W; got shape {tuple(x.shape)}")
    momentum, eps = _batch_norm.check_bn_args(x, channels, bn_weight, bn_bias, running_mean, running_var,
                                              training, momentum, eps)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
    if residual is not None:
        _checks.tensor("residual", residual, dim=4, shape_doc="[B, C, H, W] like x")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}")
        _checks.floating("residual", residual)
        _checks.same_device([("x", x), ("residual", residual)])
    if branch_scale is not None:
        _checks.tensor("branch_scale", branch_scale, dim=1, shape_doc="[B]")
        if branch_scale.shape[0] != batch:
            raise ValueError(f"branch_scale must have shape [B] = [{batch}]; got {list(branch_scale.shape)}")
        _checks.floating("branch_scale", branch_scale)
        _checks.same_device([("x", x), ("branch_scale", branch_scale)])
        if branch_scale.requires_grad:
            raise ValueError("branch_scale must not require grad: it is a constant per-image factor "
                             "(a stochastic-depth mask), and no backend differentiates it")
    _batch_norm.check_batch_count(x, training, batch * height * width)
    return momentum, eps


def batch_norm_act_eager(x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, activation,
                         residual, branch_scale):
    """The seed's ``BatchNorm2d`` (+ ``GELU``) and then ``shortcut + drop_path(branch)``, as calls."""
    y = F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if activation == "gelu":
        y = F.gelu(y)
    if branch_scale is not None:
        y = y * branch_scale.to(y.dtype).view(-1, 1, 1, 1)
    return y if residual is None else residual + y


# --- triton backend: custom ops (visible to torch.compile), autograd, dispatch entry ---------

def _stats_kernels(x, running=None):
    from coatnet_fast.kernels import batch_norm_act as kernels

    return kernels.batch_stats(x, running)


@torch.library.custom_op("coatnet_fast::batch_norm_stats_triton", mutates_args=())
def _triton_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return _stats_kernels(x)


@_triton_stats.register_fake
def _(x):
    stats = x.new_empty((x.shape[1],), dtype=torch.float32)
    return stats, torch.empty_like(stats)


def _out_dtype(x, residual) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _forward_kernels(x, bn_weight, bn_bias, mean, rstd, gelu: bool, residual, branch_scale):
    from coatnet_fast.kernels import batch_norm_act as kernels

    return kernels.apply(x, mean, rstd, bn_weight, bn_bias, gelu, residual, branch_scale, _out_dtype(x, residual))


def _backward_kernels(dy, x, bn_weight, bn_bias, mean, rstd, gelu: bool, branch_scale, training: bool):
    from coatnet_fast.kernels import batch_norm_act as kernels

    dx, dgamma, dbeta = kernels.backward(dy, x, bn_weight, bn_bias, mean, rstd, gelu, branch_scale, training)
    return dx, dgamma.to(bn_weight.dtype), dbeta.to(bn_bias.dtype)


@torch.library.custom_op("coatnet_fast::batch_norm_act_triton", mutates_args=())
def _triton_forward(x: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor, mean: torch.Tensor,
                    rstd: torch.Tensor, training: bool, gelu: bool, residual: Optional[torch.Tensor],
                    branch_scale: Optional[torch.Tensor]) -> torch.Tensor:
    return _forward_kernels(x, bn_weight, bn_bias, mean, rstd, gelu, residual, branch_scale)


@_triton_forward.register_fake
def _(x, bn_weight, bn_bias, mean, rstd, training, gelu, residual, branch_scale):
    return _batch_norm.out_like(x, tuple(x.shape), _out_dtype(x, residual))


@torch.library.custom_op("coatnet_fast::batch_norm_act_triton_backward", mutates_args=())
def _triton_backward(dy: torch.Tensor, x: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                     mean: torch.Tensor, rstd: torch.Tensor, gelu: bool, branch_scale: Optional[torch.Tensor],
                     training: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_kernels(dy, x, bn_weight, bn_bias, mean, rstd, gelu, branch_scale, training)


@_triton_backward.register_fake
def _(dy, x, bn_weight, bn_bias, mean, rstd, gelu, branch_scale, training):
    return _batch_norm.out_like(x, tuple(x.shape)), torch.empty_like(bn_weight), torch.empty_like(bn_bias)


def _setup_context(ctx, inputs, output):
    x, bn_weight, bn_bias, mean, rstd, training, gelu, residual, branch_scale = inputs
    ctx.save_for_backward(x, bn_weight, bn_bias, mean, rstd, branch_scale)  # x, not the BatchNorm output
    ctx.training, ctx.gelu = training, gelu
    ctx.residual_dtype = None if residual is None else residual.dtype


def _residual_grad(ctx, dy):
    # The add's gradient is dy itself; only its dtype may need to follow the residual's.
    return None if ctx.residual_dtype is None else dy.to(ctx.residual_dtype)


def _backward(ctx, dy):
    x, bn_weight, bn_bias, mean, rstd, branch_scale = ctx.saved_tensors
    dx, dgamma, dbeta = _triton_backward(dy, x, bn_weight, bn_bias, mean, rstd, ctx.gelu, branch_scale, ctx.training)
    return dx, dgamma, dbeta, None, None, None, None, _residual_grad(ctx, dy), None


torch.library.register_autograd("coatnet_fast::batch_norm_act_triton", _backward, setup_context=_setup_context)


class _TritonBatchNormActFunction(torch.autograd.Function):
    """The eager path of the triton backend: the same launchers as the custom ops above,
    without their per-call dispatch cost (see ``dispatch.eager_fast_path``)."""

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, mean, rstd, training, gelu, residual, branch_scale):
        inputs = (x, bn_weight, bn_bias, mean, rstd, training, gelu, residual, branch_scale)
        y = _forward_kernels(x, bn_weight, bn_bias, mean, rstd, gelu, residual, branch_scale)
        _setup_context(ctx, inputs, y)
        return y

    @staticmethod
    def backward(ctx, dy):
        dispatch.no_double_backward(OP)
        x, bn_weight, bn_bias, mean, rstd, branch_scale = ctx.saved_tensors
        dx, dgamma, dbeta = _backward_kernels(dy, x, bn_weight, bn_bias, mean, rstd, ctx.gelu, branch_scale,
                                              ctx.training)
        return dx, dgamma, dbeta, None, None, None, None, _residual_grad(ctx, dy), None


def batch_norm_act_triton(x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, activation,
                          residual, branch_scale):
    tensors = [t for t in (x, bn_weight, bn_bias, running_mean, running_var, residual, branch_scale) if t is not None]
    fast = dispatch.eager_fast_path(*tensors)
    stats = _stats_kernels if fast else _triton_stats
    batch, _, height, width = x.shape
    # The eager path updates the running statistics inside the merge kernel; the custom op (what
    # torch.compile traces) declares no mutation, so its graph keeps the update as torch ops.
    mean, rstd = _batch_norm.normalisation(lambda *running: stats(x.detach(), *running), x, batch * height * width,
                                           running_mean, running_var, training, momentum, eps,
                                           stats_update_running=fast)
    if branch_scale is not None:
        branch_scale = branch_scale.contiguous()
    # The kernels index per-channel vectors densely; contiguous() is differentiable and free when dense.
    bn_weight, bn_bias = bn_weight.contiguous(), bn_bias.contiguous()
    forward = _TritonBatchNormActFunction.apply if fast else _triton_forward
    return forward(x, bn_weight, bn_bias, mean, rstd, training, activation == "gelu", residual, branch_scale)


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_reasons(x, residual=None, **_inputs) -> List[str]:
    why = dispatch.triton_device_reasons(x)
    for name, t in (("x", x), ("residual", residual)):
        if t is not None and t.dtype not in _TRITON_DTYPES:
            why.append(f"{name}: dtype {t.dtype} is not supported (float32, float16, bfloat16)")
    return why


dispatch.register(OP, "eager", batch_norm_act_eager)
dispatch.register(OP, "triton", batch_norm_act_triton, available=dispatch.triton_available, reasons=_triton_reasons)


# --- ext backend: torch.ops.coatnet_fast_ext (csrc/), built on first use ---------------------
# Schemas and CPU/CUDA kernels are registered in C++; fake kernels and the autograd formula of
# ``batch_norm_act_forward`` (the C++ backward op, from x alone) are added here once the library
# is loaded. The forward saves what the triton backend's does (_setup_context).

def _ext_fake_stats(x):
    stats = x.new_empty((x.shape[1],), dtype=ext.acc_dtype(x.dtype))
    return stats, torch.empty_like(stats)


def _ext_fake_apply(x, mean, scale, beta, gelu, residual, branch_scale):
    return _batch_norm.out_like(x, tuple(x.shape), _out_dtype(x, residual))


def _ext_fake_forward(x, bn_weight, bn_bias, mean, rstd, training, gelu, residual, branch_scale):
    return _ext_fake_apply(x, mean, None, bn_bias, gelu, residual, branch_scale)


def _ext_fake_backward(dy, x, bn_weight, bn_bias, mean, rstd, gelu, branch_scale, training):
    return (_batch_norm.out_like(x, tuple(x.shape)), bn_weight.new_empty(bn_weight.shape),
            bn_bias.new_empty(bn_bias.shape))


def _ext_backward(ctx, dy):
    # The C++ backward op has no autograd formula of its own: a graph of these gradients
    # (create_graph=True) would silently differentiate to zero, so it raises instead.
    dispatch.no_double_backward(OP)
    x, bn_weight, bn_bias, mean, rstd, branch_scale = ctx.saved_tensors
    dx, dgamma, dbeta = torch.ops.coatnet_fast_ext.batch_norm_act_backward(
        dy, x, bn_weight, bn_bias, mean, rstd, ctx.gelu, branch_scale, ctx.training)
    return dx, dgamma, dbeta, None, None, None, None, _residual_grad(ctx, dy), None


def _register_ext_python_parts() -> None:
    ns = "coatnet_fast_ext::"
    torch.library.register_fake(ns + "batch_norm_stats")(_ext_fake_stats)
    torch.library.register_fake(ns + "batch_norm_act_apply")(_ext_fake_apply)
    torch.library.register_fake(ns + "batch_norm_act_forward")(_ext_fake_forward)
    torch.library.register_fake(ns + "batch_norm_act_backward")(_ext_fake_backward)
    torch.library.register_autograd(ns + "batch_norm_act_forward", _ext_backward, setup_context=_setup_context)


ext.on_load(_register_ext_python_parts)


def batch_norm_act_ext(x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, activation,
                       residual, branch_scale):
    if not ext.is_loaded():
        ext.load()
    batch, _, height, width = x.shape
    mean, rstd = _batch_norm.normalisation(lambda: torch.ops.coatnet_fast_ext.batch_norm_stats(x.detach()), x,
                                           batch * height * width, running_mean, running_var, training, momentum,
                                           eps)
    return torch.ops.coatnet_fast_ext.batch_norm_act_forward(x, bn_weight, bn_bias, mean, rstd, training,
                                                             activation == "gelu", residual, branch_scale)


def _ext_reasons(x, residual=None, **_inputs) -> List[str]:
    why = ext.device_reasons(x)
    for name, t in (("x", x), ("residual", residual)):
        if t is not None and t.dtype not in ext.DTYPES:
            why.append(f"{name}: dtype {t.dtype} is not supported ({', '.join(str(d) for d in ext.DTYPES)})")
    return why


dispatch.register(OP, "ext", batch_norm_act_ext, available=ext.unavailable_reason, reasons=_ext_reasons,
                  prepare=ext.load)

_ARG_NAMES = ("x", "bn_weight", "bn_bias", "running_mean", "running_var", "training", "momentum", "eps",
              "activation", "residual", "branch_scale")


def _select(backend, *args):
    momentum, eps = check_inputs(*args)
    args = args[:6] + (momentum, eps) + args[8:]
    return dispatch.select(OP, backend, dict(zip(_ARG_NAMES, args))), args


def batch_norm_act(
    x: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "gelu",
    residual: Optional[torch.Tensor] = None,
    branch_scale: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """BatchNorm + activation, then ``residual + branch_scale[b] * that``.

    Args:
        x: [B, C, H, W] (NCHW or channels_last), e.g. a 1x1 conv's output.
        bn_weight, bn_bias, running_mean, running_var: [C]; x's dtype or float32.
        training: batch statistics and an in-place running-statistics update when True,
            running statistics when False.
        momentum: running-statistics update factor in [0, 1].
        eps: added to the variance.
        activation: "gelu" (exact) or "identity".
        residual: None, or a tensor of x's shape added last; the output has the promoted dtype
            of x and residual.
        branch_scale: None, or a constant [B] factor per image applied before the add
            (stochastic depth's mask / keep probability); it gets no gradient.
        backend: "auto", "eager", "triton" or "ext".
    """
    impl, args = _select(backend, x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
                         activation, residual, branch_scale)
    return impl.impl(*args)


def supported_reasons(backend: str, x, bn_weight, bn_bias, running_mean, running_var, *, training: bool,
                      momentum: float = 0.1, eps: float = 1e-5, activation: str = "gelu", residual=None,
                      branch_scale=None) -> List[str]:
    """Why ``backend`` would reject these inputs (empty when it takes them)."""
    args = (x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, activation, residual,
            branch_scale)
    check_inputs(*args)
    return dispatch.why_not(OP, backend, dict(zip(_ARG_NAMES, args)))
