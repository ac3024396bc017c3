"""Whole-model throughput: training step and inference, images/s and peak memory.

Providers: the reference model on eager (the seed model, weight for weight), the same under
torch.compile, timm's CoAtNet-0 when timm is installed, and the reference model on each fused
backend that is usable here. On a GPU the default is the issue's setting (CoAtNet-0 at
224x224, batch 128, bf16 autocast, channels_last); ``--smoke`` runs a tiny size anywhere.

    PYTHONPATH=. python bench/bench_model.py --out bench/results/model_<device>.json
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

# Run from a checkout: the bench helpers and the package beside them.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _common import environment, write_json  # noqa: E402

import coatnet_fast  # noqa: E402
from coatnet_fast.ops import dispatch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(provider: str, args) -> torch.nn.Module:
    if provider == "timm":
        import timm

        return timm.create_model("coatnet_0_rw_224", num_classes=1000)
    kwargs = dict(image_size=args.image_size, num_classes=1000)
    if args.smoke:
        kwargs.update(num_blocks=(1, 1, 1, 1, 1), channels=(16, 24, 32, 64, 96))
    model = coatnet_fast.create_model(args.model, **kwargs)
    if provider.startswith("backend:"):
        # The ops this backend has kernels for; the others stay on eager.
        backend = provider.split(":")[1]
        coatnet_fast.set_backend(model, backend, [op for op in dispatch.ops() if not dispatch.why_not(op, backend)])
    return model


def timed(fn, device, warmup: int, steps: int) -> float:
    """Seconds per step: CUDA events on a GPU, wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def measure(provider: str, mode: str, args, device) -> dict:
    model = build(provider.replace(":compile", ""), args).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    dtype = DTYPES[args.dtype]
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device).to(memory_format=memory_format)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    runner = torch.compile(model) if provider.endswith(":compile") or provider == "compile" else model

    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))

        def step():
            with autocast:
                loss = F.cross_entropy(runner(x), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                runner(x)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()  # first call: compile time for compiled providers
    first = time.perf_counter() - t0
    seconds = timed(step, device, args.warmup, args.steps)
    result = {
        "provider": provider, "mode": mode, "ms_per_step": seconds * 1e3,
        "images_per_s": args.batch / seconds, "first_call_s": first,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="coatnet_0")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--providers", default="eager,compile,timm,fused",
                   help="comma list of eager, compile, timm, fused (every usable fused backend, eager and compiled)")
    p.add_argument("--modes", default="train,infer")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny model, batch 2, 64x64, fp32: checks that the script runs")
    p.add_argument("--out", help="JSON path (default: bench/results/model_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.batch, args.image_size, args.dtype, args.warmup, args.steps = 2, 64, "fp32", 1, 2

    providers = []
    for name in args.providers.split(","):
        if name == "fused":
            usable = [b for b in dispatch.BACKENDS if b != "eager" and any(not dispatch.why_not(op, b) for op in dispatch.ops())]
            providers += [f"backend:{b}" for b in usable] + [f"backend:{b}:compile" for b in usable]
        elif name == "timm":
            try:
                import timm  # noqa: F401
            except ImportError:
                print("timm is not installed: skipping the timm provider")
                continue
            if args.smoke:
                continue
            providers.append(name)
        else:
            providers.append(name)

    payload = {"benchmark": "model", "env": environment(), "config": {k: v for k, v in vars(args).items() if k != "out"},
               "results": []}
    out = Path(args.out or Path(__file__).parent / "results" / f"model_{device.type}.json")
    for provider in providers:
        for mode in args.modes.split(","):
            try:
                r = measure(provider, mode, args, device)
            except Exception as e:  # one broken provider must not hide the others' numbers
                traceback.print_exc()
                r = {"provider": provider, "mode": mode, "error": f"{type(e).__name__}: {e}"[:500]}
            payload["results"].append(r)
            write_json(out, payload)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = {r["mode"]: r["images_per_s"] for r in payload["results"] if r["provider"] == "eager" and "images_per_s" in r}
    for r in payload["results"]:
        if r.get("mode") in base and "images_per_s" in r:
            r["speedup_vs_eager"] = r["images_per_s"] / base[r["mode"]]
    write_json(out, payload)
    print(f"wrote {out}")
    return 1 if any("error" in r for r in payload["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
