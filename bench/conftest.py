"""pytest-benchmark cases: `python -m pytest bench --benchmark-only` (CoAtNet shapes on a GPU,
a smoke size under Triton's interpreter on a CPU)."""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
