"""Compile every Triton kernel of the package for Hopper (sm_90) without a GPU.

Triton's compiler and the ptxas it ships run on the CPU, so this catches what the CPU
interpreter cannot: type errors in loop-carried values, unsupported ops, register or shared
memory blow-ups at the tile sizes we launch. Run without TRITON_INTERPRET (under it, kernels
are interpreted functions, not compilable ones). Prints one line per kernel; exits 1 on failure.
"""
import inspect
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import coatnet_fast  # noqa: F401  (serves coatnet_fast.kernels from a checkout)
from coatnet_fast.kernels import _common as common
from coatnet_fast.kernels import batch_norm_act as bna
from coatnet_fast.kernels import dwconv_bn_gelu as dw
from coatnet_fast.kernels import rel_bias_attention as attn

TARGET = GPUTarget("cuda", 90, 32)
FP32_POINTERS = {"T", "LSE", "DELTA", "DQ_ACC", "DBIAS", "DT", "WT", "SCALE", "SHIFT", "POOL", "MEAN", "M2", "RSTD",
                 "GAMMA", "BETA", "SUM_DU", "SUM_DU_XHAT", "DBETA", "DGAMMA", "DPOOL",
                 "DW_PARTIAL", "OUT_MEAN", "OUT_VAR"}
FLOATS = {"scale", "inv_p", "inv_count"}
SIZES = {"N", "H", "W", "C", "P", "R", "HO", "WO", "P_SPLIT", "G", "S"}  # upper-case scalars; other upper-case names are pointers


def signature(kernel, act, constexprs):
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.isupper() and name not in SIZES:
            sig[name] = "*fp32" if name in FP32_POINTERS else f"*{act}"
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def cases():
    yield common._merge_stats, "fp32", dict(BLOCK_G=64, BLOCK_C=32), dict(num_warps=4)  # fp32 partials only
    for act in ("bf16", "fp16", "fp32"):
        ieee = act == "fp32"
        for kernel, configs in ((attn._fwd, attn.FWD_CONFIGS), (attn._bwd_dkdv, attn.DKDV_CONFIGS),
                                (attn._bwd_dq_dbias, attn.DQ_DBIAS_CONFIGS)):
            if act != "bf16":
                configs = [attn._config(32, 64, 4)]
            for c in configs:
                yield kernel, act, dict(c.kwargs, D=32, IEEE=ieee), dict(num_warps=c.num_warps, num_stages=c.num_stages)
            # The largest head dim at the tiles used when not autotuning (shared memory grows with d).
            fixed = attn._fixed(kernel, 196, 128, torch.device("cuda"))
            tiles = {key: fixed.pop(key) for key in ("BLOCK_M", "BLOCK_N")}
            yield kernel, act, dict(tiles, D=128, IEEE=ieee), fixed
        # The single-tile backward at the smallest and largest padded windows (7x7 pads to 64).
        for block, d in [(b, d) for b in (16, 64) for d in (32, 64, 128)] if act == "bf16" else [(64, 32)]:
            yield attn._bwd_small, act, dict(BLOCK=block, D=d, IEEE=ieee), attn._small_config(block, d, ieee)
        yield attn._bwd_delta, act, dict(BLOCK_M=128, D=32), dict(num_warps=4)
        yield attn._bias_to_table, act, dict(BLOCK_R=32, BLOCK_I=64), dict(num_warps=4)
        # The tiles a GPU launch picks for channels_last and NCHW (meta tensors: only the device
        # type and layout are read).
        for memory_format in (torch.channels_last, torch.contiguous_format):
            x = torch.empty(2, 384, 8, 8, device="meta").contiguous(memory_format=memory_format)
            block_p, block_c, warps = dw._blocks(x, 384)
            tiles, w = dict(BLOCK_P=block_p, BLOCK_C=block_c), dict(num_warps=warps)
            for stride in (1, 2):
                yield dw._stats, act, dict(tiles, STRIDE=stride), w
                yield dw._bwd_dx, act, dict(tiles, STRIDE=stride), w
                for flag in (True, False):  # training / eval variants of each kernel
                    yield dw._apply, act, dict(tiles, STRIDE=stride, HAS_SCALE=flag, HAS_POOL=not flag), w
                    yield dw._bwd_reduce, act, dict(tiles, STRIDE=stride, HAS_DPOOL=flag), w
                    yield dw._bwd_dz, act, dict(tiles, STRIDE=stride, HAS_DPOOL=not flag, TRAINING=flag), w
            block_p, block_c, warps = bna._blocks(x, 384)
            tiles, w = dict(BLOCK_P=block_p, BLOCK_C=block_c), dict(num_warps=warps)
            yield bna._stats, act, tiles, w
            for gelu in (True, False):  # MBConv's expand (GELU) and projection (scale, residual)
                yield bna._apply, act, dict(tiles, GELU=gelu, HAS_RES=not gelu, HAS_BSCALE=not gelu), w
                # training's two runs (sums, then dx) and eval's one
                for training, write_dx, write_sums in ((True, False, True), (True, True, False), (False, True, True)):
                    yield bna._bwd, act, dict(tiles, GELU=gelu, HAS_BSCALE=not gelu, TRAINING=training,
                                              WRITE_DX=write_dx, WRITE_SUMS=write_sums), w


def main() -> int:
    failed = 0
    for kernel, act, constexprs, options in cases():
        t0 = time.perf_counter()
        try:
            src = ASTSource(fn=kernel, signature=signature(kernel, act, constexprs), constexprs=constexprs)
            compiled = triton.compile(src, target=TARGET, options=options)
            detail = f"shared={compiled.metadata.shared}"
        except Exception as e:  # report every failure, not just the first
            failed += 1
            detail = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        name = kernel.fn.__name__
        print(f"{name} {act} {constexprs} {options}: {detail} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
