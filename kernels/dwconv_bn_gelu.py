"""Triton kernels for 3x3 depthwise conv (padding 1) + BatchNorm + exact GELU, and their launchers.

Every kernel runs one program per (image, channel block) that walks the whole image (or, for the
row-streaming kernels with ``ROW_BANDS``, one band of its output rows), recomputing the conv from
x: nothing but x is kept between passes (the backward's one activation-sized
intermediate, dz, lives only while the backward runs; ``DZ_PATH``). Per-channel reductions
therefore finish inside one program per image (or band), in a fixed order: results are
deterministic for a given band count (``ROW_BANDS`` = None lets the GPU's size choose it) and
need no atomics, and partials are per image or per (image, band) ([B, C] or [B, bands, C];
[B, C, 9] for d(weight)), not per tile.

The three kernels that walk the output positions (``_stats``, ``_apply``, ``_bwd_reduce``)
stream rows: a program takes the image in strips BLOCK_W output columns wide and runs down each
strip a row at a time, loading each input row once (its three column taps) and adding it into
every output row it reaches, with the partial sums of the next rows carried in registers
(``_conv_row``). An output element then costs three tile loads, not nine (stride 2: six), and
their bf16 unpacking and addressing with them; the per-element work left is the FMAs, the
epilogue and GELU. For images of up to ROW_BACKWARD_MAX_WIDTH columns the backward then writes
dz (``_bwd_dz``, streaming strips likewise) and takes dx and d(weight) from it a whole row at a
time (``_bwd_dx_dw``); or, with DZ_PATH "scratch", ``_bwd_dx_rows`` does all three a row at a
time, dz passing between threads through a two-row scratch. Wider images take ``_bwd_dx``,
which walks flattened chunks of BLOCK_P positions (below).

- ``_stats`` (training, pass 1): per-image channel mean and M2 of the conv output: Welford's
  update per slot of the tile over the chunks, then Chan's merge across the slots once (exact
  in fp32 for a channel with mean 1e3 and std 1; no reduction across rows inside the loop).
- ``_apply`` (training pass 2, and eval's only pass): conv, BatchNorm's per-channel scale and
  shift (computed a program from mean, rstd, gamma and beta), GELU. Optionally the
  per-image channel sums of the output (the SE block's average pool) in the same pass.
- ``_bwd_reduce``: recompute, then per-image sums of du and du * xhat (d(beta), d(gamma)).
- ``_bwd_dz``: recompute, then dz (BatchNorm's training or eval backward) into memory.
- ``_bwd_dx_dw``: down dz's rows, the dx rows each completes (the transposed conv, partial sums
  carried) and d(weight)'s per-slot sums from dz and the x under each tap.
- ``_bwd_dx_rows``: see above; dx rows complete as the dz rows they take arrive (their partial
  sums carried, as the forward carries the conv's), d(weight)'s sums per slot from dz and the
  input taps the conv loaded for this row or carried from the last two.
- ``_bwd_dx`` (images wider than ROW_BACKWARD_MAX_WIDTH): walks the input positions; before
  each chunk it computes, a chunk of output positions at a time, dz (the gradient at the conv
  output: recompute, then BatchNorm's training or eval backward) as far as the chunk's taps
  reach, and then dx, the transposed
  depthwise conv of dz (with stride 2 only the taps whose parity matches an input position
  reach it). dz goes to a ring of a few output rows per program (fp32, ``ring_rows``), read
  back from cache, so it never makes a round trip through memory as a [B, C, HO, WO] tensor;
  d(weight)'s per-image partials are summed in the same pass, per tap, from fp32 dz times the
  x under that tap (the x tiles are reloaded, cache hits, rather than held).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (bn_scale_shift, cdiv, channel_block_start, gelu, gelu_grad, image_and_channels,
                      image_channel_grid, is_channels_last, match_layout, merge_stats, next_power_of_2, prefetch_l2,
                      welford_total, welford_update)

# Channels a thread loads together in the backward kernels (8-byte loads at 16 bits; fp32's
# 16-byte loads are four already). A thread then holds four channels' nine tap weights, not
# eight's: _bwd_reduce goes from 227 to 168 registers, and _bwd_dz and _bwd_dx_dw were laid out
# for it (ptxas, triton 3.6, sm_90a, bf16). The forward kernels load 16 bytes a thread
# (FORWARD_CHANNEL_VECTOR = 0: the compiler's choice): capped at four they went from 165 to 128
# registers but ran slower on an H200, S1's training forward 0.744 ms against 0.674 and eval
# 0.423 against 0.408 (dwconv_bn_gelu_h200_5337586.json against dwconv_bn_gelu_h200.json).
CHANNEL_VECTOR: tl.constexpr = tl.constexpr(4)
FORWARD_CHANNEL_VECTOR: tl.constexpr = tl.constexpr(0)



@triton.jit
def _x_tap(X, b, ho, wo, p_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W,
           ky, kx, STRIDE: tl.constexpr):
    """x under tap (ky, kx) of output positions (ho, wo), channels offs_c, fp32; 0 in the padding."""
    hi = ho * STRIDE - 1 + ky
    wi = wo * STRIDE - 1 + kx
    ok = p_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    # A 64-bit image base plus 32-bit offsets within the image (the launchers check they fit): a
    # [BLOCK_P, BLOCK_C] tile of 64-bit offsets per tap costs registers the compiler spills.
    ptrs = (X + b * sx_b) + (offs_c[None, :] * sx_c + (hi * sx_h + wi * sx_w)[:, None])
    return tl.load(ptrs, mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _tap_weight(WT, offs_c, c_ok, sw_c, sw_h, sw_w, ky: tl.constexpr, kx: tl.constexpr):
    return tl.load(WT + offs_c * sw_c + ky * sw_h + kx * sw_w, mask=c_ok, other=0.0).to(tl.float32)


@triton.jit
def _tap_weights(WT, offs_c, c_ok, sw_c, sw_h, sw_w):
    """The nine taps' weights of channels offs_c in fp32, a tuple indexed ky * 3 + kx. Loaded
    once a program, before the position loop: Triton does not move loads out of loops, and
    inside one they were nine loads and their bf16 unpacking every chunk (SASS, below)."""
    return (_tap_weight(WT, offs_c, c_ok, sw_c, sw_h, sw_w, 0, 0), _tap_weight(WT, offs_c, c_ok, sw_c, sw_h, sw_w, 0, 1),
            _tap_weight(WT, offs_c, c_ok, sw_c, sw_h, sw_w, 0, 2), _tap_weight(WT, offs_c, c_ok, sw_c, sw_h, sw_w, 1, 0),
            _tap_weight(WT, offs_c, c_ok, sw_c, sw_h, sw_w, 1, 1), _tap_weight(WT, offs_c, c_ok, sw_c, sw_h, sw_w, 1, 2),
            _tap_weight(WT, offs_c, c_ok, sw_c, sw_h, sw_w, 2, 0), _tap_weight(WT, offs_c, c_ok, sw_c, sw_h, sw_w, 2, 1),
            _tap_weight(WT, offs_c, c_ok, sw_c, sw_h, sw_w, 2, 2))


@triton.jit
def _conv_tile(X, wts, b, offs_p, p_ok, offs_c, c_ok,
               sx_b, sx_c, sx_h, sx_w, H, W, WO,
               STRIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The conv output at output positions offs_p (flattened ho * WO + wo), channels offs_c, fp32;
    wts from ``_tap_weights``."""
    ho = offs_p // WO
    wo = offs_p % WO
    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for ky in tl.static_range(3):
        for kx in tl.static_range(3):
            xv = _x_tap(X, b, ho, wo, p_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, ky, kx, STRIDE)
            acc += xv * wts[ky * 3 + kx][None, :]
    return acc


@triton.jit
def _row_taps(X, b, hi, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE: tl.constexpr):
    """x of input row hi under the three column taps (kx = 0, 1, 2) of output columns wo, fp32;
    0 in the padding (a row outside the image is all padding)."""
    x0, x1, x2 = _row_taps_raw(X, b, hi, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE)
    return x0.to(tl.float32), x1.to(tl.float32), x2.to(tl.float32)


@triton.jit
def _row_taps_raw(X, b, hi, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE: tl.constexpr):
    """``_row_taps`` in x's dtype: a row loaded ahead is held packed (bf16: half the registers)."""
    rows = hi + tl.zeros_like(wo)  # per column: the interpreter turns a mask and'ed with a scalar into int32
    ok = w_ok & (rows >= 0) & (rows < H)
    # The row clamped, so that a padding row's pointers stay within the image's rows (its loads
    # are masked off all the same, as are the column taps -1 and W and channels past C).
    base = (X + b * sx_b) + (tl.minimum(tl.maximum(hi, 0), H - 1) * sx_h + offs_c[None, :] * sx_c)
    mask_c = c_ok[None, :]
    wi = wo * STRIDE - 1  # never >= W; column wo * STRIDE is always inside
    x0 = tl.load(base + (wi * sx_w)[:, None], mask=(ok & (wi >= 0))[:, None] & mask_c, other=0.0)
    x1 = tl.load(base + ((wi + 1) * sx_w)[:, None], mask=ok[:, None] & mask_c, other=0.0)
    x2 = tl.load(base + ((wi + 2) * sx_w)[:, None], mask=(ok & (wi + 2 < W))[:, None] & mask_c, other=0.0)
    return x0, x1, x2


@triton.jit
def _input_rows(X, b, ho, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE: tl.constexpr):
    """The input taps ``_conv_row``'s step for output row ho reads, in x's dtype: stride 1, input
    row ho + 1's three column taps; stride 2, rows 2 ho's and 2 ho + 1's (six). Rows past the
    image are masked off (all padding), so a load one row ahead of the last is harmless."""
    if STRIDE == 1:
        rows = _row_taps_raw(X, b, ho + 1, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE)
    else:
        v0, v1, v2 = _row_taps_raw(X, b, 2 * ho, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE)
        x0, x1, x2 = _row_taps_raw(X, b, 2 * ho + 1, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE)
        rows = (v0, v1, v2, x0, x1, x2)
    return rows


@triton.jit
def _rows_ahead(X, b, h0, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W,
                STRIDE: tl.constexpr, PREFETCH: tl.constexpr):
    """What ``_conv_row`` carries into output row h0 (a band's first) of a strip: with PREFETCH,
    that row's input taps, loaded ahead; without, a placeholder it passes along untouched."""
    if PREFETCH:
        rows = _input_rows(X, b, h0, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE)
    else:
        rows = tl.zeros([1], tl.int8)
    return rows


