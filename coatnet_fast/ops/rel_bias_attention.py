"""``rel_bias_attention``: softmax(q k^T * scale + bias) v, with the bias gathered from a table.

The table holds one scalar per relative offset and head, in the seed model's layout
(``Attention.relative_bias_table``): row ``(dy + H - 1) * (2W - 1) + (dx + W - 1)`` for a query
at (yi, xi) and a key at (yj, xj), dy = yi - yj, dx = xi - xj, with positions numbered row-major
over the H x W window. This file holds the argument contract, the eager reference and the
backend table entries; fused kernels live in ``coatnet_fast.kernels``.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence

import torch

from . import _checks, dispatch

OP = "rel_bias_attention"


def _build_index(height: int, width: int, device) -> torch.Tensor:
    # Built on the CPU explicitly, so a surrounding `with torch.device("meta")` cannot leak in.
    rows = torch.arange(height, device="cpu")
    cols = torch.arange(width, device="cpu")
    coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij")).flatten(1)  # [2, N]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, N(query), N(key)]
    return ((rel[0] + height - 1) * (2 * width - 1) + (rel[1] + width - 1)).to(device)


# One copy per window and device: eager calls then skip the build and the host-to-device copy.
_cached_index = functools.lru_cache(maxsize=64)(_build_index)


def _index(height: int, width: int, device) -> torch.Tensor:
    # Under torch.compile the index is traced (and constant-folded) rather than read from a
    # Python cache that the compiler cannot see into.
    if torch.compiler.is_compiling():
        return _build_index(height, width, device)
    return _cached_index(height, width, device)


def relative_position_index(height: int, width: int, device=None) -> torch.Tensor:
    """[N, N] int64 table rows for a height x width window, query-major (the seed's order)."""
    return _cached_index(int(height), int(width), torch.device(device or "cpu")).clone()


def table_rows(window: Sequence[int]) -> int:
    height, width = window
    return (2 * height - 1) * (2 * width - 1)


def check_inputs(q, k, v, table, window, scale) -> tuple:
    """Validate the public contract; returns (window, scale) normalised."""
    doc = "[B, heads, N, d]"
    q = _checks.tensor("q", q, dim=4, shape_doc=doc)
    k = _checks.tensor("k", k, dim=4, shape_doc=doc)
    v = _checks.tensor("v", v, dim=4, shape_doc=doc)
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}; got {tuple(t.shape)}")
    _checks.floating("q", q)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}; got {t.dtype}")
    window = _checks.positive_int_pair("window", window)
    batch, heads, n, d = q.shape
    if window[0] * window[1] != n:
        raise ValueError(
            f"window {window} has {window[0] * window[1]} positions but q has N={n} "
            f"(q shape {tuple(q.shape)}); N must equal H*W"
        )
    table = _checks.tensor("table", table, dim=2, shape_doc="[(2H-1)(2W-1), heads]")
    expected = (table_rows(window), heads)
    if tuple(table.shape) != expected:
        raise ValueError(
            f"table must have shape [(2H-1)(2W-1), heads] = {list(expected)} for window {window} "
            f"and {heads} heads; got {list(table.shape)}"
        )
    _checks.floating("table", table)
    _checks.master_dtype("table", table, "q", q)
    _checks.same_device([("q", q), ("k", k), ("v", v), ("table", table)])
    scale = d ** -0.5 if scale is None else _checks.positive_float("scale", scale)
    return window, scale


def rel_bias_attention_eager(q, k, v, table, window, scale):
    """The seed's formulation, op for op (see ``Attention.forward`` in the seed)."""
    n = q.shape[-2]
    index = _index(window[0], window[1], table.device)
    # [N*N, heads] -> [heads, N, N]; index_select's backward sums rows sharing an offset.
    bias = table.index_select(0, index.flatten()).view(n, n, -1).permute(2, 0, 1)
    dots = torch.matmul(q, k.transpose(-1, -2)) * scale
    dots = dots + bias.unsqueeze(0)
    attn = dots.softmax(dim=-1)
    # An fp32 table promotes the scores of low-precision q, k to fp32 (as under autocast);
    # the product with v is taken in v's dtype, which is what autocast's matmul does.
    return torch.matmul(attn.to(v.dtype), v)


dispatch.register(OP, "eager", rel_bias_attention_eager)
dispatch.register(OP, "triton", None, available=dispatch.not_in_this_build("the Triton kernel for rel_bias_attention"))
dispatch.register(OP, "ext", None, available=dispatch.not_in_this_build("the C++/CUDA extension for rel_bias_attention"))


def rel_bias_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    window: Sequence[int],
    scale: Optional[float] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Pre-softmax relative-bias attention over one H x W window.

    Args:
        q, k, v: [B, heads, N, d] with N == H * W; strided views (e.g. of a fused qkv
            projection) are accepted.
        table: [(2H-1)(2W-1), heads] relative bias table in the seed's layout; q's dtype or
            float32.
        window: (H, W).
        scale: multiplier of q k^T; defaults to d ** -0.5.
        backend: "auto", "eager", "triton" or "ext".

    Returns:
        [B, heads, N, d] in q's dtype.
    """
    window, scale = check_inputs(q, k, v, table, window, scale)
    impl = dispatch.select(OP, backend, dict(q=q, k=k, v=v, table=table, window=window, scale=scale))
    return impl.impl(q, k, v, table, window, scale)


def supported_reasons(backend: str, q, k, v, table, window, scale=None) -> List[str]:
    """Why ``backend`` would reject these inputs (empty when it takes them)."""
    window, scale = check_inputs(q, k, v, table, window, scale)
    return dispatch.why_not(OP, backend, dict(q=q, k=k, v=v, table=table, window=window, scale=scale))
