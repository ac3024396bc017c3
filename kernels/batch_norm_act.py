"""Triton kernels for BatchNorm + optional exact GELU + optional scaled residual add, and their
launchers: MBConv's expand (1x1 conv, BatchNorm, GELU) and projection (1x1 conv, BatchNorm,
then the block's stochastic-depth scale and residual add) after cuDNN's 1x1 conv.

A tensor [B, C, H, W] is read as [B, C, P] with P = H * W at one position stride (NCHW and
channels_last both qualify; the launchers copy anything else, and outputs take the caller's
layout either way). Programs are (image and channel block, position split): each walks its
split of positions in chunks of BLOCK_P, so per-channel reductions come out as [B, S, C]
partials in a fixed order (deterministic, no atomics), merged by one more small kernel.

- ``_stats`` (training, pass 1): per-split channel mean and M2 about a value of each channel
  (Welford per slot of the tile, then Chan's merge across slots after the loop), so that a
  channel with mean 1e3 and std 1 keeps its variance to fp32 rounding.
- ``_apply`` (training pass 2, eval's only pass): y = residual + s_b * act((x - mean) * scale + beta),
  with scale = gamma * rstd per channel from the launcher.
- ``_bwd``: per-split sums of du and du * xhat, du being the gradient at the BatchNorm's output
  (through GELU and s_b), whose totals are d(beta) and d(gamma); and dx, by BatchNorm's training
  backward (from those totals, so training runs it twice: sums, then dx) or its eval backward
  (no totals needed: one run writes dx and the sums).
Nothing but x is kept for the backward: xhat and the GELU input are recomputed from it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (cdiv, gelu, gelu_grad, image_and_channels, image_channel_grid, is_channels_last,
                      match_layout, merge_stats, next_power_of_2, welford_total, welford_update)


@triton.jit
def _tile(T, b, offs_p, offs_c, s_b, s_c, s_p):
    """Pointers of a [BLOCK_P, BLOCK_C] tile: a 64-bit image base plus 32-bit offsets within the
    image (the launchers check they fit)."""
    return (T + b * s_b) + (offs_c[None, :] * s_c + offs_p[:, None] * s_p)


@triton.jit
def _program(C, P, P_SPLIT, BLOCK_C: tl.constexpr):
    b, offs_c = image_and_channels(C, BLOCK_C)
    split = tl.program_id(1)
    p_begin = split * P_SPLIT
    p_end = p_begin + tl.minimum(P_SPLIT, P - p_begin)  # not p_begin + P_SPLIT: that may pass 2**31
    return b, offs_c, offs_c < C, split, p_begin, p_end


@triton.jit
def _stats(X, MEAN, M2, sx_b, sx_c, sx_p, C, P, P_SPLIT,
           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b, offs_c, c_ok, split, p_begin, p_end = _program(C, P, P_SPLIT, BLOCK_C)
    # Statistics about a value of each channel, x[0, c, 0, 0]: partial means then carry the
    # data's spread, not its offset (a channel at mean 1e3, std 1 keeps its variance to fp32
    # rounding). Read here, not gathered and cast on the host: those were three torch ops a call.
    shift = tl.load(X + offs_c * sx_c, mask=c_ok, other=0.0).to(tl.float32)
    count = tl.zeros([BLOCK_P], tl.float32)
    mean = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for start in range(p_begin, p_end, BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        p_ok = offs_p < p_end
        z = tl.load(_tile(X, b, offs_p, offs_c, sx_b, sx_c, sx_p), mask=p_ok[:, None] & c_ok[None, :],
                    other=0.0).to(tl.float32) - shift[None, :]
        count, mean, m2 = welford_update(count, mean, m2, z, p_ok)
    mean, m2 = welford_total(count, mean, m2)
    out = (b * tl.num_programs(1) + split) * C + offs_c
    tl.store(MEAN + out, mean, mask=c_ok)
    tl.store(M2 + out, m2, mask=c_ok)


@triton.jit
def _apply(X, MEAN, RSTD, GAMMA, BETA, RES, BSCALE, Y,
           sx_b, sx_c, sx_p, sr_b, sr_c, sr_p, sy_b, sy_c, sy_p, C, P, P_SPLIT,
           GELU: tl.constexpr, HAS_RES: tl.constexpr, HAS_BSCALE: tl.constexpr,
           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b, offs_c, c_ok, split, p_begin, p_end = _program(C, P, P_SPLIT, BLOCK_C)
    mean = tl.load(MEAN + offs_c, mask=c_ok, other=0.0)
    scale = tl.load(RSTD + offs_c, mask=c_ok, other=0.0) * tl.load(GAMMA + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(BETA + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_BSCALE:
        branch_scale = tl.load(BSCALE + b).to(tl.float32)
    for start in range(p_begin, p_end, BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        ok = (offs_p < p_end)[:, None] & c_ok[None, :]
        y = tl.load(_tile(X, b, offs_p, offs_c, sx_b, sx_c, sx_p), mask=ok, other=0.0).to(tl.float32)
        # Centred first: folding the mean into a shift (x * scale + shift) cancels at large means.
        y = (y - mean[None, :]) * scale[None, :] + beta[None, :]
        if GELU:
            y = gelu(y)
        if HAS_BSCALE:
            y = y * branch_scale
        if HAS_RES:
            y += tl.load(_tile(RES, b, offs_p, offs_c, sr_b, sr_c, sr_p), mask=ok, other=0.0).to(tl.float32)
        tl.store(_tile(Y, b, offs_p, offs_c, sy_b, sy_c, sy_p), y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _du_tile(X, DY, b, offs_p, ok, offs_c, mean, rstd, gamma, beta, branch_scale,
             sx_b, sx_c, sx_p, sdy_b, sdy_c, sdy_p, GELU: tl.constexpr, HAS_BSCALE: tl.constexpr):
    """Recompute xhat, then du = d(loss)/d(BatchNorm output) through s_b and GELU (fp32, 0 where
    masked)."""
    z = tl.load(_tile(X, b, offs_p, offs_c, sx_b, sx_c, sx_p), mask=ok, other=0.0).to(tl.float32)
    xhat = (z - mean[None, :]) * rstd[None, :]
    du = tl.load(_tile(DY, b, offs_p, offs_c, sdy_b, sdy_c, sdy_p), mask=ok, other=0.0).to(tl.float32)
    if HAS_BSCALE:
        du = du * branch_scale
    if GELU:
        du = du * gelu_grad(xhat * gamma[None, :] + beta[None, :])
    return tl.where(ok, du, 0.0), xhat


@triton.jit
def _channel_params(MEAN, RSTD, GAMMA, BETA, BSCALE, b, offs_c, c_ok, HAS_BSCALE: tl.constexpr):
    mean = tl.load(MEAN + offs_c, mask=c_ok, other=0.0)
    rstd = tl.load(RSTD + offs_c, mask=c_ok, other=0.0)
    gamma = tl.load(GAMMA + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(BETA + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    branch_scale = 1.0
    if HAS_BSCALE:
        branch_scale = tl.load(BSCALE + b).to(tl.float32)
    return mean, rstd, gamma, beta, branch_scale


@triton.jit
def _bwd(X, DY, MEAN, RSTD, GAMMA, BETA, BSCALE, DBETA, DGAMMA, DX, SUM_DU, SUM_DU_XHAT,
         sx_b, sx_c, sx_p, sdy_b, sdy_c, sdy_p, sdx_b, sdx_c, sdx_p, C, P, P_SPLIT, inv_count,
         GELU: tl.constexpr, HAS_BSCALE: tl.constexpr, TRAINING: tl.constexpr,
         WRITE_DX: tl.constexpr, WRITE_SUMS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Training runs it twice: sums only (d(beta) and d(gamma)'s partials), then dx from their
    totals (DBETA, DGAMMA). Eval's dx needs no totals, so one run writes dx and the sums."""
    b, offs_c, c_ok, split, p_begin, p_end = _program(C, P, P_SPLIT, BLOCK_C)
    mean, rstd, gamma, beta, branch_scale = _channel_params(MEAN, RSTD, GAMMA, BETA, BSCALE, b, offs_c, c_ok,
                                                            HAS_BSCALE)
    if WRITE_DX and TRAINING:
        mean_dbeta = tl.load(DBETA + offs_c, mask=c_ok, other=0.0) * inv_count
        mean_dgamma = tl.load(DGAMMA + offs_c, mask=c_ok, other=0.0) * inv_count
    # Summed per slot and reduced across rows once, after the loop (see welford_update).
    sum_du = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    sum_du_xhat = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for start in range(p_begin, p_end, BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        ok = (offs_p < p_end)[:, None] & c_ok[None, :]
        du, xhat = _du_tile(X, DY, b, offs_p, ok, offs_c, mean, rstd, gamma, beta, branch_scale,
                            sx_b, sx_c, sx_p, sdy_b, sdy_c, sdy_p, GELU, HAS_BSCALE)
        if WRITE_SUMS:
            sum_du += du
            sum_du_xhat += du * xhat
        if WRITE_DX:
            if TRAINING:  # batch statistics depend on every input: BatchNorm's training backward
                du = du - mean_dbeta[None, :] - xhat * mean_dgamma[None, :]
            tl.store(_tile(DX, b, offs_p, offs_c, sdx_b, sdx_c, sdx_p),
                     (du * (gamma * rstd)[None, :]).to(DX.dtype.element_ty), mask=ok)
    if WRITE_SUMS:
        out = (b * tl.num_programs(1) + split) * C + offs_c
        tl.store(SUM_DU + out, tl.sum(sum_du, 0), mask=c_ok)
        tl.store(SUM_DU_XHAT + out, tl.sum(sum_du_xhat, 0), mask=c_ok)


# --- launchers ------------------------------------------------------------------------------

# (BLOCK_P, BLOCK_C, num_warps) for every launch when set (benchmarks sweep it; tests try several).
FORCED_TILES: Optional[tuple] = None
# Positions one program walks at most: enough programs to fill a GPU at CoAtNet's S1/S2 shapes
# (batch x channel blocks alone is a few hundred), few enough that per-split partials stay small.
POSITIONS_PER_PROGRAM = 1024


def _blocks(x: torch.Tensor, channels: int):
    """(BLOCK_P, BLOCK_C, num_warps). channels_last is contiguous in C, so its tiles are wide in C;
    NCHW is contiguous in P, so its tiles are long in P. Sixteen elements a thread on a GPU (no
    nine-tap reuse here to hold registers): channels_last compiles to at most 128 registers, no
    spills (``tests/compile_for_gpu.py --ptxas``, triton 3.6, sm_90a, bf16). NCHW reads P through
    a mask whose end is computed in the kernel, so its loads stay scalar (up to 241 registers,
    no spills); channels_last is the fast path. The CPU interpreter pays per
    chunk, so larger tiles."""
    if FORCED_TILES is not None:
        return FORCED_TILES
    on_cpu = x.device.type == "cpu"
    if is_channels_last(x):
        block_c = min(64, max(16, next_power_of_2(channels)))
        return (128 if on_cpu else 2048 // block_c), block_c, 4
    return (256 if on_cpu else 128), 16, 4


def flat_positions(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t``, or a dense copy of it, readable as [B, C, P] at one position stride, with offsets
    within one image under 2**31 (the kernels add them to a 64-bit image base)."""
    if t.numel() < 2**31 and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        return t  # dense (the common case): two C++ calls instead of the loops below
    if math.prod(t.shape[1:]) >= 2**31:
        raise ValueError(f"{name}: one image of shape {tuple(t.shape[1:])} has 2**31 elements or more, "
                         "which the Triton kernels do not support")
    _, _, height, width = t.shape
    flat = height == 1 or t.stride(2) == width * t.stride(3) or width == 1
    span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))
    if flat and span < 2**31:
        return t
    return t.contiguous(memory_format=torch.channels_last if is_channels_last(t) or t.stride(1) == 1
                        else torch.contiguous_format)


def _position_stride(t: torch.Tensor) -> int:
    """The stride between consecutive positions p = h * W + w (flat_positions guarantees one)."""
    return t.stride(3) if t.shape[3] > 1 else t.stride(2)


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), _position_stride(t)


def _launch(x: torch.Tensor):
    """(grid, P_SPLIT, splits, BLOCK_P, BLOCK_C, num_warps) for x: images x channel blocks on
    grid axis 0, position splits on axis 1 (at most 65535, CUDA's limit there)."""
    batch, channels, height, width = x.shape
    positions = height * width
    block_p, block_c, warps = _blocks(x, channels)
    per_program = max(block_p, min(positions, POSITIONS_PER_PROGRAM) // block_p * block_p,
                      cdiv(cdiv(positions, 65535), block_p) * block_p)
    splits = cdiv(positions, per_program)
    grid = (image_channel_grid(batch, channels, block_c), splits)
    return grid, per_program, splits, block_p, block_c, warps


def _out_like(t: torch.Tensor, dtype) -> torch.Tensor:
    """An output in t's layout (channels_last or contiguous), whatever copy the kernels read: the
    rule the custom ops' fake kernels state."""
    fmt = torch.channels_last if is_channels_last(t) else torch.contiguous_format
    return torch.empty(t.shape, dtype=dtype, device=t.device, memory_format=fmt)


def batch_stats(x: torch.Tensor, running=None):
    """Channel mean and biased variance of x over batch and positions (fp32, [C] each); with
    ``running``, (mean, rstd) and the running statistics updated (``merge_stats``)."""
    x = flat_positions("x", x)
    batch, channels, height, width = x.shape
    grid, per_program, splits, block_p, block_c, warps = _launch(x)
    means, m2s = torch.empty((2, batch, splits, channels), dtype=torch.float32, device=x.device).unbind(0)
    _stats[grid](x, means, m2s, *_strides(x), channels, height * width, per_program,
                 BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)
    return merge_stats(means, m2s, height * width, per_program, (x, x.stride(1)), running)


def apply(x, mean, rstd, gamma, beta, gelu: bool, residual: Optional[torch.Tensor],
          branch_scale: Optional[torch.Tensor], out_dtype: torch.dtype):
    """residual + branch_scale[b] * act((x - mean) * rstd * gamma + beta), per channel (mean and
    rstd fp32)."""
    y = _out_like(x, out_dtype)
    x = flat_positions("x", x)
    batch, channels, height, width = x.shape
    grid, per_program, _, block_p, block_c, warps = _launch(x)
    res = flat_positions("residual", match_layout(residual, x)) if residual is not None else x
    _apply[grid](
        x, mean, rstd, gamma, beta, res, branch_scale if branch_scale is not None else mean, y,
        *_strides(x), *_strides(res), *_strides(y), channels, height * width, per_program,
        GELU=gelu, HAS_RES=residual is not None, HAS_BSCALE=branch_scale is not None,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps,
    )
    return y


def backward(dy, x, gamma, beta, mean, rstd, gelu: bool, branch_scale: Optional[torch.Tensor], training: bool):
    """dx (x's dtype and layout), d(gamma), d(beta) (fp32) of the BatchNorm + act + scale."""
    dx = _out_like(x, x.dtype)
    x = flat_positions("x", x)
    dy = flat_positions("dy", match_layout(dy, x))
    batch, channels, height, width = x.shape
    grid, per_program, splits, block_p, block_c, warps = _launch(x)
    has_bscale = branch_scale is not None
    bscale = branch_scale if has_bscale else mean
    sum_du, sum_du_xhat = torch.empty((2, batch, splits, channels), dtype=torch.float32, device=x.device).unbind(0)
    args = (x, dy, mean, rstd, gamma, beta, bscale)
    strides = (*_strides(x), *_strides(dy), *_strides(dx), channels, height * width, per_program,
               1.0 / max(1, batch * height * width))  # eval allows an empty batch
    meta = dict(GELU=gelu, HAS_BSCALE=has_bscale, TRAINING=training, BLOCK_P=block_p, BLOCK_C=block_c,
                num_warps=warps)
    if training:
        _bwd[grid](*args, mean, mean, dx, sum_du, sum_du_xhat, *strides, WRITE_DX=False, WRITE_SUMS=True, **meta)
        dbeta, dgamma = sum_du.sum((0, 1)), sum_du_xhat.sum((0, 1))  # not views of one tensor: op outputs
        _bwd[grid](*args, dbeta, dgamma, dx, sum_du, sum_du_xhat, *strides, WRITE_DX=True, WRITE_SUMS=False, **meta)
    else:
        _bwd[grid](*args, mean, mean, dx, sum_du, sum_du_xhat, *strides, WRITE_DX=True, WRITE_SUMS=True, **meta)
        dbeta, dgamma = sum_du.sum((0, 1)), sum_du_xhat.sum((0, 1))
    return dx, dgamma, dbeta
