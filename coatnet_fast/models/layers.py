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
from ..ops.batch_norm_act import batch_norm_act
from ..ops.dwconv_bn_gelu import dwconv_bn_gelu, dwconv_bn_gelu_pool
from ..ops.max_pool2d import MAX_KERNEL_SIZE as MAX_POOL_KERNEL_SIZE
from ..ops.max_pool2d import max_pool2d


class FusedOpModule:
    """Mixin for modules whose forward is one op of the backend table."""

    fused_op: str = ""
    backend: str = "eager"


class _FusedBNSequential(nn.Sequential, FusedOpModule):
    """A seed Sequential whose child 1 is a BatchNorm2d, run as one fused op. Subclassing
    Sequential keeps the children named 0, 1, 2, so keys such as ``block.dw_conv.1.running_mean``
    are the seed's."""

    def _bn_args(self):
        """nn.BatchNorm2d's bookkeeping (momentum=None means a cumulative average), then the
        op's BatchNorm arguments."""
        bn = self[1]
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = 1.0 / float(bn.num_batches_tracked)
        params = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
        return params, dict(training=bn.training, momentum=factor, eps=bn.eps, backend=self.backend)

    def _runs_as_modules(self) -> bool:
        """Whether this step runs the modules themselves rather than the fused op, which computes
        exactly affine BatchNorm with running statistics and exact GELU, per process:
        - a SyncBatchNorm (``convert_sync_batchnorm``, ``train --sync-bn``) training across
          processes takes its statistics over all of them;
        - a BatchNorm without affine parameters or running statistics, or an activation swapped
          for another (say ``GELU(approximate="tanh")``), is not what the op computes."""
        bn = self[1]
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.affine or not bn.track_running_stats:
            return True
        if len(self) > 2 and not (type(self[2]) is nn.GELU and self[2].approximate == "none"):
            return True
        return (isinstance(bn, nn.SyncBatchNorm) and bn.training and torch.distributed.is_available()
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1)


class MaxPool2d(nn.MaxPool2d, FusedOpModule):
    """The seed's ``nn.MaxPool2d`` (no parameters, the same constructor), routed through the
    ``max_pool2d`` op on a fused backend; what the op does not take (dilation, ceil_mode,
    returned indices, rectangular windows, windows past 11, unbatched input) runs the module
    itself. A backend that cannot take x (its dtype or device) raises, as the other fused
    modules do, unless the backend is "auto"."""

    fused_op = "max_pool2d"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s, p = (_square(v) for v in (self.kernel_size, self.stride, self.padding))
        if (self.backend == "eager" or None in (k, s, p) or _square(self.dilation) != 1 or self.ceil_mode
                or self.return_indices or x.dim() != 4 or not 1 <= k <= MAX_POOL_KERNEL_SIZE):
            return super().forward(x)
        return max_pool2d(x, k, s, p, backend=self.backend)


