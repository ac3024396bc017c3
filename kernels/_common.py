"""Triton helpers shared by the BatchNorm kernels (``dwconv_bn_gelu``, ``batch_norm_act``)."""
import torch
import triton
import triton.language as tl

INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
NEG_HALF_LOG2E = tl.constexpr(-0.7213475204444817)  # exp(-u^2 / 2) = exp2(u^2 * NEG_HALF_LOG2E)

# The normal CDF's tail, Phi(-a) = exp(-a^2 / 2) * t * Q(t) with t = 1 / (1 + P a), a >= 0: Q of
# degree 6 fitted by ``tests/fit_normal_cdf.py`` (weighted minimax: the relative error of Phi
# where Phi >= 1e-4, absolute below; 2.7e-8 by that measure). Evaluated in fp32 by the
# interpreter over |u| <= 14: GELU within 4.0e-6 relative wherever |GELU(u)| > 1e-6, 7.8e-7 at
# |u| < 4, 3.5e-4 in the tail down to 1e-30; its derivative within 1.9e-7 absolute (the textbook
# 0.5 u (1 + erf(u / sqrt 2)) in fp32, by torch: 7% at |GELU(u)| = 1e-6, since 1 + erf cancels,
# and 1.4e-7 for the derivative). ``tests/test_batch_norm_act.py`` bounds both, on GPUs too.
# Why not ``tl.erf``: libdevice's erf evaluates two polynomials and selects, about 26 SASS
# instructions an element for GELU and 34 for its derivative (sm_90a, triton 3.6), which left the
# BatchNorm + GELU kernels issue-bound; this is one polynomial, a reciprocal and an exp2 that the
# derivative shares, 17 and 18 (8 of them the division's range handling around MUFU.RCP).
CDF_P = tl.constexpr(0.33)
CDF_Q0 = tl.constexpr(0.13282273915322862)
CDF_Q1 = tl.constexpr(0.11779758954751969)
CDF_Q2 = tl.constexpr(0.18652795265392905)
CDF_Q3 = tl.constexpr(-0.09893518038383203)
CDF_Q4 = tl.constexpr(0.34063862012575186)
CDF_Q5 = tl.constexpr(-0.22542488818209097)
CDF_Q6 = tl.constexpr(0.04657315910606758)



# Host-side integer helpers. triton.cdiv and triton.next_power_of_2 are ConstexprFunctions in
# recent Triton: a few microseconds of Python a call, and a launch's tile choice made ~20 of them
# (bench_host_overhead.py's profile on an H200 host: 100 us of a depthwise forward + backward).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (n >= 1), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 1 else 1

def is_channels_last(t: torch.Tensor) -> bool:
    """Dense in channels_last and not also dense in NCHW (a tensor with one channel or 1x1 images is both)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def match_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` dense in ``like``'s layout (channels_last or contiguous), copied when it is not and
    ``like`` is dense. The kernels' tiles follow the activation's layout (wide in C for
    channels_last, long in positions for NCHW), so a gradient or residual in the other layout
    would be read across them: eight or sixteen 2-byte gathers a thread where one vector load
    does, in every pass that reads it. One copy costs less. (The model's backward hands both ops
    gradients in the activation's layout; a loss taken on an NCHW tensor need not.)"""
    if is_channels_last(like):
        fmt = torch.channels_last
    elif like.is_contiguous():
        fmt = torch.contiguous_format
    else:
        return t  # a strided view (a channel slice): no layout to follow
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


@triton.jit
def normal_cdf_and_density_scale(u):
    """(Phi(u), exp(-u^2 / 2)) of fp32 u, by the fit above."""
    t = 1.0 / (1.0 + CDF_P * tl.abs(u))
    q = CDF_Q6 * t + CDF_Q5
    q = q * t + CDF_Q4
    q = q * t + CDF_Q3
    q = q * t + CDF_Q2
    q = q * t + CDF_Q1
    q = q * t + CDF_Q0
    e = tl.math.exp2(u * u * NEG_HALF_LOG2E)
    tail = e * (t * q)
    return tl.where(u >= 0, 1.0 - tail, tail), e


@triton.jit
def gelu(u):
    """Exact (erf) GELU, as ``nn.GELU()``: u Phi(u)."""
    cdf, _ = normal_cdf_and_density_scale(u)
    return u * cdf


@triton.jit
def gelu_grad(u):
    """d GELU / du = Phi(u) + u phi(u)."""
    cdf, e = normal_cdf_and_density_scale(u)
    return cdf + u * e * INV_SQRT_2PI


