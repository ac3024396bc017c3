"""``coatnet-fast train``: train a CoAtNet on the embedded digits set or an ImageFolder tree.

The pieces are usable on their own: ``TrainConfig`` (what the command line sets),
``train(config) -> TrainResult``, and the step-level helpers ``build_optimizer``,
``build_scheduler`` and ``train_step`` (the training-parity test drives these directly).

Reproducibility: every epoch's shuffle (and the digits translation) is seeded from
``(seed, epoch)`` (``DistributedSampler.set_epoch`` under torchrun), and a checkpoint holds the
model, optimizer, scheduler, grad scaler, epoch, step, metrics so far and every process's RNG
states, so a run resumed from a checkpoint continues exactly as the uninterrupted run would.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import random
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler

from . import cuda_graphs
from . import data as data_mod
from .models import MODEL_CONFIGS, CoAtNet, list_models, set_backend
from .ops import dispatch

# A small CoAtNet for 32x32 single-channel images: S0..S2 convolutional (16x16, 8x8, 4x4), S3
# and S4 attention over 2x2 and 1x1 windows with 16-wide heads; 0.15M parameters. With the
# defaults below it reaches about 99% on the digits' validation split (>= 95% is tested) in
# 15 epochs, about 20 s on two idle CPU cores.
DIGITS_MODEL: Dict[str, Any] = dict(
    num_blocks=(1, 1, 1, 1, 1), channels=(16, 32, 48, 64, 96), heads=(2, 2, 4, 6), dim_head=16,
)
MODEL_CHOICES = ("digits",) + tuple(list_models())

CHECKPOINT_FORMAT = 1
TIMING_KEYS = ("images_per_s", "seconds")  # the metrics that depend on the machine's speed
METRIC_KEYS = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr") + TIMING_KEYS


@dataclasses.dataclass
class TrainConfig:
    """Everything ``coatnet-fast train`` takes; the command line's flags map onto these fields."""

    model: str = "digits"
    config: Optional[Dict[str, Any]] = None  # CoAtNet keyword arguments, over --model's
    data: Optional[str] = None  # ImageFolder root (train/, val/); None: the embedded digits
    image_size: Optional[int] = None  # default: 32 for digits, 224 for --data
    backend: str = "eager"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: Optional[bool] = None  # None: on for CUDA, off on the CPU
    compile: bool = False
    cuda_graphs: bool = False  # replay each training step from a CUDA graph (GraphedTrainStep)
    epochs: int = 15
    batch_size: int = 64  # in total, over all processes
    lr: float = 4e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    drop_path: float = 0.0
    seed: int = 0
    workers: Optional[int] = None  # None: 0 for digits (in memory), min(8, cores) for --data
    device: Optional[str] = None  # None: cuda when available
    out: Optional[str] = None  # None: runs/<model>
    resume: Optional[str] = None  # a checkpoint path, or "auto": <out>/last.pt when there is one
    log_format: str = "json"
    max_steps: Optional[int] = None  # stop after this many optimizer steps in total
    steps_per_epoch: Optional[int] = None  # use at most this many batches of each epoch
    sync_bn: bool = False
    plot: bool = True
    augment: bool = True  # digits only: a random +-max_shift pixel translation per image
    max_shift: int = 3
    val_fraction: float = 0.2
    progress: bool = True

    def run_name(self) -> str:
        return self.model


@dataclasses.dataclass
class TrainResult:
    model: nn.Module  # the trained model (unwrapped from DDP and torch.compile)
    metrics: List[Dict[str, Any]]
    val_acc: float
    out_dir: str
    global_step: int
    epoch: int


# --- command line ---------------------------------------------------------------------------

