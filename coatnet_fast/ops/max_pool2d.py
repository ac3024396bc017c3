"""``max_pool2d``: a square max pool, floor mode, dilation 1: ``F.max_pool2d(x, kernel_size,
stride, padding)``, value for value and gradient for gradient (ties, -inf and NaN pick the
element PyTorch picks).

CoAtNet downsamples with ``MaxPool2d(3, 2, 1)``: MBConv's shortcut at the start of S1 and S2
and both branches of the first Transformer block of S3 and S4. Under torch.compile on an H200
its backward took over 1 ms of CoAtNet-0's training step (0.729 ms at 112x112x64 alone,
bench/results/profile_ops_model_compile_h200_c68a2d4.json): Inductor gathers PyTorch's int64
indices. The Triton backend keeps a one-byte window index instead and gathers dx in one pass.

Backends: "eager" and "triton". The C++ extension has no max pool: modules switched to "ext"
keep theirs on eager (``set_backend``).
"""
from __future__ import annotations

import numbers
from typing import List, Tuple

import torch
import torch.nn.functional as F

from . import _checks, dispatch

OP = "max_pool2d"
# The window index is one int8 (kernels/max_pool2d.py): kernel_size * kernel_size - 1 <= 127.
MAX_KERNEL_SIZE = 11


def _int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    return int(value)


def check_inputs(x, kernel_size, stride, padding) -> Tuple[int, int, int]:
    x = _checks.tensor("x", x, dim=4, shape_doc="[B, C, H, W]")
    _checks.floating("x", x)
    kernel_size = _int("kernel_size", kernel_size, 1)
    if kernel_size > MAX_KERNEL_SIZE:
        raise ValueError(f"kernel_size must be at most {MAX_KERNEL_SIZE} (a one-byte window index); "
                         f"got {kernel_size}")
    stride = _int("stride", stride, 1)
    padding = _int("padding", padding, 0)
    if padding > kernel_size // 2:
        raise ValueError(f"padding must be at most kernel_size // 2 = {kernel_size // 2}; got {padding}")
    height, width = x.shape[2], x.shape[3]
    if height + 2 * padding < kernel_size or width + 2 * padding < kernel_size:
        raise ValueError(f"x's H x W = {height} x {width} (padded by {padding}) is smaller than the "
                         f"{kernel_size} x {kernel_size} window")
    return kernel_size, stride, padding


def max_pool2d_eager(x, kernel_size, stride, padding):
    """The seed's ``nn.MaxPool2d``."""
    return F.max_pool2d(x, kernel_size, stride, padding)


# --- triton backend: custom ops (visible to torch.compile), autograd, dispatch entry ---------

def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _out_like(x: torch.Tensor, shape, dtype, channels_last=None) -> torch.Tensor:
    """An empty tensor in x's layout (or the one named), as the kernels' launchers allocate."""
    channels_last = _channels_last(x) if channels_last is None else channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=fmt)


def _out_shape(x, kernel_size, stride, padding):
    size = lambda n: (n + 2 * padding - kernel_size) // stride + 1  # noqa: E731
    return (x.shape[0], x.shape[1], size(x.shape[2]), size(x.shape[3]))


def _forward_kernels(x, kernel_size, stride, padding, with_index=True):
    from coatnet_fast.kernels import max_pool2d as kernels

    return kernels.forward(x, kernel_size, stride, padding, with_index)


def _backward_kernels(dy, index, input_shape, channels_last, kernel_size, stride, padding):
    from coatnet_fast.kernels import max_pool2d as kernels

    return kernels.backward(dy, index, tuple(input_shape), channels_last, kernel_size, stride, padding)


