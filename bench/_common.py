"""What every benchmark writes beside its numbers: device, versions, commit, time.

The code lives in the package (coatnet_fast/benchmark.py), so that `coatnet-fast bench` works
from an installed wheel; the op benchmarks import it from here.
"""
from pathlib import Path

from coatnet_fast.benchmark import commit, environment, write_json  # noqa: F401

RESULTS_DIR = Path(__file__).resolve().parent / "results"
