"""Whole-model throughput: training step and inference, images/s and peak memory.

``coatnet-fast bench`` (in a checkout also ``python bench/bench_model.py``) times, for each
model in ``--models``, these providers:

  eager                 the reference model on eager (the seed model, weight for weight)
  compile               the same under torch.compile
  timm                  timm's coatnet_0_rw_224 (CoAtNet-0 only; when timm can be imported)
  fused                 backend:<b> and backend:<b>:compile for every fused backend usable here
  backend:<b>[:compile] the reference model with the ops <b> has kernels for on <b>
  backend:<b>[:compile]:no-<op>  the same with <op> left on eager (repeatable), to measure
                        what one fusion is worth in the model; no-se-gate keeps SE's
                        multiply instead of its gate in the projection's weights
  backend:<b>[:compile]:train-batch_norm_act  the same with the stem's and MBConv's
                        BatchNorm (+ GELU) blocks fused in training too (ConvBN's
                        fused_in_training; by default they are fused in eval only)
  backend:<b>[:compile]:pad-conv-input<N>  the same with ConvBN's conv inputs zero-padded
                        to a multiple of N channels (the stem's 3; ConvBN.pad_input_channels)
  <any of the above>:graphs  the step captured once as a CUDA graph and replayed
                        (coatnet_fast.cuda_graphs.CapturedStep; AdamW capturable), so
                        that no host work is timed; compiled providers take
                        torch.compile(mode="reduce-overhead") instead, its own graphs

A training step is autocast forward, cross-entropy, backward and AdamW (fused on CUDA);
inference is a forward under torch.inference_mode. On a GPU the default is the issue's
setting (224x224, batch 128, bf16 autocast, channels_last); on a CPU it is a smoke size (tiny
model, batch 2, 64x64, fp32) unless --full, --batch or --image-size is given. It prints a
table and writes JSON (device, versions, commit, settings, one row per provider and mode) and a
PNG bar chart of images/s beside it. Each fused or compiled provider is then checked against the
eager model with the same weights (``check_against_eager``): a wrong one is flagged, exit code 1.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import __version__, cuda_graphs
from ._env import device_description, dist_version
from .models import MODEL_CONFIGS, ConvBN, MBConv, create_model, set_backend
from .ops import dispatch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("train", "infer")
DEFAULT_MODELS = ("coatnet_0", "coatnet_1")
DEFAULT_PROVIDERS = "eager,compile,timm,fused"
TIMM_MODEL = "coatnet_0_rw_224"
TIMM_COUNTERPART = "coatnet_0"  # the one model of ours that timm's model corresponds to
# The setting, and the smoke size that only checks that everything runs.
FULL = {"batch": 128, "image_size": 224, "dtype": "bf16", "warmup": 5, "steps": 20}
SMOKE = {"batch": 2, "image_size": 64, "dtype": "fp32", "warmup": 1, "steps": 2}
SMOKE_MODEL = {"num_blocks": (1, 1, 1, 1, 1), "channels": (16, 24, 32, 64, 96)}

_CHECKOUT = Path(__file__).resolve().parent.parent
SE_GATE = "se-gate"  # backend:<b>:no-se-gate: MBConv's SE multiplies the activation (see MBConv)
TRAIN_BATCH_NORM_ACT = "train-batch_norm_act"  # backend:<b>:train-batch_norm_act: ConvBN.fused_in_training
PAD_CONV_INPUT = "pad-conv-input"  # backend:<b>:pad-conv-input<N>: ConvBN.pad_input_channels = N
GRAPHS = "graphs"  # <provider>:graphs: the step replayed from a CUDA graph (the last option)


class ProviderError(ValueError):
    """A provider name that cannot be measured here (unknown, or nothing to run)."""


# --- environment and files ------------------------------------------------------------------

def checkout_root() -> Optional[Path]:
    """The source checkout the package runs from (editable install or PYTHONPATH), else None."""
    return _CHECKOUT if (_CHECKOUT / "bench" / "bench_model.py").is_file() else None


def commit() -> str:
    """$COATNET_FAST_COMMIT, else the checkout's git HEAD, else "unknown"."""
    if os.environ.get("COATNET_FAST_COMMIT"):
        return os.environ["COATNET_FAST_COMMIT"]
    root = checkout_root()
    if root is None:
        return "unknown"
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=root, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    """What every benchmark writes beside its numbers: device, versions, commit, time."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "coatnet_fast": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": dist_version("triton"),
        "timm": dist_version("timm"),
        "cuda": torch.version.cuda,
        "device": device_description(),
        # The package's knobs set for this process (COATNET_FAST_L2_AHEAD_ROWS, _AUTOTUNE, ...):
        # a row timed under one is not the default's.
        "knobs": {k: v for k, v in sorted(os.environ.items())
                  if k.startswith("COATNET_FAST_") and k not in ("COATNET_FAST_COMMIT", "COATNET_FAST_EXT_DIR")},
    }


def write_json(path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def default_out(device: torch.device) -> Path:
    """bench/results/model_<device>.json in a checkout, else ./coatnet_fast_bench/model_<device>.json."""
    root = checkout_root()
    folder = root / "bench" / "results" if root is not None else Path("coatnet_fast_bench")
    return folder / f"model_{device.type}.json"


# --- settings and providers -----------------------------------------------------------------

def _comma_list(choices: Optional[Sequence[str]], what: str):
    def parse(text: str) -> List[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"no {what} given")
        bad = [s for s in items if choices is not None and s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(choices)}")
        return list(dict.fromkeys(items))
    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0; got {value}")
    return value


def _image_size(text: str) -> int:
    value = int(text)
    if value < 32 or value % 32:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 32; got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options (shared by `coatnet-fast bench` and bench/bench_model.py)."""
    p.add_argument("--models", "--model", dest="models", type=_comma_list(sorted(MODEL_CONFIGS), "model"),
                   metavar="NAMES", help=f"comma list of models (default: {','.join(DEFAULT_MODELS)})")
    p.add_argument("--providers", default=DEFAULT_PROVIDERS, metavar="NAMES",
                   help="comma list of eager, compile, timm, fused (every usable fused backend, eager and "
                        f"compiled), backend:<name>[:compile]; any of them with :{GRAPHS} appended replays "
                        f"the step from a CUDA graph (default: {DEFAULT_PROVIDERS})")
    p.add_argument("--modes", type=_comma_list(MODES, "mode"), default=list(MODES), metavar="MODES",
                   help="comma list of train, infer (default: both)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true",
                      help=f"tiny model, batch {SMOKE['batch']}, {SMOKE['image_size']}x{SMOKE['image_size']}, "
                           f"{SMOKE['dtype']}, {SMOKE['warmup']} warm-up and {SMOKE['steps']} timed steps: checks "
                           "that everything runs (the default on a CPU)")
    size.add_argument("--full", action="store_true",
                      help=f"the real models at the issue's size (batch {FULL['batch']}, "
                           f"{FULL['image_size']}x{FULL['image_size']}, {FULL['dtype']}) even on a CPU "
                           "(the default on a GPU)")
    p.add_argument("--batch", type=_positive_int, help=f"batch size (default: {FULL['batch']}; smoke {SMOKE['batch']})")
    p.add_argument("--image-size", type=_image_size,
                   help=f"square image side, a multiple of 32 "
                        f"(default: {FULL['image_size']}; smoke {SMOKE['image_size']})")
    p.add_argument("--dtype", choices=list(DTYPES),
                   help=f"autocast dtype; fp32 runs without autocast "
                        f"(default: {FULL['dtype']}; smoke {SMOKE['dtype']})")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep the model and input contiguous (default: channels_last)")
    p.add_argument("--warmup", type=_non_negative_int,
                   help=f"untimed steps after the first call "
                        f"(default: {FULL['warmup']}; smoke {SMOKE['warmup']})")
    p.add_argument("--steps", type=_positive_int, help=f"timed steps (default: {FULL['steps']}; smoke {SMOKE['steps']})")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--out", help="JSON path; the chart goes beside it as .png (default: bench/results/"
                                 "model_<device>.json in a checkout, else ./coatnet_fast_bench/model_<device>.json)")
    return p


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(p)


