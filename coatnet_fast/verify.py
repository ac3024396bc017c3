"""``coatnet-fast verify``: every usable backend of every op, and the whole model, against eager.

The reference is always the eager backend in float64 on the same device; each candidate runs
in the dtype under test. Errors are norm-wise relative errors, ||a - b|| / ||b||, over the
output, every input gradient, and (for BatchNorm) the updated running statistics.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Iterable, List, Optional

import torch

from .models import CoAtNet, set_backend
from .ops import dispatch
from .ops.batch_norm_act import batch_norm_act
from .ops.dwconv_bn_gelu import dwconv_bn_gelu
from .ops.max_pool2d import max_pool2d
from .ops.rel_bias_attention import rel_bias_attention, table_rows

# Norm-wise relative error allowed against float64. fp32 leaves ~1e-7 per op; fp16 carries
# an 11-bit significand and bf16 an 8-bit one, so bf16 gets twice fp16's allowance.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@dataclasses.dataclass
class Result:
    check: str
    backend: str
    dtype: str
    case: str
    error: float
    worst: str
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double().to(actual.device)
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def _worst(pairs: Iterable[tuple]) -> tuple:
    worst_name, worst_err = "", 0.0
    for name, actual, expected in pairs:
        err = relative_error(actual, expected)
        if err != err or err > worst_err:  # NaN counts as the worst
            worst_name, worst_err = name, err
            if err != err:
                break
    return worst_err, worst_name


@contextlib.contextmanager
def exact_fp32():
    """TF32 would make fp32 comparisons meaningless; switch it off for the duration."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _grads(out: torch.Tensor, grad_out: torch.Tensor, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, grad_out.to(out.dtype)))


ATTENTION_CASES = (
    # name, batch, heads, window, head dim, q/k/v as strided views of one qkv tensor
    ("7x5 d16 strided", 2, 3, (7, 5), 16, True),
    ("4x4 d32", 2, 2, (4, 4), 32, False),
)


def verify_rel_bias_attention(backend: str, dtype: torch.dtype, device: torch.device) -> List[Result]:
    results = []
    for name, batch, heads, window, d, strided in ATTENTION_CASES:
        g = torch.Generator(device="cpu").manual_seed(0)
        n = window[0] * window[1]
        if strided:
            qkv = torch.randn(batch, n, 3, heads, d, generator=g, dtype=torch.float64)
            q64, k64, v64 = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q64, k64, v64 = (torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64) for _ in range(3))
        table64 = torch.randn(table_rows(window), heads, generator=g, dtype=torch.float64)
        grad_out = torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64).to(device)

        def run(ts, op_backend):
            ts = [t.to(device).detach().requires_grad_(True) for t in ts]
            out = rel_bias_attention(*ts, window, backend=op_backend)
            return out, _grads(out, grad_out, ts)

        ref_out, ref_grads = run([q64, k64, v64, table64], "eager")
        cast = [t.to(dtype) for t in (q64, k64, v64, table64)]
        if strided:  # keep the candidate's q, k, v strided too
            qkv_c = qkv.to(dtype)
            cast[:3] = qkv_c.permute(2, 0, 3, 1, 4).unbind(0)
        out, grads = run(cast, backend)
        names = ("out", "dq", "dk", "dv", "dtable")
        err, worst = _worst(zip(names, [out] + grads, [ref_out] + ref_grads))
        results.append(Result("rel_bias_attention", backend, str(dtype).replace("torch.", ""), name, err, worst, TOLERANCE[dtype]))
    return results


DWCONV_CASES = (
    # name, shape [B, C, H, W], stride, training, channels_last
    ("9x7 C6 s1 train", (2, 6, 9, 7), 1, True, False),
    ("9x7 C6 s2 train NHWC", (2, 6, 9, 7), 2, True, True),
    ("8x8 C5 s1 eval", (2, 5, 8, 8), 1, False, False),
)


