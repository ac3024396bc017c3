"""Triton kernels for pre-softmax relative-bias attention, and their launch wrappers.

Forward, per (batch, head) and query tile: s = q k^T * scale + table[offset(i, j), head], with
the offset computed from the query and key positions and the window (no [N, N] index is read,
no [heads, N, N] bias is built); online softmax in fp32 over key tiles; o = p v; the row
log-sum-exp is written for the backward.

Backward, recomputing the probabilities from the saved log-sum-exp (nothing of size
[B, heads, N, N] is stored). Windows of up to SMALL_N_MAX positions (7x7, 8x8: the model's
common case) fit one tile, so one kernel does everything:
- ``_bwd_small``: per (head, batch group), the whole window in one tile; for each of the group's
  batch items it recomputes p once and writes dq, dk, dv (q's dtype) and delta = rowsum(o * do)
  on the fly; d(bias) is summed over the group in registers into [groups, heads, N, N] partials.
  One launch, half the recompute of the two kernels below and no dq scratch.
Larger windows take several tiles along each axis:
- ``_bwd_delta``: delta = rowsum(o * do) in fp32, one read of o and do.
- ``_bwd_dkdv``: per (batch, head) and key tile, loop over query tiles -> dk, dv.
- ``_bwd_dq_dbias``: per (head, query tile, batch group), loop over key tiles and the group's
  batch items -> dq and d(bias) summed over the group, into [groups, heads, N, N] partials.
  dq sums over key tiles in an fp32 scratch; the last key tile writes it in q's dtype (no
  scratch at all with one key tile). The number of groups depends on the machine, not on the
  batch, so memory does not grow with the batch.
Both paths end with:
- ``_bias_to_table``: each table row sums the partials of every (group, i, j) with its offset.
Every output element is written by exactly one program in a fixed order (no atomics), so with
fixed tiles gradients are bit-identical from run to run; deterministic mode pins the tiles.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._common import cdiv, next_power_of_2


@triton.jit
def _bias_rows(T, st_r, st_h, h, offs_m, N: tl.constexpr, H: tl.constexpr, W: tl.constexpr):
    """Per query row i, a pointer into the table such that ``_bias_at`` finds (i, j)'s entry at
    ``- _bias_cols(j)`` from it. The table row of (i, j) is
        (yi - yj + H - 1) * (2W - 1) + (xi - xj + W - 1) = a(i) - c(j),
    a(i) = (yi + H - 1) * (2W - 1) + xi + W - 1 and c(j) = yj * (2W - 1) + xj = j + yj * (W - 1),
    so a tile costs one subtraction an element instead of two divisions and five products
    (ptxas: the forward's loop was mostly this index arithmetic). Padded rows take row N - 1's
    entries: in bounds, so the gather needs no mask, and never stored."""
    i = tl.minimum(offs_m, N - 1)
    a = i + (i // W) * (W - 1) + ((H - 1) * (2 * W - 1) + W - 1)  # = a(i), one division as c(j)
    return (T + h * st_h) + a * st_r


@triton.jit
def _bias_cols(st_r, offs_n, N: tl.constexpr, W: tl.constexpr):
    """c(j) * st_r per key column (see ``_bias_rows``); padded columns take column N - 1's, so the
    gather stays in bounds (callers mask those scores)."""
    j = tl.minimum(offs_n, N - 1)
    return (j + (j // W) * (W - 1)) * st_r


@triton.jit
def _bias_at(rows_ptr, cols, KEY_MAJOR: tl.constexpr = False):
    """table[offset(i, j), h] in fp32 for a tile, from ``_bias_rows`` and ``_bias_cols``.
    KEY_MAJOR gathers it as [keys, queries] and transposes: Triton then gives each thread of the
    load one key column and many query rows instead of the reverse, so the key index work runs
    once a thread, not once an element (SASS, this change alone: the forward's loop 821 -> 465
    instructions at 64x64, 4 warps). It pays where the keys change inside a loop, the forward
    over several key tiles; where they are fixed (dk/dv) or one tile is all there is (a 7x7
    window's forward: 944 -> 3200 instructions; the single-tile backward), the transpose costs
    more than it saves."""
    if KEY_MAJOR:
        out = tl.trans(tl.load(rows_ptr[None, :] - cols[:, None]))
    else:
        out = tl.load(rows_ptr[:, None] - cols[None, :])
    return out.to(tl.float32)


@triton.jit
def _load_rows(PTR, b, h, rows, ok, offs_d, s_b, s_h, s_n, s_d):
    """A [rows, D] tile of a strided [B, heads, N, D] tensor (rows int64: row * s_n may pass 2**31)."""
    # d offsets in int64 too: a d-outermost view can have (D - 1) * s_d past 2**31.
    return tl.load(PTR + b * s_b + h * s_h + rows[:, None] * s_n + offs_d.to(tl.int64)[None, :] * s_d,
                   mask=ok[:, None], other=0.0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE keeps fp32 inputs out of TF32 (fp32 parity)."""
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


# exp(x) is computed as exp2(x * log2 e): tl.math.exp2 compiles to ex2.approx.ftz on NVIDIA GPUs,
# while tl.exp compiled to the non-ftz ex2, which ptxas wraps in a denormal range fix (a compare
# and two predicated multiplies an element, about a tenth of the loops' instructions). Results
# under 2**-126 become 0, next to a row maximum of 1. The log2 e factor goes into an explicit
# FMA with the row term, so it costs no instruction whether or not Triton fuses floating point.
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _fwd(
    Q, K, V, T, O, LSE,
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_n, so_d,
    st_r, st_h,
    n_heads, N: tl.constexpr, H: tl.constexpr, W: tl.constexpr, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)  # int64: B * heads * N * d may pass 2**31
    pid_m = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < N
    rows = offs_m.to(tl.int64)  # row * stride may pass 2**31 (e.g. sequence-first layouts)

    q = _load_rows(Q, b, h, rows, row_ok, offs_d, sq_b, sq_h, sq_n, sq_d)
    bias_rows = _bias_rows(T, st_r, st_h, h, offs_m, N, H, W)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        cols = offs_n.to(tl.int64)
        k = _load_rows(K, b, h, cols, col_ok, offs_d, sk_b, sk_h, sk_n, sk_d)
        v = _load_rows(V, b, h, cols, col_ok, offs_d, sv_b, sv_h, sv_n, sv_d)
        s = _dot(q, tl.trans(k), IEEE)
        s = s * scale + _bias_at(bias_rows, _bias_cols(st_r, offs_n, N, W), KEY_MAJOR=N > BLOCK_N)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A tile of -inf scores (a table entry of -inf masks a pair) must not give inf - inf.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        # exp(s - m) as 2**(s log2e - m log2e): one FMA an element before the ex2 (see LOG2E).
        p = tl.math.exp2(tl.fma(s, LOG2E, -(m_use * LOG2E)[:, None]))
        alpha = tl.math.exp2((m_i - m_use) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = _dot(p.to(v.dtype), v, IEEE)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * so_b + h * so_h + rows[:, None] * so_n + offs_d[None, :] * so_d,
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh * N + offs_m, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _bwd_dkdv(
    Q, K, V, T, DO, LSE, DELTA, DK, DV,
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_n, sdo_d,
    st_r, st_h,
    n_heads, N: tl.constexpr, H: tl.constexpr, W: tl.constexpr, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < N
    cols = offs_n.to(tl.int64)
    k = _load_rows(K, b, h, cols, col_ok, offs_d, sk_b, sk_h, sk_n, sk_d)
    v = _load_rows(V, b, h, cols, col_ok, offs_d, sv_b, sv_h, sv_n, sv_d)
    bias_cols = _bias_cols(st_r, offs_n, N, W)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        rows = offs_m.to(tl.int64)
        q = _load_rows(Q, b, h, rows, row_ok, offs_d, sq_b, sq_h, sq_n, sq_d)
        do = _load_rows(DO, b, h, rows, row_ok, offs_d, sdo_b, sdo_h, sdo_n, sdo_d)
        lse = tl.load(LSE + pid_bh * N + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + pid_bh * N + offs_m, mask=row_ok, other=0.0)
        s = _dot(q, tl.trans(k), IEEE)
        s = s * scale + _bias_at(_bias_rows(T, st_r, st_h, h, offs_m, N, H, W), bias_cols)
        p = tl.math.exp2(tl.fma(s, LOG2E, -(lse * LOG2E)[:, None]))
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    out = pid_bh * N * D + offs_n[:, None] * D + offs_d[None, :]  # DK, DV: contiguous [B, heads, N, D]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_dbias(
    Q, K, V, T, DO, LSE, DELTA, DQ, DQ_ACC, DBIAS,
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_n, sdo_d,
    st_r, st_h,
    batch, n_heads, n_groups, N: tl.constexpr, H: tl.constexpr, W: tl.constexpr, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
):
    pid_hg = tl.program_id(0)
    pid_m = tl.program_id(1)
    h = (pid_hg // n_groups).to(tl.int64)
    g = pid_hg % n_groups
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < N
    rows = offs_m.to(tl.int64)
    bias_rows = _bias_rows(T, st_r, st_h, h, offs_m, N, H, W)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        cols = offs_n.to(tl.int64)
        bias = _bias_at(bias_rows, _bias_cols(st_r, offs_n, N, W))
        dbias = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for b32 in range(g, batch, n_groups):
            b = h * 0 + b32  # int64 (h is), in the interpreter too
            bh = b * n_heads + h
            q = _load_rows(Q, b, h, rows, row_ok, offs_d, sq_b, sq_h, sq_n, sq_d)
            do = _load_rows(DO, b, h, rows, row_ok, offs_d, sdo_b, sdo_h, sdo_n, sdo_d)
            lse = tl.load(LSE + bh * N + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh * N + offs_m, mask=row_ok, other=0.0)
            k = _load_rows(K, b, h, cols, col_ok, offs_d, sk_b, sk_h, sk_n, sk_d)
            v = _load_rows(V, b, h, cols, col_ok, offs_d, sv_b, sv_h, sv_n, sv_d)
            s = _dot(q, tl.trans(k), IEEE)
            dp = _dot(do, tl.trans(v), IEEE)
            p = tl.math.exp2(tl.fma(s * scale + bias, LOG2E, -(lse * LOG2E)[:, None]))
            p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
            ds = p * (dp - delta[:, None])
            dbias += ds
            dq = _dot(ds.to(k.dtype), k, IEEE) * scale
            # DQ_ACC is an fp32 [B, heads, N, D] running sum owned row-wise by this program: the
            # first key tile stores, later ones add, so nothing needs zeroing beforehand; the last
            # key tile writes DQ (q's dtype) instead, so a single key tile never touches DQ_ACC.
            out = bh * N * D + rows[:, None] * D + offs_d[None, :]
            if start_n > 0:
                # Read back what this program stored for the previous key tile: the store and the
                # load may map elements to different threads, so order them with a barrier.
                tl.debug_barrier()
                dq += tl.load(DQ_ACC + out, mask=row_ok[:, None], other=0.0)
            if start_n + BLOCK_N < N:
                tl.store(DQ_ACC + out, dq, mask=row_ok[:, None])
            else:
                tl.store(DQ + out, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
        out = ((g * n_heads + h) * N + offs_m[:, None]) * N + offs_n[None, :]
        tl.store(DBIAS + out, dbias, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _bwd_delta(
    O, DO, DELTA,
    so_b, so_h, so_n, so_d,
    sdo_b, sdo_h, sdo_n, sdo_d,
    n_heads, N,
    BLOCK_M: tl.constexpr, D: tl.constexpr,
):
    """DELTA[b, h, i] = sum_d o * do in fp32 (the softmax backward's row term)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_d = tl.arange(0, D)
    row_ok = offs_m < N
    rows = offs_m.to(tl.int64)
    o = _load_rows(O, b, h, rows, row_ok, offs_d, so_b, so_h, so_n, so_d).to(tl.float32)
    do = _load_rows(DO, b, h, rows, row_ok, offs_d, sdo_b, sdo_h, sdo_n, sdo_d).to(tl.float32)
    tl.store(DELTA + pid_bh * N + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _bwd_small(
    Q, K, V, T, O, DO, LSE, DQ, DK, DV, DBIAS,
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_n, so_d,
    sdo_b, sdo_h, sdo_n, sdo_d,
    st_r, st_h,
    batch, n_heads, n_groups, N: tl.constexpr, H: tl.constexpr, W: tl.constexpr, scale,
    BLOCK: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
):
    """Whole-window backward (N <= BLOCK): dq, dk, dv of the group's batch items, d(bias) partials."""
    pid_hg = tl.program_id(0)
    h = (pid_hg // n_groups).to(tl.int64)
    g = pid_hg % n_groups
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    ok = offs < N
    rows = offs.to(tl.int64)
    pair_ok = ok[:, None] & ok[None, :]
    # The same for every batch item: gathered once, and d(bias) summed in registers. Padded
    # pairs get -inf, so p = 0 there without a mask in the loop (padded rows load lse = 0).
    bias = tl.where(pair_ok, _bias_at(_bias_rows(T, st_r, st_h, h, offs, N, H, W), _bias_cols(st_r, offs, N, W)),
                    float("-inf")) * LOG2E
    dbias = tl.zeros([BLOCK, BLOCK], tl.float32)
    for b32 in range(g, batch, n_groups):
        b = h * 0 + b32  # int64 (h is), in the interpreter too
        bh = b * n_heads + h
        q = _load_rows(Q, b, h, rows, ok, offs_d, sq_b, sq_h, sq_n, sq_d)
        k = _load_rows(K, b, h, rows, ok, offs_d, sk_b, sk_h, sk_n, sk_d)
        lse = tl.load(LSE + bh * N + offs, mask=ok, other=0.0)
        s = _dot(q, tl.trans(k), IEEE)
        # As in _bwd_dkdv: a -inf table entry gives p = 0 (a row masked whole has lse = -inf and
        # NaN gradients, as its output is NaN).
        p = tl.math.exp2(tl.fma(s, scale * LOG2E, bias - (lse * LOG2E)[:, None]))
        do = _load_rows(DO, b, h, rows, ok, offs_d, sdo_b, sdo_h, sdo_n, sdo_d)
        o = _load_rows(O, b, h, rows, ok, offs_d, so_b, so_h, so_n, so_d)
        # delta here rather than in _bwd_delta: do is loaded anyway, and it saves a launch.
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        # Each gradient is stored as soon as it is formed: three [BLOCK, D] fp32 results are
        # never live together (registers are the limit at BLOCK = 64).
        out = bh * N * D + rows[:, None] * D + offs_d[None, :]  # DQ, DK, DV: contiguous [B, heads, N, D]
        dv = _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=ok[:, None])
        v = _load_rows(V, b, h, rows, ok, offs_d, sv_b, sv_h, sv_n, sv_d)
        ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
        dbias += ds
        dq = _dot(ds.to(k.dtype), k, IEEE) * scale
        tl.store(DQ + out, dq.to(DQ.dtype.element_ty), mask=ok[:, None])
        dk = _dot(tl.trans(ds.to(q.dtype)), q, IEEE) * scale
        tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=ok[:, None])
    out = ((g * n_heads + h) * N + rows[:, None]) * N + offs[None, :]
    tl.store(DBIAS + out, dbias, mask=pair_ok)


@triton.jit
def _bias_to_table(
    DBIAS, DT, st_r, st_h,
    n_heads, n_groups, N, H, W, R,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """DT[r, h] = sum over groups g and queries i of DBIAS[g, h, i, j(i, r)] (j valid)."""
    h = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    dy = offs_r // (2 * W - 1) - (H - 1)
    dx = offs_r % (2 * W - 1) - (W - 1)
    acc = tl.zeros([BLOCK_R], tl.float32)
    for g in range(0, n_groups):
        for start_i in range(0, N, BLOCK_I):
            offs_i = start_i + tl.arange(0, BLOCK_I)
            yj = (offs_i // W)[None, :] - dy[:, None]
            xj = (offs_i % W)[None, :] - dx[:, None]
            ok = (offs_r[:, None] < R) & (offs_i[None, :] < N) & (yj >= 0) & (yj < H) & (xj >= 0) & (xj < W)
            j = yj * W + xj
            vals = tl.load(DBIAS + ((g * n_heads + h) * N + offs_i[None, :]) * N + j, mask=ok, other=0.0)
            acc += tl.sum(vals, 1)
    tl.store(DT + offs_r * st_r + h * st_h, acc.to(DT.dtype.element_ty), mask=offs_r < R)


def _config(block_m, block_n, num_warps, num_stages=2):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# Short lists, pruned per window size (tiles past the padded window only waste work).
# 32-column tiles pad less (N = 196: 224 columns, not 256), which counts where the loop's
# instructions, not bytes, set the time. None of these spills (ptxas, Triton 3.6, bf16, d = 32);
# 64x128 at 4 warps and 128x128 at 8 did (80 and 56 bytes) once the bias came in key-major.
FWD_CONFIGS = [_config(*c) for c in [(16, 64, 2), (32, 32, 4), (32, 64, 4), (32, 128, 4), (64, 32, 4), (64, 64, 4),
                                     (64, 128, 8), (128, 64, 8)]]
DKDV_CONFIGS = [_config(*c) for c in [(16, 32, 2), (32, 32, 4), (32, 64, 4), (64, 32, 4), (64, 64, 4),
                                      (64, 128, 8), (128, 64, 8)]]
# _bwd_dq_dbias keeps the bias tile and its d(bias) sum live across its batch loop, beside the
# score tiles. None of these spills at d = 32 as a launch specializes them (tests/
# compile_for_gpu.py --ptxas, triton 3.6, sm_90a, bf16: at most 249 registers, 16 x 256 at 4
# warps; (32, 64, 8) left the list when it came to 24 bytes of spill). The 16 x 128 and
# 16 x 256 tiles take every key of a window of up to 128 or 256 positions in one tile (14x14
# and 12x12 windows), so dq sums in registers instead of through the fp32 DQ_ACC scratch (up to
# 2 * (key tiles - 1) passes over a [B, heads, N, d] fp32 tensor), and the loop over the batch
# costs 0.65 warp instructions a score at 16 x 256 x 8 warps against 2.8 at 32 x 32 (SASS,
# N = 196). 16 x 256 x 4 spills at d = 64 (and 16 bytes at d = 32 with Triton 3.9).
DQ_DBIAS_CONFIGS = [_config(*c) for c in [(16, 32, 4), (16, 64, 4), (32, 32, 4), (32, 32, 8), (64, 32, 8),
                                          (16, 128, 4), (16, 128, 8), (16, 256, 4), (16, 256, 8)]]


def _prune(configs, named_args, **_kwargs):
    cap = max(16, next_power_of_2(named_args["N"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap and c.kwargs["BLOCK_N"] <= cap]
    return kept or configs[:1]


def _tuned(kernel, configs):
    # Keyed on the window size and head dim (tensor dtypes are part of Triton's key too).
    # Every kernel writes each output element once (no accumulation into its inputs), so
    # re-running it during tuning is harmless.
    return triton.autotune(configs, key=["N", "D"], prune_configs_by={"early_config_prune": _prune})(kernel)


_fwd_tuned = _tuned(_fwd, FWD_CONFIGS)
_bwd_dkdv_tuned = _tuned(_bwd_dkdv, DKDV_CONFIGS)
_bwd_dq_dbias_tuned = _tuned(_bwd_dq_dbias, DQ_DBIAS_CONFIGS)


def autotuning(t: torch.Tensor) -> bool:
    """Autotune on GPUs unless COATNET_FAST_AUTOTUNE=0 (the test suite's setting: many shapes)
    or deterministic algorithms are requested: the tiles a timing race picks set the summation
    order, so fixed tiles are what makes gradients repeat bit for bit across processes."""
    return (t.device.type == "cuda" and os.environ.get("COATNET_FAST_AUTOTUNE", "1") != "0"
            and not torch.are_deterministic_algorithms_enabled())


# (BLOCK_M, BLOCK_N, num_warps) on GPUs without autotuning, where a kernel differs from 32x64 at 4 warps.
GPU_FIXED_TILES = {_bwd_dq_dbias: (32, 32, 8)}
# Windows of up to this many positions get one key tile spanning them in _bwd_dq_dbias on GPUs
# without autotuning (16 query rows, 8 warps; see DQ_DBIAS_CONFIGS and _fixed).
DQ_DBIAS_ONE_KEY_TILE_MAX = 256


def _fixed(kernel, n: int, d: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Tiles when not autotuning. The CPU interpreter runs programs one by one, so it gets few,
    large tiles; GPUs get light tiles that keep several programs resident per SM. The d(bias)
    kernel takes one key tile for windows of up to DQ_DBIAS_ONE_KEY_TILE_MAX positions in 2-byte
    dtypes at 32 <= d <= 64, where it neither spills nor needs more than 78 KB of shared memory
    (fp32 at d = 64 needs 152 KB, more than GPUs below the A100/H100 class give a program, and
    d = 16 or 128 spill); 32x32 tiles otherwise (see DQ_DBIAS_CONFIGS)."""
    cap = max(16, next_power_of_2(n))
    if device.type == "cpu":
        return dict(BLOCK_M=min(64, cap), BLOCK_N=min(128 if d <= 64 else 64, cap), num_warps=4)
    if dtype == torch.float32 and (d >= 64 and kernel is _fwd or d >= 32 and kernel is _bwd_dkdv):
        # fp32 dots run on FMAs with their operands in registers: at 32x64 these spilled 48
        # bytes (dk/dv, d = 32) to kilobytes, and dk/dv at d = 128 needed 112 KB of shared
        # memory; 32x32 at 8 warps spills nothing but dk/dv at d = 128 (956 bytes, 72 KB).
        return dict(BLOCK_M=min(32, cap), BLOCK_N=min(32, cap), num_warps=8, num_stages=2)
    if (kernel is _bwd_dq_dbias and cap <= DQ_DBIAS_ONE_KEY_TILE_MAX and 32 <= d <= 64
            and dtype in (torch.float16, torch.bfloat16)):
        return dict(BLOCK_M=16, BLOCK_N=cap, num_warps=8, num_stages=2)
    block_m, block_n, warps = GPU_FIXED_TILES.get(kernel, (32, 64, 4))
    return dict(BLOCK_M=min(block_m, cap), BLOCK_N=min(block_n, cap), num_warps=warps, num_stages=2)


# Tiles pinned per kernel (tests run every config of the tuning lists through this).
FORCED_TILES: dict = {}


def _pinned(kernel, n: int, d: int, t: torch.Tensor):
    """The tiles ``kernel`` runs with: forced, fixed, or None where the autotuner picks them."""
    forced = FORCED_TILES.get(kernel)
    if forced is None and autotuning(t):
        return None
    return _fixed(kernel, n, d, t.device, t.dtype) if forced is None else forced


# The autotuner's pick per kernel and key, once it has made it: later calls launch the kernel
# with it directly. Triton's Autotuner.run rebuilds its key from every argument on each call
# (~45 us of host time a launch on an H200 machine's host, bench_host_overhead.py).
TUNED_CONFIGS: dict = {}


def _launch(kernel, tuned, grid, args, constexprs: dict, n: int, d: int, t: torch.Tensor):
    """Run ``kernel`` with autotuned tiles on a GPU, fixed ones otherwise; ``grid(BLOCK_M,
    BLOCK_N)`` gives the launch grid for the chosen tiles."""
    cfg = _pinned(kernel, n, d, t)
    if cfg is None:
        # The autotuner's own key: N, D and every tensor argument's dtype (plus the device here).
        key = (kernel, n, d, t.device, tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        cfg = TUNED_CONFIGS.get(key)
        if cfg is None:
            tuned[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **constexprs)
            best = getattr(tuned, "best_config", None)
            if best is not None:
                TUNED_CONFIGS[key] = best.all_kwargs()
            return
    kernel[grid(cfg["BLOCK_M"], cfg["BLOCK_N"])](*args, **constexprs, **cfg)


def _strides(t: torch.Tensor):
    return tuple(t.stride())


def output_rows(batch: int, heads: int, n: int, d: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An empty [B, heads, N, d] tensor over [B, N, heads, d] storage (also the fake kernel's)."""
    return torch.empty((batch, n, heads, d), dtype=dtype, device=device).transpose(1, 2)


def rel_bias_attention_fwd(q, k, v, table, height: int, width: int, scale: float):
    """o [B, heads, N, d] (q's dtype) and lse [B, heads, N] fp32. o is stored [B, N, heads, d]:
    the module's next step merges the heads into rows ([B, N, heads * d]) as a view, not a copy."""
    batch, heads, n, d = q.shape
    o = output_rows(batch, heads, n, d, q.dtype, q.device)
    lse = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
    args = (q, k, v, table, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(table),
            heads, n, height, width, scale)
    _launch(_fwd, _fwd_tuned, lambda bm, bn: (batch * heads, cdiv(n, bm)), args,
            dict(D=d, IEEE=q.dtype == torch.float32), n, d, q)
    return o, lse


# Windows of up to this many positions take the single-tile backward ``_bwd_small`` (tests set
# it to 0 to send small windows through the general path too).
SMALL_N_MAX = 64

# Programs of _bwd_small per SM, counting heads * groups. A program holds a whole window, its
# bias and its d(bias) sum in registers (~250 per thread at BLOCK 64, see _small_config), so an
# SM holds about two at once: 4 per SM is two rounds, enough to even out the tail, while each
# program still spreads its bias gather and its d(bias) partial over several batch items.
SMALL_PROGRAMS_PER_SM = 4

# The launch options _small_config picks from (tests run each).
SMALL_CONFIGS = [dict(num_warps=4, num_stages=2), dict(num_warps=4, num_stages=1), dict(num_warps=8, num_stages=1),
                 dict(num_warps=8, num_stages=2)]


def _small_config(block: int, d: int, ieee: bool) -> dict:
    """num_warps / num_stages of _bwd_small (FORCED_TILES[_bwd_small] overrides them), from
    ptxas (Triton 3.6, sm_90a, a unit d-stride, spill stores a thread). bf16/fp16 at BLOCK 64:
    d = 32 fits 4 warps with the next batch item prefetched (248 registers, no spill, 40 KB of
    shared memory; two programs an SM); d = 64 needs 8 warps (none, 72 KB; 4 warps spill 56-164
    bytes); d = 128 spills at any option: 8 warps without prefetch (208 bytes, 64 KB), since
    prefetching (60 bytes) takes 144 KB of shared memory, more than GPUs below the A100/H100
    class give a program. Smaller windows prefetch at 4 warps. fp32 dots run on FMAs with every
    operand in registers: 8 warps without prefetch, the least spill (216 bytes at d = 32, none
    before the bias gather took its current form, which saved the bf16 kernel its 32 bytes; 4
    warps spill kilobytes); fp32 training goes through autocast's bf16 on GPUs anyway."""
    if ieee:
        return dict(SMALL_CONFIGS[2])
    if block <= 32 or d <= 32:
        return dict(SMALL_CONFIGS[0])
    return dict(SMALL_CONFIGS[3] if d <= 64 else SMALL_CONFIGS[2])


def _small_groups(batch: int, heads: int, device: torch.device) -> int:
    """Batch groups for _bwd_small: about SMALL_PROGRAMS_PER_SM programs per SM, never more than
    the batch, and no more groups than the longest program's share of the batch needs (128 items
    in 88 groups take as long as in 64, with more partials to reduce)."""
    if device.type != "cuda":
        return min(batch, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    target = max(1, min(batch, math.ceil(SMALL_PROGRAMS_PER_SM * sms / heads)))
    return math.ceil(batch / max(1, math.ceil(batch / target)))  # 0 for an empty batch: no partials


def _batch_groups(batch: int, heads: int, n: int, device: torch.device) -> int:
    """Batch groups for the dq/d(bias) kernel: enough programs to keep every SM busy (counted
    at 32-row query tiles), never more than the batch. It depends on the machine and the
    window, not on the batch size, so the [groups, heads, N, N] partials stay bounded."""
    if device.type != "cuda":
        return min(batch, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(batch, max(1, math.ceil(8 * sms / (heads * cdiv(n, 32)))))  # 0 for an empty batch


def _bwd_small_path(do, q, k, v, table, o, lse, dq, dk, dv, height, width, scale):
    batch, heads, n, d = q.shape
    block = max(16, next_power_of_2(n))
    groups = _small_groups(batch, heads, q.device)
    dbias = torch.empty((groups, heads, n, n), dtype=torch.float32, device=q.device)
    cfg = FORCED_TILES.get(_bwd_small) or _small_config(block, d, q.dtype == torch.float32)
    _bwd_small[(heads * groups,)](
        q, k, v, table, o, do, lse, dq, dk, dv, dbias,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do), *_strides(table),
        batch, heads, groups, n, height, width, scale,
        BLOCK=block, D=d, IEEE=q.dtype == torch.float32, **cfg,
    )
    return dbias


def _bwd_general_path(do, q, k, v, table, o, lse, dq, dk, dv, height, width, scale):
    batch, heads, n, d = q.shape
    constexprs = dict(D=d, IEEE=q.dtype == torch.float32)
    delta = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
    block = min(max(16, next_power_of_2(n)), max(16, 4096 // d))  # ~4K elements of o, do per program
    _bwd_delta[(batch * heads, cdiv(n, block))](
        o, do, delta, *_strides(o), *_strides(do), heads, n, BLOCK_M=block, D=d, num_warps=4)

    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(table))
    _launch(_bwd_dkdv, _bwd_dkdv_tuned, lambda bm, bn: (batch * heads, cdiv(n, bn)),
            (q, k, v, table, do, lse, delta, dk, dv, *common, heads, n, height, width, scale),
            constexprs, n, d, q)

    groups = _batch_groups(batch, heads, n, q.device)
    # The fp32 dq running sum is needed only where some candidate tile leaves several key tiles.
    cfg = _pinned(_bwd_dq_dbias, n, d, q)
    block_n = (min(c.kwargs["BLOCK_N"] for c in _prune(DQ_DBIAS_CONFIGS, {"N": n})) if cfg is None
               else cfg["BLOCK_N"])
    # With one key tile the kernel never touches DQ_ACC: delta stands in as a valid fp32 pointer.
    dq_acc = torch.empty((batch, heads, n, d), dtype=torch.float32, device=q.device) if n > block_n else delta
    dbias = torch.empty((groups, heads, n, n), dtype=torch.float32, device=q.device)
    _launch(_bwd_dq_dbias, _bwd_dq_dbias_tuned, lambda bm, bn: (heads * groups, cdiv(n, bm)),
            (q, k, v, table, do, lse, delta, dq, dq_acc, dbias, *common, batch, heads, groups, n, height, width,
             scale), constexprs, n, d, q)
    return dbias


def rel_bias_attention_bwd(do, q, k, v, table, o, lse, height: int, width: int, scale: float):
    """dq, dk, dv (q's dtype, contiguous) and dtable (table's dtype)."""
    batch, heads, n, d = q.shape
    dq = torch.empty((batch, heads, n, d), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    # fp32 with d > 64 stays tiled: the single tile then needs 128 KB of shared memory at
    # BLOCK 64, above what GPUs other than the A100/H100 class give one program.
    small = n <= SMALL_N_MAX and not (q.dtype == torch.float32 and d > 64)
    path = _bwd_small_path if small else _bwd_general_path
    dbias = path(do, q, k, v, table, o, lse, dq, dk, dv, height, width, scale)

    rows = table.shape[0]
    dtable = torch.empty_like(table)
    block_r = 32
    _bias_to_table[(heads, cdiv(rows, block_r))](
        dbias, dtable, *_strides(dtable), heads, dbias.shape[0], n, height, width, rows,
        BLOCK_R=block_r, BLOCK_I=min(64, max(16, next_power_of_2(n))), num_warps=4,
    )
    return dq, dk, dv, dtable