def resolve_settings(args: argparse.Namespace) -> dict:
    """The settings a run uses: the device's default size, with what the user gave on top.

    On a CPU the default is the smoke size; --full, --batch or --image-size measure the real
    models instead (sizes not given take the issue's values). --smoke forces the smoke size
    anywhere; explicit values still win over its defaults.
    """
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    explicit_size = args.batch is not None or args.image_size is not None
    smoke = bool(args.smoke or (name == "cpu" and not args.full and not explicit_size))
    base = SMOKE if smoke else FULL
    pick = lambda key: getattr(args, key) if getattr(args, key) is not None else base[key]  # noqa: E731
    return {
        "models": ",".join(args.models or DEFAULT_MODELS),
        "batch": pick("batch"),
        "image_size": pick("image_size"),
        "dtype": pick("dtype"),
        "channels_last": args.channels_last,
        "providers": args.providers,
        "modes": ",".join(args.modes),
        "warmup": pick("warmup"),
        "steps": pick("steps"),
        "smoke": smoke,
        "device": name,
    }


def fused_backends() -> List[str]:
    """The non-eager backends that can run at least one fused op here (nothing is built or run)."""
    return [b for b in dispatch.BACKENDS
            if b != "eager" and any(not dispatch.why_not(op, b) for op in dispatch.ops())]