def verify_dwconv_bn_gelu(backend: str, dtype: torch.dtype, device: torch.device) -> List[Result]:
    results = []
    for name, shape, stride, training, channels_last in DWCONV_CASES:
        g = torch.Generator(device="cpu").manual_seed(1)
        c = shape[1]
        x64 = torch.randn(shape, generator=g, dtype=torch.float64)
        w64 = torch.randn(c, 1, 3, 3, generator=g, dtype=torch.float64) / 3
        gamma = 1 + 0.2 * torch.randn(c, generator=g, dtype=torch.float64)
        beta = 0.2 * torch.randn(c, generator=g, dtype=torch.float64)
        mean = 0.3 * torch.randn(c, generator=g, dtype=torch.float64)
        var = 0.5 + torch.rand(c, generator=g, dtype=torch.float64)
        h_out, w_out = (shape[2] - 1) // stride + 1, (shape[3] - 1) // stride + 1
        grad_out = torch.randn(shape[0], c, h_out, w_out, generator=g, dtype=torch.float64).to(device)

        def run(dt, op_backend):
            x = x64.to(device, dt)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            params = [t.to(device, dt).requires_grad_(True) for t in (w64, gamma, beta)]
            x.requires_grad_(True)
            rm, rv = mean.to(device, dt), var.to(device, dt)
            out = dwconv_bn_gelu(x, params[0], params[1], params[2], rm, rv, training=training, stride=stride,
                                 backend=op_backend)
            return [out] + _grads(out, grad_out, [x] + params) + [rm, rv]

        names = ("out", "dx", "dweight", "dbn_weight", "dbn_bias", "running_mean", "running_var")
        err, worst = _worst(zip(names, run(dtype, backend), run(torch.float64, "eager")))
        results.append(Result("dwconv_bn_gelu", backend, str(dtype).replace("torch.", ""), name, err, worst, TOLERANCE[dtype]))
    return results


# Small but complete: both block types, downsampling in every stage, a non-square image
# (windows 4x2 and 2x1), channels that are not powers of two.
VERIFY_MODEL = dict(image_size=(64, 32), num_blocks=(1, 1, 2, 2, 1), channels=(8, 12, 16, 32, 48),
                    num_classes=7, heads=(1, 2, 2, 3), dim_head=16)


def verify_model(backend: str, dtype: torch.dtype, device: torch.device) -> List[Result]:
    torch.manual_seed(0)
    reference = CoAtNet(**VERIFY_MODEL).to(device, torch.float64)
    with torch.no_grad():  # the seed starts the bias tables at zero; make them matter
        for name, p in reference.named_parameters():
            if name.endswith("relative_bias_table"):
                p.normal_()
    usable_ops = [op for op in dispatch.ops() if not dispatch.why_not(op, backend)]
    candidate = set_backend(copy.deepcopy(reference).to(dtype), backend, usable_ops)
    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(3, 3, *VERIFY_MODEL["image_size"], generator=g, dtype=torch.float64).to(device)
    grad_out = torch.randn(3, VERIFY_MODEL["num_classes"], generator=g, dtype=torch.float64).to(device)

    results = []
    for mode in ("train", "eval"):
        reference.train(mode == "train")
        candidate.train(mode == "train")
        for model in (reference, candidate):
            model.zero_grad(set_to_none=True)
        ref_out = reference(x)
        out = candidate(x.to(dtype))
        pairs = [("logits", out, ref_out)]
        if mode == "train":
            ref_out.backward(grad_out)
            out.backward(grad_out.to(dtype))
            ref_params = dict(reference.named_parameters())
            pairs += [(f"grad {n}", p.grad, ref_params[n].grad) for n, p in candidate.named_parameters()]
            ref_buffers = dict(reference.named_buffers())
            pairs += [(n, b, ref_buffers[n]) for n, b in candidate.named_buffers() if n.endswith(("running_mean", "running_var"))]
        err, worst = _worst(pairs)
        case = f"{mode} 64x32" + ("" if len(usable_ops) == len(dispatch.ops()) else f" ({'+'.join(usable_ops)})")
        results.append(Result("model", backend, str(dtype).replace("torch.", ""), case, err, worst, TOLERANCE[dtype]))
    return results


BATCH_NORM_ACT_CASES = (
    # name, shape [B, C, H, W], training, gelu (else residual and drop-path scale), channels_last
    ("9x7 C6 expand train", (2, 6, 9, 7), True, True, False),
    ("9x7 C6 projection train NHWC", (3, 6, 9, 7), True, False, True),
    ("8x8 C5 projection eval", (2, 5, 8, 8), False, False, False),
)


