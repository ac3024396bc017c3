"""Whole-model throughput: training step and inference, images/s and peak memory.

The same as `coatnet-fast bench` (the code is coatnet_fast/benchmark.py), run from a checkout:

    PYTHONPATH=. python bench/bench_model.py --out bench/results/model_<device>.json

`--help` lists the options; `--smoke` runs a tiny size anywhere (the default on a CPU).
"""
import sys
from pathlib import Path

# Run from a checkout: the package beside this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coatnet_fast.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