def _timm_skip_reason(model: str, smoke: bool) -> Optional[str]:
    if model != TIMM_COUNTERPART:
        return f"timm: {TIMM_MODEL} is CoAtNet-0; no timm provider for {model}"
    if smoke:
        return f"timm: {TIMM_MODEL} has no smoke size; skipped"
    try:
        import timm  # noqa: F401
    except Exception as e:  # ImportError, or a timm that breaks on import (e.g. a torchvision mismatch)
        return f"timm cannot be imported ({type(e).__name__}: {e}); skipping the timm provider"
    return None


def expand_providers(requested: Sequence[str], model: str, smoke: bool) -> Tuple[List[str], List[str]]:
    """The providers to measure for ``model`` and notes on those skipped.

    "fused" becomes backend:<b> for every usable fused backend, then backend:<b>:compile;
    "timm" stays only for CoAtNet-0 at a real size when timm imports. Other names pass through
    unchecked: a name that cannot be measured is recorded as an error when measured.
    """
    providers: List[str] = []
    notes: List[str] = []
    for name in requested:
        if name == "fused":
            usable = fused_backends()
            if not usable:
                notes.append("fused: no fused backend is usable here (`coatnet-fast info` says why)")
            providers += [f"backend:{b}" for b in usable] + [f"backend:{b}:compile" for b in usable]
        elif name == "timm":
            why = _timm_skip_reason(model, smoke)
            if why:
                notes.append(why)
            else:
                providers.append(name)
        else:
            providers.append(name)
    return list(dict.fromkeys(providers)), notes


def parse_provider(provider: str) -> Tuple[str, Optional[str], bool]:
    """(source, backend, compiled): source is "reference" or "timm"."""
    source, backend, compiled, _ = _parse_provider(provider)
    return source, backend, compiled


def _compiled(provider: str) -> bool:
    try:
        return parse_provider(provider)[2]
    except ProviderError:
        return False


def split_graphs(provider: str) -> Tuple[str, bool]:
    """(the provider without ``:graphs``, whether its step is replayed from a CUDA graph)."""
    base, sep, last = provider.rpartition(":")
    return (base, True) if sep and last == GRAPHS and base else (provider, False)


