"""What the op benchmarks share: device, versions, commit and time beside the numbers (the
code lives in the package, coatnet_fast/benchmark.py, so that `coatnet-fast bench` works from
an installed wheel), timing, and the rows they write.
"""
import time
from pathlib import Path

import torch

from coatnet_fast.benchmark import commit, environment, write_json  # noqa: F401
from coatnet_fast.ops import dispatch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def bench_ms(fn, device, warmup=10, rep=50):
    """[median, p20, p80] milliseconds of fn(): triton.testing.do_bench on a GPU, a few wall-clock
    runs on the CPU (a smoke check there, not a measurement)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    times = []
    for i in range(3 + 3):
        t0 = time.perf_counter()
        fn()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return [times[len(times) // 2], times[0], times[-1]]


def copy_bandwidth(device) -> float:
    """Measured device-to-device copy, bytes read + written per second."""
    if device.type != "cuda":
        return float("nan")
    import triton.testing

    x = torch.empty(2**30 // 2, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=5, rep=50)
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def start_payload(name: str, args, device):
    """(JSON path, copy bandwidth in GB/s, payload) of an op benchmark: ``--out`` or
    bench/results/<name>_<device>.json, and the arguments but ``--out`` as its config."""
    out_path = Path(args.out or RESULTS_DIR / f"{name}_{device.type}.json")
    bandwidth = copy_bandwidth(device) / 1e9
    payload = {"benchmark": name, "env": environment(),
               "config": {k: v for k, v in vars(args).items() if k != "out"}, "copy_bandwidth_gbps": bandwidth,
               "results": []}
    return out_path, bandwidth, payload


def with_compiled_peer(eager_op, device) -> dict:
    """{"eager": eager_op} plus, on a GPU, {"compile": torch.compile(eager_op)} from a fresh cache:
    built once per case (shape and mode), since past dynamo's recompile limit the function would
    silently run uncompiled under that name."""
    fns = {"eager": eager_op}
    if device.type == "cuda":
        torch.compiler.reset()
        fns["compile"] = torch.compile(eager_op)
    return fns


def with_tiles(fns: dict, tiles) -> dict:
    """Add ``triton@PxCxW`` providers, the triton backend at forced tiles (``use_tiles``)."""
    if "triton" in fns:
        for t in tiles:
            fns[f"triton@{t}"] = fns["triton"]
    return fns


def use_tiles(kernels, provider: str) -> None:
    """Set the kernel module's FORCED_TILES (BLOCK_P, BLOCK_C, num_warps) for ``triton@PxCxW``,
    else None (the launcher's own choice); left set for the whole timed step, backward included."""
    kernels.FORCED_TILES = tuple(int(v) for v in provider.split("@")[1].split("x")) if "@" in provider else None


def relative_errors(names, actual, expected) -> dict:
    return {k: ((a.double() - b.double()).norm() / b.double().norm()).item()
            for k, a, b in zip(names, actual, expected)}


def timed_passes(forward, forward_backward, moved: dict, bandwidth_gbps: float, device, **fields) -> list:
    """One row per pass ("fwd", "fwd+bwd"): ms (median, p20, p80) and GB/s over the bytes in
    ``moved[pass]``, also as a fraction of the copy bandwidth; ``fields`` go into every row."""
    rows = []
    for which, step in (("fwd", forward), ("fwd+bwd", forward_backward)):
        median, low, high = bench_ms(step, device)
        gbps = moved[which] / (median * 1e-3) / 1e9
        rows.append(dict(fields, **{"pass": which, "ms": median, "ms_p20": low, "ms_p80": high, "gbps": gbps,
                                    "fraction_of_copy_bandwidth": gbps / bandwidth_gbps}))
    return rows


def add_speedups(rows: list, peers=("eager", "compile")) -> None:
    """speedup_vs_<peer> on every correct timed row, per pass."""
    for which in ("fwd", "fwd+bwd"):
        timed = [r for r in rows if r.get("pass") == which and r["correct"]]
        base = {r["provider"]: r["ms"] for r in timed}
        for r in timed:
            for peer in peers:
                if peer in base:
                    r[f"speedup_vs_{peer}"] = base[peer] / r["ms"]


def report(rows: list, payload: dict, out_path, **fields) -> bool:
    """Add ``fields`` to the rows, print them, append them to the payload and write it; True when
    a backend of this package (not a peer) gave a wrong result."""
    failed = False
    for r in rows:
        r.update(fields)
        failed |= r.get("correct") is False and r["provider"].split("@")[0] in dispatch.BACKENDS
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "rel_errors"}, flush=True)
    payload["results"] += rows
    write_json(out_path, payload)
    return failed
