"""One line per timed row of op-benchmark JSON files, the columns that decide a target:

    python bench/summarize.py bench/results/rel_bias_attention_h100.json [more.json ...]

case (shape or window, part, mode, pass, dtype), provider, host-inclusive ms and device-only
graph ms, the fraction of copy bandwidth over each, and the speedups over each clock. Rows
that failed to run or to match the reference say so instead of giving numbers.
"""
from __future__ import annotations

import json
import sys

CASE_KEYS = ("shape", "window", "part", "mode", "pass", "dtype")
RATIOS = ("speedup_vs_eager", "speedup_vs_compile", "speedup_vs_best_peer")


def _num(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def lines(payload: dict) -> list[str]:
    out = [f"# {payload.get('benchmark')} on {payload.get('env', {}).get('device')} "
           f"(commit {str(payload.get('env', {}).get('commit'))[:10]}, copy "
           f"{_num(payload.get('copy_bandwidth_gbps'), 0)} GB/s); host ms | graph ms"]
    for r in payload["results"]:
        case = " ".join(f"{r[k]}" for k in CASE_KEYS if k in r)
        head = f"{case:<28} {r.get('provider', '?'):<18}"
        if "error" in r:
            out.append(f"{head} error: {r['error'][:100]}")
            continue
        cells = [f"{_num(r.get('ms'))} | {_num(r.get('graph_ms'))} ms"]
        if "fraction_of_copy_bandwidth" in r:
            cells.append(f"bw {_num(r['fraction_of_copy_bandwidth'], 2)} | "
                         f"{_num(r.get('graph_fraction_of_copy_bandwidth'), 2)}")
        for ratio in RATIOS:
            if ratio in r:
                cells.append(f"{ratio[8:]} {_num(r[ratio], 2)} | {_num(r.get('graph_' + ratio), 2)}")
        if "graph_error" in r:
            cells.append(f"graph error: {r['graph_error'][:80]}")
        if not r.get("correct", True):
            cells.append(f"WRONG {r.get('rel_errors')}")
        out.append(head + "  ".join(cells))
    return out


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    for path in paths:
        try:
            with open(path) as f:
                payload = json.load(f)
        except (OSError, ValueError) as e:
            print(f"# {path}: {e}")
            continue
        print("\n".join(lines(payload)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