def _parse_provider(provider: str) -> Tuple[str, Optional[str], bool, List[str]]:
    """parse_provider's answer and the options of a ``backend:<b>[:compile][:no-<op>...]`` provider:
    what it leaves unfused, to measure what one fusion is worth inside the model (the ops named,
    and with ``no-se-gate`` MBConv's SE gate multiplying the activation instead of going into the
    projection's weights), ``train-batch_norm_act`` where it fuses ConvBN in training too, and
    ``pad-conv-input<N>`` where ConvBN pads its conv's input channels to a multiple of N."""
    provider = split_graphs(provider)[0]
    if provider == "eager":
        return "reference", None, False, []
    if provider == "compile":
        return "reference", None, True, []
    if provider == "timm":
        return "timm", None, False, []
    parts = provider.split(":")
    if parts[0] == "backend" and len(parts) >= 2:
        if parts[1] not in dispatch.BACKENDS:
            raise ProviderError(f"unknown backend {parts[1]!r} in provider {provider!r}; backends: "
                                f"{', '.join(dispatch.BACKENDS)}")
        options = parts[2:]
        compiled = options[:1] == ["compile"]
        options = options[int(compiled):]
        if all(o.startswith("no-") or o == TRAIN_BATCH_NORM_ACT or _pad_multiple(o) for o in options):
            unknown = [o[len("no-"):] for o in options
                       if o.startswith("no-") and o[len("no-"):] not in dispatch.ops() + [SE_GATE]]
            if unknown:
                raise ProviderError(f"unknown op {unknown[0]!r} in provider {provider!r}; ops: "
                                    f"{', '.join(dispatch.ops() + [SE_GATE])}")
            return "reference", parts[1], compiled, [o[len("no-"):] if o.startswith("no-") else o for o in options]
    raise ProviderError(f"unknown provider {provider!r}; choose eager, compile, timm, fused, "
                        f"backend:<name>[:compile][:no-<op>...][:{TRAIN_BATCH_NORM_ACT}][:{PAD_CONV_INPUT}<N>], "
                        f"each optionally "
                        f"followed by :{GRAPHS}, with name in "
                        f"{', '.join(dispatch.BACKENDS)}")


def _pad_multiple(option: str) -> int:
    """N of a ``pad-conv-input<N>`` option (N >= 2), else 0."""
    digits = option[len(PAD_CONV_INPUT):] if option.startswith(PAD_CONV_INPUT) else ""
    return int(digits) if digits.isdigit() and int(digits) >= 2 else 0


# --- measuring ------------------------------------------------------------------------------

def build(provider: str, model: str, settings: dict) -> Tuple[torch.nn.Module, List[str]]:
    """The module a provider times, and the fused ops it routes to its backend."""
    source, backend, _, options = _parse_provider(provider)  # ops and features left out, train-batch_norm_act
    if source == "timm":
        import timm

        size = settings["image_size"]
        return timm.create_model(TIMM_MODEL, num_classes=1000, **({} if size == 224 else {"img_size": size})), []
    kwargs = dict(image_size=settings["image_size"], num_classes=1000)
    if settings["smoke"]:
        kwargs.update(SMOKE_MODEL)
    net = create_model(model, **kwargs)
    if backend is None:
        return net, []
    # The ops this backend has kernels for; the others stay on eager.
    ops = [op for op in dispatch.ops() if not dispatch.why_not(op, backend) and op not in options]
    if not ops:
        why = "; ".join(f"{op}: {', '.join(dispatch.why_not(op, backend))}" for op in dispatch.ops())
        raise ProviderError(f"backend {backend!r} can run none of the fused ops here ({why})")
    set_backend(net, backend, ops)
    for module in net.modules():
        if SE_GATE in options and isinstance(module, MBConv):
            module.se_gate_in_projection = False
        if TRAIN_BATCH_NORM_ACT in options and isinstance(module, ConvBN):
            module.fused_in_training = True
        if isinstance(module, ConvBN):
            for option in options:
                if _pad_multiple(option):
                    module.pad_input_channels = _pad_multiple(option)
    return net, ops