@triton.jit
def bn_scale_shift(MEAN, RSTD, GAMMA, BETA, offs_c, c_ok):
    """BatchNorm as y = x * scale + shift for channels offs_c, fp32: scale = rstd * gamma, shift =
    beta - mean * scale, computed a program rather than as torch ops on the host."""
    mean = tl.load(MEAN + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    scale = tl.load(RSTD + offs_c, mask=c_ok, other=0.0).to(tl.float32) * \
        tl.load(GAMMA + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    return scale, tl.load(BETA + offs_c, mask=c_ok, other=0.0).to(tl.float32) - mean * scale


@triton.jit
def image_and_channels(C, BLOCK_C: tl.constexpr, VECTOR: tl.constexpr = 0):
    """(image index as int64, channel offsets) of a program on grid axis 0, which runs over
    images x channel blocks: one axis, so neither count meets CUDA's 65535 limit on axes 1 and 2.
    VECTOR > 0 caps the channels a thread loads together (the tile layout's elements per thread
    along C) at VECTOR, where the compiler would take 16 bytes' worth."""
    blocks = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    offs_c = (pid % blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    if VECTOR > 0 and BLOCK_C >= VECTOR:  # the hint goes on the op that makes offs_c, not on a call's result
        offs_c = tl.max_contiguous(offs_c, VECTOR)
    return (pid // blocks).to(tl.int64), offs_c


@triton.jit
def channel_block_start(C, BLOCK_C: tl.constexpr):
    """The first channel of the block ``image_and_channels`` gives this program, as a scalar."""
    return (tl.program_id(0) % tl.cdiv(C, BLOCK_C)) * BLOCK_C


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the memory at ``ptrs`` (PTX ``prefetch.global.L2``, one per element): a hint
    with no result, so it holds no registers past its address and nothing waits on it. PTX only
    (the interpreter runs no inline assembly: callers gate it behind a constexpr), and every
    address must lie inside the tensor, which callers ensure by clamping."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


def image_channel_grid(batch: int, channels: int, block_c: int, name: str = "x") -> int:
    """Grid axis 0 for ``image_and_channels``."""
    programs = batch * cdiv(channels, block_c)
    if programs >= 2**31:
        raise ValueError(f"{name}: {batch} images x {cdiv(channels, block_c)} channel blocks is past "
                         "the 2**31 programs one grid axis allows")
    return programs


@triton.jit
def welford_update(count, mean, m2, z, p_ok):
    """Fold a [BLOCK_P, BLOCK_C] chunk (rows p_ok) into running statistics kept per slot: row
    counts [BLOCK_P], means and M2 [BLOCK_P, BLOCK_C]. Each slot takes one value a chunk, so the
    loop reduces nothing across rows: no shuffles or barriers between its loads (a per-chunk
    column reduction put ten barriers in every iteration). ``welford_total`` merges the slots
    once, after the loop. Welford's update in deviation form: a channel with mean 1e3 and std 1
    keeps its variance in fp32, where sums of squares would cancel it away."""
    count = count + p_ok.to(tl.float32)
    delta = z - mean
    mean += tl.where(p_ok[:, None], delta * (1.0 / tl.maximum(count, 1.0))[:, None], 0.0)
    m2 += tl.where(p_ok[:, None], delta * (z - mean), 0.0)
    return count, mean, m2


@triton.jit
def _chan_combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's merge of two (count, mean, M2) summaries; empty ones (n = 0) drop out."""
    n = n_a + n_b
    frac = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def welford_total(count, mean, m2):
    """Per-column (mean, M2) over all slots of ``welford_update``'s statistics, merged in a
    fixed tree (deterministic)."""
    n = tl.broadcast_to(count[:, None], mean.shape)
    _, mean, m2 = tl.reduce((n, mean, m2), 0, _chan_combine)
    return mean, m2


@triton.jit
def _merge_stats(MEAN, M2, SHIFT, ss_c, OUT_MEAN, OUT_VAR, OUT_RSTD, RUN_MEAN, RUN_VAR, G, C, P, P_SPLIT, S, count,
                 momentum, eps, HAS_SHIFT: tl.constexpr, UPDATE: tl.constexpr, BLOCK_G: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """Merge G = B * S partial (mean, M2) rows [G, C] of ``count`` values a channel into the
    channel mean and biased variance [C]; group g covers split g % S of an image's P positions,
    P_SPLIT each (the last split the rest). Chan's formula for many groups at once: the mean
    from the count-weighted group means, then M2 = sum M2_g + sum n_g (mean_g - mean)^2,
    deviations taken directly (no cancellation). Partial means taken about SHIFT (a value of
    each channel) have the spread of the data, not its offset, so their fp32 rounding does not
    reach the variance. Tiles of BLOCK_G groups in a fixed order: deterministic. With UPDATE,
    also what ``nn.BatchNorm2d`` does next on the host: the running statistics' update in place
    (unbiased variance) and rstd = 1 / sqrt(var + eps)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    weighted = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, G, BLOCK_G):
        g = start + tl.arange(0, BLOCK_G)
        n = tl.where(g < G, tl.minimum(P_SPLIT, P - (g % S) * P_SPLIT), 0).to(tl.float32)
        rows = g.to(tl.int64)[:, None] * C
        part = tl.load(MEAN + rows + offs_c[None, :], mask=(g < G)[:, None] & c_ok[None, :], other=0.0)
        weighted += tl.sum(part * n[:, None], 0)
    mean = weighted / count
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, G, BLOCK_G):
        g = start + tl.arange(0, BLOCK_G)
        ok = (g < G)[:, None] & c_ok[None, :]
        n = tl.where(g < G, tl.minimum(P_SPLIT, P - (g % S) * P_SPLIT), 0).to(tl.float32)
        rows = g.to(tl.int64)[:, None] * C
        dev = tl.where(ok, tl.load(MEAN + rows + offs_c[None, :], mask=ok, other=0.0) - mean[None, :], 0.0)
        m2 += tl.sum(tl.load(M2 + rows + offs_c[None, :], mask=ok, other=0.0) + n[:, None] * dev * dev, 0)
    if HAS_SHIFT:
        mean += tl.load(SHIFT + offs_c * ss_c, mask=c_ok, other=0.0).to(tl.float32)
    var = m2 / count
    tl.store(OUT_MEAN + offs_c, mean, mask=c_ok)
    tl.store(OUT_VAR + offs_c, var, mask=c_ok)
    if UPDATE:
        tl.store(OUT_RSTD + offs_c, 1.0 / tl.sqrt(var + eps), mask=c_ok)
        run_mean = tl.load(RUN_MEAN + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        run_var = tl.load(RUN_VAR + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        run_mean = run_mean * (1.0 - momentum) + mean * momentum
        run_var = run_var * (1.0 - momentum) + m2 / (count - 1.0) * momentum
        tl.store(RUN_MEAN + offs_c, run_mean.to(RUN_MEAN.dtype.element_ty), mask=c_ok)
        tl.store(RUN_VAR + offs_c, run_var.to(RUN_VAR.dtype.element_ty), mask=c_ok)


def merge_stats(means, m2s, positions: int, per_program: int, shift=None, running=None):
    """(mean, biased variance) [C] from per-(image, split) partials [B, S, C] (fp32, contiguous)
    of ``positions`` values an image, ``per_program`` a split, taken about ``shift`` ((t, stride):
    channel c's shift at t's element c * stride, any float dtype; or None for 0): one launch instead of a string of small torch ops on the host. With
    ``running`` = (running_mean, running_var, momentum, eps) (dense [C] tensors), updates those in
    place as ``nn.BatchNorm2d`` does and returns (mean, rstd) instead: the host's five update ops
    and the rsqrt, each a launch and some microseconds of Python, become part of this one."""
    batch, splits, channels = means.shape
    if running is None:  # separate tensors: a custom op's outputs may not alias each other
        mean = torch.empty(channels, dtype=torch.float32, device=means.device)
        var = rstd = torch.empty_like(mean)
    else:  # the eager path's: one allocation (each torch.empty is host time too)
        mean, var, rstd = torch.empty((3, channels), dtype=torch.float32, device=means.device).unbind(0)
    run_mean, run_var, momentum, eps = running if running is not None else (mean, mean, 0.0, 0.0)
    block_c = min(32, next_power_of_2(max(channels, 1)))
    count = batch * positions
    _merge_stats[(cdiv(channels, block_c),)](
        means, m2s, *((mean, 1) if shift is None else shift), mean, var, rstd, run_mean, run_var, batch * splits, channels,
        positions, per_program, splits, float(count), float(momentum), float(eps), HAS_SHIFT=shift is not None,
        UPDATE=running is not None, BLOCK_G=64, BLOCK_C=block_c, num_warps=4)
    return (mean, var) if running is None else (mean, rstd)
