"""Compile every Triton kernel of the package for Hopper (sm_90) without a GPU.

Triton's compiler and the ptxas it ships run on the CPU, so this catches what the CPU
interpreter cannot: type errors in loop-carried values, unsupported ops, register or shared
memory blow-ups at the tile sizes we launch. Run without TRITON_INTERPRET (under it, kernels
are interpreted functions, not compilable ones). Prints one line per kernel; exits 1 on failure.

Each kernel compiles as a launch specializes it (``specialization``): Triton's JIT turns an int
argument equal to 1 into a constant and marks pointers and ints divisible by 16, and that is
what lets it vectorize along a unit stride. Compiled without it, the same kernels read element by
element through 64-bit addresses and need two to four times the registers, so counts taken that
way say little about the GPU. ``--ptxas`` adds ptxas's register and spill counts (sm_90a, with
the ptxas this Triton uses for Hopper) to each line, ``--loops`` the SASS instruction count
and that of each loop body.
"""
import argparse
import inspect
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import coatnet_fast  # noqa: F401  (serves coatnet_fast.kernels from a checkout)
from coatnet_fast.kernels import _common as common
from coatnet_fast.kernels import batch_norm_act as bna
from coatnet_fast.kernels import dwconv_bn_gelu as dw
from coatnet_fast.kernels import max_pool2d as mp
from coatnet_fast.kernels import rel_bias_attention as attn

TARGET = GPUTarget("cuda", 90, 32)
FP32_POINTERS = {"T", "LSE", "DELTA", "DQ_ACC", "DBIAS", "DT", "WT", "SCALE", "SHIFT", "POOL", "MEAN", "M2", "RSTD",
                 "GAMMA", "BETA", "SUM_DU", "SUM_DU_XHAT", "DBETA", "DGAMMA", "DPOOL",
                 "DW_PARTIAL", "OUT_MEAN", "OUT_VAR", "OUT_RSTD", "RUN_MEAN", "RUN_VAR", "RING", "SCRATCH"}
FLOATS = {"scale", "inv_p", "inv_count", "count", "momentum", "eps"}
SIZES = {"N", "H", "W", "C", "P", "R", "HO", "WO", "ROWS", "P_SPLIT", "G", "S"}  # upper-case scalars; other upper-case names are pointers


def signature(kernel, act, constexprs):
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "DZ":  # the backward's dz through memory: bf16 at bf16, else fp32 (see backward)
            sig[name] = "*bf16" if act == "bf16" else "*fp32"
        elif name == "IDX":  # the max pool's one-byte window index
            sig[name] = "*i8"
        elif name.isupper() and name not in SIZES:
            sig[name] = "*fp32" if name in FP32_POINTERS else f"*{act}"
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def _is_stride(name: str) -> bool:
    return re.fullmatch(r"s[a-z]*_[a-z]", name) is not None


def specialization(kernel, constexprs, layout):
    """(ints the launch passes as 1, argument indices it marks divisible by 16) for ``layout``:
    - "rows" (attention): q, k, v, o and do have unit head-dim strides (``*_d``; q, k, v are views
      of the qkv projection), the bias table [R, heads] a unit head stride (``st_h``); their other
      strides are multiples of 16 at d = 32 (the table's row stride, ``heads``, is not);
    - "channels_last": unit channel strides; the channel count and the other strides multiples of
      16, as at CoAtNet's widths (the channel mask then keeps whole vectors, so loads vectorize);
    - "nchw": unit position (``*_p``) or column (``*_w``) strides, and of the rest only the image
      strides and the channel count are sure to be multiples of 16 (H * W = 196 is not);
    - the depthwise weight goes in the seed's layout ([C, 1, 3, 3]: strides 9, 3, 1) in either
      layout; None: only pointers.
    Every pointer is 16-byte aligned (a fresh allocation, or a qkv view at a multiple of d)."""
    params = list(inspect.signature(kernel.fn).parameters)
    strides = [n for n in params if _is_stride(n)]
    if layout == "rows":
        ones = [n for n in strides if n.endswith("_d") or n == "st_h"]
        divisible = [n for n in strides if n not in ones and n != "st_r"]
    elif layout == "channels_last":
        ones = [n for n in strides if n.endswith("_c") and n != "sw_c"] + [n for n in strides if n == "sw_w"]
        divisible = [n for n in strides if n not in ones and not n.startswith("sw_")] + [n for n in params if n == "C"]
    elif layout == "nchw":
        ones = [n for n in strides if n.endswith(("_p", "_w"))]
        divisible = [n for n in strides if n.endswith("_b")] + [n for n in params if n == "C"]
    else:
        ones, divisible = [], []
    pointers = [n for n in params if n.isupper() and n not in SIZES and n not in constexprs]
    attrs = {(params.index(n),): [["tt.divisibility", 16]] for n in pointers + divisible}
    return {n: 1 for n in ones}, attrs