@triton.jit
def _dy_row(DY, b, ho, wo, w_ok, offs_c, c_ok, sdy_b, sdy_c, sdy_h, sdy_w, HO):
    """dy at output row ho, columns wo, in its dtype; 0 past the last row (a load ahead of it)."""
    ok = (w_ok & (ho + tl.zeros_like(wo) < HO))[:, None] & c_ok[None, :]
    return tl.load((DY + b * sdy_b) + (offs_c[None, :] * sdy_c + (ho * sdy_h + wo * sdy_w)[:, None]),
                   mask=ok, other=0.0)


@triton.jit
def _dy_ahead(DY, b, h0, wo, w_ok, offs_c, c_ok, sdy_b, sdy_c, sdy_h, sdy_w, HO, PREFETCH: tl.constexpr):
    """What ``_dy_step`` carries into output row h0: that row's dy with PREFETCH, else a placeholder."""
    if PREFETCH:
        dy = _dy_row(DY, b, h0, wo, w_ok, offs_c, c_ok, sdy_b, sdy_c, sdy_h, sdy_w, HO)
    else:
        dy = tl.zeros([1], tl.int8)
    return dy


@triton.jit
def _dy_step(DY, b, ho, wo, w_ok, offs_c, c_ok, sdy_b, sdy_c, sdy_h, sdy_w, HO, dy_next, PREFETCH: tl.constexpr):
    """(dy of output row ho, what the next step takes): with PREFETCH, row ho's was loaded a step
    earlier and row ho + 1's is loaded now, as ``_conv_row`` does with x."""
    if PREFETCH:
        dy = dy_next
        dy_next = _dy_row(DY, b, ho + 1, wo, w_ok, offs_c, c_ok, sdy_b, sdy_c, sdy_h, sdy_w, HO)
    else:
        dy = _dy_row(DY, b, ho, wo, w_ok, offs_c, c_ok, sdy_b, sdy_c, sdy_h, sdy_w, HO)
    return dy, dy_next


@triton.jit
def _l2_tile(T, b, row, cols, c0, st_b, st_c, st_h, st_w, H, W, C,
             L2_CHANS: tl.constexpr, L2_STEP: tl.constexpr):
    """Ask L2 for row ``row`` of T (channels_last) at columns ``cols``, channels c0 onward: one
    address per L2_STEP channels (32 bytes), L2_CHANS of them. Row, columns and channels are
    clamped into the tensor: a row past the last asks for the last again, which costs nothing."""
    cols = tl.minimum(tl.maximum(cols, 0), W - 1)
    chans = tl.minimum(c0 + tl.arange(0, L2_CHANS) * L2_STEP, C - 1)
    base = (T + b * st_b) + tl.minimum(row, H - 1) * st_h
    prefetch_l2(base + ((cols * st_w)[:, None] + (chans * st_c)[None, :]))


@triton.jit
def _l2_input_rows(X, b, ho, cols, c0, sx_b, sx_c, sx_h, sx_w, H, W, C,
                   STRIDE: tl.constexpr, L2_CHANS: tl.constexpr, L2_STEP: tl.constexpr):
    """Ask L2 for the input rows that output row ho's step loads (``_input_rows``)."""
    if STRIDE == 1:
        _l2_tile(X, b, ho + 1, cols, c0, sx_b, sx_c, sx_h, sx_w, H, W, C, L2_CHANS, L2_STEP)
    else:
        _l2_tile(X, b, 2 * ho, cols, c0, sx_b, sx_c, sx_h, sx_w, H, W, C, L2_CHANS, L2_STEP)
        _l2_tile(X, b, 2 * ho + 1, cols, c0, sx_b, sx_c, sx_h, sx_w, H, W, C, L2_CHANS, L2_STEP)


@triton.jit
def _l2_input_and_dy_rows(X, DY, b, ho, cols, wo, c0, sx_b, sx_c, sx_h, sx_w, sdy_b, sdy_c, sdy_h, sdy_w,
                          H, W, HO, WO, C, STRIDE: tl.constexpr, L2_CHANS: tl.constexpr, L2_STEP: tl.constexpr):
    """The backward's ``_l2_input_rows``: output row ho's input rows and its dy row."""
    _l2_input_rows(X, b, ho, cols, c0, sx_b, sx_c, sx_h, sx_w, H, W, C, STRIDE, L2_CHANS, L2_STEP)
    _l2_tile(DY, b, ho, wo, c0, sdy_b, sdy_c, sdy_h, sdy_w, HO, WO, C, L2_CHANS, L2_STEP)


@triton.jit
def _row_acc(acc, x0, x1, x2, wts, ky: tl.constexpr):
    """acc plus one input row's contribution through kernel row ky."""
    acc += x0 * wts[ky * 3][None, :]
    acc += x1 * wts[ky * 3 + 1][None, :]
    acc += x2 * wts[ky * 3 + 2][None, :]
    return acc


@triton.jit
def _conv_rows_start(X, wts, b, h0, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W,
                     STRIDE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """The partial sums ``_conv_row`` carries, before output row h0 of a strip (0, or a band's
    first row): with stride 1, input rows h0 - 1's and h0's parts of output row h0 (ky = 0 and
    1) and row h0's part of output row h0 + 1 (ky = 0); with stride 2, input row 2 h0 - 1's part
    of output row h0 (ky = 0). Rows above the image are padding (their loads masked off). Then
    input row h0's taps (stride 2: zeros), for callers that keep them (the backward's d(weight))."""
    acc_a = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
    acc_b = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
    x0, x1, x2 = acc_a, acc_a, acc_a
    if STRIDE == 1:
        p0, p1, p2 = _row_taps(X, b, h0 - 1, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE)
        acc_a = _row_acc(acc_a, p0, p1, p2, wts, 0)
        x0, x1, x2 = _row_taps(X, b, h0, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE)
        acc_a = _row_acc(acc_a, x0, x1, x2, wts, 1)
        acc_b = _row_acc(acc_b, x0, x1, x2, wts, 0)
    else:
        p0, p1, p2 = _row_taps(X, b, 2 * h0 - 1, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE)
        acc_a = _row_acc(acc_a, p0, p1, p2, wts, 0)
    return acc_a, acc_b, x0, x1, x2


@triton.jit
def _conv_row(X, wts, b, ho, wo, w_ok, offs_c, c_ok, acc_a, acc_b, rows, sx_b, sx_c, sx_h, sx_w, H, W,
              STRIDE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, PREFETCH: tl.constexpr):
    """(conv output row ho at columns wo, fp32; the carried sums for row ho + 1; the taps it
    used: input row ho + 1's, or with stride 2 rows 2 ho's and 2 ho + 1's, six tiles; ``rows``
    for the next call). Rows stream: each input row is loaded once a strip (three column taps)
    and feeds every output row it reaches, so an output element costs three tile loads, not nine
    (stride 2: six). Callers that do not use the taps leave them to the compiler to drop.
    With PREFETCH, ``rows`` holds this row's input taps, loaded a step earlier (``_rows_ahead``
    for row 0), and the next row's are loaded here, before any arithmetic: a program waits on
    memory once a row, and the wait then overlaps a row's work instead of following it (on an
    H200 the streaming kernels took about one memory latency a row: 392 rows of S1's strips,
    ~1.3 us each)."""
    if PREFETCH:
        cur = rows
        rows = _input_rows(X, b, ho + 1, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE)
    else:
        cur = _input_rows(X, b, ho, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE)
    if STRIDE == 1:  # input row ho + 1 completes row ho (ky = 2) and feeds rows ho + 1 and ho + 2
        x0, x1, x2 = cur[0].to(tl.float32), cur[1].to(tl.float32), cur[2].to(tl.float32)
        z = _row_acc(acc_a, x0, x1, x2, wts, 2)
        acc_a = _row_acc(acc_b, x0, x1, x2, wts, 1)
        acc_b = _row_acc(tl.zeros([BLOCK_W, BLOCK_C], tl.float32), x0, x1, x2, wts, 0)
        taps = (x0, x1, x2)
    else:  # input rows 2 ho (ky = 1) and 2 ho + 1 (ky = 2; and ky = 0 of row ho + 1)
        v0, v1, v2 = cur[0].to(tl.float32), cur[1].to(tl.float32), cur[2].to(tl.float32)
        z = _row_acc(acc_a, v0, v1, v2, wts, 1)
        x0, x1, x2 = cur[3].to(tl.float32), cur[4].to(tl.float32), cur[5].to(tl.float32)
        z = _row_acc(z, x0, x1, x2, wts, 2)
        acc_a = _row_acc(tl.zeros([BLOCK_W, BLOCK_C], tl.float32), x0, x1, x2, wts, 0)
        taps = (v0, v1, v2, x0, x1, x2)
    return z, acc_a, acc_b, taps, rows


@triton.jit
def _stats(X, WT, MEAN, M2,
           sx_b, sx_c, sx_h, sx_w, sw_c, sw_h, sw_w,
           C, H, W, HO, WO, ROWS,
           STRIDE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, PREFETCH: tl.constexpr,
           L2_AHEAD: tl.constexpr, L2_COLS: tl.constexpr, L2_CHANS: tl.constexpr, L2_STEP: tl.constexpr):
    b, offs_c = image_and_channels(C, BLOCK_C, FORWARD_CHANNEL_VECTOR)
    c0 = channel_block_start(C, BLOCK_C)
    band = tl.program_id(1)  # grid axis 1: bands of ROWS output rows (``_row_bands``)
    h0 = band * ROWS
    h1 = tl.minimum(h0 + ROWS, HO)
    split = b * tl.num_programs(1) + band  # the row of this program's per-(image, band) partials
    c_ok = offs_c < C
    wts = _tap_weights(WT, offs_c, c_ok, sw_c, sw_h, sw_w)
    count = tl.zeros([BLOCK_W], tl.float32)
    mean = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
    for w0 in range(0, WO, BLOCK_W):
        wo = w0 + tl.arange(0, BLOCK_W)
        w_ok = wo < WO
        l2_cols = w0 * STRIDE - 1 + tl.arange(0, L2_COLS)  # the strip's input columns, halo included
        acc_a, acc_b, _, _, _ = _conv_rows_start(X, wts, b, h0, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W,
                                                 STRIDE, BLOCK_W, BLOCK_C)
        rows = _rows_ahead(X, b, h0, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE, PREFETCH)
        for ho in range(h0, h1):
            if L2_AHEAD > 0:  # L2_AHEAD steps past the one whose rows this step loads
                _l2_input_rows(X, b, ho + 1 + L2_AHEAD, l2_cols, c0, sx_b, sx_c, sx_h, sx_w, H, W, C, STRIDE,
                               L2_CHANS, L2_STEP)
            z, acc_a, acc_b, _taps, rows = _conv_row(X, wts, b, ho, wo, w_ok, offs_c, c_ok, acc_a, acc_b, rows,
                                                     sx_b, sx_c, sx_h, sx_w, H, W, STRIDE, BLOCK_W, BLOCK_C, PREFETCH)
            count, mean, m2 = welford_update(count, mean, m2, z, w_ok)
    mean, m2 = welford_total(count, mean, m2)
    tl.store(MEAN + split * C + offs_c, mean, mask=c_ok)
    tl.store(M2 + split * C + offs_c, m2, mask=c_ok)


@triton.jit
def _apply(X, WT, MEAN, RSTD, GAMMA, BETA, Y, POOL,
           sx_b, sx_c, sx_h, sx_w, sw_c, sw_h, sw_w, sy_b, sy_c, sy_h, sy_w,
           C, H, W, HO, WO, ROWS,
           STRIDE: tl.constexpr, HAS_POOL: tl.constexpr,
           BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, PREFETCH: tl.constexpr,
           L2_AHEAD: tl.constexpr, L2_COLS: tl.constexpr, L2_CHANS: tl.constexpr, L2_STEP: tl.constexpr):
    b, offs_c = image_and_channels(C, BLOCK_C, FORWARD_CHANNEL_VECTOR)
    c0 = channel_block_start(C, BLOCK_C)
    band = tl.program_id(1)  # grid axis 1: bands of ROWS output rows (``_row_bands``)
    h0 = band * ROWS
    h1 = tl.minimum(h0 + ROWS, HO)
    split = b * tl.num_programs(1) + band  # the row of this program's per-(image, band) partials
    c_ok = offs_c < C
    scale, shift = bn_scale_shift(MEAN, RSTD, GAMMA, BETA, offs_c, c_ok)
    wts = _tap_weights(WT, offs_c, c_ok, sw_c, sw_h, sw_w)
    pool = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)  # per slot, reduced across rows after the loop
    for w0 in range(0, WO, BLOCK_W):
        wo = w0 + tl.arange(0, BLOCK_W)
        w_ok = wo < WO
        l2_cols = w0 * STRIDE - 1 + tl.arange(0, L2_COLS)  # the strip's input columns, halo included
        ok = w_ok[:, None] & c_ok[None, :]
        y_strip = (Y + b * sy_b) + (offs_c[None, :] * sy_c + (wo * sy_w)[:, None])
        acc_a, acc_b, _, _, _ = _conv_rows_start(X, wts, b, h0, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W,
                                                 STRIDE, BLOCK_W, BLOCK_C)
        rows = _rows_ahead(X, b, h0, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE, PREFETCH)
        for ho in range(h0, h1):
            if L2_AHEAD > 0:  # L2_AHEAD steps past the one whose rows this step loads
                _l2_input_rows(X, b, ho + 1 + L2_AHEAD, l2_cols, c0, sx_b, sx_c, sx_h, sx_w, H, W, C, STRIDE,
                               L2_CHANS, L2_STEP)
            u, acc_a, acc_b, _taps, rows = _conv_row(X, wts, b, ho, wo, w_ok, offs_c, c_ok, acc_a, acc_b, rows,
                                                     sx_b, sx_c, sx_h, sx_w, H, W, STRIDE, BLOCK_W, BLOCK_C, PREFETCH)
            y = gelu(u * scale[None, :] + shift[None, :])
            tl.store(y_strip + ho * sy_h, y.to(Y.dtype.element_ty), mask=ok)
            if HAS_POOL:
                pool += tl.where(ok, y, 0.0)
    if HAS_POOL:
        tl.store(POOL + split * C + offs_c, tl.sum(pool, 0), mask=c_ok)


