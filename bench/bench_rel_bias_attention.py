"""rel_bias_attention: forward and forward+backward at CoAtNet shapes, against the peers.

Providers (each checked against an fp32 eager computation before it is timed):
- ``eager``: the seed's formulation (``backend="eager"``): matmul, gathered bias, softmax, matmul.
- ``sdpa``: ``F.scaled_dot_product_attention`` with the gathered [1, heads, N, N] bias as a
  grad-requiring ``attn_mask``, forced onto the memory-efficient backend (the only one that
  returns the mask's gradient; PRIOR_ART.md).
- ``flex_table`` / ``flex_dense``: compiled FlexAttention with a score_mod that indexes the
  table through the relative index, or a captured dense [heads, N, N] bias; the faster of the
  two is the FlexAttention peer.
- ``triton`` (and any other usable fused backend): this package.
The gather of the bias is inside the timed region for every provider, because the table is
the parameter whose gradient training needs.

    PYTHONPATH=. python bench/bench_rel_bias_attention.py --models coatnet_0 --out bench/results/rel_bias_attention_h100.json
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
    add_ratios, bench_ms, copy_bandwidth, environment, fresh_leaves, graph_fields, write_json)

from coatnet_fast.models.registry import MODEL_CONFIGS  # noqa: E402
from coatnet_fast.ops import dispatch, rel_bias_attention, relative_position_index  # noqa: E402
from coatnet_fast.ops.rel_bias_attention import table_rows  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def shapes(models, image_sizes):
    """(model, image, stage, N, heads) for the Transformer stages S3 and S4."""
    seen = {}
    for model in models:
        cfg = MODEL_CONFIGS[model]
        heads = cfg["heads"] if isinstance(cfg["heads"], tuple) else (cfg["heads"],) * 4
        for image in image_sizes:
            for stage, down in ((3, 16), (4, 32)):
                side = image // down
                key = (side, heads[stage - 1])
                seen.setdefault(key, []).append(f"{model}@{image}:s{stage}")
    return [(labels, side, h) for (side, h), labels in seen.items()]


def make_inputs(batch, heads, side, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    n = side * side
    # The model's layout: q, k, v are strided views of one [B, N, 3 * heads * d] projection.
    qkv = torch.randn(batch, n, 3 * heads * d, device=device, dtype=dtype, generator=g)
    q, k, v = qkv.unflatten(-1, (3, heads, d)).permute(2, 0, 3, 1, 4).unbind(0)
    table = torch.randn(table_rows((side, side)), heads, device=device, generator=g)  # fp32 parameter
    grad_out = torch.randn(batch, heads, n, d, device=device, dtype=dtype, generator=g)
    return [t.detach().requires_grad_(True) for t in (q, k, v, table)], grad_out


def provider_fns(window, device):
    n = window[0] * window[1]
    index = relative_position_index(*window, device=device)

    def gathered_bias(table, dtype):
        return table.index_select(0, index.flatten()).view(n, n, -1).permute(2, 0, 1).to(dtype)

    def sdpa(q, k, v, table):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # On CUDA only the memory-efficient kernel returns the mask gradient; the CPU has math.
        backend = SDPBackend.EFFICIENT_ATTENTION if device.type == "cuda" else SDPBackend.MATH
        # The memory-efficient kernel wants the mask's rows 16-element aligned: pad, then view.
        padded = (n + 15) // 16 * 16
        mask = F.pad(gathered_bias(table, q.dtype), (0, padded - n))[..., :n].unsqueeze(0)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    fns = {"eager": lambda q, k, v, t: rel_bias_attention(q, k, v, t, window, backend="eager"), "sdpa": sdpa}
    for backend in dispatch.BACKENDS:
        if backend != "eager" and not dispatch.why_not("rel_bias_attention", backend):
            fns[backend] = lambda q, k, v, t, _b=backend: rel_bias_attention(q, k, v, t, window, backend=_b)
    if "triton" in fns:
        from coatnet_fast.kernels import rel_bias_attention as kernels

        if n <= kernels.SMALL_N_MAX:  # the same op through the tiled backward (see use_backward_path)
            fns["triton@tiled"] = fns["triton"]
            fns["triton@small-8w"] = fns["triton"]

    if device.type == "cuda":
        from torch.nn.attention.flex_attention import flex_attention

        flex_compiled = torch.compile(flex_attention, dynamic=False)
        # Queries shorter than 128 go to the decoding kernel unless told otherwise
        # (PRIOR_ART.md); at N = 49 that path returned wrong results here.
        options = {"FORCE_USE_FLEX_ATTENTION": True} if n < 128 else None

        def flex(q, k, v, score_mod):
            return flex_compiled(q, k, v, score_mod=score_mod, kernel_options=options)

        def flex_table(q, k, v, table):
            def score_mod(score, b, h, q_idx, kv_idx):
                return score + table[index[q_idx, kv_idx], h]

            return flex(q, k, v, score_mod=score_mod)

        def flex_dense(q, k, v, table):
            bias = gathered_bias(table, torch.float32)

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + bias[h, q_idx, kv_idx]

            return flex(q, k, v, score_mod=score_mod)

        fns["flex_table"] = flex_table
        fns["flex_dense"] = flex_dense
    return fns


def use_backward_path(provider: str) -> None:
    """``triton@tiled`` sends a small window through the tiled backward kernels instead of the
    single-tile one, and ``triton@small-8w`` runs the single-tile one at 8 warps without
    prefetch (ptxas, Triton 3.6: 190 registers a thread for a 7x7 window at d = 32, so one
    program an SM, against 248 and two at the default 4 warps), for the whole timed step;
    every other provider gets the default."""
    if "triton" not in provider:
        return
    from coatnet_fast.kernels import rel_bias_attention as kernels

    default = _DEFAULT_SMALL_N_MAX.setdefault("value", kernels.SMALL_N_MAX)
    kernels.SMALL_N_MAX = 0 if provider == "triton@tiled" else default
    if provider == "triton@small-8w":
        kernels.FORCED_TILES[kernels._bwd_small] = dict(num_warps=8, num_stages=1)
    else:
        kernels.FORCED_TILES.pop(kernels._bwd_small, None)


_DEFAULT_SMALL_N_MAX: dict = {}  # the kernels module's own value, read before the first change


def run_case(name, fn, inputs, grad_out, window, ref, device, batch, heads, d, dtype, tol, bandwidth=None):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out)
    errors = {}
    for label, a, b in zip(("out", "dq", "dk", "dv", "dtable"), (out,) + grads, ref):
        a, b = a.double(), b.double()
        errors[label] = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    ok = all(e <= tol for e in errors.values())
    n = window[0] * window[1]
    elem = torch.finfo(dtype).bits // 8
    bhnd = batch * heads * n * d
    table_bytes = table_rows(window) * heads * 4
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        if mode == "fwd":
            def step():
                with torch.no_grad():
                    fn(*inputs)
            flops = 4 * batch * heads * n * n * d
            min_bytes = 4 * bhnd * elem + table_bytes  # read q, k, v, table; write o
        else:
            def step():
                leaves = fresh_leaves(inputs)
                torch.autograd.grad(fn(*leaves), leaves, grad_out)
            flops = 14 * batch * heads * n * n * d  # 2 matmuls forward, 5 backward
            # forward as above, plus read q, k, v, o, do and write dq, dk, dv, dtable
            min_bytes = (4 + 8) * bhnd * elem + 3 * table_bytes + 2 * batch * heads * n * 4
        median, low, high = bench_ms(step, device)
        rows.append({
            "provider": name, "mode": mode, "ms": median, "ms_p20": low, "ms_p80": high,
            "tflops": flops / (median * 1e-3) / 1e12, "gbps": min_bytes / (median * 1e-3) / 1e9,
            "correct": ok, "rel_errors": errors,
            **graph_fields(step, device, flops=flops, moved_bytes=min_bytes, bandwidth_gbps=bandwidth),
        })
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="coatnet_0,coatnet_1,coatnet_2,coatnet_3,coatnet_4")
    p.add_argument("--image-sizes", default="224,384")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--providers", default="", help="comma list to keep (default: all)")
    p.add_argument("--smoke", action="store_true", help="batch 2, seed model at 64x64, fp32, no FlexAttention")
    p.add_argument("--out", help="JSON path (default: bench/results/rel_bias_attention_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.models, args.image_sizes, args.batch, args.dtypes = "seed", "64", 2, "fp32"
    out_path = Path(args.out or Path(__file__).parent / "results" / f"rel_bias_attention_{device.type}.json")
    payload = {"benchmark": "rel_bias_attention", "env": environment(),
               "config": {k: v for k, v in vars(args).items() if k != "out"},
               "copy_bandwidth_gbps": copy_bandwidth(device) / 1e9, "results": []}
    keep = set(filter(None, args.providers.split(",")))
    failed = False
    for labels, side, heads in shapes(args.models.split(","), [int(s) for s in args.image_sizes.split(",")]):
        window = (side, side)
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            inputs, grad_out = make_inputs(args.batch, heads, side, args.head_dim, dtype, device)
            ref_inputs = [t.detach().float().requires_grad_(True) for t in inputs]
            ref_out = rel_bias_attention(*ref_inputs, window, backend="eager")
            ref = (ref_out,) + torch.autograd.grad(ref_out, ref_inputs, grad_out.float())
            tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
            case = {"shapes": labels, "window": side, "N": side * side, "heads": heads, "d": args.head_dim,
                    "batch": args.batch, "dtype": dtype_name}
            rows = []
            for name, fn in provider_fns(window, device).items():
                if keep and name not in keep:
                    continue
                use_backward_path(name)
                try:
                    rows += run_case(name, fn, inputs, grad_out, window, ref, device, args.batch, heads,
                                     args.head_dim, dtype, tol, payload["copy_bandwidth_gbps"])
                except Exception as e:  # a peer that cannot run this shape is reported, not fatal
                    traceback.print_exc()
                    rows.append({"provider": name, "error": f"{type(e).__name__}: {e}"[:400]})
            use_backward_path("triton")
            add_ratios(rows, "mode", {"speedup_vs_best_peer": ("sdpa", "flex_table", "flex_dense"),
                                      "speedup_vs_eager": ("eager",)})
            if payload["copy_bandwidth_gbps"] == payload["copy_bandwidth_gbps"]:
                for r in rows:
                    if r.get("correct"):
                        r["fraction_of_copy_bandwidth"] = r["gbps"] / payload["copy_bandwidth_gbps"]
            for r in rows:
                r.update(case)
                failed |= r.get("correct") is False and r["provider"].split("@")[0] in dispatch.BACKENDS
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "rel_errors"},
                      flush=True)
            payload["results"] += rows
            write_json(out_path, payload)
    print(f"wrote {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
