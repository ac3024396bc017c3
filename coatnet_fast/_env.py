"""Versions and the device, described once for `coatnet-fast info` and the benchmarks' JSON."""
from __future__ import annotations

import importlib.metadata
import platform

import torch


def dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def device_description() -> str:
    """The GPU torch uses (name, capability, SMs, memory), else the CPU."""
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        p = torch.cuda.get_device_properties(i)
        return f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