def verify_batch_norm_act(backend: str, dtype: torch.dtype, device: torch.device) -> List[Result]:
    results = []
    for name, shape, training, gelu, channels_last in BATCH_NORM_ACT_CASES:
        g = torch.Generator(device="cpu").manual_seed(2)
        c = shape[1]
        x64, res64 = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
        gamma = 1 + 0.2 * torch.randn(c, generator=g, dtype=torch.float64)
        beta = 0.2 * torch.randn(c, generator=g, dtype=torch.float64)
        mean = 0.3 * torch.randn(c, generator=g, dtype=torch.float64)
        var = 0.5 + torch.rand(c, generator=g, dtype=torch.float64)
        scale = torch.tensor([0.0] + [1.25] * (shape[0] - 1), dtype=torch.float64)
        grad_out = torch.randn(shape, generator=g, dtype=torch.float64).to(device)

        def run(dt, op_backend):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            x, res = (t.to(device, dt).contiguous(memory_format=fmt).requires_grad_(True) for t in (x64, res64))
            params = [t.to(device, dt).requires_grad_(True) for t in (gamma, beta)]
            rm, rv = mean.to(device, dt), var.to(device, dt)
            extra = {} if gelu else dict(residual=res, branch_scale=scale.to(device, dt))
            out = batch_norm_act(x, *params, rm, rv, training=training, activation="gelu" if gelu else "identity",
                                 backend=op_backend, **extra)
            return [out] + _grads(out, grad_out, [x] + params + ([] if gelu else [res])) + [rm, rv]

        names = ("out", "dx", "dbn_weight", "dbn_bias") + (() if gelu else ("dresidual",)) + ("running_mean",
                                                                                               "running_var")
        err, worst = _worst(zip(names, run(dtype, backend), run(torch.float64, "eager")))
        results.append(Result("batch_norm_act", backend, str(dtype).replace("torch.", ""), name, err, worst,
                              TOLERANCE[dtype]))
    return results


MAX_POOL_CASES = (
    # name, shape [B, C, H, W], channels_last, integer values (ties in most windows)
    ("9x7 C6", (2, 6, 9, 7), False, False),
    ("9x7 C6 ties NHWC", (2, 6, 9, 7), True, True),
)


def verify_max_pool2d(backend: str, dtype: torch.dtype, device: torch.device) -> List[Result]:
    results = []
    for name, shape, channels_last, ties in MAX_POOL_CASES:
        g = torch.Generator(device="cpu").manual_seed(3)
        x64 = (torch.randint(-2, 3, shape, generator=g).double() if ties
               else torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).double()
        grad_out = torch.randn(shape[0], shape[1], 5, 4, generator=g, dtype=torch.float64).to(device)

        def run(dt, op_backend):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            x = x64.to(device, dt).contiguous(memory_format=fmt).requires_grad_(True)
            out = max_pool2d(x, 3, 2, 1, backend=op_backend)
            return [out] + _grads(out, grad_out, [x])

        err, worst = _worst(zip(("out", "dx"), run(dtype, backend), run(torch.float64, "eager")))
        results.append(Result("max_pool2d", backend, str(dtype).replace("torch.", ""), name, err, worst,
                              TOLERANCE[dtype]))
    return results


def run_verify(device: Optional[str] = None, dtypes: Optional[List[torch.dtype]] = None,
               backends: Optional[List[str]] = None, notes: Optional[List[str]] = None) -> List[Result]:
    """Run the checks; ``backends`` narrows them (default: all usable). Combinations that
    cannot run here are described in ``notes`` rather than checked."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtypes is None:
        dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
    notes = [] if notes is None else notes
    wanted = list(backends or dispatch.BACKENDS)
    results: List[Result] = []
    with exact_fp32():
        for op, verify_op in (("rel_bias_attention", verify_rel_bias_attention), ("dwconv_bn_gelu", verify_dwconv_bn_gelu),
                              ("batch_norm_act", verify_batch_norm_act), ("max_pool2d", verify_max_pool2d)):
            for backend in wanted:
                why = dispatch.why_not(op, backend)
                if why:
                    notes.append(f"{op} on {backend}: not checked, " + "; ".join(why))
                    continue
                for dtype in dtypes:
                    results += verify_op(backend, dtype, device)
        for backend in wanted:
            if any(not dispatch.why_not(op, backend) for op in dispatch.ops()):
                # The whole model in low precision compounds errors over every layer; its
                # mixed-precision parity belongs to training tests. fp32 here. Ops the
                # backend cannot run stay on eager (named in the case).
                results += verify_model(backend, torch.float32, device)
            else:
                notes.append(f"model on {backend}: not checked, none of its fused ops is usable here")
    return results


def format_results(results: List[Result]) -> str:
    header = ("check", "backend", "dtype", "case", "rel err", "tolerance", "worst", "result")
    rows = [(r.check, r.backend, r.dtype, r.case, f"{r.error:.2e}", f"{r.tolerance:.0e}", r.worst, "ok" if r.ok else "MISMATCH")
            for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
