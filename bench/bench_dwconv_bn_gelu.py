"""dwconv_bn_gelu: forward and forward+backward at CoAtNet-0 MBConv shapes, train and eval.

Providers (each checked against an fp32 eager computation, output and all gradients, before
it is timed):
- ``eager``: ``F.conv2d`` (depthwise) + ``F.batch_norm`` + ``F.gelu``, the seed's Sequential;
- ``compile``: ``torch.compile`` of those same three ops;
- ``triton`` (and any other usable fused backend): this package.
Reports ms, GB/s over the fewest bytes the op must move (x read and y written forward; plus
dy read and dx written backward) and that as a fraction of the measured copy bandwidth.

    PYTHONPATH=. python bench/bench_dwconv_bn_gelu.py --out bench/results/dwconv_bn_gelu_<gpu>.json
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

from coatnet_fast.kernels import dwconv_bn_gelu as kernels  # noqa: E402
from coatnet_fast.ops import dispatch, dwconv_bn_gelu  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# CoAtNet-0 MBConv depthwise convs at 224x224: (label, H, W, hidden channels).
SHAPES = [("s1 56x56 C384", 56, 56, 384), ("s2 28x28 C384", 28, 28, 384), ("s2 28x28 C768", 28, 28, 768)]


def eager_op(x, w, g, b, rm, rv, training):
    y = F.conv2d(x, w.to(x.dtype), None, 1, 1, 1, x.shape[1])
    return F.gelu(F.batch_norm(y, rm, rv, g, b, training, 0.1, 1e-5))


def providers(device, tiles=(), variants=()):
    """name -> fn; ``triton@PxCxW`` runs the triton backend with forced tiles (``use_tiles``),
    ``triton@<variant>`` with one of ``configure``'s variants (backward paths, row-streaming knobs)."""
    fns = with_compiled_peer(eager_op, device)  # providers() is called per shape and mode
    for backend in dispatch.BACKENDS:
        if backend != "eager" and not dispatch.why_not("dwconv_bn_gelu", backend):
            fns[backend] = (lambda x, w, g, b, rm, rv, training, _b=backend:
                            dwconv_bn_gelu(x, w, g, b, rm, rv, training=training, backend=_b))
    fns = with_tiles(fns, tiles)
    if "triton" in fns:
        for variant in variants:
            fns[f"triton@{variant}"] = fns["triton"]
    return fns


_DEFAULTS = {name: getattr(kernels, name) for name in ("DZ_PATH", "ROW_BACKWARD_MAX_WIDTH", "PREFETCH_ROWS",
                                                   "ROW_ELEMENTS_PER_THREAD", "ROW_MAXNREG", "L2_AHEAD_ROWS",
                                                   "ROW_BANDS")}


def configure(provider: str) -> None:
    """The kernel module's knobs for a provider, left set for its whole timed step: ``@scratch``
    the backward's dz in a per-program scratch (DZ_PATH), ``@flattened`` the flattened backward
    (ROW_BACKWARD_MAX_WIDTH 0), ``@bwdCxW`` the row backward's channel block and warps
    (FORCED_ROW_BACKWARD_TILES), ``@noprefetch`` the row-streaming kernels without their loads
    one row ahead (PREFETCH_ROWS), ``@rowsN`` N tile elements a thread in them
    (ROW_ELEMENTS_PER_THREAD), ``@maxnregN`` their register cap (ROW_MAXNREG), ``@l2aheadN`` their
    L2 prefetch N row steps ahead (L2_AHEAD_ROWS; ``l2ahead0``: none), ``@bandsN`` their images
    split into N bands of rows (ROW_BANDS; ``bandsauto``: as many as fill the GPU), ``@PxCxW`` forced
    tiles (``use_tiles``); else the defaults."""
    for name, value in _DEFAULTS.items():
        setattr(kernels, name, value)
    kernels.FORCED_ROW_BACKWARD_TILES = None
    variant = provider.split("@")[1] if "@" in provider else ""
    use_tiles(kernels, provider if variant[:1].isdigit() else "")
    if variant == "scratch":
        kernels.DZ_PATH = "scratch"
    elif variant == "flattened":
        kernels.ROW_BACKWARD_MAX_WIDTH = 0
    elif variant == "noprefetch":
        kernels.PREFETCH_ROWS = False
    elif variant.startswith("rows") and variant[4:].isdigit():
        kernels.ROW_ELEMENTS_PER_THREAD = int(variant[4:])
    elif variant.startswith("maxnreg") and variant[7:].isdigit():  # maxnreg0: no cap
        kernels.ROW_MAXNREG = int(variant[7:]) or None
    elif variant.startswith("l2ahead") and variant[7:].isdigit():
        kernels.L2_AHEAD_ROWS = int(variant[7:])
    elif variant == "bandsauto":
        kernels.ROW_BANDS = None
    elif variant.startswith("bands") and variant[5:].isdigit():
        kernels.ROW_BANDS = int(variant[5:])
    elif variant.startswith("bwd"):
        kernels.FORCED_ROW_BACKWARD_TILES = tuple(int(v) for v in variant[len("bwd"):].split("x"))
    elif variant and not variant[:1].isdigit():
        raise ValueError(f"unknown triton variant {variant!r} in provider {provider!r}")


