"""What the BatchNorm ops (``dwconv_bn_gelu``, ``batch_norm_act``) share: argument checks of the
BatchNorm parameters, and ``nn.BatchNorm2d``'s running-statistics update."""
from __future__ import annotations

import numbers
from typing import Callable, Tuple

import torch

from .. import ext
from . import _checks

BN_ARG_NAMES = ("bn_weight", "bn_bias", "running_mean", "running_var")


def check_bn_args(x, channels: int, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps
                  ) -> Tuple[float, float]:
    """Per-channel parameters [C] in x's dtype or fp32 on x's device, a bool ``training``,
    ``momentum`` in [0, 1], a positive ``eps``; returns (momentum, eps) as floats."""
    per_channel = tuple(zip(BN_ARG_NAMES, (bn_weight, bn_bias, running_mean, running_var)))
    for name, t in per_channel:
        _checks.tensor(name, t, dim=1, shape_doc="[C]")
        if t.shape[0] != channels:
            raise ValueError(f"{name} must have shape [C] = [{channels}]; got {list(t.shape)}")
        _checks.floating(name, t)
        _checks.master_dtype(name, t, "x", x)
    _checks.same_device([("x", x)] + list(per_channel))
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool; got {training!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a number in [0, 1]; got {momentum!r}")
    return float(momentum), _checks.positive_float("eps", eps)


def check_batch_count(x: torch.Tensor, training: bool, count: int) -> None:
    if training and count < 2:
        raise ValueError(
            f"training-mode batch statistics need more than one value per channel; got x of shape {tuple(x.shape)}"
        )


def normalisation(stats: Callable[..., Tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, count: int,
                  running_mean, running_var, training: bool, momentum: float, eps: float,
                  stats_update_running: bool = False):
    """(mean, rstd) to normalise with: in training the batch statistics ``stats()`` returns (mean
    and biased variance over ``count`` values a channel), with the running statistics updated in
    place as ``nn.BatchNorm2d`` does; in eval the running statistics. With
    ``stats_update_running``, ``stats(running)`` takes (running_mean, running_var, momentum, eps),
    updates the first two itself and returns (mean, rstd) (the Triton kernels' ``merge_stats``):
    offered only where the running statistics are dense, as the kernels write them in place."""
    if not training:  # contiguous: the kernels index per-channel vectors densely
        acc = ext.acc_dtype(x.dtype)
        return running_mean.to(acc).contiguous(), torch.rsqrt(running_var.to(acc) + eps)
    if stats_update_running and running_mean.is_contiguous() and running_var.is_contiguous():
        return stats((running_mean, running_var, momentum, eps))
    mean, var = stats()
    with torch.no_grad():  # biased variance normalises, unbiased is tracked
        running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1.0 - momentum).add_((var * (count / (count - 1))).to(running_var.dtype), alpha=momentum)
    return mean, torch.rsqrt(var + eps)


def out_like(x: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """An empty tensor in x's memory format (channels_last or contiguous)."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=fmt)
