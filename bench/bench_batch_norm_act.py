"""batch_norm_act: forward and forward+backward at CoAtNet-0 MBConv shapes, train and eval.

The places CoAtNet uses it, after cuDNN's convs:
- ``stem``: BatchNorm + GELU after each 3x3 conv of S0 (112x112 C64);
- ``expand``: BatchNorm + GELU on MBConv's hidden activation (S1 56x56 C384, S2 28x28 C384/C768);
- ``projection``: BatchNorm, stochastic depth's per-image scale and the residual add on the
  block output (S1 56x56 C96, S2 28x28 C192).
Providers (each checked against an fp32 eager computation, output and all gradients, before
it is timed): ``eager`` (``F.batch_norm``, ``F.gelu``, mul, add: the seed's modules),
``compile`` (``torch.compile`` of the same, GPU only) and each usable fused backend.
Reports ms, GB/s over the fewest bytes the op must move (forward: x and residual read, y
written; backward: x and dy read, dx written) and that as a fraction of the copy bandwidth.
Whether the fusion pays inside the model is ``coatnet-fast bench`` with and without it
(``--skip-ops batch_norm_act``).

    PYTHONPATH=. python bench/bench_batch_norm_act.py --out bench/results/batch_norm_act_<gpu>.json
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _common import (  # noqa: E402
    add_speedups, fresh_leaves, relative_errors, report, start_payload, timed_passes, use_tiles, with_compiled_peer,
    with_tiles)

from coatnet_fast.kernels import batch_norm_act as kernels  # noqa: E402
from coatnet_fast.ops import batch_norm_act, dispatch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (label, part, H, W, channels) of CoAtNet-0 at 224x224.
SHAPES = [("s0 112x112 C64", "stem", 112, 112, 64), ("s1 56x56 C384", "expand", 56, 56, 384), ("s2 28x28 C384", "expand", 28, 28, 384),
          ("s2 28x28 C768", "expand", 28, 28, 768), ("s1 56x56 C96", "projection", 56, 56, 96),
          ("s2 28x28 C192", "projection", 28, 28, 192)]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def eager_op(x, g, b, rm, rv, training, residual, branch_scale):
    y = F.batch_norm(x, rm, rv, g, b, training, 0.1, 1e-5)
    if residual is None:
        return F.gelu(y)
    return residual + y * branch_scale.to(y.dtype).view(-1, 1, 1, 1)


def providers(device, tiles=()):
    """name -> fn; ``triton@PxCxW`` runs the triton backend with forced tiles (``use_tiles``)."""
    fns = with_compiled_peer(eager_op, device)  # providers() is called per shape and mode
    for backend in dispatch.BACKENDS:
        if backend != "eager" and not dispatch.why_not("batch_norm_act", backend):
            fns[backend] = (lambda x, g, b, rm, rv, training, residual, branch_scale, _b=backend: batch_norm_act(
                x, g, b, rm, rv, training=training, activation="gelu" if residual is None else "identity",
                residual=residual, branch_scale=branch_scale, backend=_b))
    return with_tiles(fns, tiles)


def make_inputs(batch, channels, height, width, dtype, device, projection, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def act():
        t = torch.randn(batch, channels, height, width, generator=g).to(device, dtype)
        return t.contiguous(memory_format=torch.channels_last).requires_grad_(True)

    x = act()
    params = [(1 + 0.1 * torch.randn(channels, generator=g)).to(device).requires_grad_(True),
              (0.1 * torch.randn(channels, generator=g)).to(device).requires_grad_(True)]  # fp32 masters
    stats = [(0.1 * torch.randn(channels, generator=g)).to(device), (0.5 + torch.rand(channels, generator=g)).to(device)]
    residual = act() if projection else None
    branch_scale = ((torch.rand(batch, generator=g) < 0.9).float() / 0.9).to(device, dtype) if projection else None
    # channels_last, as the model's backward hands it over (a layout the kernels do not follow
    # would cost a copy; these files' results before 2026-11-27's third session had NCHW here).
    grad_out = torch.randn(batch, channels, height, width, generator=g).to(device, dtype).contiguous(
        memory_format=torch.channels_last)
    return x, params, stats, residual, branch_scale, grad_out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--modes", default="train,eval")
    p.add_argument("--tiles", default="", help="also time the triton backend at these tiles, e.g. 32x64x4,64x64x8 "
                   "(BLOCK_P x BLOCK_C x num_warps)")
    p.add_argument("--smoke", action="store_true", help="batch 2, 8x8, 16 channels, fp32")
    p.add_argument("--out", help="JSON path (default: bench/results/batch_norm_act_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [("smoke 8x8 C16", part, 8, 8, 16) for part in ("expand", "projection")] if args.smoke else SHAPES
    if args.smoke:
        args.batch, args.dtype = 2, "fp32"
    dtype = DTYPES[args.dtype]
    elem = torch.finfo(dtype).bits // 8
    out_path, bandwidth, payload = start_payload("batch_norm_act", args, device)
    failed = False
    for label, part, height, width, channels in shapes:
        projection = part == "projection"
        x, params, pristine, residual, branch_scale, grad_out = make_inputs(
            args.batch, channels, height, width, dtype, device, projection)
        stats = [t.clone() for t in pristine]  # the timed runs update these in place
        inputs = [x] + params + ([residual] if projection else [])
        names = ("out", "dx", "dgamma", "dbeta") + (("dresidual",) if projection else ())
        activation_bytes = x.numel() * elem
        # Fewest bytes: forward reads x (and the residual) and writes y; backward reads x and dy and
        # writes dx (the residual's gradient is dy itself).
        moved = {"fwd": (3 if projection else 2) * activation_bytes}
        moved["fwd+bwd"] = moved["fwd"] + 3 * activation_bytes
        for mode in args.modes.split(","):
            training = mode == "train"
            ref_in = [t.detach().float().requires_grad_(True) for t in inputs]
            ref_stats = [t.clone() for t in pristine]
            ref_res = ref_in[3] if projection else None
            ref_scale = branch_scale.float() if projection else None
            ref_out = eager_op(*ref_in[:3], *ref_stats, training, ref_res, ref_scale)
            ref = (ref_out,) + torch.autograd.grad(ref_out, ref_in, grad_out.float())
            rows = []
            for name, fn in providers(device, [t for t in args.tiles.split(",") if t]).items():
                use_tiles(kernels, name)
                try:
                    run_stats = [t.clone() for t in pristine]
                    out = fn(x, *params, *run_stats, training, residual, branch_scale)
                    grads = torch.autograd.grad(out, inputs, grad_out)
                    errors = relative_errors(names, (out,) + grads, ref)
                    if training:
                        errors.update(relative_errors(("running_mean", "running_var"), run_stats, ref_stats))

                    def forward():
                        with torch.no_grad():
                            fn(x, *params, *stats, training, residual, branch_scale)

                    def forward_backward():
                        leaves = fresh_leaves(inputs)
                        res = leaves[3] if projection else None
                        torch.autograd.grad(fn(*leaves[:3], *stats, training, res, branch_scale), leaves, grad_out)

                    rows += timed_passes(forward, forward_backward, moved, bandwidth, device, provider=name,
                                         mode=mode, correct=all(e <= TOLERANCE[dtype] for e in errors.values()),
                                         rel_errors=errors)
                except Exception as e:  # a provider that cannot run is reported, not fatal
                    traceback.print_exc()
                    rows.append({"provider": name, "mode": mode, "error": f"{type(e).__name__}: {e}"[:400]})
            use_tiles(kernels, "")
            add_speedups(rows)
            failed |= report(rows, payload, out_path, shape=label, part=part, batch=args.batch, dtype=args.dtype,
                             layout="channels_last")
    print(f"wrote {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
