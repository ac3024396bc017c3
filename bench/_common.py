"""What every benchmark writes beside its numbers: device, versions, commit, time."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from coatnet_fast._env import device_description, dist_version

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def commit() -> str:
    if os.environ.get("COATNET_FAST_COMMIT"):
        return os.environ["COATNET_FAST_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": dist_version("triton"),
        "timm": dist_version("timm"),
        "cuda": torch.version.cuda,
        "device": device_description(),
    }


def write_json(path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
