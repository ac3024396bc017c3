"""Building blocks shared by the model: the fusable modules and the backend switch.

A fusable module keeps exactly the children and parameters of the seed's module (so state
dicts move freely between backends) and routes its forward through one functional op of
``coatnet_fast.ops``; ``backend`` picks that op's implementation.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from ..ops import dispatch
from ..ops.dwconv_bn_gelu import dwconv_bn_gelu, dwconv_bn_gelu_pool


class FusedOpModule:
    """Mixin for modules whose forward is one op of the backend table."""

    fused_op: str = ""
    backend: str = "eager"


class DWConvBNGELU(nn.Sequential, FusedOpModule):
    """The seed's ``dw_conv``: Sequential(Conv2d depthwise 3x3, BatchNorm2d, GELU), run as one op.

    Subclassing Sequential keeps the children named 0, 1, 2, so keys such as
    ``block.dw_conv.1.running_mean`` are the seed's.
    """

    fused_op = "dwconv_bn_gelu"

    def __init__(self, channels: int, stride: int = 1, backend: str = "eager"):
        super().__init__(
            nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False),
            nn.BatchNorm2d(channels),
            nn.GELU(),
        )
        self.backend = backend

    def _op_args(self):
        """nn.BatchNorm2d's bookkeeping (momentum=None means a cumulative average), then the op's
        arguments."""
        conv, bn = self[0], self[1]
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = 1.0 / float(bn.num_batches_tracked)
        params = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        return params, dict(training=bn.training, momentum=factor, eps=bn.eps, stride=conv.stride[0],
                            backend=self.backend)

    def _cross_process_statistics(self) -> bool:
        """A SyncBatchNorm (``convert_sync_batchnorm``, ``train --sync-bn``) training across
        processes takes its statistics over all of them; the fused kernels take them per
        process, so such steps run the modules themselves."""
        bn = self[1]
        return (isinstance(bn, nn.SyncBatchNorm) and bn.training and torch.distributed.is_available()
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._cross_process_statistics():
            return nn.Sequential.forward(self, x)
        params, kwargs = self._op_args()
        return dwconv_bn_gelu(x, *params, **kwargs)

    def forward_pooled(self, x: torch.Tensor):
        """The output and its per-image channel mean (SE's squeeze), from one fused pass."""
        if self._cross_process_statistics():
            y = nn.Sequential.forward(self, x)
            return y, y.mean(dim=(2, 3), dtype=torch.float32)
        params, kwargs = self._op_args()
        return dwconv_bn_gelu_pool(x, *params, **kwargs)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch per sample with probability ``rate``."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


def set_backend(model: nn.Module, backend: str, ops: Optional[Iterable[str]] = None) -> nn.Module:
    """Route the fusable modules of ``model`` through ``backend``, in place; returns ``model``.

    ``ops`` limits the switch to the modules of those ops (e.g. ``["rel_bias_attention"]``
    while a backend has no kernel for the others); by default every fusable module moves.
    Parameters, buffers and ``state_dict()`` keys do not change, so this can be undone by
    calling it again with "eager". A backend that cannot run one of the chosen ops on this
    machine at all raises here, with the reasons; limits that depend on the inputs are checked
    at call time ("auto" then falls back to eager, a named backend raises).
    """
    dispatch.check_backend_name(backend)
    modules = [m for m in model.modules() if isinstance(m, FusedOpModule)]
    if ops is not None:
        ops = set(ops)
        unknown = ops - set(dispatch.ops())
        if unknown:
            raise ValueError(f"ops must be names from {dispatch.ops()}; got {sorted(unknown)}")
        modules = [m for m in modules if m.fused_op in ops]
    if backend != "auto":
        missing = {}
        for op in sorted({m.fused_op for m in modules}):
            why = dispatch.why_not(op, backend)
            if why:
                missing[op] = why
        if missing:
            raise dispatch.BackendUnavailableError(
                ", ".join(missing), {f"{backend} ({op})": why for op, why in missing.items()}
            )
    for op in sorted({m.fused_op for m in modules}):
        dispatch.prepare(op, backend)
    for m in modules:
        m.backend = backend
    if ops is None and hasattr(model, "backend") and not isinstance(model, FusedOpModule):
        model.backend = backend
    return model


def get_backend(model: nn.Module) -> str:
    """The backend of the fusable modules of ``model`` ("mixed" if they disagree)."""
    names = {m.backend for m in model.modules() if isinstance(m, FusedOpModule)}
    if not names:
        return "eager"
    return names.pop() if len(names) == 1 else "mixed"
