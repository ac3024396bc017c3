"""What the op benchmarks share: device, versions, commit and time beside the numbers (the
code lives in the package, coatnet_fast/benchmark.py, so that `coatnet-fast bench` works from
an installed wheel), timing, and the rows they write.
"""
import statistics
import time
from pathlib import Path

import torch

from coatnet_fast.benchmark import commit, environment, write_json  # noqa: F401
from coatnet_fast.ops import dispatch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def host_us(fn, repeats: int, sync=lambda: None, rounds: int = 5, warmup: int = 10) -> float:
    """Median over rounds of the mean time per call of fn, ``sync()`` at each round's end (on a
    GPU: the device drained, so with tiny kernels the host sets the pace)."""
    for _ in range(repeats // 5 + warmup):
        fn()
    sync()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(samples)


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


def graph_ms(fn, device, warmup=10, rep=50):
    """[median, p20, p80] milliseconds of the device's work in fn(), without the host's: fn is
    captured once as a CUDA graph and its replays are timed by ``bench_ms`` (L2 flushed before
    each, so the host launches the replay while the flush runs and the device never waits on
    it). None on the CPU, which has no graphs. For small windows a call's host time (Python,
    dispatch, launches) can exceed its kernels' time, and then ``bench_ms`` times the host; a
    model step keeps the device busy meanwhile, so both numbers matter. fn must already have
    run (autotuning and compiling happen outside the capture)."""
    if device.type != "cuda":
        return None
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # capture wants its first allocations made off the default stream
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        return bench_ms(graph.replay, device, warmup, rep)
    finally:
        del graph
        torch.cuda.empty_cache()


def fresh_leaves(tensors):
    """New leaf tensors sharing ``tensors``' storage (no copy), for a step that takes gradients:
    a leaf's AccumulateGrad node lives as long as the leaf and keeps the stream it was made on,
    so a step reusing leaves from earlier eager runs syncs with the default stream inside the
    graph capture and invalidates it (seen on an H200 for every fwd+bwd row, 2026-11-27); a leaf
    made inside the step gets its node on the capturing stream."""
    return [t.detach().requires_grad_(t.requires_grad) for t in tensors]


def graph_fields(fn, device, flops=None, moved_bytes=None, bandwidth_gbps=None) -> dict:
    """The ``graph_*`` fields of a row (``graph_ms``, its p20/p80, and TFLOP/s, GB/s and the
    fraction of copy bandwidth over it where given): empty on the CPU; ``graph_error`` where
    the capture fails (a provider that syncs with the host), which leaves the row's other
    timings standing."""
    try:
        times = graph_ms(fn, device)
    except Exception as e:  # noqa: BLE001 - reported in the row
        return {"graph_error": f"{type(e).__name__}: {e}"[:300]}
    if times is None:
        return {}
    median, low, high = times
    fields = {"graph_ms": median, "graph_ms_p20": low, "graph_ms_p80": high}
    if flops is not None:
        fields["graph_tflops"] = flops / (median * 1e-3) / 1e12
    if moved_bytes is not None:
        fields["graph_gbps"] = moved_bytes / (median * 1e-3) / 1e9
        if bandwidth_gbps is not None and bandwidth_gbps == bandwidth_gbps:
            fields["graph_fraction_of_copy_bandwidth"] = fields["graph_gbps"] / bandwidth_gbps
    return fields


CLOCKS = (("ms", ""), ("graph_ms", "graph_"))  # (time field, prefix of the ratios over it)


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
    # grad_layout: the backward's incoming gradient is channels_last, as the activations (results
    # without this key were taken with an NCHW gradient, which the kernels read across their tiles).
    config = {k: v for k, v in vars(args).items() if k != "out"} | {"grad_layout": "channels_last"}
    payload = {"benchmark": name, "env": environment(), "config": config, "copy_bandwidth_gbps": bandwidth,
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
    ``moved[pass]``, also as a fraction of the copy bandwidth, and the same over the device
    time alone on a GPU (``graph_fields``); ``fields`` go into every row."""
    rows = []
    for which, step in (("fwd", forward), ("fwd+bwd", forward_backward)):
        median, low, high = bench_ms(step, device)
        gbps = moved[which] / (median * 1e-3) / 1e9
        rows.append(dict(fields, **{"pass": which, "ms": median, "ms_p20": low, "ms_p80": high, "gbps": gbps,
                                    "fraction_of_copy_bandwidth": gbps / bandwidth_gbps},
                         **graph_fields(step, device, moved_bytes=moved[which], bandwidth_gbps=bandwidth_gbps)))
    return rows


def add_ratios(rows: list, group: str, ratios: dict) -> None:
    """For each ``ratios`` entry {name: providers}: r[name] = the fastest of those providers' times
    over r's, among the correct timed rows with r's ``group`` value (pass or mode), on each clock
    (``graph_<name>`` over graph_ms, where both sides have one)."""
    for value in {r.get(group) for r in rows}:
        for clock, prefix in CLOCKS:  # host-inclusive, then device-only: each may pick another peer
            timed = [r for r in rows if r.get(group) == value and r.get("correct") and clock in r]
            for name, providers in ratios.items():
                base = [r[clock] for r in timed if r["provider"] in providers]
                for r in timed:
                    if base:
                        r[prefix + name] = min(base) / r[clock]


def add_speedups(rows: list, peers=("eager", "compile")) -> None:
    """speedup_vs_<peer> (and graph_speedup_vs_<peer>) on every correct timed row, per pass."""
    add_ratios(rows, "pass", {f"speedup_vs_{peer}": (peer,) for peer in peers})


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