def _json_config(text: str) -> Dict[str, Any]:
    """--config: a JSON object, inline or in a file."""
    source = text
    if not text.lstrip().startswith("{") and os.path.isfile(text):
        with open(text) as f:
            source = f.read()
    try:
        value = json.loads(source)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--config must be a JSON object (inline or a file); {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--config must be a JSON object of CoAtNet arguments; got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = TrainConfig()
    parser.description = ("Train a CoAtNet. With no arguments: the small 'digits' model on scikit-learn's "
                          "embedded 8x8 digits upsampled to 32x32 (no download), which reaches >= 95% "
                          "validation accuracy (about 99%) on two CPU cores in well under a minute.")
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=d.model, choices=MODEL_CHOICES,
                   help="'digits' (a small CoAtNet for 32x32 inputs) or one of the family (default: digits)")
    g.add_argument("--config", type=_json_config, metavar="JSON",
                   help="CoAtNet constructor arguments as a JSON object (or a .json file), over --model's; "
                        'e.g. \'{"channels": [16, 32, 48, 64, 96], "num_blocks": [1, 1, 1, 1, 1]}\'')
    g.add_argument("--backend", default=d.backend, choices=list(dispatch.BACKEND_CHOICES),
                   help="where the fused ops run (default: eager)")
    g.add_argument("--drop-path", type=float, default=d.drop_path, help="stochastic depth rate (default: 0)")
    g = parser.add_argument_group("data")
    g.add_argument("--data", metavar="PATH",
                   help="an ImageFolder tree PATH/train/<class>/*, PATH/val/<class>/* (needs torchvision); "
                        "default: the embedded digits")
    g.add_argument("--image-size", type=_positive_int, help="input side (default: 32 for digits, 224 for --data)")
    g.add_argument("--workers", type=int, help="DataLoader workers (default: 0 for digits, min(8, cores) for --data)")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="digits: no random translation of the training images")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_positive_int, default=d.epochs, help=f"(default: {d.epochs})")
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help=f"in total over all processes (default: {d.batch_size})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"AdamW peak learning rate (default: {d.lr})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW weight decay, not on biases, norms and bias tables (default: {d.weight_decay})")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                   help=f"linear warm-up per step, then cosine decay to 0 (default: {d.warmup_epochs})")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help=f"(default: {d.label_smoothing})")
    g.add_argument("--seed", type=int, default=d.seed, help=f"(default: {d.seed})")
    g.add_argument("--max-steps", type=_positive_int, help="stop after this many optimizer steps in all")
    g.add_argument("--steps-per-epoch", type=_positive_int, help="use at most this many batches of each epoch")
    g = parser.add_argument_group("speed")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available; LOCAL_RANK under torchrun)")
    g.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; auto: bf16 on CUDA, fp32 on the CPU; fp16 uses a GradScaler")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="capture the training step (forward, backward, AdamW) once as a CUDA graph and "
                        "replay it: no Python or launch cost per step. CUDA, one process, bf16 or fp32; "
                        "not with --compile (whose own graphs are mode='reduce-overhead')")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: convert BatchNorm layers to SyncBatchNorm")
    g = parser.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", help="checkpoints, metrics and plot (default: runs/<model>)")
    g.add_argument("--resume", metavar="PATH|auto",
                   help="continue from a checkpoint; auto: DIR/last.pt when it exists")
    g.add_argument("--log-format", default=d.log_format, choices=["json", "csv"],
                   help="metrics.json (a list of per-epoch records) or metrics.csv (default: json)")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="do not write curves.png")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress display")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def main_from_args(args: argparse.Namespace) -> int:
    try:
        train(config_from_args(args))
    except ImportError as e:  # a missing optional dependency (torchvision, scikit-learn)
        print(f"coatnet-fast train: error: {e}", file=sys.stderr)
        return 2
    return 0


# --- distributed ------------------------------------------------------------------------------

@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Dist(rank, world, local_rank, owns)


