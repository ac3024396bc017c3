"""Triton kernels for a square max pool (CoAtNet's downsampling ``MaxPool2d(3, 2, 1)``) and its
backward, and their launchers.

- ``_fwd``: each program takes a tile of output positions (image, row, column flattened) by a
  block of channels, scans the window in row-major order and writes the max and where in the
  window it sat, as one int8 (kh * K + kw) a output element: PyTorch keeps an int64 flat input
  index (8 bytes), which its backward must gather back; here the index is an eighth of that.
  The first in-window element starts the scan, a later one wins when greater or NaN: PyTorch's
  rule, so ties, -inf and NaN pick the element PyTorch picks.
- ``_bwd``: a gather, not a scatter: each program takes a tile of input positions by a block of
  channels and sums the gradient of every window that holds the position (at most
  ceil(K / S) per dimension: 2 x 2 for 3 / 2) whose index names it, in the order of increasing
  output row and column (PyTorch's). Every input element is written once, so no atomics and
  no zero-fill pass.

Tensors are addressed by their four strides, so NCHW and channels_last both run without a copy,
and the outputs take the input's layout. Offsets are 64-bit (positions and channels both: a
view's channel stride times C can pass 2**31 where a dense tensor's would not).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, is_channels_last, next_power_of_2

# Position x channel tiles: channels_last reads along channels, NCHW along positions.
BLOCK_P_CHANNELS_LAST, BLOCK_C_CHANNELS_LAST = 32, 64
BLOCK_P_NCHW, BLOCK_C_NCHW = 128, 8
NUM_WARPS = 4
# The window index is one int8: K * K - 1 <= 127.
MAX_KERNEL_SIZE = 11


@triton.jit
def _tile(total, C, ROWS, COLS, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """A program's tile: positions (image, row, column of a ROWS x COLS map, flattened) by
    channels, 64-bit, with their masks."""
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    per_image = ROWS * COLS
    b = offs_p // per_image
    rem = offs_p - b * per_image
    row = rem // COLS
    return b, row, rem - row * COLS, offs_c, offs_p < total, offs_c < C


@triton.jit
def _fwd(X, Y, IDX, C, H, W, HO, WO, total,
         sx_b, sx_c, sx_h, sx_w, sy_b, sy_c, sy_h, sy_w,
         KERNEL: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, WRITE_INDEX: tl.constexpr,
         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b, oh, ow, offs_c, p_ok, c_ok = _tile(total, C, HO, WO, BLOCK_P, BLOCK_C)
    x_base = X + b * sx_b
    best = tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_P, BLOCK_C], tl.int32)
    found = tl.zeros([BLOCK_P, BLOCK_C], tl.int1)
    for kh in tl.static_range(KERNEL):
        h = oh * STRIDE - PAD + kh
        h_ok = p_ok & (h >= 0) & (h < H)
        for kw in tl.static_range(KERNEL):
            w = ow * STRIDE - PAD + kw
            ok = (h_ok & (w >= 0) & (w < W))[:, None] & c_ok[None, :]
            v = tl.load(x_base[:, None] + (h * sx_h + w * sx_w)[:, None] + offs_c[None, :] * sx_c, mask=ok,
                        other=float("-inf")).to(tl.float32)
            take = ok & ((v > best) | (v != v) | (found == 0))
            best = tl.where(take, v, best)
            arg = tl.where(take, kh * KERNEL + kw, arg)
            found = found | ok
    out = (b * sy_b)[:, None] + (oh * sy_h + ow * sy_w)[:, None] + offs_c[None, :] * sy_c
    mask = p_ok[:, None] & c_ok[None, :]
    tl.store(Y + out, best.to(Y.dtype.element_ty), mask=mask)
    if WRITE_INDEX:  # only when autograd will need it (inference skips a third of the writes)
        tl.store(IDX + out, arg.to(tl.int8), mask=mask)


@triton.jit
def _bwd(DY, IDX, DX, C, H, W, HO, WO, total,
         sy_b, sy_c, sy_h, sy_w, si_b, si_c, si_h, si_w, sx_b, sx_c, sx_h, sx_w,
         KERNEL: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, WINDOWS: tl.constexpr,
         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b, h, w, offs_c, p_ok, c_ok = _tile(total, C, H, W, BLOCK_P, BLOCK_C)
    y_base, i_base = b * sy_b, b * si_b
    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    # The windows holding row h are oh = (h + PAD) // STRIDE - d for d < WINDOWS, kept when
    # 0 <= oh < HO and the row's place in the window, h + PAD - oh * STRIDE, is < KERNEL.
    for i in tl.static_range(WINDOWS):
        oh = (h + PAD) // STRIDE - (WINDOWS - 1 - i)  # increasing output rows, as PyTorch sums
        kh = h + PAD - oh * STRIDE
        h_ok = p_ok & (oh >= 0) & (oh < HO) & (kh < KERNEL)
        for j in tl.static_range(WINDOWS):
            ow = (w + PAD) // STRIDE - (WINDOWS - 1 - j)
            kw = w + PAD - ow * STRIDE
            ok = (h_ok & (ow >= 0) & (ow < WO) & (kw < KERNEL))[:, None] & c_ok[None, :]
            at_i = i_base[:, None] + (oh * si_h + ow * si_w)[:, None] + offs_c[None, :] * si_c
            at_y = y_base[:, None] + (oh * sy_h + ow * sy_w)[:, None] + offs_c[None, :] * sy_c
            idx = tl.load(IDX + at_i, mask=ok, other=-1).to(tl.int32)
            g = tl.load(DY + at_y, mask=ok, other=0.0).to(tl.float32)
            acc += tl.where(ok & (idx == (kh * KERNEL + kw)[:, None]), g, 0.0)
    out = (b * sx_b)[:, None] + (h * sx_h + w * sx_w)[:, None] + offs_c[None, :] * sx_c
    tl.store(DX + out, acc.to(DX.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


def out_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """nn.MaxPool2d's output size (floor mode, dilation 1)."""
    return (size + 2 * padding - kernel_size) // stride + 1


