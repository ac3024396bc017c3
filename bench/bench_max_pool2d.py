"""max_pool2d: forward and forward+backward at CoAtNet-0's downsampling pools (3 / 2 / 1 window).

Where CoAtNet pools (batch 128 at 224x224, channels_last):
- ``s1 112x112 C64``: MBConv's shortcut at the start of S1 (its backward alone took 0.729 ms
  of the compiled fused training step on an H200);
- ``s2 56x56 C96``: the same at the start of S2;
- ``s3 28x28 C192`` and ``s4 14x14 C384``: both branches of the first Transformer block.
Providers (each checked against float64 ``F.max_pool2d``, output and gradient, before it is
timed): ``eager`` (``F.max_pool2d``: the seed's module, int64 indices), ``compile``
(``torch.compile`` of the same, GPU only: Inductor's kernels, what the compiled model runs) and
each usable fused backend. Reports ms and GB/s over the fewest bytes the op must move (forward:
x read, y written, plus the index the backward needs, one byte an output here; backward: dy and
the index read, dx written), and that as a fraction of the copy bandwidth.

    PYTHONPATH=. python bench/bench_max_pool2d.py --out bench/results/max_pool2d_<gpu>.json
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
    add_speedups, fresh_leaves, relative_errors, report, start_payload, timed_passes, with_compiled_peer)

from coatnet_fast.ops import dispatch, max_pool2d  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (label, H, W, channels) of CoAtNet-0's pool inputs at 224x224.
SHAPES = [("s1 112x112 C64", 112, 112, 64), ("s2 56x56 C96", 56, 56, 96), ("s3 28x28 C192", 28, 28, 192),
          ("s4 14x14 C384", 14, 14, 384)]
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def eager_op(x):
    return F.max_pool2d(x, 3, 2, 1)


def providers(device):
    fns = with_compiled_peer(eager_op, device)
    for backend in dispatch.BACKENDS:
        if backend != "eager" and not dispatch.why_not("max_pool2d", backend):
            fns[backend] = lambda x, _b=backend: max_pool2d(x, 3, 2, 1, backend=_b)
    return fns


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--smoke", action="store_true", help="batch 2, 9x9, 16 channels, fp32")
    p.add_argument("--out", help="JSON path (default: bench/results/max_pool2d_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [("smoke 9x9 C16", 9, 9, 16)] if args.smoke else SHAPES
    if args.smoke:
        args.batch, args.dtype = 2, "fp32"
    dtype = DTYPES[args.dtype]
    elem = torch.finfo(dtype).bits // 8
    out_path, bandwidth, payload = start_payload("max_pool2d", args, device)
    failed = False
    for label, height, width, channels in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, channels, height, width, generator=g).to(device, dtype).contiguous(
            memory_format=torch.channels_last).requires_grad_(True)
        ho, wo = (height - 1) // 2 + 1, (width - 1) // 2 + 1
        grad_out = torch.randn(args.batch, channels, ho, wo, generator=g).to(device, dtype).contiguous(
            memory_format=torch.channels_last)
        in_bytes, out_elems = x.numel() * elem, args.batch * channels * ho * wo
        moved = {"fwd": in_bytes + out_elems * (elem + 1)}
        moved["fwd+bwd"] = moved["fwd"] + out_elems * (elem + 1) + in_bytes
        ref_x = x.detach().double().requires_grad_(True)
        ref_out = eager_op(ref_x)
        ref = (ref_out,) + torch.autograd.grad(ref_out, ref_x, grad_out.double())
        rows = []
        for name, fn in providers(device).items():
            try:
                out = fn(x)
                errors = relative_errors(("out", "dx"), (out,) + torch.autograd.grad(out, x, grad_out), ref)

                def forward():
                    with torch.no_grad():
                        fn(x)

                def forward_backward():
                    (leaf,) = fresh_leaves([x])
                    torch.autograd.grad(fn(leaf), leaf, grad_out)

                rows += timed_passes(forward, forward_backward, moved, bandwidth, device, provider=name,
                                     correct=all(e <= TOLERANCE[dtype] for e in errors.values()), rel_errors=errors)
            except Exception as e:  # a provider that cannot run is reported, not fatal
                traceback.print_exc()
                rows.append({"provider": name, "error": f"{type(e).__name__}: {e}"[:400]})
        add_speedups(rows)
        failed |= report(rows, payload, out_path, shape=label, batch=args.batch, dtype=args.dtype,
                         layout="channels_last")
    print(f"wrote {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