class ShardSampler(Sampler):
    """Every world-th index from rank, without padding: each example is evaluated exactly once
    over all processes (the metrics are then summed across them)."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# --- model, optimizer, schedule, step ---------------------------------------------------------

def model_kwargs(config: TrainConfig, in_channels: int, num_classes: int, image_size: int) -> Dict[str, Any]:
    base = dict(DIGITS_MODEL) if config.model == "digits" else dict(MODEL_CONFIGS[config.model])
    kwargs = dict(image_size=image_size, in_channels=in_channels, num_classes=num_classes, **base)
    kwargs.update(config.config or {})
    if config.drop_path or "drop_path_rate" not in kwargs:  # --drop-path, unless only --config sets it
        kwargs["drop_path_rate"] = config.drop_path
    for key in ("backend",):
        kwargs.pop(key, None)  # the backend is --backend's
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}


def build_model(kwargs: Dict[str, Any]) -> CoAtNet:
    try:
        return CoAtNet(**kwargs)
    except TypeError as e:
        raise ValueError(f"--config: {e}") from e


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; weight decay on the weight matrices and conv kernels only (not on biases, norms,
    or the relative-position bias tables). ``set_capturable`` readies it for a CUDA graph."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("relative_bias_table") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def set_capturable(optimizer: torch.optim.Optimizer, device: Optional[torch.device]) -> None:
    """AdamW ready for a CUDA graph on ``device``: capturable, each group's learning rate a
    one-element fp32 tensor there (the scheduler fills it in place, a captured step reads it),
    step counts on the parameters' device. With ``device=None``, back to the plain step: float
    rates, step counts on the CPU. ``load_state_dict`` restores whatever the checkpoint's run
    used, groups and step counts, so this runs after a resume too."""
    for group in optimizer.param_groups:
        group["capturable"] = device is not None
        value = float(group["lr"])
        group["lr"] = value if device is None else torch.tensor(value, dtype=torch.float32, device=device)
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(p.device if device is not None else "cpu")


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up over warmup_steps (the first step at lr / warmup_steps), then cosine to 0
    at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepped once per optimizer step."""
    warmup_steps = max(0, min(int(warmup_steps), int(total_steps)))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               scheduler: Optional[torch.optim.lr_scheduler.LRScheduler], criterion: nn.Module,
               scaler: Optional[torch.amp.GradScaler] = None, autocast_dtype: Optional[torch.dtype] = None):
    """One optimizer step; returns (loss, number correct), both detached tensors (no sync)."""
    loss, correct = _optimizer_step(model, images, labels, optimizer, criterion, scaler, autocast_dtype)
    if scheduler is not None:
        _scheduler_step(scheduler)
    return loss, correct


