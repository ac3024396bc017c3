"""Host time per call of the triton backend's two call paths, with the kernels stubbed out, and of
the eager ops the BatchNorm fusions replace (at a size where their kernels cost nothing).

The fused ops reach their kernel launchers either through their torch.library custom ops (what
torch.compile traces) or, for plain eager calls, through a torch.autograd.Function
(``dispatch.eager_fast_path``). This times what each path adds around the kernels: argument
checks, backend selection, autograd and the custom-op machinery. The launchers are replaced by
functions that only allocate the outputs, so the figures hold on any machine and say nothing
about the kernels themselves (bench/profile_ops.py measures those on a GPU).

    PYTHONPATH=. python bench/bench_dispatch_overhead.py --out bench/results/dispatch_overhead_cpu.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _common import environment, host_us, write_json  # noqa: E402

from coatnet_fast.kernels import batch_norm_act as bna_kernels  # noqa: E402
from coatnet_fast.kernels import dwconv_bn_gelu as dw_kernels  # noqa: E402
from coatnet_fast.kernels import rel_bias_attention as attn_kernels  # noqa: E402
from coatnet_fast.ops import batch_norm_act, dispatch, dwconv_bn_gelu, rel_bias_attention  # noqa: E402
from coatnet_fast.ops.rel_bias_attention import table_rows  # noqa: E402

STUBS = {
    attn_kernels: {
        "rel_bias_attention_fwd": lambda q, k, v, table, h, w, scale: (
            torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)),
        "rel_bias_attention_bwd": lambda do, q, k, v, table, o, lse, h, w, scale: (
            torch.empty_like(q), torch.empty_like(q), torch.empty_like(q), torch.empty_like(table)),
    },
    dw_kernels: {
        "batch_stats": lambda x, weight, stride, running=None: (x.new_zeros(x.shape[1], dtype=torch.float32),
                                                  x.new_ones(x.shape[1], dtype=torch.float32)),
        "apply": lambda x, weight, mean, rstd, gamma, beta, stride, pool: (
            torch.empty_like(x), x.new_empty(x.shape[:2] if pool else (0,), dtype=torch.float32)),
        "backward": lambda dy, dpool, x, weight, gamma, beta, mean, rstd, stride, training: (
            torch.empty_like(x), weight.new_empty(weight.shape, dtype=torch.float32),
            gamma.new_empty(gamma.shape, dtype=torch.float32), beta.new_empty(beta.shape, dtype=torch.float32)),
    },
    bna_kernels: {
        "batch_stats": lambda x, running=None: (x.new_zeros(x.shape[1], dtype=torch.float32),
                                  x.new_ones(x.shape[1], dtype=torch.float32)),
        "apply": lambda x, mean, rstd, gamma, beta, gelu, residual, branch_scale, out_dtype: torch.empty_like(
            x, dtype=out_dtype),
        "backward": lambda dy, x, gamma, beta, mean, rstd, gelu, branch_scale, training: (
            torch.empty_like(x), gamma.new_empty(gamma.shape, dtype=torch.float32),
            beta.new_empty(beta.shape, dtype=torch.float32)),
    },
}


def calls(device):
    """op -> (forward, inputs that take gradients), at sizes where the stubs cost nothing."""
    q, k, v = (torch.randn(2, 2, 9, 16, device=device, requires_grad=True) for _ in range(3))
    table = torch.nn.Parameter(torch.randn(table_rows((3, 3)), 2, device=device))
    x = torch.randn(2, 8, 6, 6, device=device, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(8, 1, 3, 3, device=device))
    bn = torch.nn.BatchNorm2d(8).to(device)
    return {
        "rel_bias_attention": (lambda: rel_bias_attention(q, k, v, table, (3, 3), backend="triton"), (q, k, v, table)),
        "dwconv_bn_gelu (train)": (lambda: dwconv_bn_gelu(x, weight, bn.weight, bn.bias, bn.running_mean,
                                                          bn.running_var, training=True, backend="triton"),
                                   (x, weight, bn.weight, bn.bias)),
        "batch_norm_act (train)": (lambda: batch_norm_act(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                                          training=True, backend="triton"),
                                   (x, bn.weight, bn.bias)),
        "batch_norm_act (eval)": (lambda: batch_norm_act(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                                         training=False, backend="triton"),
                                  (x, bn.weight, bn.bias)),
    }


def eager_calls(device):
    """What the fused ops replace, run as eager torch ops at the same sizes (tiny, so the time is
    the host's): the seed's BatchNorm2d + GELU, in training and in eval."""
    x = torch.randn(2, 8, 6, 6, device=device, requires_grad=True)
    bn = torch.nn.BatchNorm2d(8).to(device)
    act = torch.nn.GELU()
    return {f"eager BatchNorm2d + GELU ({mode})": (lambda training=training: act(bn.train(training)(x)),
                                                   (x, bn.weight, bn.bias))
            for mode, training in (("train", True), ("eval", False))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=400)
    p.add_argument("--smoke", action="store_true", help="a few calls only")
    p.add_argument("--out", help="JSON path (default: bench/results/dispatch_overhead_<device>.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.repeats = 5
    device = torch.device("cpu")
    if dispatch.why_not("rel_bias_attention", "triton"):
        p.error("the triton backend is not usable here (set TRITON_INTERPRET=1 on a CPU)")
    out_path = Path(args.out or Path(__file__).parent / "results" / f"dispatch_overhead_{device.type}.json")
    payload = {"benchmark": "dispatch_overhead", "env": environment(),
               "config": {k: v for k, v in vars(args).items() if k != "out"}, "results": []}
    saved = {(module, name): getattr(module, name) for module, stubs in STUBS.items() for name in stubs}
    fast_path = dispatch.eager_fast_path
    try:
        for module, stubs in STUBS.items():
            for name, stub in stubs.items():
                setattr(module, name, stub)
        for op, (forward, inputs) in calls(device).items():
            def forward_backward(forward=forward, inputs=inputs):
                out = forward()
                torch.autograd.grad(out, inputs, out)
            row = {"op": op}
            for path, use_fast in (("custom_op", False), ("autograd_function", True)):
                dispatch.eager_fast_path = fast_path if use_fast else (lambda *tensors: False)
                row[f"{path}_fwd_us"] = host_us(forward, args.repeats)
                row[f"{path}_fwd_bwd_us"] = host_us(forward_backward, args.repeats)
            dispatch.eager_fast_path = fast_path
            payload["results"].append(row)
            print({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        for op, (forward, inputs) in eager_calls(device).items():
            def forward_backward(forward=forward, inputs=inputs):
                out = forward()
                torch.autograd.grad(out, inputs, out)
            row = {"op": op, "eager_fwd_us": host_us(forward, args.repeats),
                   "eager_fwd_bwd_us": host_us(forward_backward, args.repeats)}
            payload["results"].append(row)
            print({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    finally:
        dispatch.eager_fast_path = fast_path
        for (module, name), fn in saved.items():
            setattr(module, name, fn)
    write_json(out_path, payload)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
