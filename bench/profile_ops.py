"""Where the time of each fused op, and of a CoAtNet-0 step, goes: GPU kernels, host, gaps.

For every op (and ``model``: a training step and an inference forward of CoAtNet-0 on each
backend), shape, provider and pass (forward, forward+backward) this records
- ``host_us``: Python and launch time to issue one step, the GPU queue left to drain;
- ``wall_us``: one step, back to back, synchronised at the end (no cache flush between steps);
- ``kernel_us``: the sum of the GPU kernels of one step, from torch.profiler, and each kernel's
  share (name, calls and microseconds per step);
- ``top_cpu_ops``: the host operators with the most self time per step.
When wall_us is well above kernel_us the step is host-bound or launch-bound, and faster kernels
will not show in the op benchmarks; when they agree, the kernel list says which one to work on.
On a CPU (``--smoke``) only host figures exist: Triton runs in its interpreter there.

    PYTHONPATH=. python bench/profile_ops.py --out bench/results/profile_ops_h100.json
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import bench_batch_norm_act as bna_bench  # noqa: E402
import bench_dwconv_bn_gelu as dw_bench  # noqa: E402
import bench_rel_bias_attention as attn_bench  # noqa: E402
from _common import environment, write_json  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPS = ("rel_bias_attention", "dwconv_bn_gelu", "batch_norm_act", "model")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_step(step, device, iters: int) -> dict:
    for _ in range(3):  # compiles, autotunes, fills the allocator's cache
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    issued = time.perf_counter()
    _sync(device)
    done = time.perf_counter()

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        _sync(device)
    kernels = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            calls, us = kernels.get(event.name, (0, 0.0))
            kernels[event.name] = (calls + 1, us + event.time_range.elapsed_us())
    kernel_list = sorted(({"name": name[:160], "calls_per_iter": calls / iters, "us_per_iter": us / iters}
                          for name, (calls, us) in kernels.items()), key=lambda k: -k["us_per_iter"])
    cpu_ops = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0),
                     key=lambda e: -e.self_cpu_time_total)[:12]
    return {
        "host_us": (issued - start) / iters * 1e6,
        "wall_us": (done - start) / iters * 1e6,
        "kernel_us": sum(k["us_per_iter"] for k in kernel_list) if device.type == "cuda" else None,
        "kernels": kernel_list,
        "top_cpu_ops": [{"name": e.key[:120], "calls_per_iter": e.count / iters,
                         "self_us_per_iter": e.self_cpu_time_total / iters} for e in cpu_ops],
    }


def attention_cases(args, device, dtype):
    if args.smoke:
        cases = [(["smoke 3x3"], 3, 2)]
    else:
        cases = attn_bench.shapes(args.models.split(","), [int(s) for s in args.image_sizes.split(",")])
    for labels, side, heads in cases:
        inputs, grad_out = attn_bench.make_inputs(args.batch, heads, side, args.head_dim, dtype, device)
        fns = attn_bench.provider_fns((side, side), device)
        for name, fn in fns.items():
            if name.startswith("flex"):  # compiled peers: their kernels are in the op benchmark's JSON
                continue
            yield f"{'/'.join(labels)} N={side * side} heads={heads}", name, "fwd", \
                lambda fn=fn: _no_grad(fn, inputs)
            yield f"{'/'.join(labels)} N={side * side} heads={heads}", name, "fwd+bwd", \
                lambda fn=fn: torch.autograd.grad(fn(*inputs), inputs, grad_out)


def dwconv_cases(args, device, dtype):
    shapes = [("smoke 8x8 C16", 8, 8, 16)] if args.smoke else dw_bench.SHAPES
    for label, height, width, channels in shapes:
        x, params, stats, grad_out = dw_bench.make_inputs(args.batch, channels, height, width, dtype, device)
        inputs = [x] + params
        for name, fn in dw_bench.providers(device).items():
            if name == "compile":
                continue
            for mode in ("train", "eval"):
                training = mode == "train"
                yield f"{label} {mode}", name, "fwd", \
                    lambda fn=fn, t=training: _no_grad(fn, [x, *params, *stats, t])
                yield f"{label} {mode}", name, "fwd+bwd", \
                    lambda fn=fn, t=training: torch.autograd.grad(fn(x, *params, *stats, t), inputs, grad_out)


def batch_norm_act_cases(args, device, dtype):
    shapes = ([("smoke 8x8 C16", part, 8, 8, 16) for part in ("expand", "projection")] if args.smoke
              else bna_bench.SHAPES)
    for label, part, height, width, channels in shapes:
        x, params, stats, residual, branch_scale, grad_out = bna_bench.make_inputs(
            args.batch, channels, height, width, dtype, device, part == "projection")
        inputs = [x] + params + ([residual] if residual is not None else [])
        for name, fn in bna_bench.providers(device).items():
            if name == "compile":
                continue
            for mode in ("train", "eval"):
                call = [x, *params, *stats, mode == "train", residual, branch_scale]
                yield f"{label} {part} {mode}", name, "fwd", lambda fn=fn, call=call: _no_grad(fn, call)
                yield f"{label} {part} {mode}", name, "fwd+bwd", \
                    lambda fn=fn, call=call: torch.autograd.grad(fn(*call), inputs, grad_out)


def model_cases(args, device, dtype):
    """A CoAtNet-0 training step (forward, cross-entropy, backward) and an inference forward,
    autocast to ``--dtype``, channels_last on a GPU: on eager and on each fused backend (the ops
    it has; the rest eager), and under torch.compile (its default mode: no CUDA graphs, so the
    host work shows beside Inductor's kernels) for each ``<backend>:compile`` that ``--providers`` names
    (``eager:compile`` the seed model). Its kernel list says which of the model's kernels the
    time is in."""
    import torch.nn.functional as F

    from coatnet_fast import benchmark

    size = 64 if args.smoke else 224
    settings = {"image_size": size, "smoke": args.smoke}
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = torch.randn(args.batch, 3, size, size, device=device).to(memory_format=memory_format)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    compiled = [p for p in filter(None, args.providers.split(",")) if p.endswith(":compile")]
    for provider in ["eager"] + benchmark.fused_backends() + compiled:
        backend = provider.removesuffix(":compile")
        net, _ = benchmark.build("eager" if backend == "eager" else f"backend:{backend}", "coatnet_0", settings)
        net = net.to(device).to(memory_format=memory_format)
        runner = torch.compile(net) if provider in compiled else net

        def train(net=net, runner=runner):
            net.train()
            with autocast:
                loss = F.cross_entropy(runner(x), target)
            loss.backward()
            net.zero_grad(set_to_none=True)

        def infer(net=net, runner=runner):
            net.eval()
            with torch.inference_mode(), autocast:
                runner(x)

        case = f"coatnet_0@{size} batch {args.batch}"
        yield case, provider, "fwd", infer
        yield case, provider, "fwd+bwd", train


def _no_grad(fn, inputs):
    with torch.no_grad():
        return fn(*inputs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--providers", default="", help="comma list (default: every one the op benchmarks time)")
    p.add_argument("--models", default="coatnet_0")
    p.add_argument("--image-sizes", default="224")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="batch 2, tiny shapes, fp32, 2 iterations")
    p.add_argument("--out", help="JSON path (default: bench/results/profile_ops_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.batch, args.dtype, args.iters, args.head_dim = 2, "fp32", 2, 16
    dtype = DTYPES[args.dtype]
    ops = args.ops.split(",")
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        p.error(f"--ops: unknown {unknown}; choose from {list(OPS)}")
    wanted = set(filter(None, args.providers.split(",")))
    out_path = Path(args.out or Path(__file__).parent / "results" / f"profile_ops_{device.type}.json")
    payload = {"benchmark": "profile_ops", "env": environment(),
               "config": {k: v for k, v in vars(args).items() if k != "out"} | {"grad_layout": "channels_last"},
               "results": []}
    failed = False
    makers = {"rel_bias_attention": attention_cases, "dwconv_bn_gelu": dwconv_cases,
              "batch_norm_act": batch_norm_act_cases, "model": model_cases}
    for op in ops:
        for case, provider, mode, step in makers[op](args, device, dtype):
            if wanted and provider not in wanted:
                continue
            row = {"op": op, "case": case, "provider": provider, "mode": mode}
            try:
                row.update(profile_step(step, device, args.iters))
            except Exception as e:  # reported, and the exit code says so
                traceback.print_exc()
                failed = True
                row["error"] = f"{type(e).__name__}: {e}"[:400]
            payload["results"].append(row)
            write_json(out_path, payload)
            top = ", ".join(f"{k['name'][:40]} {k['us_per_iter']:.0f}" for k in row.get("kernels", [])[:3])
            kernel = row.get("kernel_us")
            print(f"{op:18s} {case:34s} {provider:7s} {mode:7s} host {row.get('host_us', float('nan')):8.1f} us  "
                  f"wall {row.get('wall_us', float('nan')):8.1f} us  "
                  f"kernels {'-' if kernel is None else f'{kernel:8.1f}'} us  {row.get('error', top)}", flush=True)
    payload["autotuned"] = autotuned_configs()
    write_json(out_path, payload)
    print(f"wrote {out_path}")
    return 1 if failed else 0


def autotuned_configs() -> dict:
    """The tiles each autotuned kernel picked, per tuning key (N, D, dtypes...), for the record."""
    import triton

    from coatnet_fast.kernels import dwconv_bn_gelu, rel_bias_attention

    picked = {}
    for module in (rel_bias_attention, dwconv_bn_gelu):
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.Autotuner) and obj.cache:
                picked[f"{module.__name__.rsplit('.', 1)[-1]}.{name}"] = {str(k): str(c) for k, c in obj.cache.items()}
    return picked


if __name__ == "__main__":
    sys.exit(main())
