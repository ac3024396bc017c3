"""Host time per call of the fused ops with their real kernel launches, and where it goes.

The op benchmarks time the kernels (CUDA graphs) and a call with its host work; when the host
work is the longer, a model step waits on Python, not on the GPU. This runs each op at a tiny
size, where its kernels take a few microseconds, so a call's time is its host time: Python,
Triton's launcher, and each small torch op's dispatch and launch. Beside them, for scale, the
cost of an empty Triton kernel's launch (1 and 24 arguments), of one small torch op, and of the
eager modules the fused ops replace. Then cProfile of each op path: the functions with the most
own time per call, so a change can aim at them. (bench_dispatch_overhead.py stubs the kernels
out instead, to time the Python around them on any machine.)

    PYTHONPATH=. python bench/bench_host_overhead.py --out bench/results/host_overhead_h100.json
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _common import environment, host_us, write_json  # noqa: E402

from coatnet_fast.ops import batch_norm_act, dwconv_bn_gelu, rel_bias_attention  # noqa: E402
from coatnet_fast.ops.rel_bias_attention import table_rows  # noqa: E402


def _empty_kernels():
    import triton

    global tl  # Triton resolves a kernel's names in its module's globals
    import triton.language as tl

    @triton.jit
    def one_arg(X):
        pass

    @triton.jit
    def many_args(A, B, C, D, E, F, G, H, s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, n0, n1,
                  K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr):
        pass

    return one_arg, many_args


def calibration(device):
    """name -> call: what one launch and one small torch op cost this host."""
    t = torch.randn(64, device=device)
    ints = list(range(3, 15))
    calls = {"torch add (one small op)": lambda: torch.add(t, 1.0)}
    if device.type == "cuda":
        one_arg, many_args = _empty_kernels()
        calls["triton launch, 1 argument"] = lambda: one_arg[(1,)](t)
        calls["triton launch, 24 arguments"] = lambda: many_args[(1,)](t, t, t, t, t, t, t, t, *ints[:10], *ints[10:12],
                                                                       K0=16, K1=32, K2=True, K3=False)
    return calls


def op_calls(device, dtype):
    """name -> (forward, inputs taking gradients or None): each fused op's eager path on the
    triton backend, channels_last, and the eager modules it replaces, at tiny sizes."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, grad=False, cl=False):
        t = torch.randn(*shape, generator=g).to(device, dtype)
        if cl:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(grad)

    x = rand(2, 32, 8, 8, grad=True, cl=True)
    weight = torch.nn.Parameter(torch.randn(32, 1, 3, 3, generator=g).to(device))
    bn = torch.nn.BatchNorm2d(32).to(device)
    q, k, v = (rand(2, 2, 49, 32, grad=True) for _ in range(3))
    table = torch.nn.Parameter(torch.randn(table_rows((7, 7)), 2, generator=g).to(device))
    act = torch.nn.GELU()
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False).to(device, dtype)

    def bna(training):
        return lambda: batch_norm_act(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, training=training,
                                      backend="triton")

    def dw(training):
        return lambda: dwconv_bn_gelu(x, weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                      training=training, backend="triton")

    def eager_bn_gelu(training):
        return lambda: act(bn.train(training)(x))

    def eager_dw(training):
        return lambda: act(bn.train(training)(conv(x)))

    return {
        "batch_norm_act eval": (bna(False), None),
        "batch_norm_act train": (bna(True), (x, bn.weight, bn.bias)),
        "eager BatchNorm2d + GELU eval": (eager_bn_gelu(False), None),
        "eager BatchNorm2d + GELU train": (eager_bn_gelu(True), (x, bn.weight, bn.bias)),
        "dwconv_bn_gelu eval": (dw(False), None),
        "dwconv_bn_gelu train": (dw(True), (x, weight, bn.weight, bn.bias)),
        "eager Conv2d(dw) + BatchNorm2d + GELU eval": (eager_dw(False), None),
        "eager Conv2d(dw) + BatchNorm2d + GELU train": (eager_dw(True), (x, conv.weight, bn.weight, bn.bias)),
        "rel_bias_attention": (lambda: rel_bias_attention(q, k, v, table, (7, 7), backend="triton"),
                               (q, k, v, table)),
    }


def profile(fn, repeats: int, top: int):
    """The ``top`` functions by own time per call under cProfile (which slows Python itself,
    so read shares, not sums)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(repeats):
        fn()
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [{"function": f"{Path(file).name}:{line}({name})", "calls_per_call": round(nc / repeats, 2),
             "own_us_per_call": round(tt / repeats * 1e6, 2)}
            for (file, line, name), (cc, nc, tt, ct, callers) in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--top", type=int, default=14, help="functions listed per profile")
    p.add_argument("--smoke", action="store_true", help="a few calls only (CPU, TRITON_INTERPRET=1)")
    p.add_argument("--out", help="JSON path (default: bench/results/host_overhead_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.smoke or device.type == "cpu":
        args.repeats, dtype = (1 if args.smoke else args.repeats), torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timing = dict(rounds=1, warmup=0) if args.smoke else {}

    def timed(fn, repeats, sync):
        return host_us(fn, repeats, sync, **timing)

    out_path = Path(args.out or Path(__file__).parent / "results" / f"host_overhead_{device.type}.json")
    payload = {"benchmark": "host_overhead", "env": environment(),
               "config": {k: v for k, v in vars(args).items() if k != "out"} | {"dtype": str(dtype)},
               "calibration": [], "results": []}
    for name, fn in calibration(device).items():
        row = {"call": name, "us": timed(fn, args.repeats, sync)}
        payload["calibration"].append(row)
        print(f"{name:50s} {row['us']:8.1f} us", flush=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for name, (forward, inputs) in op_calls(device, dtype).items():
            row = {"op": name}
            if inputs is None:
                with torch.inference_mode():
                    row["fwd_us"] = timed(forward, args.repeats, sync)
                    row["profile_fwd"] = profile(forward, args.repeats, args.top)
            else:
                def forward_backward(forward=forward, inputs=inputs):
                    out = forward()
                    torch.autograd.grad(out, inputs, out)
                row["fwd_us"] = timed(forward, args.repeats, sync)
                row["fwd_bwd_us"] = timed(forward_backward, args.repeats, sync)
                row["profile_fwd_bwd"] = profile(forward_backward, args.repeats, args.top)
            payload["results"].append(row)
            print(f"{name:50s} fwd {row['fwd_us']:8.1f} us" +
                  (f"  fwd+bwd {row['fwd_bwd_us']:8.1f} us" if "fwd_bwd_us" in row else ""), flush=True)
            for entry in (row.get("profile_fwd") or row.get("profile_fwd_bwd"))[:6]:
                print(f"    {entry['own_us_per_call']:7.1f} us  x{entry['calls_per_call']:<5} {entry['function']}")
    write_json(out_path, payload)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
