"""Every Triton kernel compiles for Hopper (sm_90) here, without a GPU (see compile_for_gpu.py)."""
import os
import re
import subprocess
import sys
from pathlib import Path


def _compile(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, str(Path(__file__).with_name("compile_for_gpu.py")), *args],
                          capture_output=True, text=True, env=env, timeout=900)


def test_kernels_compile_for_sm90():
    done = _compile()
    failures = [line for line in done.stdout.splitlines() if "FAILED" in line]
    assert done.returncode == 0 and not failures, "\n".join(failures) or done.stderr[-2000:]
    assert done.stdout.count("shared=") > 40, done.stdout[-2000:]


def test_channels_last_kernels_do_not_spill():
    """The model's fast path (channels_last BatchNorm kernels at their default GPU tiles, in the
    2-byte dtypes autocast runs, as a launch specializes them) compiles without real register
    spills (ptxas -v, sm_90a). A few bytes, where ptxas settles on a register cap, are allowed
    (none at present, with the GPU image's triton 3.6 or this one's; _bwd_dx had 8 bytes in
    two variants before its weights were loaded once a program); the tiles this guards against
    spilled hundreds of bytes a thread. fp32
    variants are left out: this ptxas caps some at 128 registers (24 bytes of spill, none with
    triton 3.6's)."""
    done = _compile("--ptxas", "--layouts", "channels_last")
    lines = [line for line in done.stdout.splitlines()
             if "spill_stores=" in line and line.split()[1] in ("bf16", "fp16")]
    assert done.returncode == 0 and len(lines) > 30, done.stdout[-2000:] + done.stderr[-2000:]
    spilling = [line for line in lines if int(re.search(r"spill_stores=(\d+)", line).group(1)) > 16]
    assert not spilling, "\n".join(spilling)


def test_depthwise_l2_prefetch_compiles_without_spills():
    """The depthwise row kernels with their L2 prefetch on (``L2_AHEAD_ROWS``; off by default
    until a GPU has timed it), at bf16 channels_last as the fast path launches them: every one
    compiles, its PTX holds the prefetches (inline assembly the interpreter never runs), and
    ptxas spills no more than the bound above."""
    kernels = ("_stats", "_apply", "_bwd_reduce", "_bwd_dz", "_bwd_dx_dw")
    done = _compile("--ptxas", "--layouts", "channels_last", "--dtypes", "bf16", "--l2-ahead", "4",
                    "--kernels", *kernels)
    # (batch_norm_act's _stats and _apply share the names: its tiles are BLOCK_P x BLOCK_C)
    lines = [line for line in done.stdout.splitlines() if "spill_stores=" in line and "'BLOCK_W" in line]
    assert done.returncode == 0 and len(lines) > 30, done.stdout[-2000:] + done.stderr[-2000:]
    assert {line.split()[0] for line in lines} == set(kernels)
    assert all("'L2_AHEAD': 4" in line and int(re.search(r"l2_prefetches=(\d+)", line).group(1)) >= 1
               for line in lines), "\n".join(lines)
    spilling = [line for line in lines if int(re.search(r"spill_stores=(\d+)", line).group(1)) > 16]
    assert not spilling, "\n".join(spilling)