def make_inputs(batch, channels, height, width, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=g).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    params = [(torch.randn(channels, 1, 3, 3, generator=g) / 3).to(device), (1 + 0.1 * torch.randn(channels, generator=g)).to(device),
              (0.1 * torch.randn(channels, generator=g)).to(device)]
    params = [p.requires_grad_(True) for p in params]  # fp32 master parameters, as under autocast
    stats = [(0.1 * torch.randn(channels, generator=g)).to(device), (0.5 + torch.rand(channels, generator=g)).to(device)]
    # channels_last, as the model's backward hands it over (a layout the kernels do not follow
    # would cost a copy; these files' results before 2026-11-27's third session had NCHW here).
    grad_out = torch.randn(batch, channels, height, width, generator=g).to(device, dtype).contiguous(
        memory_format=torch.channels_last)
    return x, params, stats, grad_out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--modes", default="train,eval")
    p.add_argument("--tiles", default="", help="also time the triton backend at these tiles, e.g. 16x64x4,32x64x8 "
                   "(BLOCK_P x BLOCK_C x num_warps)")
    p.add_argument("--variants", default="", help="also time the triton backend's variants (backward paths, row-streaming knobs), e.g. "
                   "scratch,flattened,noprefetch,bwd16x4 (see configure)")
    p.add_argument("--smoke", action="store_true", help="batch 2, 8x8, 16 channels, fp32")
    p.add_argument("--out", help="JSON path (default: bench/results/dwconv_bn_gelu_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [("smoke 8x8 C16", 8, 8, 16)] if args.smoke else SHAPES
    if args.smoke:
        args.batch, args.dtype = 2, "fp32"
    dtype = DTYPES[args.dtype]
    elem = torch.finfo(dtype).bits // 8
    out_path, bandwidth, payload = start_payload("dwconv_bn_gelu", args, device)
    failed = False
    for label, height, width, channels in shapes:
        x, params, pristine, grad_out = make_inputs(args.batch, channels, height, width, dtype, device)
        stats = [t.clone() for t in pristine]  # the timed runs update these in place
        inputs = [x] + params
        activation_bytes = x.numel() * elem
        for mode in args.modes.split(","):
            training = mode == "train"
            ref_in = [t.detach().float().requires_grad_(True) for t in inputs]
            ref_stats = [t.clone() for t in pristine]
            ref_out = eager_op(*ref_in, *ref_stats, training)
            ref = (ref_out,) + torch.autograd.grad(ref_out, ref_in, grad_out.float())
            tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
            rows = []
            for name, fn in providers(device, [t for t in args.tiles.split(",") if t],
                                      [v for v in args.variants.split(",") if v]).items():
                configure(name)
                try:
                    run_stats = [t.clone() for t in pristine]
                    out = fn(x, *params, *run_stats, training)
                    grads = torch.autograd.grad(out, inputs, grad_out)
                    errors = relative_errors(("out", "dx", "dweight", "dgamma", "dbeta"), (out,) + grads, ref)
                    if training:
                        errors.update(relative_errors(("running_mean", "running_var"), run_stats, ref_stats))

                    def forward():
                        with torch.no_grad():
                            fn(x, *params, *stats, training)

                    def forward_backward():
                        leaves = fresh_leaves(inputs)
                        torch.autograd.grad(fn(*leaves, *stats, training), leaves, grad_out)

                    # Fewest bytes: x read and y written forward; dy read and dx written backward.
                    moved = {"fwd": 2 * activation_bytes, "fwd+bwd": 5 * activation_bytes}
                    rows += timed_passes(forward, forward_backward, moved, bandwidth, device, provider=name,
                                         mode=mode, correct=all(e <= tol for e in errors.values()),
                                         rel_errors=errors)
                except Exception as e:  # a provider that cannot run is reported, not fatal
                    traceback.print_exc()
                    rows.append({"provider": name, "mode": mode, "error": f"{type(e).__name__}: {e}"[:400]})
            configure("")
            add_speedups(rows)
            failed |= report(rows, payload, out_path, shape=label, batch=args.batch, dtype=args.dtype,
                             layout="channels_last")
    print(f"wrote {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
