"""``dwconv_bn_gelu``: 3x3 depthwise conv (padding 1), BatchNorm, exact GELU, as one op.

Exactly ``gelu(batch_norm(conv2d(x, weight, stride=stride, padding=1, groups=C), running_mean,
running_var, bn_weight, bn_bias, training, momentum, eps))``, including the in-place update
of the running statistics in training. ``momentum`` is the update factor itself: the module
turns ``BatchNorm2d(momentum=None)`` into 1 / num_batches_tracked before calling, as
``nn.BatchNorm2d`` does.
"""
from __future__ import annotations

import numbers
from typing import List

import torch
import torch.nn.functional as F

from . import _checks, dispatch

OP = "dwconv_bn_gelu"


def check_inputs(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride):
    x = _checks.tensor("x", x, dim=4, shape_doc="[B, C, H, W]")
    _checks.floating("x", x)
    channels = x.shape[1]
    weight = _checks.tensor("weight", weight, dim=4, shape_doc="[C, 1, 3, 3]")
    if tuple(weight.shape) != (channels, 1, 3, 3):
        raise ValueError(
            f"weight must have shape [C, 1, 3, 3] = {[channels, 1, 3, 3]} for x with C={channels}; "
            f"got {list(weight.shape)}"
        )
    per_channel = (
        ("bn_weight", bn_weight),
        ("bn_bias", bn_bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    )
    for name, t in per_channel:
        _checks.tensor(name, t, dim=1, shape_doc="[C]")
        if t.shape[0] != channels:
            raise ValueError(f"{name} must have shape [C] = [{channels}]; got {list(t.shape)}")
    for name, t in (("weight", weight),) + per_channel:
        _checks.floating(name, t)
        _checks.master_dtype(name, t, "x", x)
    _checks.same_device([("x", x), ("weight", weight)] + list(per_channel))
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool; got {training!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a number in [0, 1]; got {momentum!r}")
    eps = _checks.positive_float("eps", eps)
    if stride not in (1, 2) or isinstance(stride, bool):
        raise ValueError(f"stride must be 1 or 2; got {stride!r}")
    if training and x.shape[0] * ((x.shape[2] - 1) // stride + 1) * ((x.shape[3] - 1) // stride + 1) < 2:
        raise ValueError(
            f"training-mode batch statistics need more than one value per channel; got x of shape {tuple(x.shape)}"
        )
    return float(momentum), eps, int(stride)


def dwconv_bn_gelu_eager(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride):
    """The seed's ``dw_conv`` Sequential, written as calls (weight in x's dtype, as autocast does)."""
    y = F.conv2d(x, weight.to(x.dtype), None, stride, 1, 1, x.shape[1])
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return F.gelu(y)


dispatch.register(OP, "eager", dwconv_bn_gelu_eager)
dispatch.register(OP, "triton", None, available=dispatch.not_in_this_build("the Triton kernel for dwconv_bn_gelu"))
dispatch.register(OP, "ext", None, available=dispatch.not_in_this_build("the C++/CUDA extension for dwconv_bn_gelu"))


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
    momentum, eps, stride = check_inputs(
        x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride
    )
    args = (x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride)
    impl = dispatch.select(OP, backend, dict(zip(_ARG_NAMES, args)))
    return impl.impl(*args)


_ARG_NAMES = ("x", "weight", "bn_weight", "bn_bias", "running_mean", "running_var", "training", "momentum", "eps", "stride")


def supported_reasons(backend: str, x, weight, bn_weight, bn_bias, running_mean, running_var, *,
                      training: bool, momentum: float = 0.1, eps: float = 1e-5, stride: int = 1) -> List[str]:
    """Why ``backend`` would reject these inputs (empty when it takes them)."""
    momentum, eps, stride = check_inputs(
        x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride
    )
    args = (x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride)
    return dispatch.why_not(OP, backend, dict(zip(_ARG_NAMES, args)))