def _scheduler_step(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    with warnings.catch_warnings():
        # The schedule counts steps, not updates: when the fp16 GradScaler skips an update
        # (inf/NaN gradients, as in the first steps while it finds its scale), the learning
        # rate still moves on, and PyTorch's warning that the optimizer did not step is moot.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        scheduler.step()


def _optimizer_step(model, images, labels, optimizer, criterion, scaler, autocast_dtype):
    """train_step without the schedule: what a CUDA graph captures."""
    device_type = images.device.type
    autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        logits = model(images)
        loss = criterion(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    correct = (logits.detach().argmax(dim=1) == labels).sum()
    return loss.detach(), correct


class GraphedTrainStep:
    """``train_step`` with its optimizer step replayed from a CUDA graph (``--cuda-graphs``).

    Each call copies the batch into static tensors and runs one step through
    ``coatnet_fast.cuda_graphs.CapturedStep``: the first calls eagerly (Triton compiles and
    autotunes, AdamW creates its state), then one capture, then replays of forward, loss,
    backward and AdamW with no Python in between; the scheduler steps outside the graph, filling
    the learning-rate tensors the captured AdamW reads (``set_capturable``). Every call is a real
    training step, so a graphed run takes the same steps as an eager one. The optimizer must be
    capturable, the batch shape fixed (the loaders drop the last partial batch), and nothing in
    the step may wait on the host (no GradScaler, so fp16 is refused). The returned loss and
    count are the graph's outputs, overwritten by the next call: read them before it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                 autocast_dtype: Optional[torch.dtype], device: torch.device,
                 eager_calls: int = cuda_graphs.DEFAULT_EAGER_CALLS):
        self.device = cuda_graphs.check_device(device)
        if autocast_dtype == torch.float16:
            raise ValueError("--cuda-graphs: fp16 needs a GradScaler, whose skipped steps are decided on the "
                             "host; use bf16 or fp32")
        if not all(group.get("capturable") for group in optimizer.param_groups):
            raise ValueError("--cuda-graphs: the optimizer must be capturable (set_capturable), which keeps "
                             "its step counts on the device")
        self._rates = [group["lr"] for group in optimizer.param_groups]
        if not all(isinstance(lr, torch.Tensor) and lr.device == self.device for lr in self._rates):
            raise ValueError(f"--cuda-graphs: the learning rates must be tensors on {self.device} "
                             "(set_capturable), or the graph would keep the first one")
        self._optimizer = optimizer
        self._args = (model, optimizer, criterion, None, autocast_dtype)
        self._eager_calls = eager_calls
        self._static: Optional[tuple] = None
        self._step: Optional[cuda_graphs.CapturedStep] = None

    @property
    def captured(self) -> bool:
        return self._step is not None and self._step.captured

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 scheduler: Optional[torch.optim.lr_scheduler.LRScheduler]):
        if any(group["lr"] is not lr for group, lr in zip(self._optimizer.param_groups, self._rates)):
            raise RuntimeError("--cuda-graphs: a learning rate was replaced instead of filled in place; the "
                               "captured step would keep reading the old one")
        if self._static is None:
            self._static = static = (images.clone(), labels.clone())  # clone keeps channels_last
            model, optimizer, criterion, scaler, autocast_dtype = self._args
            # Over locals, not self: a cycle through self would keep the graph's memory until a GC pass.
            self._step = cuda_graphs.CapturedStep(
                lambda: _optimizer_step(model, *static, optimizer, criterion, scaler, autocast_dtype),
                self.device, self._eager_calls)
        else:
            for name, new, static in (("images", images, self._static[0]), ("labels", labels, self._static[1])):
                if new.shape != static.shape or new.dtype != static.dtype:
                    raise ValueError(f"--cuda-graphs: {name} must keep the shape and dtype of the first batch "
                                     f"{tuple(static.shape)} {static.dtype}; got {tuple(new.shape)} {new.dtype}")
                static.copy_(new)
        loss, correct = self._step()
        if scheduler is not None:
            _scheduler_step(scheduler)
        return loss, correct


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast_dtype: Optional[torch.dtype],
             channels_last: bool, dd: _Dist):
    """(mean cross-entropy, accuracy) over the loader, summed over all processes."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    for images, labels in loader:
        images, labels = _to_device(images, labels, device, channels_last)
        with autocast:
            logits = model(images)
        totals[0] += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").double()
        totals[1] += (logits.argmax(dim=1) == labels).sum()
        totals[2] += labels.numel()
    if dd.enabled:
        dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    return loss_sum / max(count, 1), correct / max(count, 1)


def _to_device(images, labels, device, channels_last):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


# --- RNG states, checkpoints ------------------------------------------------------------------

def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # every device
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def rng_state(device: torch.device) -> Dict[str, Any]:
    """This process's RNG states, in types torch.load(weights_only=True) accepts."""
    state: Dict[str, Any] = {"python": _tuples_to_lists(random.getstate()), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    except ImportError:
        pass
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    random.setstate(_lists_to_tuples(state["python"]))
    torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        try:
            import numpy as np

            kind, keys, pos, has_gauss, gauss = state["numpy"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        except ImportError:
            pass
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _tuples_to_lists(x):
    return [_tuples_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _lists_to_tuples(x):
    return tuple(_lists_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> Dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"--resume {path!r} is not a coatnet-fast training checkpoint")
    return ckpt


def _resolve_resume(resume: Optional[str], out: str, verbose: bool = True) -> Optional[str]:
    if resume is None:
        return None
    if resume == "auto":
        path = os.path.join(out, "last.pt")
        if os.path.isfile(path):
            return path
        if verbose:
            print(f"note: --resume auto: no {path} yet; starting from scratch", file=sys.stderr)
        return None
    if not os.path.isfile(resume):
        raise ValueError(f"--resume {resume!r}: no such checkpoint")
    return resume


# --- logging: progress, metrics, plot ---------------------------------------------------------

class Progress:
    """One line on stderr, rewritten in place on a terminal; plain lines every `every` steps and
    at the end of each epoch otherwise (a log file, CI)."""

    def __init__(self, enabled: bool, stream=None, lines: int = 4):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.lines = lines
        self._last = 0.0

    def due(self, step: int, steps: int) -> bool:
        """Whether update() at this step would show anything (so the caller can skip building the
        line, and the device sync its loss value costs)."""
        if not self.enabled:
            return False
        if step == steps:
            return True
        if self.tty:
            return time.perf_counter() - self._last >= 0.1
        return step % max(1, steps // self.lines) == 0

    def update(self, text: str, step: int, steps: int) -> None:
        if not self.due(step, steps):
            return
        if self.tty:
            self._last = time.perf_counter()
            self.stream.write("\r" + text.ljust(100)[:160])
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def end(self, text: str) -> None:
        if not self.enabled:
            return
        self.stream.write(("\r" + text.ljust(100) if self.tty else text) + "\n")
        self.stream.flush()


def write_metrics(metrics: List[Dict[str, Any]], out: str, fmt: str) -> str:
    if fmt == "json":
        path = os.path.join(out, "metrics.json")
        _atomic_write_text(json.dumps(metrics, indent=1) + "\n", path)
    else:
        path = os.path.join(out, "metrics.csv")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(METRIC_KEYS), lineterminator="\n")
        writer.writeheader()
        for row in metrics:
            writer.writerow({k: row[k] for k in METRIC_KEYS})
        _atomic_write_text(buf.getvalue(), path)
    return path


def plot_curves(metrics: List[Dict[str, Any]], path: str) -> Optional[str]:
    """Loss and accuracy per epoch to a PNG; returns None (after a note) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("note: matplotlib is not installed; not plotting (pip install matplotlib)", file=sys.stderr)
        return None
    epochs = [m["epoch"] for m in metrics]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, key, title in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        ax.plot(epochs, [m[f"train_{key}"] for m in metrics], "o-", label="train")
        ax.plot(epochs, [m[f"val_{key}"] for m in metrics], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


# --- the run --------------------------------------------------------------------------------

def _resolve_device(config: TrainConfig) -> torch.device:
    if config.device:
        device = torch.device(config.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {config.device!r}: CUDA is not available here")
        # torch.cuda.set_device refuses a device without an index; a bare "cuda" is the current one.
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def _autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _check_config(config: TrainConfig) -> None:
    if config.model not in MODEL_CHOICES:
        raise ValueError(f"model must be one of {MODEL_CHOICES}; got {config.model!r}")
    dispatch.check_backend_name(config.backend)
    if config.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16; got {config.precision!r}")
    if config.log_format not in ("json", "csv"):
        raise ValueError(f"log_format must be json or csv; got {config.log_format!r}")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {config.label_smoothing}")
    if config.lr <= 0 or config.weight_decay < 0 or config.warmup_epochs < 0:
        raise ValueError("lr must be positive, weight_decay and warmup_epochs non-negative")


def _check_cuda_graphs(config: TrainConfig, device: torch.device, dd: _Dist,
                       autocast_dtype: Optional[torch.dtype]) -> None:
    """--cuda-graphs' limits, named before anything is built (see GraphedTrainStep)."""
    try:
        cuda_graphs.check_device(device)
    except ValueError as e:
        raise ValueError(f"--cuda-graphs: {e}") from None
    if config.compile:
        raise ValueError("--cuda-graphs with --compile: choose one (torch.compile's own CUDA graphs are "
                         "mode='reduce-overhead')")
    if dd.enabled:
        raise ValueError("--cuda-graphs runs in one process; DistributedDataParallel needs its own warm-up "
                         "and static graph, which this does not set up")
    if autocast_dtype == torch.float16:
        raise ValueError("--cuda-graphs: fp16 needs a GradScaler, whose skipped steps are decided on the host; "
                         "use --precision bf16 or fp32")


def _datasets(config: TrainConfig, image_size: int):
    if config.data is None:
        kw = dict(image_size=image_size, val_fraction=config.val_fraction, seed=config.seed)
        return data_mod.digits("train", **kw), data_mod.digits("val", **kw), 1, data_mod.DIGITS_CLASSES
    train_set = data_mod.image_folder(config.data, "train", image_size)
    val_set = data_mod.image_folder(config.data, "val", image_size)
    if train_set.classes != val_set.classes:
        raise ValueError(f"--data {config.data!r}: train/ and val/ have different class folders")
    return train_set, val_set, 3, len(train_set.classes)


def train(config: TrainConfig) -> TrainResult:
    """Train as ``config`` says; returns the trained model and the per-epoch metrics. Under
    torchrun (WORLD_SIZE > 1) every process calls this; only rank 0 writes files and prints."""
    _check_config(config)
    device = _resolve_device(config)
    if config.sync_bn and device.type != "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--sync-bn needs CUDA: torch's SyncBatchNorm has no CPU implementation")
    dd = _init_distributed(device)
    try:
        return _train(config, device, dd)
    finally:
        if dd.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, device: torch.device, dd: _Dist) -> TrainResult:
    is_digits = config.data is None
    image_size = config.image_size or (32 if is_digits else 224)
    autocast_dtype = _autocast_dtype(config.precision, device)
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    out = config.out or os.path.join("runs", config.run_name())
    resume_path = _resolve_resume(config.resume, out, dd.main)

    if config.batch_size % dd.world:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {dd.world} processes")
    if config.cuda_graphs:
        _check_cuda_graphs(config, device, dd, autocast_dtype)
    local_batch = config.batch_size // dd.world

    train_set, val_set, in_channels, num_classes = _datasets(config, image_size)
    kwargs = model_kwargs(config, in_channels, num_classes, image_size)
    if dd.main:
        os.makedirs(out, exist_ok=True)

    # The same initial model in every process (DDP broadcasts rank 0's anyway).
    _seed_all(config.seed)
    model = build_model(kwargs)
    set_backend(model, config.backend)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config.lr, config.weight_decay)

    workers = config.workers if config.workers is not None else (0 if is_digits else min(8, os.cpu_count() or 1))
    loader_gen = torch.Generator()
    if dd.enabled:
        train_sampler = torch.utils.data.DistributedSampler(
            train_set, num_replicas=dd.world, rank=dd.rank, shuffle=True, seed=config.seed, drop_last=True)
        val_sampler = ShardSampler(len(val_set), dd.rank, dd.world)
        shuffle = None
    else:
        train_sampler, val_sampler, shuffle = None, None, True
    pin = device.type == "cuda"
    train_loader = DataLoader(train_set, batch_size=local_batch, shuffle=shuffle, sampler=train_sampler,
                              num_workers=workers, pin_memory=pin, drop_last=True, generator=loader_gen,
                              persistent_workers=False)
    val_loader = DataLoader(val_set, batch_size=max(local_batch, 256 if is_digits else local_batch),
                            sampler=val_sampler, shuffle=False, num_workers=workers, pin_memory=pin)
    steps_per_epoch = len(train_loader)
    if config.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    if steps_per_epoch == 0:
        raise ValueError(f"the training split ({len(train_set)} images) is smaller than one batch "
                         f"({local_batch} per process); lower --batch-size")
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    scheduler = build_scheduler(optimizer, warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    start_epoch, global_step, metrics = 0, 0, []
    resumed_rng = None
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        if ckpt["model_kwargs"] != kwargs:
            raise ValueError(f"--resume {resume_path!r} holds a model built with {ckpt['model_kwargs']}, "
                             f"not {kwargs}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, global_step, metrics = ckpt["epoch"], ckpt["global_step"], list(ckpt["metrics"])
        rngs = ckpt["rng"]
        resumed_rng = rngs[dd.rank] if len(rngs) == dd.world else None
        if resumed_rng is None and dd.main:
            print(f"note: {resume_path} was written by {len(rngs)} processes, this run has {dd.world}; "
                  "reseeding the random number generators", file=sys.stderr)

    raw_model = model
    if config.sync_bn and not dd.enabled and dd.main:
        print("note: --sync-bn has no effect in a single process", file=sys.stderr)
    if dd.enabled and config.sync_bn:
        # The BatchNorm of a fused depthwise conv (DWConvBNGELU) is converted too, but its batch
        # statistics are computed inside the fused op, per process; the others are synchronised.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        raw_model = model
    if dd.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        model = torch.compile(model)
    # After the scheduler's first step and a resume (which restores the saved run's optimizer
    # settings, graphed or not): this run's.
    set_capturable(optimizer, device if config.cuda_graphs else None)
    graphed = GraphedTrainStep(model, optimizer, criterion, autocast_dtype, device) if config.cuda_graphs else None

    # Per-process randomness (stochastic depth): seeded per rank, or restored from the checkpoint.
    if resumed_rng is not None:
        set_rng_state(resumed_rng, device)
    else:
        _seed_all(config.seed + 1_000_003 * dd.rank + 7919 * start_epoch)
    aug_gen = torch.Generator()

    progress = Progress(config.progress and dd.main)
    if dd.main:
        n_params = sum(p.numel() for p in raw_model.parameters())
        where = f"{dd.world} processes, " if dd.enabled else ""
        prec = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]
        print(f"training {config.run_name()} ({n_params / 1e6:.2f}M parameters) on {where}{device}, backend "
              f"{config.backend}, {prec}{', channels_last' if channels_last else ''}"
              f"{', compiled' if config.compile else ''}{', CUDA graphs' if config.cuda_graphs else ''}; "
              f"{len(train_set)} training / {len(val_set)} validation "
              f"images at {image_size}x{image_size}; {steps_per_epoch} steps of {config.batch_size} per epoch; "
              f"writing to {out}", file=sys.stderr)
        if resume_path is not None:
            print(f"resuming from {resume_path} after epoch {start_epoch} (step {global_step})", file=sys.stderr)

    epochs_done = start_epoch
    for epoch in range(start_epoch, config.epochs):
        if global_step >= total_steps:
            break
        model.train()
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        loader_gen.manual_seed(config.seed + epoch)
        aug_gen.manual_seed(config.seed * 1_000_003 + 7919 * epoch + dd.rank)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct_sum = torch.zeros((), dtype=torch.int64, device=device)
        seen, step_in_epoch = 0, 0
        steps_this_epoch = min(steps_per_epoch, total_steps - global_step)
        t0 = time.perf_counter()
        for images, labels in train_loader:
            if step_in_epoch >= steps_this_epoch:
                break
            images, labels = _to_device(images, labels, device, channels_last)
            if is_digits and config.augment:
                images = data_mod.random_translate(images, config.max_shift, aug_gen)
            lr = optimizer.param_groups[0]["lr"]
            if graphed is not None:
                lr = lr.clone()  # the scheduler fills the optimizer's tensor in place; read it without a sync
                loss, correct = graphed(images, labels, scheduler)
            else:
                loss, correct = train_step(model, images, labels, optimizer, scheduler, criterion, scaler,
                                           autocast_dtype)
            loss_sum += loss.double() * labels.numel()
            correct_sum += correct
            seen += labels.numel()
            step_in_epoch += 1
            global_step += 1
            if progress.due(step_in_epoch, steps_this_epoch):
                elapsed = time.perf_counter() - t0
                progress.update(
                    f"epoch {epoch + 1}/{config.epochs} step {step_in_epoch}/{steps_this_epoch} "
                    f"loss {loss.item():.4f} lr {float(lr):.2e} {seen * dd.world / max(elapsed, 1e-9):.0f} img/s",
                    step_in_epoch, steps_this_epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        totals = torch.stack([loss_sum, correct_sum.double(), torch.tensor(float(seen), device=device,
                                                                           dtype=torch.float64)])
        if dd.enabled:
            dist.all_reduce(totals)
            # BatchNorm running statistics drift apart between processes; evaluate and save rank 0's.
            for buf in raw_model.buffers():
                dist.broadcast(buf, 0)
        loss_total, correct_total, seen_total = totals.tolist()  # one device sync per epoch
        train_loss = loss_total / max(seen_total, 1)
        train_acc = correct_total / max(seen_total, 1)
        val_loss, val_acc = evaluate(raw_model, val_loader, device, autocast_dtype, channels_last, dd)
        record = dict(epoch=epoch + 1, step=global_step, train_loss=train_loss, train_acc=train_acc,
                      val_loss=val_loss, val_acc=val_acc, lr=float(lr), images_per_s=seen_total / seconds,
                      seconds=seconds)
        metrics.append(record)
        progress.end(f"epoch {epoch + 1}/{config.epochs} train loss {train_loss:.4f} acc {train_acc * 100:.2f}% | "
                     f"val loss {val_loss:.4f} acc {val_acc * 100:.2f}% | {record['images_per_s']:.0f} img/s, "
                     f"{seconds:.1f} s")

        rngs = [rng_state(device)]
        if dd.enabled:
            gathered: List[Any] = [None] * dd.world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if dd.main:
            ckpt = dict(format=CHECKPOINT_FORMAT, epoch=epoch + 1, global_step=global_step,
                        model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), rng=rngs,
                        metrics=metrics, model_kwargs=kwargs, config=dataclasses.asdict(config))
            _atomic_save(ckpt, os.path.join(out, f"checkpoint_epoch{epoch + 1}.pt"))
            _atomic_save(ckpt, os.path.join(out, "last.pt"))
            write_metrics(metrics, out, config.log_format)
            if config.plot:
                plot_curves(metrics, os.path.join(out, "curves.png"))
        if dd.enabled:
            dist.barrier()
        epochs_done = epoch + 1

    if epochs_done == start_epoch:  # nothing left to train (e.g. resumed from a finished run): measure
        val_acc = evaluate(raw_model, val_loader, device, autocast_dtype, channels_last, dd)[1]
    else:
        val_acc = metrics[-1]["val_acc"]
    if dd.main:
        print(f"validation accuracy: {val_acc * 100:.2f}%", flush=True)
    return TrainResult(model=raw_model, metrics=metrics, val_acc=val_acc, out_dir=out, global_step=global_step,
                       epoch=epochs_done)
