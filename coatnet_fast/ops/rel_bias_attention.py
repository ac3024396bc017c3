"""``rel_bias_attention``: softmax(q k^T * scale + bias) v, with the bias gathered from a table.

The table holds one scalar per relative offset and head, in the seed model's layout
(``Attention.relative_bias_table``): row ``(dy + H - 1) * (2W - 1) + (dx + W - 1)`` for a query
at (yi, xi) and a key at (yj, xj), dy = yi - yj, dx = xi - xj, with positions numbered row-major
over the H x W window. This file holds the argument contract, the eager reference and the
backend table entries; fused kernels live in ``coatnet_fast.kernels``.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch

from .. import ext
from . import _checks, dispatch

OP = "rel_bias_attention"


def _build_index(height: int, width: int, device) -> torch.Tensor:
    # Built on the CPU explicitly, so a surrounding `with torch.device("meta")` cannot leak in;
    # and never as an inference tensor, which the cache would hand to later calls that train
    # (autograd refuses to save inference tensors for backward).
    with torch.inference_mode(False):
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


# --- triton backend: custom ops (visible to torch.compile), autograd, dispatch entry ---------

@torch.library.custom_op("coatnet_fast::rel_bias_attention_triton", mutates_args=())
def _triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                    height: int, width: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    from coatnet_fast.kernels.rel_bias_attention import rel_bias_attention_fwd

    return rel_bias_attention_fwd(q, k, v, table, height, width, scale)


@_triton_forward.register_fake
def _(q, k, v, table, height, width, scale):
    from coatnet_fast.kernels.rel_bias_attention import output_rows

    batch, heads, n, d = q.shape
    return output_rows(batch, heads, n, d, q.dtype, q.device), q.new_empty((batch, heads, n), dtype=torch.float32)


@torch.library.custom_op("coatnet_fast::rel_bias_attention_triton_backward", mutates_args=())
def _triton_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                     o: torch.Tensor, lse: torch.Tensor, height: int, width: int,
                     scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from coatnet_fast.kernels.rel_bias_attention import rel_bias_attention_bwd

    return rel_bias_attention_bwd(do, q, k, v, table, o, lse, height, width, scale)


@_triton_backward.register_fake
def _(do, q, k, v, table, o, lse, height, width, scale):
    shape = tuple(q.shape)
    return q.new_empty(shape), q.new_empty(shape), q.new_empty(shape), torch.empty_like(table)


def _setup_context(ctx, inputs, output):
    q, k, v, table, height, width, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, table, o, lse)
    ctx.window = (height, width)
    ctx.scale = scale


def _backward(ctx, do, _dlse):
    q, k, v, table, o, lse = ctx.saved_tensors
    dq, dk, dv, dtable = _triton_backward(do, q, k, v, table, o, lse, ctx.window[0], ctx.window[1], ctx.scale)
    return dq, dk, dv, dtable, None, None, None


torch.library.register_autograd("coatnet_fast::rel_bias_attention_triton", _backward, setup_context=_setup_context)


class _TritonAttentionFunction(torch.autograd.Function):
    """The eager path of the triton backend: the same launchers as the custom ops above,
    without their per-call dispatch cost (see ``dispatch.eager_fast_path``)."""

    @staticmethod
    def forward(ctx, q, k, v, table, height, width, scale):
        from coatnet_fast.kernels.rel_bias_attention import rel_bias_attention_fwd

        o, lse = rel_bias_attention_fwd(q, k, v, table, height, width, scale)
        _setup_context(ctx, (q, k, v, table, height, width, scale), (o, lse))
        return o

    @staticmethod
    def backward(ctx, do):
        from coatnet_fast.kernels.rel_bias_attention import rel_bias_attention_bwd

        dispatch.no_double_backward(OP)
        q, k, v, table, o, lse = ctx.saved_tensors
        grads = rel_bias_attention_bwd(do, q, k, v, table, o, lse, ctx.window[0], ctx.window[1], ctx.scale)
        return *grads, None, None, None


def _autocast_qkv(q, k, v):
    if torch.is_autocast_enabled(q.device.type):
        # What autocast does to the eager matmuls: q, k, v in the autocast dtype; the table
        # stays fp32 and the softmax runs in fp32 inside the kernel.
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


def rel_bias_attention_triton(q, k, v, table, window, scale):
    q, k, v = _autocast_qkv(q, k, v)
    if dispatch.eager_fast_path(q, k, v, table):
        return _TritonAttentionFunction.apply(q, k, v, table, window[0], window[1], scale)
    return _triton_forward(q, k, v, table, window[0], window[1], scale)[0]


def _triton_reasons(q, k, v, table, window, scale) -> List[str]:
    why = dispatch.triton_device_reasons(q)
    on_cpu = q.device.type == "cpu"
    if q.shape[-1] not in _TRITON_HEAD_DIMS:
        why.append(f"head dim d={q.shape[-1]} is not supported (supported: {_TRITON_HEAD_DIMS})")
    dtype = q.dtype
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        why.append(f"dtype {dtype} is not supported (float32, float16, bfloat16)")
    elif on_cpu and dtype == torch.bfloat16:
        why.append("bfloat16 on the CPU interpreter is not supported: its tl.dot returns wrong values for bf16")
    return why


# tl.dot needs power-of-two tiles of at least 16 along d; the kernels hold d in one tile.
_TRITON_HEAD_DIMS = (16, 32, 64, 128)

dispatch.register(OP, "eager", rel_bias_attention_eager)
dispatch.register(OP, "triton", rel_bias_attention_triton, available=dispatch.triton_available, reasons=_triton_reasons)


# --- ext backend: torch.ops.coatnet_fast_ext (csrc/), built on first use ---------------------
# The schemas and CPU/CUDA kernels are registered in C++; the fake kernels and the autograd
# formula are added here once the library is loaded.

def _ext_fake_forward(q, k, v, table, height, width, scale):
    batch, heads, n, d = q.shape
    return q.new_empty((batch, heads, n, d)), q.new_empty((batch, heads, n), dtype=ext.acc_dtype(q.dtype))


def _ext_fake_backward(do, q, k, v, table, o, lse, height, width, scale):
    shape = tuple(q.shape)
    return q.new_empty(shape), q.new_empty(shape), q.new_empty(shape), table.new_empty(table.shape)


def _ext_backward(ctx, do, _dlse):
    dispatch.no_double_backward(OP)  # as dwconv_bn_gelu's: the C++ backward op has no autograd formula
    q, k, v, table, o, lse = ctx.saved_tensors
    dq, dk, dv, dtable = torch.ops.coatnet_fast_ext.rel_bias_attention_backward(
        do, q, k, v, table, o, lse, ctx.window[0], ctx.window[1], ctx.scale)
    return dq, dk, dv, dtable, None, None, None


def _register_ext_python_parts() -> None:
    forward = "coatnet_fast_ext::rel_bias_attention_forward"
    torch.library.register_fake(forward)(_ext_fake_forward)
    torch.library.register_fake("coatnet_fast_ext::rel_bias_attention_backward")(_ext_fake_backward)
    torch.library.register_autograd(forward, _ext_backward, setup_context=_setup_context)


ext.on_load(_register_ext_python_parts)


def rel_bias_attention_ext(q, k, v, table, window, scale):
    if not ext.is_loaded():
        ext.load()
    q, k, v = _autocast_qkv(q, k, v)
    return torch.ops.coatnet_fast_ext.rel_bias_attention_forward(q, k, v, table, window[0], window[1], scale)[0]


def _ext_reasons(q, k, v, table, window, scale) -> List[str]:
    why = ext.device_reasons(q)
    if q.device.type == "cuda" and q.shape[-1] > _EXT_CUDA_MAX_HEAD_DIM:
        why.append(f"head dim d={q.shape[-1]} is above the CUDA kernel's limit of {_EXT_CUDA_MAX_HEAD_DIM}")
    dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
    if dtype not in ext.DTYPES:
        why.append(f"dtype {dtype} is not supported ({', '.join(str(t) for t in ext.DTYPES)})")
    elif table.dtype not in (dtype, torch.float32):
        # Autocast casts q, k, v but not the table: the kernels take it in their dtype or fp32.
        why.append(f"a {table.dtype} table with {dtype} activations (under autocast) is not supported")
    return why


# The CUDA kernel holds a query row's d values in registers.
_EXT_CUDA_MAX_HEAD_DIM = 128

dispatch.register(OP, "ext", rel_bias_attention_ext, available=ext.unavailable_reason, reasons=_ext_reasons,
                  prepare=ext.load)


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
