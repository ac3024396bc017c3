"""Command line: ``coatnet-fast train | bench | info | verify | list | build-ext`` (also ``python -m coatnet_fast``)."""
from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import List, Optional

import torch

from . import __version__, ext
from ._env import device_description, dist_version
from .ops import dispatch


def _device_line() -> str:
    if torch.cuda.is_available():
        return (f"cuda:{torch.cuda.current_device()} {device_description()}, CUDA {torch.version.cuda}, "
                f"cuDNN {torch.backends.cudnn.version()}")
    return f"{device_description()}; no CUDA device"


def cmd_info(_args) -> int:
    print(f"coatnet-fast {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {dist_version('triton')}, "
          f"einops {dist_version('einops')}, ninja {dist_version('ninja')}")
    print(f"device: {_device_line()}")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!s}")
    print(f"C++/CUDA extension: {ext.describe_status()}")
    print("backends (auto tries " + " -> ".join(dispatch.AUTO_ORDER) + "):")
    rows = []
    for op in dispatch.ops():
        for backend in dispatch.BACKENDS:
            why = dispatch.why_not(op, backend)
            rows.append((op, backend, "no" if why else "yes", "; ".join(why)))
    widths = [max(len(r[i]) for r in rows + [("op", "backend", "usable", "")]) for i in range(3)]
    print("  " + "  ".join(h.ljust(w) for h, w in zip(("op", "backend", "usable"), widths)) + "  why not")
    for row in rows:
        print(("  " + "  ".join(x.ljust(w) for x, w in zip(row[:3], widths)) + "  " + row[3]).rstrip())
    return 0


def cmd_verify(args) -> int:
    from .verify import format_results, run_verify

    dtypes = [getattr(torch, d) for d in args.dtype] if args.dtype else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"verifying on {device} against eager float64")
    notes: List[str] = []
    results = run_verify(device, dtypes, args.backend, notes)
    if results:
        print(format_results(results))
    for note in notes:
        print(note)
    bad = [r for r in results if not r.ok]
    print(f"{len(results) - len(bad)} passed, {len(bad)} failed")
    if not results:
        print("coatnet-fast verify: error: none of the requested backends is usable here", file=sys.stderr)
        return 2
    return 1 if bad else 0


def cmd_list(args) -> int:
    from .models import MODEL_CONFIGS, create_model

    print(f"{'model':<10} {'params':>10}  num_blocks / channels / heads (at {args.image_size}x{args.image_size})")
    for name in sorted(MODEL_CONFIGS):
        with torch.device("meta"):
            model = create_model(name, image_size=args.image_size)
        count = sum(p.numel() for p in model.parameters())
        cfg = MODEL_CONFIGS[name]
        print(f"{name:<10} {count / 1e6:>9.2f}M  {cfg['num_blocks']} / {cfg['channels']} / {cfg['heads']}")
    return 0


def cmd_build_ext(args) -> int:
    """Build (or load) the extension now, and say what it was built against."""
    try:
        path = ext.load(verbose=args.verbose)
    except ext.ExtensionUnavailableError as e:
        print(f"coatnet-fast build-ext: error: {e}", file=sys.stderr)
        return 1
    info = ext.status().get("build_info", {})
    print(f"built {path}")
    for key, value in info.items():
        print(f"  {key}: {' '.join(value) if isinstance(value, list) else value}")
    cuda = ext.cuda_unavailable_reason()
    if cuda:
        print(f"  CUDA kernels: not built ({cuda})")
    print("  ops: " + ", ".join(ext.registered_ops()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coatnet-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backend of each op is usable here").set_defaults(func=cmd_info)
    p = sub.add_parser("verify", help="check every usable backend and the model against eager float64")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", action="append", choices=["float32", "float16", "bfloat16"],
                   help="dtype to check; repeatable (default: float32 on cpu, all three on cuda)")
    p.add_argument("--backend", action="append", choices=list(dispatch.BACKENDS),
                   help="backend to check; repeatable (default: every usable one)")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("build-ext", help="build the C++/CUDA extension now (it otherwise builds on first use)")
    p.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    p.set_defaults(func=cmd_build_ext)
    p = sub.add_parser("list", help="the model family with parameter counts")
    p.add_argument("--image-size", type=int, default=224)
    p.set_defaults(func=cmd_list)
    from . import benchmark

    p = sub.add_parser("bench", help="whole-model training and inference throughput (images/s, peak memory)",
                       description=benchmark.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchmark.add_arguments(p).set_defaults(func=benchmark.main_from_args)
    from . import train

    p = sub.add_parser("train", help="train a model (default: the small digits model on embedded data)")
    train.add_train_arguments(p).set_defaults(func=train.main_from_args)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, dispatch.BackendUnavailableError) as e:
        print(f"coatnet-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `coatnet-fast info | head`: the reader left, which is fine
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
