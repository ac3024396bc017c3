"""Triton helpers shared by the BatchNorm kernels (``dwconv_bn_gelu``, ``batch_norm_act``)."""
import torch
import triton
import triton.language as tl

INV_SQRT2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def gelu(u):
    """Exact (erf) GELU, as ``nn.GELU()``."""
    return 0.5 * u * (1.0 + tl.erf(u * INV_SQRT2))


@triton.jit
def gelu_grad(u):
    return 0.5 * (1.0 + tl.erf(u * INV_SQRT2)) + u * tl.exp(-0.5 * u * u) * INV_SQRT_2PI


@triton.jit
def chan_merge(count, mean, m2, z, p_ok):
    """Fold a [BLOCK_P, BLOCK_C] chunk (rows p_ok) into a running per-column (count, mean, M2).

    Chan's parallel formula in deviation form: a channel with mean 1e3 and std 1 keeps its
    variance in fp32, where sums of squares would cancel it away."""
    n = tl.sum(p_ok.to(tl.float32), 0)
    chunk_mean = tl.sum(tl.where(p_ok[:, None], z, 0.0), 0) / tl.maximum(n, 1.0)
    dev = tl.where(p_ok[:, None], z - chunk_mean[None, :], 0.0)
    chunk_m2 = tl.sum(dev * dev, 0)
    total = count + n
    delta = chunk_mean - mean
    mean += delta * (n / tl.maximum(total, 1.0))
    m2 += chunk_m2 + delta * delta * (count * n / tl.maximum(total, 1.0))
    return total, mean, m2


@triton.jit
def _merge_stats(MEAN, M2, OUT_MEAN, OUT_VAR, G, C, P, P_SPLIT, S,
                 BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge G = B * S partial (mean, M2) rows [G, C] into the channel mean and biased variance
    [C]; group g covers split g % S of an image's P positions, P_SPLIT each (the last split the
    rest). Chan's formula for many groups at once: the mean from the count-weighted group means,
    then M2 = sum M2_g + sum n_g (mean_g - mean)^2, deviations taken directly (no cancellation).
    Tiles of BLOCK_G groups in a fixed order: deterministic."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    weighted = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, G, BLOCK_G):
        g = start + tl.arange(0, BLOCK_G)
        n = tl.where(g < G, tl.minimum(P_SPLIT, P - (g % S) * P_SPLIT), 0).to(tl.float32)
        part = tl.load(MEAN + g[:, None] * C + offs_c[None, :], mask=(g < G)[:, None] & c_ok[None, :], other=0.0)
        weighted += tl.sum(part * n[:, None], 0)
    total = (G // S) * P  # every image has P positions
    mean = weighted / total
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, G, BLOCK_G):
        g = start + tl.arange(0, BLOCK_G)
        ok = (g < G)[:, None] & c_ok[None, :]
        n = tl.where(g < G, tl.minimum(P_SPLIT, P - (g % S) * P_SPLIT), 0).to(tl.float32)
        part = tl.load(MEAN + g[:, None] * C + offs_c[None, :], mask=ok, other=0.0)
        dev = tl.where(ok, part - mean[None, :], 0.0)
        m2 += tl.sum(tl.load(M2 + g[:, None] * C + offs_c[None, :], mask=ok, other=0.0) + n[:, None] * dev * dev, 0)
    tl.store(OUT_MEAN + offs_c, mean, mask=c_ok)
    tl.store(OUT_VAR + offs_c, m2 / total, mask=c_ok)


def merge_stats(means, m2s, positions: int, per_program: int):
    """(mean, biased variance) [C] from per-(image, split) partials [B, S, C] (fp32, contiguous)
    of ``positions`` values an image, ``per_program`` a split: one launch instead of a string of
    small torch ops on the host."""
    batch, splits, channels = means.shape
    mean = torch.empty(channels, dtype=torch.float32, device=means.device)
    var = torch.empty_like(mean)
    block_c = min(32, triton.next_power_of_2(channels))
    _merge_stats[(triton.cdiv(channels, block_c),)](
        means, m2s, mean, var, batch * splits, channels, positions, per_program, splits,
        BLOCK_G=64, BLOCK_C=block_c, num_warps=4)
    return mean, var