def timed(fn, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step: CUDA events on a GPU, wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def measure(provider: str, model: str, mode: str, settings: dict, device: torch.device) -> dict:
    """One provider, one mode: ms per step, images/s, first-call seconds, peak GiB on CUDA.

    With ``:graphs`` the step is captured once (``CapturedStep``: its eager warm-up calls and the
    capture count as the first call) and only replays are timed; a compiled provider gets
    ``mode="reduce-overhead"``, torch.compile's own CUDA graphs, instead."""
    _, _, compiled = parse_provider(provider)
    graphs = split_graphs(provider)[1]
    if graphs:
        try:
            cuda_graphs.check_device(device)
        except ValueError as e:
            raise ProviderError(f"{provider}: {e}") from None
    net, ops = build(provider, model, settings)
    memory_format = torch.channels_last if settings["channels_last"] else torch.contiguous_format
    net = net.to(device).to(memory_format=memory_format)
    dtype = DTYPES[settings["dtype"]]
    batch, size = settings["batch"], settings["image_size"]
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=memory_format)
    target = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if compiled:
        torch.compiler.reset()  # a fresh cache: honest first-call time, no recompile limit across providers
    runner = (torch.compile(net, mode="reduce-overhead" if graphs else None) if compiled else net)
    captured = graphs and not compiled
    # reduce-overhead's graphs are told where a step begins (their outputs are overwritten by the next).
    mark_step = torch.compiler.cudagraph_mark_step_begin if graphs and compiled else (lambda: None)

    if mode == "train":
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}),
                                **({"capturable": True} if captured else {}))

        def step():
            mark_step()
            # Gradients set to None before the backward, so that a captured step allocates them
            # in its graph's memory and every replay writes the same ones.
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(runner(x), target)
            loss.backward()
            opt.step()
    else:
        net.eval()

        def step():
            mark_step()
            with torch.inference_mode(), autocast:
                runner(x)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if captured:
        step = cuda_graphs.CapturedStep(step, device)
        while not step.captured:  # the eager warm-up calls and the capture: the first call
            step()
    else:
        step()  # first call: compile time for compiled providers
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    seconds = timed(step, device, settings["warmup"], settings["steps"])
    result = {
        "model": model, "provider": provider, "mode": mode, "ms_per_step": seconds * 1e3,
        "images_per_s": batch / seconds, "first_call_s": first,
    }
    if ops:
        result["ops"] = ops
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    source, backend, _ = parse_provider(provider)
    if source == "reference" and (backend is not None or compiled):
        # After the timing, so that first_call_s stays the compile time and the peak memory is the step's.
        try:
            result.update(check_against_eager(net, runner, model, mode, settings, device, x, target,
                                              autocast, mark_step))
        except Exception as e:  # a check that cannot run keeps the timing and fails the run
            traceback.print_exc()
            result.update(correct=False, check_error=f"the check failed: {type(e).__name__}: {e}")
    return result