def _tiles(x: torch.Tensor, channels: int):
    if is_channels_last(x):
        block_c = min(BLOCK_C_CHANNELS_LAST, next_power_of_2(channels))
        return max(BLOCK_P_CHANNELS_LAST, 2048 // block_c), block_c
    return BLOCK_P_NCHW, min(BLOCK_C_NCHW, next_power_of_2(channels))


def _empty(shape, like: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """A new [B, C, H, W] tensor on like's device, channels_last or NCHW."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=like.device, memory_format=fmt)


def channel_blocks(x: torch.Tensor, channels: int) -> int:
    """Programs along grid axis 1 (at most 65535 on CUDA) for x's layout."""
    return cdiv(channels, _tiles(x, channels)[1])


def forward(x: torch.Tensor, kernel_size: int, stride: int, padding: int, with_index: bool = True):
    """(y, window index as int8), both in x's layout (channels_last or NCHW); without the index
    (an empty int8 tensor in its place) when ``with_index`` is False."""
    batch, channels, height, width = x.shape
    ho, wo = out_size(height, kernel_size, stride, padding), out_size(width, kernel_size, stride, padding)
    channels_last = is_channels_last(x)
    y = _empty((batch, channels, ho, wo), x, x.dtype, channels_last)
    index = _empty((batch, channels, ho, wo) if with_index else (0, 0, 0, 0), x, torch.int8, channels_last)
    total = batch * ho * wo
    if total == 0 or channels == 0:
        return y, index
    block_p, block_c = _tiles(x, channels)
    _fwd[(cdiv(total, block_p), cdiv(channels, block_c))](
        x, y, index, channels, height, width, ho, wo, total, *x.stride(), *y.stride(),
        KERNEL=kernel_size, STRIDE=stride, PAD=padding, WRITE_INDEX=with_index, BLOCK_P=block_p, BLOCK_C=block_c,
        num_warps=NUM_WARPS)
    return y, index


def backward(dy: torch.Tensor, index: torch.Tensor, input_shape, channels_last: bool, kernel_size: int,
             stride: int, padding: int):
    """d(x) of ``forward`` from dy and the window index, channels_last or NCHW as x was."""
    batch, channels, height, width = input_shape
    dx = _empty((batch, channels, height, width), dy, dy.dtype, channels_last)
    total = batch * height * width
    if total == 0 or channels == 0:
        return dx
    block_p, block_c = _tiles(dx, channels)
    windows = cdiv(kernel_size, stride)
    _bwd[(cdiv(total, block_p), cdiv(channels, block_c))](
        dy, index, dx, channels, height, width, dy.shape[2], dy.shape[3], total, *dy.stride(), *index.stride(),
        *dx.stride(),
        KERNEL=kernel_size, STRIDE=stride, PAD=padding, WINDOWS=windows, BLOCK_P=block_p, BLOCK_C=block_c,
        num_warps=NUM_WARPS)
    return dx