@torch.library.custom_op("coatnet_fast::max_pool2d_triton", mutates_args=())
def _triton_forward(x: torch.Tensor, kernel_size: int, stride: int, padding: int, with_index: bool
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward_kernels(x, kernel_size, stride, padding, with_index)


@_triton_forward.register_fake
def _(x, kernel_size, stride, padding, with_index):
    shape = _out_shape(x, kernel_size, stride, padding)
    return _out_like(x, shape, x.dtype), _out_like(x, shape if with_index else (0, 0, 0, 0), torch.int8)


@torch.library.custom_op("coatnet_fast::max_pool2d_triton_backward", mutates_args=())
def _triton_backward(dy: torch.Tensor, index: torch.Tensor, input_shape: List[int], channels_last: bool,
                     kernel_size: int, stride: int, padding: int) -> torch.Tensor:
    return _backward_kernels(dy, index, input_shape, channels_last, kernel_size, stride, padding)


@_triton_backward.register_fake
def _(dy, index, input_shape, channels_last, kernel_size, stride, padding):
    return _out_like(dy, tuple(input_shape), dy.dtype, channels_last)


def _setup_context(ctx, inputs, output):
    x, kernel_size, stride, padding, _with_index = inputs
    # The one-byte index and x's shape and layout: not x, which eager's pool keeps (a
    # Transformer block's input is kept for nothing else).
    ctx.save_for_backward(output[1])
    ctx.pool = (list(x.shape), _channels_last(x), kernel_size, stride, padding)


def _backward(ctx, dy, _dindex):
    index, = ctx.saved_tensors
    return _triton_backward(dy, index, *ctx.pool), None, None, None, None


torch.library.register_autograd("coatnet_fast::max_pool2d_triton", _backward, setup_context=_setup_context)


class _TritonMaxPool2dFunction(torch.autograd.Function):
    """The eager path of the triton backend: the same launchers as the custom ops above,
    without their per-call dispatch cost (see ``dispatch.eager_fast_path``)."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, with_index):
        y, index = _forward_kernels(x, kernel_size, stride, padding, with_index)
        _setup_context(ctx, (x, kernel_size, stride, padding, with_index), (y, index))
        ctx.mark_non_differentiable(index)
        return y, index

    @staticmethod
    def backward(ctx, dy, _dindex):
        dispatch.no_double_backward(OP)
        index, = ctx.saved_tensors
        return _backward_kernels(dy, index, *ctx.pool), None, None, None, None


def max_pool2d_triton(x, kernel_size, stride, padding):
    forward = _TritonMaxPool2dFunction.apply if dispatch.eager_fast_path(x) else _triton_forward
    # The index only where a backward will read it: inference writes a third fewer bytes.
    with_index = torch.is_grad_enabled() and x.requires_grad
    return forward(x, kernel_size, stride, padding, with_index)[0]


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Programs along CUDA's grid axis 1 (channel blocks of 8 in NCHW, 64 in channels_last).
_MAX_CHANNEL_BLOCKS = 65535


def _triton_reasons(x, **_inputs) -> List[str]:
    why = dispatch.triton_device_reasons(x)
    if x.dtype not in _TRITON_DTYPES:
        why.append(f"x: dtype {x.dtype} is not supported (float32, float16, bfloat16)")
    if x.shape[1] > 8 * _MAX_CHANNEL_BLOCKS:
        from coatnet_fast.kernels import max_pool2d as kernels

        if kernels.channel_blocks(x, x.shape[1]) > _MAX_CHANNEL_BLOCKS:
            why.append(f"x: {x.shape[1]} channels take more channel blocks than a CUDA grid axis holds "
                       f"({_MAX_CHANNEL_BLOCKS})")
    return why


dispatch.register(OP, "eager", max_pool2d_eager)
dispatch.register(OP, "triton", max_pool2d_triton, available=dispatch.triton_available, reasons=_triton_reasons)
# No kernel in the C++ extension: set_backend(model, "ext") leaves the pools on eager.
dispatch.register(OP, "ext", None, available=lambda: "the C++ extension has no max_pool2d kernel")

_ARG_NAMES = ("x", "kernel_size", "stride", "padding")


def max_pool2d(x: torch.Tensor, kernel_size: int = 3, stride: int = 2, padding: int = 1, *,
               backend: str = "auto") -> torch.Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` (floor mode, dilation 1).

    Args:
        x: [B, C, H, W] floating point (NCHW or channels_last; the output takes its layout).
        kernel_size: the square window's side, 1 to 11.
        stride: the window's step.
        padding: implicit -inf padding on each side, at most kernel_size // 2.
        backend: "auto", "eager" or "triton".
    """
    args = (x,) + check_inputs(x, kernel_size, stride, padding)
    return dispatch.select(OP, backend, dict(zip(_ARG_NAMES, args))).impl(*args)


def supported_reasons(backend: str, x, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> List[str]:
    """Why ``backend`` would reject these inputs (empty when it takes them)."""
    args = (x,) + check_inputs(x, kernel_size, stride, padding)
    return dispatch.why_not(OP, backend, dict(zip(_ARG_NAMES, args)))