def _rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().float()
    return ((got.detach().float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def check_against_eager(net, runner, model: str, mode: str, settings: dict, device: torch.device,
                        x: torch.Tensor, target: torch.Tensor, autocast, mark_step) -> dict:
    """What a provider computes against the eager reference model with the same weights (its
    state_dict at the end of the timing), on the timed batch under the same autocast:
    inference's logits, or a training step's loss and every parameter's gradient (no optimizer
    step), as ||got - ref|| / ||ref||. The tolerance is four times the eager model's own error
    under that autocast against the eager model in fp32 (the rounding any bf16 or fp16 model
    has), and at least 1e-3: ``correct`` is False when the provider's error is above it, or when
    it leaves a gradient out that eager computes (or the other way round)."""
    ref = build("eager", model, settings)[0]
    ref.load_state_dict(net.state_dict())
    memory_format = torch.channels_last if settings["channels_last"] else torch.contiguous_format
    ref = ref.to(device).to(memory_format=memory_format)
    training = mode == "train"
    net.train(training)
    ref.train(training)

    def outputs(module, cast, call=None):
        """{name: fp32 tensor}: the logits, or the loss and each parameter's gradient."""
        # Not `call or module`: a torch.compile'd module raises on truth-testing (its __len__).
        call = module if call is None else call
        if not training:
            with torch.inference_mode(), cast:
                return {"logits": call(x).float().clone()}
        module.zero_grad(set_to_none=True)
        with cast:
            loss = F.cross_entropy(call(x), target)
        loss.backward()
        found = {"loss": loss.detach().float().clone()}
        found.update({name: p.grad.detach().float().clone() for name, p in module.named_parameters()
                      if p.grad is not None})
        module.zero_grad(set_to_none=True)
        return found

    def errors(got, want):
        if got.keys() != want.keys():
            return None
        if not training:
            return {"logits_rel_error": _rel_error(got["logits"], want["logits"])}
        grads = [n for n in want if n != "loss"]
        return {"loss_rel_error": _rel_error(got["loss"], want["loss"]),
                "grads_rel_error": _rel_error(torch.cat([got[n].flatten() for n in grads]),
                                              torch.cat([want[n].flatten() for n in grads]))}

    mark_step()
    got = outputs(net, autocast, runner)
    want = outputs(ref, autocast)
    exact = outputs(ref, contextlib.nullcontext())
    del ref
    found = errors(got, want)
    scale = max(errors(want, exact).values())
    tolerance = max(4 * scale, 1e-3)
    if found is None:
        missing = sorted(got.keys() ^ want.keys())
        return {"correct": False, "check_error": f"gradients of {missing[:4]} exist in one model only"}
    return {**found, "eager_rel_error_vs_fp32": scale, "tolerance": tolerance,
            "correct": all(v <= tolerance for v in found.values())}


def add_speedups(results: List[dict]) -> None:
    """Ratios against the same model and mode's eager seed model and its torch.compile (the
    issue's targets): speedup_vs_eager and speedup_vs_compile (images/s over theirs), and
    memory_vs_eager (peak memory over eager's, where measured)."""
    def by_provider(provider, key):
        return {(r.get("model"), r["mode"]): r[key] for r in results if r["provider"] == provider and key in r}

    for ratio, provider, key in (("speedup_vs_eager", "eager", "images_per_s"),
                                 ("speedup_vs_compile", "compile", "images_per_s"),
                                 ("memory_vs_eager", "eager", "peak_memory_gib")):
        base = by_provider(provider, key)
        for r in results:
            where = (r.get("model"), r.get("mode"))
            if where in base and key in r and base[where] > 0:
                r[ratio] = r[key] / base[where]


# --- report ---------------------------------------------------------------------------------

def format_table(results: List[dict]) -> str:
    """Model, provider, mode, images/s, ms/step, peak GiB, the speedups over eager and over
    torch.compile, and peak memory over eager's; errors listed below."""
    def num(r, key, fmt):
        return format(r[key], fmt) if key in r else "-"

    header = ("model", "provider", "mode", "images/s", "ms/step", "peak GiB", "x eager", "x compile", "mem x eager")
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["model"], r["provider"], r["mode"], "error") + ("-",) * (len(header) - 4))
        else:
            rows.append((r["model"], r["provider"], r["mode"], num(r, "images_per_s", ",.1f"),
                         num(r, "ms_per_step", ".2f"), num(r, "peak_memory_gib", ".2f"),
                         num(r, "speedup_vs_eager", ".2f"), num(r, "speedup_vs_compile", ".2f"),
                         num(r, "memory_vs_eager", ".2f")))
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    right = set(range(3, len(header)))

    def line(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [line(header), line(tuple("-" * w for w in widths))] + [line(row) for row in rows]
    errors = [r for r in results if "error" in r]
    if errors:
        out.append("errors:")
        out += [f"  {r['model']} {r['provider']} {r['mode']}: {r['error'].splitlines()[0]}" for r in errors]
    wrong = [r for r in results if r.get("correct") is False]
    if wrong:
        out.append("incorrect (against the eager model with the same weights; timed all the same):")
        out += [f"  {r['model']} {r['provider']} {r['mode']}: " + (r.get("check_error") or ", ".join(
            f"{k} {r[k]:.2e}" for k in ("logits_rel_error", "loss_rel_error", "grads_rel_error") if k in r)
            + f" > tolerance {r['tolerance']:.2e}") for r in wrong]
    return "\n".join(out)


def write_chart(payload: dict, path) -> Optional[Path]:
    """A PNG bar chart of images/s: one panel per mode, models along x, one bar per provider.

    Returns the path, or None (with a one-line note) when matplotlib is missing or nothing ran.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return None
    rows = [r for r in payload["results"] if "images_per_s" in r]
    if not rows:
        print("no provider ran: no chart")
        return None
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    value = {(r["model"], r["mode"], r["provider"]): r["images_per_s"] for r in rows}
    width = 0.8 / len(providers)
    fig = Figure(figsize=(2.0 + max(3.0, len(models) * len(providers) * 0.55) * len(modes), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(providers))]
    for ax, mode in zip(axes, modes):
        for i, provider in enumerate(providers):
            xs = [m for m, model in enumerate(models) if (model, mode, provider) in value]
            ys = [value[(models[m], mode, provider)] for m in xs]
            if not xs:
                continue
            bars = ax.bar([m - 0.4 + width * (i + 0.5) for m in xs], ys, width, label=provider, color=colors[i])
            ax.bar_label(bars, labels=[f"{y:,.0f}" if y >= 100 else f"{y:.3g}" for y in ys], fontsize=7)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models)
        ax.set_title(mode)
        ax.set_ylabel("images/s")
        ax.margins(y=0.12)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    cfg, env = payload["config"], payload["env"]
    size = "smoke size, " if cfg["smoke"] else ""
    fig.suptitle(f"{env['device']}: {size}batch {cfg['batch']}, {cfg['image_size']}x{cfg['image_size']}, "
                 f"{cfg['dtype']}{', channels_last' if cfg['channels_last'] else ''}", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# --- entry points ---------------------------------------------------------------------------

def run(settings: dict, out: Path) -> dict:
    """Measure every model x provider x mode, writing the JSON after each row; returns the payload."""
    device = torch.device(settings["device"])
    requested = [s.strip() for s in settings["providers"].split(",") if s.strip()]
    payload = {"benchmark": "model", "env": environment(), "config": settings, "notes": [], "results": []}
    for model in settings["models"].split(","):
        providers, notes = expand_providers(requested, model, settings["smoke"])
        for note in notes:
            if note not in payload["notes"]:
                payload["notes"].append(note)
                print(note, flush=True)
        for provider in providers:
            for mode in settings["modes"].split(","):
                try:
                    r = measure(provider, model, mode, settings, device)
                except ProviderError as e:
                    r = {"model": model, "provider": provider, "mode": mode, "error": f"{type(e).__name__}: {e}"[:500]}
                except Exception as e:  # one broken provider must not hide the others' numbers
                    traceback.print_exc()
                    r = {"model": model, "provider": provider, "mode": mode, "error": f"{type(e).__name__}: {e}"[:500]}
                payload["results"].append(r)
                write_json(out, payload)
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
                if _compiled(provider):
                    torch.compiler.reset()  # drop the compiled graphs and what they hold
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    add_speedups(payload["results"])
    write_json(out, payload)
    return payload


def main_from_args(args: argparse.Namespace) -> int:
    """Run with parsed arguments; 0 when every provider ran and computed what eager computes, 1
    when any recorded an error or failed check_against_eager."""
    settings = resolve_settings(args)
    out = Path(args.out) if args.out else default_out(torch.device(settings["device"]))
    print(f"benchmarking {settings['models']} on {settings['device']} ({device_description()}): "
          f"{'smoke size, ' if settings['smoke'] else ''}batch {settings['batch']}, "
          f"{settings['image_size']}x{settings['image_size']}, {settings['dtype']}"
          f"{', channels_last' if settings['channels_last'] else ''}", flush=True)
    payload = run(settings, out)
    print()
    print(format_table(payload["results"]) if payload["results"] else "no provider to measure")
    print(f"wrote {out}")
    chart = write_chart(payload, out.with_suffix(".png"))
    if chart is not None:
        print(f"wrote {chart}")
    return 1 if any("error" in r or r.get("correct") is False for r in payload["results"]) else 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return main_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