def source(kernel, act, constexprs, layout):
    ones, attrs = specialization(kernel, constexprs, layout)
    constants = dict(constexprs, **ones)
    return ASTSource(fn=kernel, signature=signature(kernel, act, constants), constexprs=constants, attrs=attrs)


def ptxas_usage(compiled) -> str:
    """ptxas -v's register and spill counts for the compiled PTX."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as tmp:
        ptx = f"{tmp}/kernel.ptx"
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        done = subprocess.run([get_ptxas(TARGET.arch).path, "-v", "--gpu-name", "sm_90a", ptx, "-o", f"{tmp}/k.cubin"],
                              capture_output=True, text=True)
    report = done.stdout + done.stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return f" regs={regs.group(1) if regs else '?'} spill_stores={spills.group(1) if spills else '?'}"


# The attention kernels' window is constexpr.
WINDOW_14 = dict(N=196, H=14, W=14)
WINDOW_7 = dict(N=49, H=7, W=7)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Shared memory a fixed (not autotuned) tile may take: what sm_86/sm_89/sm_120 give one program
# (the A100/H100 class gives 163/227 KB; the autotuner skips configs a GPU cannot launch, a
# fixed tile has no such way out).
FIXED_SHARED_MAX = 99 * 1024


def sass_loops(compiled) -> str:
    """Instructions in each loop body of the SASS (nvdisasm, shipped beside this Triton's ptxas):
    a loop is the code from a label back to the branch that jumps to it. Where arithmetic, not
    bytes, sets a kernel's time, these counts per tile are what a change should move."""
    from triton.backends.nvidia.compiler import get_ptxas
    nvdisasm = Path(get_ptxas(TARGET.arch).path).with_name("nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        listing = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True).stdout
    labels, instructions, bodies = {}, 0, []
    for line in listing.splitlines():
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = instructions
        if re.search(r"/\*[0-9a-f]{4,}\*/\s+\S", line):
            instructions += 1
            target = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
            if target and labels.get(target.group(1), instructions) < instructions - 1:
                bodies.append(instructions - labels[target.group(1)])
    return f" sass={instructions} loops={bodies}"


def cases():
    for update in (False, True):  # fp32 partials only
        yield (common._merge_stats, "fp32", dict(BLOCK_G=64, BLOCK_C=32, HAS_SHIFT=True, UPDATE=update),
               dict(num_warps=4), None)
    for act in ("bf16", "fp16", "fp32"):
        ieee = act == "fp32"
        for kernel, configs in ((attn._fwd, attn.FWD_CONFIGS), (attn._bwd_dkdv, attn.DKDV_CONFIGS),
                                (attn._bwd_dq_dbias, attn.DQ_DBIAS_CONFIGS)):
            if act != "bf16":  # the other dtypes at the tiles used when not autotuning (below)
                configs = []
            for c in configs:  # the window is a compile-time constant: CoAtNet-0's 14x14 at 224
                yield (kernel, act, dict(c.kwargs, D=32, IEEE=ieee, **WINDOW_14), dict(num_warps=c.num_warps,
                       num_stages=c.num_stages), "rows")
            if act == "bf16":  # a 7x7 window: one key tile, no loop (the bias is gathered query-major)
                yield kernel, act, dict(BLOCK_M=64, BLOCK_N=64, D=32, IEEE=ieee, **WINDOW_7), dict(num_warps=4), "rows"
            # Every head dim at the tiles used when not autotuning (shared memory grows with d;
            # main() fails any fixed tile past what every GPU class gives a program).
            for d in (16, 32, 64, 128):
                fixed = attn._fixed(kernel, 196, d, torch.device("cuda"), DTYPES[act])
                tiles = {key: fixed.pop(key) for key in ("BLOCK_M", "BLOCK_N")}
                yield kernel, act, dict(tiles, D=d, IEEE=ieee, FIXED=True, **WINDOW_14), fixed, "rows"
        # The single-tile backward at the smallest and largest padded windows (7x7 pads to 64).
        for block, d in [(b, d) for b in (16, 64) for d in (32, 64, 128)] if act == "bf16" else [(64, 32)]:
            window = WINDOW_7 if block == 64 else dict(N=15, H=5, W=3)
            yield (attn._bwd_small, act, dict(BLOCK=block, D=d, IEEE=ieee, **window), attn._small_config(block, d, ieee),
                   "rows")
        yield attn._bwd_delta, act, dict(BLOCK_M=128, D=32), dict(num_warps=4), "rows"
        yield attn._bias_to_table, act, dict(BLOCK_R=32, BLOCK_I=64), dict(num_warps=4), "rows"
        # The tiles a GPU launch picks for channels_last and NCHW (meta tensors: only the device
        # type and layout are read).
        for memory_format, layout in ((torch.channels_last, "channels_last"), (torch.contiguous_format, "nchw")):
            x = torch.empty(2, 384, 8, 8, device="meta").contiguous(memory_format=memory_format)
            block_p, block_c, warps = dw._blocks(x, 384)
            tiles, w = dict(BLOCK_P=block_p, BLOCK_C=block_c), dict(num_warps=warps)
            # The row kernels' tiles at S1's 56 output columns (and, channels_last, S2's 28).
            row_tiles = []
            for width_out in (56, 28) if layout == "channels_last" else (56,):
                block_w, block_c, row_warps = dw._row_blocks(x, 384, width_out)
                row_tiles.append((dict(BLOCK_W=block_w, BLOCK_C=block_c), dict(num_warps=row_warps)))
            for stride in (1, 2):
                for flag in (True, False):  # training / eval variants of each kernel
                    yield (dw._bwd_dx, act, dict(tiles, STRIDE=stride, HAS_DPOOL=not flag, TRAINING=flag),
                           dict(num_warps=dw.bwd_dx_warps(warps)), layout)
                # Odd shapes' tiles (one column, 13, the row backward's widest; few channels).
                for channels, width in ((3, 1), (40, 13), (384, dw.ROW_BACKWARD_MAX_WIDTH)) if act == "bf16" else ():
                    odd = torch.empty(2, channels, 4, width, device="meta").contiguous(memory_format=memory_format)
                    width_out = (width - 1) // stride + 1
                    block_wo, block_wi, block_c, row_warps = dw._bwd_row_blocks(odd, channels, width, width_out)
                    yield (dw._bwd_dx_rows, act, dict(BLOCK_WO=block_wo, BLOCK_WI=block_wi, BLOCK_C=block_c,
                                                      STRIDE=stride, HAS_DPOOL=False, TRAINING=True),
                           dict(num_warps=row_warps), layout)
                    block_wo, block_wi, block_c, row_warps = dw._dz_row_blocks(odd, channels, width, width_out)
                    yield (dw._bwd_dx_dw, act, dict(BLOCK_WO=block_wo, BLOCK_WI=block_wi, BLOCK_C=block_c,
                                                    STRIDE=stride), dict(num_warps=row_warps), layout)
                    block_w, block_c, row_warps = dw._row_blocks(odd, channels, width_out)
                    yield (dw._apply, act, dict(BLOCK_W=block_w, BLOCK_C=block_c, STRIDE=stride, HAS_POOL=True),
                           dict(num_warps=row_warps), layout)
                # The row backward at S1's 56 output columns (and, channels_last, S2's 28).
                for width_out in (56, 28) if layout == "channels_last" else (56,):
                    block_wo, block_wi, block_c, row_warps = dw._bwd_row_blocks(x, 384, width_out * stride, width_out)
                    for flag in (True, False):
                        yield (dw._bwd_dx_rows, act,
                               dict(BLOCK_WO=block_wo, BLOCK_WI=block_wi, BLOCK_C=block_c, STRIDE=stride,
                                    HAS_DPOOL=not flag, TRAINING=flag), dict(num_warps=row_warps), layout)
                    block_wo, block_wi, block_c, row_warps = dw._dz_row_blocks(x, 384, width_out * stride, width_out)
                    yield (dw._bwd_dx_dw, act, dict(BLOCK_WO=block_wo, BLOCK_WI=block_wi, BLOCK_C=block_c,
                                                    STRIDE=stride), dict(num_warps=row_warps), layout)
                for row, rw in row_tiles:
                    yield dw._stats, act, dict(row, STRIDE=stride), rw, layout
                    for flag in (True, False):
                        yield dw._apply, act, dict(row, STRIDE=stride, HAS_POOL=not flag), rw, layout
                        yield dw._bwd_reduce, act, dict(row, STRIDE=stride, HAS_DPOOL=flag), rw, layout
                        yield (dw._bwd_dz, act, dict(row, STRIDE=stride, HAS_DPOOL=not flag, TRAINING=flag), rw,
                               layout)
            block_p, block_c, warps = bna._blocks(x, 384)
            tiles, w = dict(BLOCK_P=block_p, BLOCK_C=block_c), dict(num_warps=warps)
            yield bna._stats, act, tiles, w, layout
            for gelu in (True, False):  # MBConv's expand (GELU) and projection (scale, residual)
                yield bna._apply, act, dict(tiles, GELU=gelu, HAS_RES=not gelu, HAS_BSCALE=not gelu), w, layout
                # training's two runs (sums, then dx) and eval's one
                for training, write_dx, write_sums in ((True, False, True), (True, True, False), (False, True, True)):
                    yield bna._bwd, act, dict(tiles, GELU=gelu, HAS_BSCALE=not gelu, TRAINING=training,
                                              WRITE_DX=write_dx, WRITE_SUMS=write_sums), w, layout
            # The max pool at the S1 shortcut's 64 channels (CoAtNet's 3 / 2 / 1 window).
            block_p, block_c = mp._tiles(x, 64)
            pool = dict(BLOCK_P=block_p, BLOCK_C=block_c, KERNEL=3, STRIDE=2, PAD=1)
            yield mp._fwd, act, dict(pool, WRITE_INDEX=True), dict(num_warps=mp.NUM_WARPS), layout
            yield mp._bwd, act, dict(pool, WINDOWS=2), dict(num_warps=mp.NUM_WARPS), layout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptxas", action="store_true", help="add ptxas's register and spill counts")
    parser.add_argument("--loops", action="store_true", help="add SASS instruction counts: all, and per loop body")
    parser.add_argument("--kernels", nargs="*", help="only these kernels (e.g. _apply _bwd)")
    parser.add_argument("--layouts", nargs="*", help="only these layouts (rows, channels_last, nchw)")
    parser.add_argument("--no-prefetch", action="store_true",
                        help="the depthwise row-streaming kernels without their loads a row ahead")
    parser.add_argument("--l2-ahead", type=int, default=None,
                        help="the depthwise row kernels' L2 prefetch distance (L2_AHEAD_ROWS; 0: none)")
    parser.add_argument("--dtypes", nargs="*", help="only these activation dtypes (bf16, fp16, fp32)")
    args = parser.parse_args()
    if args.l2_ahead is not None:
        dw.L2_AHEAD_ROWS = args.l2_ahead
    failed = 0
    for kernel, act, constexprs, options, layout in cases():
        name = kernel.fn.__name__
        if ((args.kernels and name not in args.kernels) or (args.layouts and layout not in args.layouts)
                or (args.dtypes and act not in args.dtypes)):
            continue
        t0 = time.perf_counter()
        fixed = constexprs.pop("FIXED", False)
        if "PREFETCH" in kernel.arg_names and "PREFETCH" not in constexprs:  # as the launchers pass it
            constexprs["PREFETCH"] = dw.PREFETCH_ROWS and not args.no_prefetch
            if "BLOCK_W" in constexprs:  # the row-streaming launches' register cap
                like = torch.empty((1, 1, 1, 1), dtype=DTYPES[act])
                if layout == "channels_last":
                    like = torch.empty((1, 2, 2, 2), dtype=like.dtype).to(memory_format=torch.channels_last)
                options = dw._row_launch(options["num_warps"], like, constexprs["STRIDE"])
        if "L2_AHEAD" in kernel.arg_names and "L2_AHEAD" not in constexprs:  # as the launchers pass it (on a GPU)
            like = torch.empty((1, 2, 2, 2), dtype=DTYPES[act])
            if layout == "channels_last":
                like = like.to(memory_format=torch.channels_last)
            columns = (constexprs["BLOCK_W"] * constexprs["STRIDE"] + 2 if "BLOCK_W" in constexprs
                       else constexprs["BLOCK_WI"])
            constexprs.update(dw._l2_prefetch(like, constexprs["BLOCK_C"], columns, gpu=True))
        try:
            compiled = triton.compile(source(kernel, act, constexprs, layout), target=TARGET, options=options)
            if fixed and compiled.metadata.shared > FIXED_SHARED_MAX:
                raise RuntimeError(f"a fixed tile takes {compiled.metadata.shared} B of shared memory, over "
                                   f"{FIXED_SHARED_MAX}")
            if constexprs.get("L2_AHEAD"):  # the hint is inline assembly: count what reached the PTX
                detail = f"l2_prefetches={compiled.asm['ptx'].count('prefetch.global.L2')} "
            else:
                detail = ""
            detail += (f"shared={compiled.metadata.shared}" + (ptxas_usage(compiled) if args.ptxas else "")
                      + (sass_loops(compiled) if args.loops else ""))
        except Exception as e:  # report every failure, not just the first
            failed += 1
            detail = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(f"{name} {act} {layout} {constexprs} {options}: {detail} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