def _square(value) -> Optional[int]:
    """An int, or a pair of equal ints, as that int; else None."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class DWConvBNGELU(_FusedBNSequential):
    """The seed's ``dw_conv``: Sequential(Conv2d depthwise 3x3, BatchNorm2d, GELU), run as one op."""

    fused_op = "dwconv_bn_gelu"

    def __init__(self, channels: int, stride: int = 1, backend: str = "eager"):
        super().__init__(
            nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False),
            nn.BatchNorm2d(channels),
            nn.GELU(),
        )
        self.backend = backend

    def _op_args(self):
        conv = self[0]
        (gamma, beta, running_mean, running_var), kwargs = self._bn_args()
        return (conv.weight, gamma, beta, running_mean, running_var), dict(kwargs, stride=conv.stride[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runs_as_modules():
            return nn.Sequential.forward(self, x)
        params, kwargs = self._op_args()
        return dwconv_bn_gelu(x, *params, **kwargs)

    def forward_pooled(self, x: torch.Tensor):
        """The output and its per-image channel mean (SE's squeeze), from one fused pass."""
        if self._runs_as_modules():
            y = nn.Sequential.forward(self, x)
            return y, y.mean(dim=(2, 3), dtype=torch.float32)
        params, kwargs = self._op_args()
        return dwconv_bn_gelu_pool(x, *params, **kwargs)


class ConvBN(_FusedBNSequential):
    """The seed's Sequential(Conv2d, BatchNorm2d[, GELU]): the stem's 3x3 layers (``conv_3x3_bn``),
    MBConv's ``expand_conv`` (1x1, GELU) and ``pro_conv`` (1x1, no GELU). cuDNN's conv, then
    BatchNorm, the GELU when there is one, and optionally the block's residual add, as one op
    (``batch_norm_act``): in eval always, in training only where ``fused_in_training`` says so
    (else the seed's modules, the scale and the add, as on eager)."""

    fused_op = "batch_norm_act"
    # Whether a training step runs the fused op too (eval always does, where a fused backend is
    # set). Off by default because a measurement says so: CoAtNet-0's training step on an H200
    # (batch 128, bf16, channels_last; bench/results/model_backends_h200.json) ran at 2,009
    # images/s with these blocks fused and 2,884 with them on cuDNN's BatchNorm and eager GELU,
    # while inference gained from them (10,449 against 9,130). Set it per module (or the
    # benchmark's ``train-batch_norm_act`` provider option) to train through the fused op.
    fused_in_training: bool = False
    # On a fused backend, the conv's input channels zero-padded up to a multiple of this (0: as
    # they are), the weight's likewise: zeros add nothing to any sum, so the result is the
    # conv's. For the stem's first conv, 3 channels: cuDNN runs it (NHWC, bf16, CoAtNet-0 at
    # batch 128) as a direct conv, 0.48 ms of a 7.1 ms inference on an H200
    # (bench/results/profile_ops_model_compile_h200_c68a2d4.json), where its 205 MB of output
    # take ~0.05 ms to write; 8 channels (16 bytes a pixel) let it take an implicit GEMM on the
    # tensor cores. Off until a GPU times it (the model benchmark's ``pad-conv-input8`` option).
    pad_input_channels: int = 0

    def __init__(self, in_c: int, out_c: int, kernel_size: int = 1, stride: int = 1, gelu: bool = True,
                 backend: str = "eager"):
        layers = [nn.Conv2d(in_c, out_c, kernel_size, stride, kernel_size // 2, bias=False), nn.BatchNorm2d(out_c)]
        super().__init__(*(layers + [nn.GELU()] if gelu else layers))
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                branch_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``residual + branch_scale[b] * self(x)``; each part only when given."""
        return self._normalise(self._conv(x), residual, branch_scale)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """The conv, on input channels padded to ``pad_input_channels`` where that is set (fused
        backends only: eager stays the seed's module)."""
        conv, multiple = self[0], self.pad_input_channels
        if (self.backend == "eager" or not multiple or conv.in_channels % multiple == 0 or conv.groups != 1
                or type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or x.dim() != 4):
            return conv(x)
        return padded_input_conv(x, conv, multiple)

    def forward_gated(self, x: torch.Tensor, gate: torch.Tensor, residual: Optional[torch.Tensor] = None,
                      branch_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``forward(x * gate[:, :, None, None], ...)`` for a per-image channel gate [B, C_in] (SE's
        excitation), with the gate folded into the 1x1 conv's weights (``gated_pointwise_conv``):
        the gated activation is never written, read back or kept for the backward."""
        conv = self[0]
        plain = (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
                 and conv.groups == 1 and conv.bias is None and type(conv) is nn.Conv2d)
        # Per-image weights [B, C_out, C_in] beat the gated activation [B, C_in, H, W] they spare
        # only when H * W >= C_out (CoAtNet at 224: 3136 vs 96, 784 vs 192; not small images).
        if plain and x.shape[2] * x.shape[3] >= conv.out_channels:
            z = gated_pointwise_conv(x, gate, conv.weight)
        else:
            z = conv(x * gate.to(x.dtype).view(*gate.shape, 1, 1))
        return self._normalise(z, residual, branch_scale)

    def _normalise(self, z, residual, branch_scale):
        """The children after the conv, then the scale and the residual: fused where the op
        computes exactly that, else module by module."""
        if self.backend == "eager" or self._runs_as_modules() or (self[1].training and not self.fused_in_training):
            y = z
            for module in list(self)[1:]:  # the seed's BatchNorm (and GELU), then the block's drop_path and add
                y = module(y)
            y = y if branch_scale is None else y * branch_scale.to(y.dtype).view(-1, 1, 1, 1)
            return y if residual is None else residual + y
        params, kwargs = self._bn_args()
        return batch_norm_act(z, *params, activation="gelu" if len(self) == 3 else "identity",
                              residual=residual, branch_scale=branch_scale, **kwargs)


def padded_input_conv(x: torch.Tensor, conv: nn.Conv2d, multiple: int) -> torch.Tensor:
    """``conv(x)`` with x's channels and the weight's input channels zero-padded up to a multiple
    of ``multiple``. Concatenation keeps x's memory format (channels_last stays channels_last);
    the weight's gradient flows back through its slice."""
    extra = -conv.in_channels % multiple
    if x.shape[1] != conv.in_channels:
        raise ValueError(f"x has {x.shape[1]} channels; the conv takes {conv.in_channels}")
    b, _, h, w = x.shape
    memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 \
        else torch.contiguous_format
    zeros = x.new_zeros((b, extra, h, w)).contiguous(memory_format=memory_format)
    x = torch.cat([x.contiguous(memory_format=memory_format), zeros], dim=1)
    weight = conv.weight
    weight = torch.cat([weight, weight.new_zeros((weight.shape[0], extra) + tuple(weight.shape[2:]))], dim=1)
    return nn.functional.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation)


def gated_pointwise_conv(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv2d(x * gate[:, :, None, None], weight)`` for a bias-free 1x1 conv, as one batched GEMM
    with the gate in per-image weights ([B, C_out, C_in], small): (W * g_b) x_b = W (g_b x_b). x is
    read in place (channels_last or NCHW, no copy) and is all autograd keeps of it; the gated
    activation, which SE's multiply would write and keep, never exists."""
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    # In x's dtype, as autocast would cast the conv's weight (one rounding of W * g_b).
    weights = (weight.view(1, out_channels, channels) * gate.view(batch, 1, channels)).to(x.dtype)
    if x.is_contiguous(memory_format=torch.channels_last):
        rows = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # a view: [B, HW, C]
        out = torch.bmm(rows, weights.transpose(1, 2))
        return out.view(batch, height, width, out_channels).permute(0, 3, 1, 2)  # channels_last
    out = torch.bmm(weights, x.reshape(batch, channels, height * width))
    return out.view(batch, out_channels, height, width)


def drop_path_scale(x: torch.Tensor, rate: float, training: bool) -> Optional[torch.Tensor]:
    """Stochastic depth's per-sample factor for a residual branch like ``x`` ([B], x's dtype):
    0 with probability ``rate``, else 1 / (1 - rate); None when nothing is dropped."""
    if rate == 0.0 or not training:
        return None
    keep = 1.0 - rate
    return x.new_empty((x.shape[0],)).bernoulli_(keep).div_(keep)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch per sample with probability ``rate``."""
    scale = drop_path_scale(x, rate, training)
    return x if scale is None else x * scale.view((-1,) + (1,) * (x.dim() - 1))


def set_backend(model: nn.Module, backend: str, ops: Optional[Iterable[str]] = None) -> nn.Module:
    """Route the fusable modules of ``model`` through ``backend``, in place; returns ``model``.

    ``ops`` limits the switch to the modules of those ops (e.g. ``["rel_bias_attention"]``
    while a backend has no kernel for the others); by default every fusable module moves,
    except those of an op the backend has no implementation of at all (an entry registered
    with no kernel): they run on eager.
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
    unimplemented = []
    if ops is None and backend != "auto":
        unimplemented = [m for m in modules if not dispatch.implemented(m.fused_op, backend)]
        modules = [m for m in modules if dispatch.implemented(m.fused_op, backend)]
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
    for m in unimplemented:
        m.backend = "eager"
    if ops is None and hasattr(model, "backend") and not isinstance(model, FusedOpModule):
        model.backend = backend
    return model


def get_backend(model: nn.Module) -> str:
    """The backend of the fusable modules of ``model`` ("mixed" if they disagree). Modules on
    eager because the others' backend has no implementation of their op agree with it (what
    ``set_backend(model, backend)`` leaves)."""
    modules = [m for m in model.modules() if isinstance(m, FusedOpModule)]
    names = {m.backend for m in modules}
    if len(names) == 2 and "eager" in names:
        (other,) = names - {"eager"}
        if other != "auto" and all(dispatch.implemented(m.fused_op, other) != (m.backend == "eager")
                                   for m in modules):
            return other
    if not names:
        return "eager"
    return names.pop() if len(names) == 1 else "mixed"
