"""Independent float64 restatements of the ops' formulas, for the tests.

Nothing here calls coatnet_fast: the relative index comes from explicit loops over query and
key positions, the depthwise conv from shifted slices, BatchNorm and GELU from their formulas.
"""
import math

import torch
import torch.nn.functional as F


def relative_index_by_loops(height, width):
    n = height * width
    index = torch.empty(n, n, dtype=torch.long)
    for i in range(n):
        yi, xi = divmod(i, width)
        for j in range(n):
            yj, xj = divmod(j, width)
            index[i, j] = (yi - yj + height - 1) * (2 * width - 1) + (xi - xj + width - 1)
    return index


def rel_bias_attention_reference(q, k, v, table, window, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    index = relative_index_by_loops(*window).to(table.device)
    bias = table[index].permute(2, 0, 1)  # [heads, N, N]
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale + bias
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    return torch.einsum("bhij,bhjd->bhid", p, v)


def dwconv_bn_gelu_reference(x, weight, gamma, beta, running_mean, running_var, training, momentum, eps, stride):
    """Returns (out, new_running_mean, new_running_var)."""
    b, c, h, w = x.shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    xp = F.pad(x, (1, 1, 1, 1))
    y = 0
    for ky in range(3):
        for kx in range(3):
            patch = xp[:, :, ky: ky + stride * (ho - 1) + 1: stride, kx: kx + stride * (wo - 1) + 1: stride]
            y = y + patch * weight[:, 0, ky, kx].view(1, c, 1, 1)
    return batch_norm_act_reference(y, gamma, beta, running_mean, running_var, training, momentum, eps, gelu=True)


def batch_norm_act_reference(x, gamma, beta, running_mean, running_var, training, momentum, eps, gelu,
                             residual=None, branch_scale=None):
    """Returns (out, new_running_mean, new_running_var)."""
    b, c, h, w = x.shape
    if training:
        count = b * h * w
        mean = x.sum(dim=(0, 2, 3)) / count
        var = ((x - mean.view(1, c, 1, 1)) ** 2).sum(dim=(0, 2, 3)) / count
        new_mean = (1 - momentum) * running_mean + momentum * mean.detach()
        new_var = (1 - momentum) * running_var + momentum * var.detach() * count / (count - 1)
    else:
        mean, var = running_mean, running_var
        new_mean, new_var = running_mean, running_var
    y = (x - mean.view(1, c, 1, 1)) / torch.sqrt(var.view(1, c, 1, 1) + eps)
    y = y * gamma.view(1, c, 1, 1) + beta.view(1, c, 1, 1)
    if gelu:
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    if branch_scale is not None:
        y = y * branch_scale.view(b, 1, 1, 1)
    if residual is not None:
        y = y + residual
    return y, new_mean, new_var


def relative_error(actual, expected):
    """||a - b|| / ||b||, with ||b|| floored at 1e-2 per element: a gradient that is zero in
    exact arithmetic (e.g. dq for a 1x1 window) is then judged by its rounding noise."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    floor = 1e-2 * expected.numel() ** 0.5
    return ((actual - expected).norm() / expected.norm().clamp_min(floor)).item()


# Norm-wise relative error against float64, by dtype (see coatnet_fast.verify.TOLERANCE).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


RUNNING_STATISTICS_PATHS = ["merge kernel", "custom op", "strided running statistics"]


def running_statistics_on_path(kernels, dispatch, path: str, channels: int, device, monkeypatch):
    """(running_mean, running_var, merged) for a test of where a Triton op's running-statistics
    update runs: fresh positive statistics, dense or (``path`` "strided running statistics")
    stride-2 views; on the "custom op" path the eager fast path is turned off; ``merged`` records,
    per ``kernels.merge_stats`` call, whether it was asked to update the running statistics."""
    merged = []
    merge = kernels.merge_stats
    monkeypatch.setattr(kernels, "merge_stats", lambda *a, **k: merged.append(
        (a[5] if len(a) > 5 else k.get("running")) is not None) or merge(*a, **k))
    if path == "custom op":
        monkeypatch.setattr(dispatch, "eager_fast_path", lambda *tensors: False)
    store = torch.rand(channels, 2, device=device) + 0.5
    running_mean, running_var = store[:, 0], store[:, 1]  # stride-2 views
    if path != "strided running statistics":
        running_mean, running_var = running_mean.contiguous(), running_var.contiguous()
    return running_mean, running_var, merged


def memory_layout(t):
    """"channels_last", "nchw" (contiguous; a tensor that is both counts as this) or "strided"."""
    if t.is_contiguous():
        return "nchw"
    return "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else "strided"