@triton.jit
def _channel_bn(MEAN, RSTD, GAMMA, BETA, DPOOL, b, offs_c, c_ok, C, inv_p, HAS_DPOOL: tl.constexpr):
    """The backward's per-channel values, fp32, loaded once a program (Triton does not move loads
    out of a loop): mean, rstd, gamma, beta, and the SE pool's gradient per position (0 without)."""
    mean = tl.load(MEAN + offs_c, mask=c_ok, other=0.0)
    rstd = tl.load(RSTD + offs_c, mask=c_ok, other=0.0)
    gamma = tl.load(GAMMA + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(BETA + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    dpool = tl.zeros_like(mean)
    if HAS_DPOOL:  # the SE pool's gradient reaches every position of its image equally
        dpool = tl.load(DPOOL + b * C + offs_c, mask=c_ok, other=0.0) * inv_p
    return mean, rstd, gamma, beta, dpool


@triton.jit
def _training_means(DBETA, DGAMMA, offs_c, c_ok, inv_count, TRAINING: tl.constexpr, BLOCK_C: tl.constexpr):
    """d(beta) and d(gamma)'s totals over the count of values a channel (training's BatchNorm
    backward subtracts them), fp32; zeros in eval."""
    mean_dbeta = tl.zeros([BLOCK_C], tl.float32)
    mean_dgamma = tl.zeros([BLOCK_C], tl.float32)
    if TRAINING:
        mean_dbeta = tl.load(DBETA + offs_c, mask=c_ok, other=0.0) * inv_count
        mean_dgamma = tl.load(DGAMMA + offs_c, mask=c_ok, other=0.0) * inv_count
    return mean_dbeta, mean_dgamma


@triton.jit
def _du_from(z, bn, dy, p_ok, c_ok, HAS_DPOOL: tl.constexpr):
    """From the conv output z and dy at the same positions (tiles): du = d(loss)/du through
    GELU, and xhat (fp32 tiles; du is 0 outside the image and the channels)."""
    mean, rstd, gamma, beta, dpool = bn
    xhat = (z - mean[None, :]) * rstd[None, :]
    u = xhat * gamma[None, :] + beta[None, :]
    ok = p_ok[:, None] & c_ok[None, :]
    dy = dy.to(tl.float32)
    if HAS_DPOOL:
        dy += dpool[None, :]
    du = tl.where(ok, dy * gelu_grad(u), 0.0)
    return du, xhat


@triton.jit
def _dz_from(z, bn, dy, p_ok, c_ok, mean_dbeta, mean_dgamma, HAS_DPOOL: tl.constexpr, TRAINING: tl.constexpr):
    """dz, the gradient at the conv output, from the conv output z and dy at the same positions:
    GELU's and BatchNorm's backward (training: batch statistics depend on every input). fp32, 0
    outside the image and the channels (the training correction would fill masked rows)."""
    du, xhat = _du_from(z, bn, dy, p_ok, c_ok, HAS_DPOOL)
    _, rstd, gamma, _, _ = bn
    if TRAINING:
        du = du - mean_dbeta[None, :] - xhat * mean_dgamma[None, :]
    return tl.where(p_ok[:, None] & c_ok[None, :], du * (gamma * rstd)[None, :], 0.0)


@triton.jit
def _dz_at(z, bn, DY, b, ho, wo, p_ok, offs_c, c_ok, mean_dbeta, mean_dgamma, sdy_b, sdy_c, sdy_h, sdy_w,
           HAS_DPOOL: tl.constexpr, TRAINING: tl.constexpr):
    """``_dz_from`` at positions (ho, wo), dy loaded here."""
    dy = tl.load((DY + b * sdy_b) + (offs_c[None, :] * sdy_c + (ho * sdy_h + wo * sdy_w)[:, None]),
                 mask=p_ok[:, None] & c_ok[None, :], other=0.0)
    return _dz_from(z, bn, dy, p_ok, c_ok, mean_dbeta, mean_dgamma, HAS_DPOOL, TRAINING)


@triton.jit
def _bwd_reduce(X, WT, DY, DPOOL, MEAN, RSTD, GAMMA, BETA, SUM_DU, SUM_DU_XHAT,
                sx_b, sx_c, sx_h, sx_w, sw_c, sw_h, sw_w, sdy_b, sdy_c, sdy_h, sdy_w,
                C, H, W, HO, WO, ROWS, inv_p,
                STRIDE: tl.constexpr, HAS_DPOOL: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
                PREFETCH: tl.constexpr, L2_AHEAD: tl.constexpr, L2_COLS: tl.constexpr, L2_CHANS: tl.constexpr,
                L2_STEP: tl.constexpr):
    b, offs_c = image_and_channels(C, BLOCK_C, CHANNEL_VECTOR)
    c0 = channel_block_start(C, BLOCK_C)
    band = tl.program_id(1)  # grid axis 1: bands of ROWS output rows (``_row_bands``)
    h0 = band * ROWS
    h1 = tl.minimum(h0 + ROWS, HO)
    split = b * tl.num_programs(1) + band  # the row of this program's per-(image, band) partials
    c_ok = offs_c < C
    wts = _tap_weights(WT, offs_c, c_ok, sw_c, sw_h, sw_w)
    bn = _channel_bn(MEAN, RSTD, GAMMA, BETA, DPOOL, b, offs_c, c_ok, C, inv_p, HAS_DPOOL)
    sum_du = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)  # per slot, reduced across rows after the loop
    sum_du_xhat = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
    for w0 in range(0, WO, BLOCK_W):
        wo = w0 + tl.arange(0, BLOCK_W)
        w_ok = wo < WO
        l2_cols = w0 * STRIDE - 1 + tl.arange(0, L2_COLS)  # the strip's input columns, halo included
        acc_a, acc_b, _, _, _ = _conv_rows_start(X, wts, b, h0, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W,
                                                 STRIDE, BLOCK_W, BLOCK_C)
        rows = _rows_ahead(X, b, h0, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE, PREFETCH)
        dy_next = _dy_ahead(DY, b, h0, wo, w_ok, offs_c, c_ok, sdy_b, sdy_c, sdy_h, sdy_w, HO, PREFETCH)
        for ho in range(h0, h1):
            if L2_AHEAD > 0:  # L2_AHEAD steps past the one whose rows this step loads
                _l2_input_and_dy_rows(X, DY, b, ho + 1 + L2_AHEAD, l2_cols, wo, c0, sx_b, sx_c, sx_h, sx_w,
                                      sdy_b, sdy_c, sdy_h, sdy_w, H, W, HO, WO, C, STRIDE, L2_CHANS, L2_STEP)
            dy, dy_next = _dy_step(DY, b, ho, wo, w_ok, offs_c, c_ok, sdy_b, sdy_c, sdy_h, sdy_w, HO, dy_next,
                                   PREFETCH)
            z, acc_a, acc_b, _taps, rows = _conv_row(X, wts, b, ho, wo, w_ok, offs_c, c_ok, acc_a, acc_b, rows,
                                                     sx_b, sx_c, sx_h, sx_w, H, W, STRIDE, BLOCK_W, BLOCK_C, PREFETCH)
            du, xhat = _du_from(z, bn, dy, w_ok, c_ok, HAS_DPOOL)
            sum_du += du
            sum_du_xhat += du * xhat
    tl.store(SUM_DU + split * C + offs_c, tl.sum(sum_du, 0), mask=c_ok)
    tl.store(SUM_DU_XHAT + split * C + offs_c, tl.sum(sum_du_xhat, 0), mask=c_ok)


@triton.jit
def _dz_chunk(X, wts, bn, DY, ring, b, q0, offs_c, c_ok, mean_dbeta, mean_dgamma,
              dw, taps, sx_b, sx_c, sx_h, sx_w, sdy_b, sdy_c, sdy_h, sdy_w,
              H, W, WO, P, ring_mask,
              STRIDE: tl.constexpr, HAS_DPOOL: tl.constexpr, TRAINING: tl.constexpr,
              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dz (fp32) at output positions q0 .. q0 + BLOCK_P into the ring, and d(weight)'s sums over
    them added to ``dw`` (row ky * 3 + kx per tap)."""
    offs_q = q0 + tl.arange(0, BLOCK_P)
    q_ok = offs_q < P
    ho = offs_q // WO
    wo = offs_q % WO
    z = _conv_tile(X, wts, b, offs_q, q_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, WO, STRIDE, BLOCK_P, BLOCK_C)
    dz = _dz_at(z, bn, DY, b, ho, wo, q_ok, offs_c, c_ok, mean_dbeta, mean_dgamma, sdy_b, sdy_c, sdy_h, sdy_w,
                HAS_DPOOL, TRAINING)
    tl.store(ring + (offs_q & ring_mask)[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :], dz,
             mask=q_ok[:, None])
    # A runtime loop, not an unrolled one: unrolled, the compiler hoists all nine x tiles at once
    # and spills (ptxas, sm_90); the reloads are cache hits, so their serial latency is cheap.
    for t in range(9):
        xv = _x_tap(X, b, ho, wo, q_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, t // 3, t % 3, STRIDE)
        dw += tl.where(taps[:, None] == t, tl.sum(dz * xv, 0)[None, :], 0.0)
    return dw


@triton.jit
def _source_index(i, k, size_out, STRIDE: tl.constexpr):
    """The output index whose tap k lands on input index i (along one axis), and whether there is
    one. Where i + 1 - k < 0 the result is masked off, so that compiled (truncating) and
    interpreted (flooring) division differ there is harmless."""
    n = i + 1 - k
    o = n // STRIDE
    ok = (n >= 0) & (o < size_out)
    if STRIDE == 2:
        ok = ok & (n % 2 == 0)
    return o, ok


@triton.jit
def _bwd_dx(X, WT, DY, DPOOL, MEAN, RSTD, GAMMA, BETA, DBETA, DGAMMA, DX, DW_PARTIAL, RING,
            sx_b, sx_c, sx_h, sx_w, sw_c, sw_h, sw_w, sdy_b, sdy_c, sdy_h, sdy_w, sdx_b, sdx_c, sdx_h, sdx_w,
            C, H, W, HO, WO, inv_p, inv_count, ring_mask,
            STRIDE: tl.constexpr, HAS_DPOOL: tl.constexpr, TRAINING: tl.constexpr,
            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b, offs_c = image_and_channels(C, BLOCK_C, CHANNEL_VECTOR)
    c_ok = offs_c < C
    P = HO * WO
    mean_dbeta, mean_dgamma = _training_means(DBETA, DGAMMA, offs_c, c_ok, inv_count, TRAINING, BLOCK_C)
    # This program's ring of dz rows: output position q in row q & ring_mask, [ring_mask + 1, BLOCK_C] fp32.
    ring = RING + tl.program_id(0).to(tl.int64) * (ring_mask + 1) * BLOCK_C
    offs_r = tl.arange(0, BLOCK_C)
    wts = _tap_weights(WT, offs_c, c_ok, sw_c, sw_h, sw_w)
    bn = _channel_bn(MEAN, RSTD, GAMMA, BETA, DPOOL, b, offs_c, c_ok, C, inv_p, HAS_DPOOL)
    taps = tl.arange(0, 16)  # d(weight)'s rows: 16, a power of two, 9 used
    dw = tl.zeros([16, BLOCK_C], tl.float32)
    dz_done = tl.full([], 0, tl.int32)  # output positions whose dz is in the ring: [0, dz_done)
    for start in range(0, H * W, BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        p_ok = offs_p < H * W
        hi = offs_p // W
        wi = offs_p % W
        # dz up to the last output row this chunk's taps reach (tap ky = 0 of its last input row);
        # the ring is large enough that nothing the previous chunk read is overwritten here.
        last_row = tl.minimum(H - 1, (start + BLOCK_P - 1) // W)
        needed = tl.minimum(HO, (last_row + 1) // STRIDE + 1) * WO
        while dz_done < needed:
            dw = _dz_chunk(X, wts, bn, DY, ring, b, dz_done, offs_c, c_ok, mean_dbeta, mean_dgamma, dw, taps,
                           sx_b, sx_c, sx_h, sx_w, sdy_b, sdy_c, sdy_h, sdy_w, H, W, WO, P, ring_mask,
                           STRIDE, HAS_DPOOL, TRAINING, BLOCK_P, BLOCK_C)
            dz_done += BLOCK_P
        # The ring rows just stored are read below by other threads of this program.
        tl.debug_barrier()
        acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        for ky in tl.static_range(3):
            ho, h_ok = _source_index(hi, ky, HO, STRIDE)
            h_ok = h_ok & p_ok
            for kx in tl.static_range(3):
                wo, w_ok = _source_index(wi, kx, WO, STRIDE)
                ok = h_ok & w_ok
                dz = tl.load(ring + ((ho * WO + wo) & ring_mask)[:, None] * BLOCK_C + offs_r[None, :],
                             mask=ok[:, None], other=0.0)
                acc += dz * wts[ky * 3 + kx][None, :]
        tl.store((DX + b * sdx_b) + (offs_c[None, :] * sdx_c + (hi * sdx_h + wi * sdx_w)[:, None]),
                 acc.to(DX.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])
    tl.store(DW_PARTIAL + (b * C + offs_c[None, :]) * 9 + taps[:, None], dw, mask=(taps[:, None] < 9) & c_ok[None, :])


@triton.jit
def _dz_cols(row, s_col, chans, c_ok, wi, wi_ok, WO, STRIDE: tl.constexpr):
    """A dz row (``row`` + column * s_col + chans) as seen by input columns wi through column
    taps kx = 0, 1, 2: dz at output column (wi + 1 - kx) / STRIDE where that is one (else 0), fp32."""
    src, ok = _source_index(wi, 0, WO, STRIDE)
    v0 = tl.load(row + src[:, None] * s_col + chans[None, :], mask=(ok & wi_ok)[:, None] & c_ok[None, :], other=0.0)
    src, ok = _source_index(wi, 1, WO, STRIDE)
    v1 = tl.load(row + src[:, None] * s_col + chans[None, :], mask=(ok & wi_ok)[:, None] & c_ok[None, :], other=0.0)
    src, ok = _source_index(wi, 2, WO, STRIDE)
    v2 = tl.load(row + src[:, None] * s_col + chans[None, :], mask=(ok & wi_ok)[:, None] & c_ok[None, :], other=0.0)
    return v0.to(tl.float32), v1.to(tl.float32), v2.to(tl.float32)


@triton.jit
def _dx_rows_take(dx_a, dx_b, d0, d1, d2, wts, dx_strip, ho, sdx_h, dx_ok, wi_row,
                  STRIDE: tl.constexpr, BLOCK_WI: tl.constexpr, BLOCK_C: tl.constexpr):
    """Add dz row ho (as ``_dz_cols`` gives it) into the dx rows it reaches, store the ones it
    completes, and return the two still taking sums: stride 1, rows ho and ho + 1 (ho - 1 is
    done); stride 2, row 2 ho + 1 (2 ho - 1 and 2 ho are done; dx_b unused)."""
    if STRIDE == 1:  # dz row ho reaches dx rows ho - 1 (ky = 0), ho (ky = 1), ho + 1 (ky = 2)
        done = _row_acc(dx_a, d0, d1, d2, wts, 0)
        tl.store(dx_strip + (ho - 1) * sdx_h, done.to(dx_strip.dtype.element_ty),
                 mask=dx_ok & (wi_row + ho >= 1)[:, None])
        dx_a = _row_acc(dx_b, d0, d1, d2, wts, 1)
        dx_b = _row_acc(tl.zeros([BLOCK_WI, BLOCK_C], tl.float32), d0, d1, d2, wts, 2)
    else:  # dz row ho reaches dx rows 2 ho - 1 (ky = 0), 2 ho (ky = 1), 2 ho + 1 (ky = 2)
        done = _row_acc(dx_a, d0, d1, d2, wts, 0)
        tl.store(dx_strip + (2 * ho - 1) * sdx_h, done.to(dx_strip.dtype.element_ty),
                 mask=dx_ok & (wi_row + ho >= 1)[:, None])
        done = _row_acc(tl.zeros([BLOCK_WI, BLOCK_C], tl.float32), d0, d1, d2, wts, 1)
        tl.store(dx_strip + (2 * ho) * sdx_h, done.to(dx_strip.dtype.element_ty), mask=dx_ok)
        dx_a = _row_acc(tl.zeros([BLOCK_WI, BLOCK_C], tl.float32), d0, d1, d2, wts, 2)
    return dx_a, dx_b


@triton.jit
def _dx_rows_finish(dx_a, dx_strip, H, HO, sdx_h, dx_ok, wi_row, STRIDE: tl.constexpr):
    """Store the last dx row: stride 1, H - 1 (its ky = 0 dz row is padding); stride 2, 2 HO - 1
    if inside."""
    if STRIDE == 1:
        last = HO - 1
    else:
        last = 2 * HO - 1
    tl.store(dx_strip + last * sdx_h, dx_a.to(dx_strip.dtype.element_ty), mask=dx_ok & (wi_row + last < H)[:, None])


@triton.jit
def _dw_store(DW_PARTIAL, b, C, offs_c, c_ok, dw0, dw1, dw2, dw3, dw4, dw5, dw6, dw7, dw8):
    """d(weight)'s per-image partials [B, C, 9] from the per-slot sums of each tap."""
    base = DW_PARTIAL + (b * C + offs_c) * 9
    tl.store(base + 0, tl.sum(dw0, 0), mask=c_ok)
    tl.store(base + 1, tl.sum(dw1, 0), mask=c_ok)
    tl.store(base + 2, tl.sum(dw2, 0), mask=c_ok)
    tl.store(base + 3, tl.sum(dw3, 0), mask=c_ok)
    tl.store(base + 4, tl.sum(dw4, 0), mask=c_ok)
    tl.store(base + 5, tl.sum(dw5, 0), mask=c_ok)
    tl.store(base + 6, tl.sum(dw6, 0), mask=c_ok)
    tl.store(base + 7, tl.sum(dw7, 0), mask=c_ok)
    tl.store(base + 8, tl.sum(dw8, 0), mask=c_ok)


@triton.jit
def _bwd_dx_rows(X, WT, DY, DPOOL, MEAN, RSTD, GAMMA, BETA, DBETA, DGAMMA, DX, DW_PARTIAL, SCRATCH,
                 sx_b, sx_c, sx_h, sx_w, sw_c, sw_h, sw_w, sdy_b, sdy_c, sdy_h, sdy_w,
                 sdx_b, sdx_c, sdx_h, sdx_w,
                 C, H, W, HO, WO, inv_p, inv_count,
                 STRIDE: tl.constexpr, HAS_DPOOL: tl.constexpr, TRAINING: tl.constexpr,
                 BLOCK_WO: tl.constexpr, BLOCK_WI: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx and d(weight)'s per-image partials, a whole image row at a time: down the rows, the
    conv output row (streamed as in the forward), its dz, which goes through a two-row scratch
    (fp32, so that each input column can read its neighbours' dz: the only exchange between
    threads, one barrier a row), the dx rows it completes (their partial sums carried, as the
    forward carries the conv's), and d(weight)'s per-slot sums from dz and the x under each tap.
    Rows must fit a tile: BLOCK_WO >= WO, BLOCK_WI >= W."""
    b, offs_c = image_and_channels(C, BLOCK_C, CHANNEL_VECTOR)
    c_ok = offs_c < C
    mean_dbeta, mean_dgamma = _training_means(DBETA, DGAMMA, offs_c, c_ok, inv_count, TRAINING, BLOCK_C)
    wts = _tap_weights(WT, offs_c, c_ok, sw_c, sw_h, sw_w)
    bn = _channel_bn(MEAN, RSTD, GAMMA, BETA, DPOOL, b, offs_c, c_ok, C, inv_p, HAS_DPOOL)
    wo = tl.arange(0, BLOCK_WO)
    wo_ok = wo < WO
    wi = tl.arange(0, BLOCK_WI)
    wi_ok = wi < W
    # This program's two dz rows, [2, BLOCK_WO, BLOCK_C] fp32: row ho in ho & 1.
    scratch = SCRATCH + tl.program_id(0).to(tl.int64) * (2 * BLOCK_WO * BLOCK_C)
    offs_s = wo[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    dx_strip = (DX + b * sdx_b) + (offs_c[None, :] * sdx_c + (wi * sdx_w)[:, None])
    dx_ok = wi_ok[:, None] & c_ok[None, :]
    wi_row = tl.zeros_like(wi)  # + a row index: a row condition as a vector (the interpreter's masks need one)
    zero = tl.zeros([BLOCK_WO, BLOCK_C], tl.float32)
    dw0, dw1, dw2, dw3, dw4, dw5, dw6, dw7, dw8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    # dx rows still taking sums: stride 1, rows ho - 1 and ho; stride 2, row 2 ho - 1 (dx_b unused)
    dx_a = tl.zeros([BLOCK_WI, BLOCK_C], tl.float32)
    dx_b = tl.zeros([BLOCK_WI, BLOCK_C], tl.float32)
    # d(weight) needs the x under every tap of output row ho: its three input rows' taps, those
    # the conv loads for this row and those carried from the last one or two (u*: kernel row 0,
    # v*: row 1, x*: row 2).
    acc_a, acc_b, v0, v1, v2 = _conv_rows_start(X, wts, b, 0, wo, wo_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W,
                                                STRIDE, BLOCK_WO, BLOCK_C)
    u0, u1, u2 = zero, zero, zero
    rows = _rows_ahead(X, b, 0, wo, wo_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE, False)
    for ho in range(0, HO):
        z, acc_a, acc_b, taps, rows = _conv_row(X, wts, b, ho, wo, wo_ok, offs_c, c_ok, acc_a, acc_b, rows,
                                                sx_b, sx_c, sx_h, sx_w, H, W, STRIDE, BLOCK_WO, BLOCK_C, False)
        if STRIDE == 1:
            x0, x1, x2 = taps
        else:
            v0, v1, v2, x0, x1, x2 = taps
        dz = _dz_at(z, bn, DY, b, ho, wo, wo_ok, offs_c, c_ok, mean_dbeta, mean_dgamma,
                    sdy_b, sdy_c, sdy_h, sdy_w, HAS_DPOOL, TRAINING)
        dw0, dw1, dw2 = dw0 + dz * u0, dw1 + dz * u1, dw2 + dz * u2
        dw3, dw4, dw5 = dw3 + dz * v0, dw4 + dz * v1, dw5 + dz * v2
        dw6, dw7, dw8 = dw6 + dz * x0, dw7 + dz * x1, dw8 + dz * x2
        if STRIDE == 1:
            u0, u1, u2 = v0, v1, v2
            v0, v1, v2 = x0, x1, x2
        else:
            u0, u1, u2 = x0, x1, x2
        # Two rows alternate, so one barrier a row suffices: a thread writing row ho + 2's dz
        # here has passed row ho + 1's barrier, which every thread reaches after reading ho's.
        buf = scratch + (ho & 1) * (BLOCK_WO * BLOCK_C)
        tl.store(buf + offs_s, dz)
        tl.debug_barrier()
        chans = tl.arange(0, BLOCK_C)
        d0, d1, d2 = _dz_cols(buf, BLOCK_C, chans, chans < BLOCK_C, wi, wi_ok, WO, STRIDE)
        dx_a, dx_b = _dx_rows_take(dx_a, dx_b, d0, d1, d2, wts, dx_strip, ho, sdx_h, dx_ok, wi_row,
                                   STRIDE, BLOCK_WI, BLOCK_C)
    _dx_rows_finish(dx_a, dx_strip, H, HO, sdx_h, dx_ok, wi_row, STRIDE)
    _dw_store(DW_PARTIAL, b, C, offs_c, c_ok, dw0, dw1, dw2, dw3, dw4, dw5, dw6, dw7, dw8)


@triton.jit
def _bwd_dz(X, WT, DY, DPOOL, MEAN, RSTD, GAMMA, BETA, DBETA, DGAMMA, DZ,
            sx_b, sx_c, sx_h, sx_w, sw_c, sw_h, sw_w, sdy_b, sdy_c, sdy_h, sdy_w, sdz_b, sdz_c, sdz_h, sdz_w,
            C, H, W, HO, WO, ROWS, inv_p, inv_count,
            STRIDE: tl.constexpr, HAS_DPOOL: tl.constexpr, TRAINING: tl.constexpr,
            BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, PREFETCH: tl.constexpr,
            L2_AHEAD: tl.constexpr, L2_COLS: tl.constexpr, L2_CHANS: tl.constexpr, L2_STEP: tl.constexpr):
    """dz, the gradient at the conv output (recompute, then GELU's and BatchNorm's backward),
    into DZ [B, C, HO, WO]; strips streamed down the rows as in ``_bwd_reduce``."""
    b, offs_c = image_and_channels(C, BLOCK_C, CHANNEL_VECTOR)
    c0 = channel_block_start(C, BLOCK_C)
    band = tl.program_id(1)  # grid axis 1: bands of ROWS output rows (``_row_bands``)
    h0 = band * ROWS
    h1 = tl.minimum(h0 + ROWS, HO)
    c_ok = offs_c < C
    mean_dbeta, mean_dgamma = _training_means(DBETA, DGAMMA, offs_c, c_ok, inv_count, TRAINING, BLOCK_C)
    wts = _tap_weights(WT, offs_c, c_ok, sw_c, sw_h, sw_w)
    bn = _channel_bn(MEAN, RSTD, GAMMA, BETA, DPOOL, b, offs_c, c_ok, C, inv_p, HAS_DPOOL)
    for w0 in range(0, WO, BLOCK_W):
        wo = w0 + tl.arange(0, BLOCK_W)
        w_ok = wo < WO
        l2_cols = w0 * STRIDE - 1 + tl.arange(0, L2_COLS)  # the strip's input columns, halo included
        ok = w_ok[:, None] & c_ok[None, :]
        dz_strip = (DZ + b * sdz_b) + (offs_c[None, :] * sdz_c + (wo * sdz_w)[:, None])
        acc_a, acc_b, _, _, _ = _conv_rows_start(X, wts, b, h0, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W,
                                                 STRIDE, BLOCK_W, BLOCK_C)
        rows = _rows_ahead(X, b, h0, wo, w_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE, PREFETCH)
        dy_next = _dy_ahead(DY, b, h0, wo, w_ok, offs_c, c_ok, sdy_b, sdy_c, sdy_h, sdy_w, HO, PREFETCH)
        for ho in range(h0, h1):
            if L2_AHEAD > 0:  # L2_AHEAD steps past the one whose rows this step loads
                _l2_input_and_dy_rows(X, DY, b, ho + 1 + L2_AHEAD, l2_cols, wo, c0, sx_b, sx_c, sx_h, sx_w,
                                      sdy_b, sdy_c, sdy_h, sdy_w, H, W, HO, WO, C, STRIDE, L2_CHANS, L2_STEP)
            dy, dy_next = _dy_step(DY, b, ho, wo, w_ok, offs_c, c_ok, sdy_b, sdy_c, sdy_h, sdy_w, HO, dy_next,
                                   PREFETCH)
            z, acc_a, acc_b, _taps, rows = _conv_row(X, wts, b, ho, wo, w_ok, offs_c, c_ok, acc_a, acc_b, rows,
                                                     sx_b, sx_c, sx_h, sx_w, H, W, STRIDE, BLOCK_W, BLOCK_C, PREFETCH)
            dz = _dz_from(z, bn, dy, w_ok, c_ok, mean_dbeta, mean_dgamma, HAS_DPOOL, TRAINING)
            tl.store(dz_strip + ho * sdz_h, dz.to(DZ.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_dx_dw(X, WT, DZ, DX, DW_PARTIAL,
               sx_b, sx_c, sx_h, sx_w, sw_c, sw_h, sw_w, sdz_b, sdz_c, sdz_h, sdz_w, sdx_b, sdx_c, sdx_h, sdx_w,
               C, H, W, HO, WO,
               STRIDE: tl.constexpr, BLOCK_WO: tl.constexpr, BLOCK_WI: tl.constexpr, BLOCK_C: tl.constexpr,
               L2_AHEAD: tl.constexpr, L2_COLS: tl.constexpr, L2_CHANS: tl.constexpr, L2_STEP: tl.constexpr):
    """dx (the transposed depthwise conv of dz) and d(weight)'s per-image partials from DZ, a
    whole image row at a time, as ``_bwd_dx_rows`` does but reading dz instead of computing it:
    no conv, no BatchNorm, no exchange between threads. Rows must fit a tile: BLOCK_WO >= WO,
    BLOCK_WI >= W. With L2_AHEAD, the x and dz rows L2_AHEAD steps on are asked of L2 (the
    streaming kernels' ``_l2_tile``; L2_COLS is BLOCK_WI)."""
    b, offs_c = image_and_channels(C, BLOCK_C, CHANNEL_VECTOR)
    c0 = channel_block_start(C, BLOCK_C)
    c_ok = offs_c < C
    wts = _tap_weights(WT, offs_c, c_ok, sw_c, sw_h, sw_w)
    wo = tl.arange(0, BLOCK_WO)
    wo_ok = wo < WO
    wi = tl.arange(0, BLOCK_WI)
    wi_ok = wi < W
    dz_image = (DZ + b * sdz_b) + offs_c * sdz_c  # [BLOCK_C] channel pointers of image b
    dz_ok = wo_ok[:, None] & c_ok[None, :]
    dx_strip = (DX + b * sdx_b) + (offs_c[None, :] * sdx_c + (wi * sdx_w)[:, None])
    dx_ok = wi_ok[:, None] & c_ok[None, :]
    wi_row = tl.zeros_like(wi)  # + a row index: a row condition as a vector (the interpreter's masks need one)
    zero = tl.zeros([BLOCK_WO, BLOCK_C], tl.float32)
    dw0, dw1, dw2, dw3, dw4, dw5, dw6, dw7, dw8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    dx_a = tl.zeros([BLOCK_WI, BLOCK_C], tl.float32)
    dx_b = tl.zeros([BLOCK_WI, BLOCK_C], tl.float32)
    # The x under each tap of output row ho, for d(weight): kernel row 0 (u*), 1 (v*), 2 (x*);
    # with stride 1 each input row is loaded once and carried through the three.
    u0, u1, u2 = zero, zero, zero
    v0, v1, v2 = zero, zero, zero
    if STRIDE == 1:
        v0, v1, v2 = _row_taps(X, b, 0, wo, wo_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE)
    for ho in range(0, HO):
        if L2_AHEAD > 0:
            _l2_input_rows(X, b, ho + L2_AHEAD, wi, c0, sx_b, sx_c, sx_h, sx_w, H, W, C, STRIDE, L2_CHANS, L2_STEP)
            _l2_tile(DZ, b, ho + L2_AHEAD, wo, c0, sdz_b, sdz_c, sdz_h, sdz_w, HO, WO, C, L2_CHANS, L2_STEP)
        if STRIDE == 1:
            x0, x1, x2 = _row_taps(X, b, ho + 1, wo, wo_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE)
        else:
            v0, v1, v2 = _row_taps(X, b, 2 * ho, wo, wo_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE)
            x0, x1, x2 = _row_taps(X, b, 2 * ho + 1, wo, wo_ok, offs_c, c_ok, sx_b, sx_c, sx_h, sx_w, H, W, STRIDE)
        dz_row = dz_image + ho * sdz_h
        dz = tl.load(dz_row[None, :] + (wo * sdz_w)[:, None], mask=dz_ok, other=0.0).to(tl.float32)
        dw0, dw1, dw2 = dw0 + dz * u0, dw1 + dz * u1, dw2 + dz * u2
        dw3, dw4, dw5 = dw3 + dz * v0, dw4 + dz * v1, dw5 + dz * v2
        dw6, dw7, dw8 = dw6 + dz * x0, dw7 + dz * x1, dw8 + dz * x2
        if STRIDE == 1:
            u0, u1, u2 = v0, v1, v2
            v0, v1, v2 = x0, x1, x2
        else:
            u0, u1, u2 = x0, x1, x2
        d0, d1, d2 = _dz_cols(DZ + b * sdz_b + ho * sdz_h, sdz_w, offs_c * sdz_c, c_ok, wi, wi_ok, WO, STRIDE)
        dx_a, dx_b = _dx_rows_take(dx_a, dx_b, d0, d1, d2, wts, dx_strip, ho, sdx_h, dx_ok, wi_row,
                                   STRIDE, BLOCK_WI, BLOCK_C)
    _dx_rows_finish(dx_a, dx_strip, H, HO, sdx_h, dx_ok, wi_row, STRIDE)
    _dw_store(DW_PARTIAL, b, C, offs_c, c_ok, dw0, dw1, dw2, dw3, dw4, dw5, dw6, dw7, dw8)


def ring_rows(height: int, width: int, stride: int, block_p: int) -> int:
    """Rows of _bwd_dx's per-program dz ring (a power of two): enough that the dz rows a chunk of
    input positions reads are all still there, and that computing the next chunk's dz overwrites
    none of them. Two consecutive chunks span at most ``spanned`` input rows; their taps read
    from output row ceil((first - 1) / stride) up to (last + 1) // stride, and the dz computed
    for them runs up to block_p - 1 positions past the last whole output row. Never more rows
    than output positions (rounded up to a power of two): with that many no row is reused."""
    ho, wo = (height - 1) // stride + 1, (width - 1) // stride + 1
    if height <= 0 or width <= 0:
        return 1  # no positions: the kernel's loops do not run
    spanned = -(-(2 * block_p - 1) // width) + 1
    output_rows = (spanned + 1) // stride + 1
    return min(next_power_of_2(output_rows * wo + block_p), next_power_of_2(ho * wo))


# (BLOCK_P, BLOCK_C, num_warps) for every launch when set (benchmarks sweep it; tests try several).
FORCED_TILES: Optional[Tuple[int, int, int]] = None
# (BLOCK_C, num_warps) of the row backward when set (tests try several).
FORCED_ROW_BACKWARD_TILES: Optional[Tuple[int, int]] = None


def _blocks(x: torch.Tensor, channels: int):
    """(BLOCK_P, BLOCK_C, num_warps) of ``_bwd_dx``'s flattened chunks. channels_last reads
    channels contiguously, so its tiles are wide in C; NCHW reads rows contiguously, so its tiles
    are long in P. Eight tile elements a thread, since the nine tap loads are all kept in flight:
    as a launch specializes them (``tests/compile_for_gpu.py --ptxas``, triton 3.6, sm_90a, bf16)
    the flattened kernels fit in 196 registers (channels_last) or 243 (NCHW) without spills; at
    sixteen, 32x64 at 4 warps still does not spill (250), while 64x64 at 4 warps spills 400 bytes
    and 128x16 812. Which is faster is for a GPU to say (``bench_dwconv_bn_gelu.py --tiles``). The
    CPU interpreter runs programs one by one at a cost per chunk, whatever its size, so it gets the
    larger tiles."""
    if FORCED_TILES is not None:
        return FORCED_TILES
    block_c = min(64, max(16, next_power_of_2(channels)))
    on_cpu = x.device.type == "cpu"
    if is_channels_last(x):
        return 64 if on_cpu else 16, block_c, 4
    return 128 if on_cpu else 64, min(block_c, 16), 4


def _row_blocks(x: torch.Tensor, channels: int, width_out: int):
    """(BLOCK_W, BLOCK_C, num_warps) of the row-streaming kernels (``_stats``, ``_apply``,
    ``_bwd_reduce``, ``_bwd_dz``): strips BLOCK_W output columns wide, BLOCK_C channels deep,
    ROW_ELEMENTS_PER_THREAD (eight) elements a thread as in ``_blocks``. channels_last reads
    channels contiguously, so the channel block is the wide side, and each side is the power of two that pads the image least (CoAtNet-0's
    MBConv: 384 or 768 channels at 128 a block; 56 columns at 8 a strip, 28 at 4), since a
    padded column or channel costs as much as a real one. NCHW reads columns contiguously: a
    strip up to 64 wide. Forced tiles (``FORCED_TILES``) give their BLOCK_P as BLOCK_W. The CPU
    interpreter gets the largest tiles, as in ``_blocks``."""
    if FORCED_TILES is not None:
        return FORCED_TILES
    if x.device.type == "cpu":
        return min(64, next_power_of_2(width_out)), min(64, max(16, next_power_of_2(channels))), 4
    if is_channels_last(x):
        block_c = min((128, 64, 32, 16), key=lambda bc: (cdiv(channels, bc) * bc, -bc))
        block_w = min((w for w in (16, 8, 4, 2) if 256 <= w * block_c <= 1024),
                      key=lambda bw: (cdiv(width_out, bw) * bw, -bw))
    else:
        block_w = max(8, min(64, next_power_of_2(width_out)))
        block_c = min(max(16, next_power_of_2(channels)), 1024 // block_w)
    return block_w, block_c, max(1, block_w * block_c // (32 * ROW_ELEMENTS_PER_THREAD))


# Widest input row the row backwards (``_bwd_dx_dw``, ``_bwd_dx_rows``) take: they hold a whole
# row in a tile. Wider images (none in CoAtNet, whose widest depthwise input has 112 columns) take
# ``_bwd_dx``, which walks flattened chunks through a ring of dz rows. Tests set it to 0 to run
# ``_bwd_dx``.
ROW_BACKWARD_MAX_WIDTH = 256
# How the backward gets dz (the gradient at the conv output) to dx and d(weight), for rows up to
# ROW_BACKWARD_MAX_WIDTH:
# - "memory": ``_bwd_dz`` writes dz as a [B, C, HO, WO] tensor (x's dtype at bf16, else fp32)
#   and ``_bwd_dx_dw`` reads it: one more pass over memory, and no exchange between threads;
# - "scratch": ``_bwd_dx_rows`` recomputes dz a row at a time into a two-row scratch per
#   program and takes dx from it after a barrier, holding d(weight)'s sums beside the conv's.
# "memory" is the default: on an H200 (bench/results/dwconv_bn_gelu_h200.json) the scratch
# backward, one 8-warp program an SM (217 registers) waiting on a barrier every row, took about
# 4 ms of a CoAtNet S1 step's 4.8, where its bytes need 0.2.
DZ_PATH = "memory"
# Whether the row-streaming kernels (``_stats``, ``_apply``, ``_bwd_reduce``, ``_bwd_dz``) load
# each row's input taps (and dy) one row ahead (``_conv_row``). The H200 profile of 46adafa
# (bench/results/profile_ops_h200_46adafa.json) had them at one memory latency a row and at 1.2 to
# 1.7 TB/s; ``bench_dwconv_bn_gelu.py --variants noprefetch`` times them without it (under the
# register cap below, which that variant keeps; ``maxnreg0`` lifts the cap).
PREFETCH_ROWS = True
# Tile elements a thread of the row-streaming kernels holds (num_warps follows from the tile);
# and a register cap for them (ptxas's ``maxnreg``; None: the compiler's choice). Loading a row
# ahead holds it in registers: ptxas (triton 3.9, sm_90a, bf16 channels_last) takes _bwd_reduce
# from 168 registers to 185-210 and the stride-2 _stats and pooled _apply to 202-208, which at 4
# warps fits two programs an SM instead of three. The H200 sweep of ed0d4dc
# (bench/results/dwconv_bn_gelu_h200_ed0d4dc.json, training forward+backward, graph ms; taken
# before the cap was a default, so only its own column is capped), rows ahead without a cap /
# with a cap of 168 / 4 elements a thread / no rows ahead (all at stride 1, as CoAtNet runs every
# depthwise conv: a downsampling MBConv's expand conv takes the stride):
#   S1 56x56 C384      2.828 / 2.425 / 2.827 / 2.562
#   S2 28x28 C384      0.933 / 0.901 / 0.740 / 1.119
#   S2 28x28 C768      1.253 / 1.230 / 1.431 / 1.434
# so rows ahead is the default, under the cap at stride 1 (``_row_launch``: at stride 2, which no
# benchmark has timed, the cap makes ptxas spill); four elements a thread wins at S2 C384 only,
# where 384 programs of 2 warps fill half the GPU (see ROW_BANDS).
ROW_ELEMENTS_PER_THREAD = 8
ROW_MAXNREG: Optional[int] = 168
# How many row steps ahead the row-streaming kernels and ``_bwd_dx_dw`` ask L2 for the rows they
# will load (``prefetch_l2``; 0: never). Loading a row ahead into registers (PREFETCH_ROWS) hides
# one step's latency at the price of registers, and at three programs an SM the kernels still
# kept too few bytes in flight to stream at memory speed (S1: 1.2 to 1.7 TB/s of an H200's 4.8);
# an L2 prefetch holds no registers and turns the demand loads several steps later into L2
# hits. channels_last launches on a GPU only: the prefetch is PTX, and its tile steps along the
# contiguous channels (NCHW would want columns). Off: the H200 sweep of c68a2d4
# (bench/results/dwconv_bn_gelu_h200_c68a2d4.json, training forward+backward, graph ms), 0 / 2 /
# 4 / 8 rows ahead:
#   S1 56x56 C384      2.431 / 2.702 / 2.764 / 2.861
#   S2 28x28 C384      0.909 / 0.869 / 0.892 / 0.928
#   S2 28x28 C768      1.230 / 1.271 / 1.292 / 1.346
# the extra loads cost S1 more than the hits save, and the whole compiled model trained at
# 3,965 images/s with 4 rows ahead against 4,025 without (model_*_h200_c68a2d4.json).
# COATNET_FAST_L2_AHEAD_ROWS sets it for a process.


def _env_rows(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise ValueError(f"{name}={value!r}: expected a number of rows, 0 or more")
    return int(value)


L2_AHEAD_ROWS = _env_rows("COATNET_FAST_L2_AHEAD_ROWS", 0)


# Bands of output rows the row-streaming kernels split each image into, one program a band
# (grid axis 1), each starting from the input rows above its first (``_conv_rows_start``) and
# writing per-(image, band) partial sums: 1 keeps whole images; None (the default) lets
# ``_row_bands`` choose from the GPU's size. A program walks its rows one memory latency at a
# time, so the time of a launch is its longest program's rows times the waves it takes. At
# CoAtNet-0's 28x28 with 384 channels (S2's first block, whose expand conv takes the stride) 384
# programs of 2 warps fill about half an H200's slots; two bands fill them. The H200 sweep of
# c68a2d4 (dwconv_bn_gelu_h200_c68a2d4.json, graph ms, forward / training forward+backward):
#   S2 28x28 C384      1 band 0.231 / 0.893    2 bands 0.165 / 0.706    auto (2) 0.165 / 0.706
#   S2 28x28 C768      1 band 0.291 / 1.294    2 bands 0.323 / 1.370    auto (1) 0.290 / 1.292
#   S1 56x56 C384      1 band 0.586 / 2.753    2 bands 0.577 / 2.773    auto (1) 0.587 / 2.749
# (that sweep ran with 4 rows of L2 prefetch in every column, which moved 28x28 C384 by 2%).
# ``best_row_bands`` picks 3 for S1's first block (56x56, 256 channels), which no GPU has timed.
# Bands change the order of the per-channel sums, so results are deterministic for a given GPU
# (its SM count picks the bands), and bit-identical across GPUs with COATNET_FAST_ROW_BANDS=1.
# COATNET_FAST_ROW_BANDS sets it for a process (a count, or "auto").


def _env_bands(name: str) -> Optional[int]:
    value = os.environ.get(name, "").strip()
    if value == "auto" or not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name}={value!r}: expected a number of bands, 1 or more, or 'auto'")
    return int(value)


ROW_BANDS: Optional[int] = _env_bands("COATNET_FAST_ROW_BANDS")
# The fewest output rows a band gets from ``_row_bands``: a band reloads the input rows above it.
ROW_BAND_MIN_ROWS = 7
_SM_COUNTS: dict = {}


def _row_bands(x: torch.Tensor, programs: int, warps: int, height_out: int, launch: dict) -> Tuple[int, int]:
    """(rows a band, bands) of a row-streaming launch of ``programs`` programs a band:
    ``ROW_BANDS`` when set, else ``best_row_bands`` for this GPU (whole images elsewhere)."""
    if ROW_BANDS is not None:
        bands = max(1, min(ROW_BANDS, height_out, 65535))  # grid axis 1's limit
    elif x.device.type != "cuda":
        bands = 1
    else:
        sms = _SM_COUNTS.get(x.device)
        if sms is None:
            sms = _SM_COUNTS[x.device] = torch.cuda.get_device_properties(x.device).multi_processor_count
        bands = best_row_bands(programs, warps, height_out, launch.get("maxnreg") or 255, sms)
    rows = max(1, cdiv(height_out, bands))
    return rows, max(1, cdiv(height_out, rows))


def best_row_bands(programs: int, warps: int, height_out: int, registers: int, sms: int) -> int:
    """The band count that minimises waves / bands (each program takes about one row step at a
    time, and a band 1 / bands of an image's steps), the fewest on ties, with at least
    ROW_BAND_MIN_ROWS rows a band: a wave is the SMs times the programs that fit one by
    ``registers`` a thread and by warps (64 an SM on sm_80 and sm_90)."""
    per_sm = max(1, min(65536 // (registers * 32 * warps), 64 // warps))
    slots = sms * per_sm
    most = max(1, height_out // ROW_BAND_MIN_ROWS)
    return min(range(1, most + 1), key=lambda n: (cdiv(programs * n, slots) / n, n))


def _row_launch(warps: int, x: torch.Tensor, stride: int) -> dict:
    """The row-streaming kernels' launch options. The register cap goes to 16-bit channels_last
    launches at stride 1 only: under it ptxas spills at most 4 bytes there, but 40 to 152 at
    stride 2 (``_bwd_reduce``), and 200 to 580 in several fp32 and NCHW tiles
    (``tests/compile_for_gpu.py --ptxas``, triton 3.9), which ``test_kernels_compile`` forbids on
    the fast path. Timed at stride 1 only (CoAtNet's depthwise convs all run at stride 1): S1
    2.828 -> 2.425 ms, 28x28 C384 0.933 -> 0.901, 28x28 C768 1.253 -> 1.230."""
    capped = ROW_MAXNREG is not None and stride == 1 and x.element_size() == 2 and is_channels_last(x)
    return {"num_warps": warps, "maxnreg": ROW_MAXNREG} if capped else {"num_warps": warps}


def _l2_prefetch(x: torch.Tensor, block_c: int, columns: int, gpu: Optional[bool] = None) -> dict:
    """The L2 prefetch's constexprs for a launch over x with ``block_c`` channels a program and
    ``columns`` input columns a row step: off (L2_AHEAD 0) unless x is channels_last on a GPU
    (``gpu`` overrides the device test, for compiling without one); one address per 32 bytes of
    the channel block."""
    if gpu is None:
        gpu = x.device.type == "cuda" and _PTX_PREFETCH
    if not (L2_AHEAD_ROWS and gpu and is_channels_last(x)):
        return _NO_L2  # one specialization for every launch without it, and no work on the host
    step = max(1, min(block_c, 32 // x.element_size()))
    return {"L2_AHEAD": L2_AHEAD_ROWS, "L2_COLS": next_power_of_2(columns), "L2_CHANS": max(1, block_c // step),
            "L2_STEP": step}


# The prefetch is PTX: NVIDIA GPUs only, and never under the interpreter (which reads
# TRITON_INTERPRET when triton is imported, as this does).
_PTX_PREFETCH = torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1"
_NO_L2 = {"L2_AHEAD": 0, "L2_COLS": 1, "L2_CHANS": 1, "L2_STEP": 1}


def _dz_row_blocks(x: torch.Tensor, channels: int, width: int, width_out: int):
    """(BLOCK_WO, BLOCK_WI, BLOCK_C, num_warps) of ``_bwd_dx_dw``: whole rows as in
    ``_bwd_row_blocks``, the wider row tile 512 elements at four a thread (4 warps) where the
    channel block of at least 4 allows (rows of up to 128 columns; 256 take 1,024 elements at 8
    warps; few channels, smaller tiles at fewer warps), so that several programs share an SM
    (168 registers: three). ``FORCED_ROW_BACKWARD_TILES`` overrides the channel block and warps
    here too."""
    block_wo, block_wi = next_power_of_2(width_out), next_power_of_2(width)
    if FORCED_ROW_BACKWARD_TILES is not None:
        return (block_wo, block_wi) + tuple(FORCED_ROW_BACKWARD_TILES)
    widest = max(block_wo, block_wi)
    if x.device.type == "cpu":
        return block_wo, block_wi, min(64, max(4, next_power_of_2(channels))), 4
    block_c = min(max(4, next_power_of_2(channels)), max(4, 512 // widest))
    return block_wo, block_wi, block_c, max(1, widest * block_c // 128)


def _bwd_row_blocks(x: torch.Tensor, channels: int, width: int, width_out: int):
    """(BLOCK_WO, BLOCK_WI, BLOCK_C, num_warps) of ``_bwd_dx_rows``: whole rows (output and
    input, powers of two), and a channel block that makes the wider of its row tiles (dz's, or
    with stride 2 dx's) 1,024 elements, four a thread: it carries nine d(weight) sums and six
    rows of taps beside the conv's sums, so half ``_row_blocks``'s eight (ptxas, triton 3.6,
    sm_90a, bf16 channels_last at CoAtNet's rows: 217 registers at stride 1, 171 at stride 2;
    stride 2 with twice the channels, dz at four a thread, needs 255 and spills 32 bytes).
    ``FORCED_ROW_BACKWARD_TILES`` (BLOCK_C, num_warps) overrides the channel block and warps
    (``FORCED_TILES`` does not: its channel blocks are sized for strips, not whole rows)."""
    block_wo, block_wi = next_power_of_2(width_out), next_power_of_2(width)
    if FORCED_ROW_BACKWARD_TILES is not None:
        return (block_wo, block_wi) + tuple(FORCED_ROW_BACKWARD_TILES)
    if x.device.type == "cpu":
        return block_wo, block_wi, min(64, max(4, next_power_of_2(channels))), 4
    widest = max(block_wo, block_wi)
    block_c = min(max(4, next_power_of_2(channels)), max(4, 1024 // widest))
    return block_wo, block_wi, block_c, max(1, widest * block_c // 128)


def bwd_dx_warps(warps: int) -> int:
    """num_warps of _bwd_dx: twice the tiles' (forced ones included, so that a sweep compares
    like with like). It holds a tile's recomputed conv, dz and d(weight) sums and then the
    transposed conv for dx, and at the tiles' 4 warps ptxas settles on a register cap with
    spills (16 to 20 bytes at 16x64, channels_last, 2-byte dtypes, ptxas of triton 3.6 and 3.9);
    at 8 warps, four tile elements a thread, at most 8 bytes."""
    return 2 * warps


def _fit_offsets(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t``, or a dense copy of it, such that offsets within one image fit 32 bits (the kernels
    add them to a 64-bit image base)."""
    # The kernels' own dense outputs (y, dx) hold whole images too, whatever t's strides.
    if t.numel() < 2**31 and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        return t  # dense (the common case): two C++ calls instead of the loops below
    if math.prod(t.shape[1:]) >= 2**31:
        raise ValueError(f"{name}: one image of shape {tuple(t.shape[1:])} has 2**31 elements or more, "
                         "which the Triton kernels do not support")
    span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))
    if span < 2**31:
        return t
    channels_last = t.is_contiguous(memory_format=torch.channels_last) or t.stride(1) == 1
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _out_like(x: torch.Tensor, shape, dtype=None):
    channels_last = is_channels_last(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


def _taps(weight: torch.Tensor):
    """The [C, 1, 3, 3] weight as the kernels read it, (channel, row, column) strides: in the
    seed's layout, a stride-9 gather per tap, loaded once a program before its row loop. (A
    tap-major copy made each tap a vector load, but cost a copy, a launch, on every call.)"""
    return weight, (weight.stride(0), weight.stride(2), weight.stride(3))


def _geometry(x, stride):
    batch, channels, height, width = x.shape
    ho, wo = (height - 1) // stride + 1, (width - 1) // stride + 1
    return batch, channels, height, width, ho, wo


def batch_stats(x, weight, stride: int, running=None):
    """Channel mean and biased variance of conv(x, weight) over the batch (fp32, [C] each); with
    ``running``, (mean, rstd) and the running statistics updated (``merge_stats``)."""
    x = _fit_offsets("x", x)
    batch, channels, height, width, ho, wo = _geometry(x, stride)
    block_w, block_c, warps = _row_blocks(x, channels, wo)
    launch = _row_launch(warps, x, stride)
    programs = image_channel_grid(batch, channels, block_c)
    rows, bands = _row_bands(x, programs, warps, ho, launch)
    means, m2s = torch.empty((2, batch * bands, channels), dtype=torch.float32, device=x.device).unbind(0)
    taps, tap_strides = _taps(weight)
    _stats[(programs, bands)](
        x, taps, means, m2s, *x.stride(), *tap_strides,
        channels, height, width, ho, wo, rows,
        STRIDE=stride, BLOCK_W=block_w, BLOCK_C=block_c, PREFETCH=PREFETCH_ROWS,
        **_l2_prefetch(x, block_c, block_w * stride + 2), **launch,
    )
    return merge_stats(means.view(batch, bands, channels), m2s.view(batch, bands, channels), ho * wo, rows * wo,
                       running=running)


def apply(x, weight, mean, rstd, gamma, beta, stride: int, pool: bool):
    """gelu((conv(x, weight) - mean) * rstd * gamma + beta), and the per-image channel sums of the
    result when ``pool``. The per-channel scale and shift are the kernel's first lines, not
    torch ops on the host: each of those is a launch and Python a call."""
    batch, channels, height, width, ho, wo = _geometry(x, stride)
    # The output's layout follows the caller's x (as the custom op's fake kernel says), not a copy's.
    y = _out_like(x, (batch, channels, ho, wo))
    x = _fit_offsets("x", x)
    block_w, block_c, warps = _row_blocks(x, channels, wo)
    launch = _row_launch(warps, x, stride)
    programs = image_channel_grid(batch, channels, block_c)
    rows, bands = _row_bands(x, programs, warps, ho, launch)
    sums = torch.empty((batch, bands, channels) if pool else (0,), dtype=torch.float32, device=x.device)
    taps, tap_strides = _taps(weight)
    _apply[(programs, bands)](
        x, taps, mean, rstd, gamma, beta, y, sums,
        *x.stride(), *tap_strides, *y.stride(),
        channels, height, width, ho, wo, rows,
        STRIDE=stride, HAS_POOL=pool,
        BLOCK_W=block_w, BLOCK_C=block_c, PREFETCH=PREFETCH_ROWS,
        **_l2_prefetch(x, block_c, block_w * stride + 2), **launch,
    )
    if pool:  # per band: one more (small) launch only when the image was split
        sums = sums.sum(1) if bands > 1 else sums.view(batch, channels)
    return y, sums


def backward(dy, dpool, x, weight, gamma, beta, mean, rstd, stride: int, training: bool):
    """dx, d(weight), d(gamma), d(beta); ``dpool`` (or None) is the gradient of the pooled sums."""
    caller_x = x  # dx takes its layout, as the custom op's fake kernel says
    x = _fit_offsets("x", x)
    dy = _fit_offsets("dy", match_layout(dy, x))
    batch, channels, height, width, ho, wo = _geometry(x, stride)
    has_dpool = dpool is not None
    dpool = dpool.contiguous() if has_dpool else mean
    taps, tap_strides = _taps(weight)
    common = (*x.stride(), *tap_strides, *dy.stride())
    block_w, block_c, warps = _row_blocks(x, channels, wo)
    launch = _row_launch(warps, x, stride)
    programs = image_channel_grid(batch, channels, block_c)
    rows, bands = _row_bands(x, programs, warps, ho, launch)
    sum_du, sum_du_xhat = torch.empty((2, batch * bands, channels), dtype=torch.float32, device=x.device).unbind(0)
    _bwd_reduce[(programs, bands)](
        x, taps, dy, dpool, mean, rstd, gamma, beta, sum_du, sum_du_xhat, *common,
        channels, height, width, ho, wo, rows, 1.0,
        STRIDE=stride, HAS_DPOOL=has_dpool, BLOCK_W=block_w, BLOCK_C=block_c, PREFETCH=PREFETCH_ROWS,
        **_l2_prefetch(x, block_c, block_w * stride + 2), **launch,
    )
    dbeta, dgamma = sum_du.sum(0), sum_du_xhat.sum(0)  # not views of one tensor: the custom op returns them
    dw_partial = torch.empty((batch, channels, 9), dtype=torch.float32, device=x.device)
    dx = _out_like(caller_x, x.shape)
    inv_count = 1.0 / max(1, batch * ho * wo)  # eval allows an empty batch
    if width <= ROW_BACKWARD_MAX_WIDTH and DZ_PATH == "memory":
        # dz through memory: bf16 keeps fp32's range (fp16's would not hold a scaled loss's
        # gradients), and cuDNN's BatchNorm backward rounds the conv's incoming gradient so too.
        dz = _out_like(caller_x, (batch, channels, ho, wo), x.dtype if x.dtype == torch.bfloat16 else torch.float32)
        _bwd_dz[(programs, bands)](
            x, taps, dy, dpool, mean, rstd, gamma, beta, dbeta, dgamma, dz, *common, *dz.stride(),
            channels, height, width, ho, wo, rows, 1.0, inv_count,
            STRIDE=stride, HAS_DPOOL=has_dpool, TRAINING=training, BLOCK_W=block_w, BLOCK_C=block_c,
            PREFETCH=PREFETCH_ROWS, **_l2_prefetch(x, block_c, block_w * stride + 2), **launch,
        )
        block_wo, block_wi, block_c, warps = _dz_row_blocks(x, channels, width, wo)
        _bwd_dx_dw[(image_channel_grid(batch, channels, block_c),)](
            x, taps, dz, dx, dw_partial, *x.stride(), *tap_strides, *dz.stride(), *dx.stride(),
            channels, height, width, ho, wo,
            STRIDE=stride, BLOCK_WO=block_wo, BLOCK_WI=block_wi, BLOCK_C=block_c,
            **_l2_prefetch(x, block_c, width), num_warps=warps,
        )
    elif width <= ROW_BACKWARD_MAX_WIDTH:
        # dz never makes a round trip through memory as a [B, C, HO, WO] tensor: it lives in
        # each program's two-row scratch (or, wider images below, ring of rows).
        block_wo, block_wi, block_c, warps = _bwd_row_blocks(x, channels, width, wo)
        grid = (image_channel_grid(batch, channels, block_c),)
        scratch = torch.empty((grid[0], 2, block_wo, block_c), dtype=torch.float32, device=x.device)
        _bwd_dx_rows[grid](
            x, taps, dy, dpool, mean, rstd, gamma, beta, dbeta, dgamma, dx, dw_partial, scratch, *common,
            *dx.stride(), channels, height, width, ho, wo, 1.0, inv_count,
            STRIDE=stride, HAS_DPOOL=has_dpool, TRAINING=training, BLOCK_WO=block_wo, BLOCK_WI=block_wi,
            BLOCK_C=block_c, num_warps=warps,
        )
    else:
        block_p, block_c, warps = _blocks(x, channels)
        grid = (image_channel_grid(batch, channels, block_c),)
        rows = ring_rows(height, width, stride, block_p)
        if rows * block_c >= 2**31:  # offsets within a program's ring are 32-bit
            raise ValueError(f"x: images of shape {tuple(x.shape[2:])} need a backward ring of {rows} rows of "
                             f"{block_c} channels, past the 2**31 elements the Triton kernel addresses")
        ring = torch.empty((grid[0], rows, block_c), dtype=torch.float32, device=x.device)
        _bwd_dx[grid](
            x, taps, dy, dpool, mean, rstd, gamma, beta, dbeta, dgamma, dx, dw_partial, ring, *common, *dx.stride(),
            channels, height, width, ho, wo, 1.0, inv_count, rows - 1,
            STRIDE=stride, HAS_DPOOL=has_dpool, TRAINING=training, BLOCK_P=block_p, BLOCK_C=block_c,
            num_warps=bwd_dx_warps(warps),
        )
    dweight = dw_partial.sum(0).view(channels, 1, 3, 3)
    return dx, dweight, dgamma, dbeta
