"""CUDA-graph replay of a step: ``coatnet_fast.cuda_graphs.CapturedStep``, ``train --cuda-graphs``
(``GraphedTrainStep``) and the model benchmark's ``:graphs`` providers.

CUDA graphs exist only on GPUs. On the CPU these tests check what is decided before any capture:
the errors that name a device, a precision or an option, the learning rates kept as tensors that
the scheduler fills in place (what a captured AdamW reads), and the provider names. On a GPU the
same file replays real steps: every call is one step (eager, then captured, then replayed), and
a graphed training run on each backend follows the eager one step for step, stochastic depth and
BatchNorm running statistics included.
"""
import json
import subprocess
import sys

import pytest
import torch

from coatnet_fast import benchmark, cli, cuda_graphs, data, ext, set_backend
from coatnet_fast import train as T
from coatnet_fast.ops import dispatch

HAVE_CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not HAVE_CUDA, reason="CUDA graphs need a GPU (replays run there only)")


# --- what is decided before a capture (every machine) -----------------------------------------

def test_captured_step_names_a_device_that_cannot_capture():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device; got device 'cpu'"):
        cuda_graphs.CapturedStep(lambda: None, "cpu")
    with pytest.raises(ValueError, match="eager_calls must be an integer >= 1"):
        cuda_graphs.CapturedStep(lambda: None, "cpu", eager_calls=0)
    with pytest.raises(TypeError, match="fn must be callable"):
        cuda_graphs.CapturedStep(None, "cpu")


def test_a_bare_cuda_device_is_the_current_one(monkeypatch):
    """Tensors made on "cuda" report cuda:<current>, and torch.device("cuda") != torch.device("cuda:0"):
    the graphed step compared its learning rates' device with a bare "cuda" and refused them (seen
    on the H200, 2026-11-27), so check_device gives the index."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert cuda_graphs.check_device("cuda") == torch.device("cuda", 1)
    assert cuda_graphs.check_device(torch.device("cuda", 0)) == torch.device("cuda", 0)


def test_train_cuda_graphs_on_the_cpu_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["train", "--cuda-graphs", "--device", "cpu", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--cuda-graphs" in err and "CUDA graphs need a CUDA device" in err
    assert not list(tmp_path.iterdir())  # refused before anything was built or written


@pytest.mark.parametrize("what, message", [
    ("compile", "--cuda-graphs with --compile: choose one"),
    ("ddp", "--cuda-graphs runs in one process"),
    ("fp16", "fp16 needs a GradScaler"),
])
def test_train_cuda_graphs_limits_are_named(monkeypatch, what, message):
    # The device check passes as on a GPU, so that each later limit is reached on any machine.
    monkeypatch.setattr(cuda_graphs, "check_device", lambda device: torch.device(device))
    config = T.TrainConfig(cuda_graphs=True, compile=what == "compile")
    dd = T._Dist(rank=0, world=2 if what == "ddp" else 1)
    dtype = torch.float16 if what == "fp16" else torch.bfloat16
    with pytest.raises(ValueError, match=message):
        T._check_cuda_graphs(config, torch.device("cuda"), dd, dtype)
    T._check_cuda_graphs(T.TrainConfig(cuda_graphs=True), torch.device("cuda"), T._Dist(), torch.bfloat16)


def test_graphed_train_step_needs_a_capturable_optimizer_and_tensor_rates(monkeypatch):
    # The device check passes for the CPU here, so that the optimizer's checks are reached.
    monkeypatch.setattr(cuda_graphs, "check_device", lambda device: torch.device(device))
    cpu = torch.device("cpu")
    model = torch.nn.Linear(3, 2)
    criterion = torch.nn.CrossEntropyLoss()
    opt = T.build_optimizer(model, lr=1e-3, weight_decay=0.0)
    with pytest.raises(ValueError, match="optimizer must be capturable"):
        T.GraphedTrainStep(model, opt, criterion, None, cpu)
    for group in opt.param_groups:
        group["capturable"] = True
    with pytest.raises(ValueError, match="learning rates must be tensors on cpu"):
        T.GraphedTrainStep(model, opt, criterion, None, cpu)
    T.set_capturable(opt, cpu)
    with pytest.raises(ValueError, match="fp16 needs a GradScaler"):
        T.GraphedTrainStep(model, opt, criterion, torch.float16, cpu)
    step = T.GraphedTrainStep(model, opt, criterion, torch.bfloat16, cpu)  # accepted; nothing ran
    opt.param_groups[0]["lr"] = torch.tensor(1e-3)  # rebound, not filled: a graph would miss it
    with pytest.raises(RuntimeError, match="replaced instead of filled in place"):
        step(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), None)


def test_learning_rates_as_tensors_are_filled_in_place_by_the_schedule():
    """A captured AdamW step reads the learning-rate tensor it saw at capture: the scheduler must
    fill that same tensor, with the values a float-rate run gets, step after step."""
    model = torch.nn.Linear(3, 2)
    runs = {}
    for storage in ("float", "tensor"):
        opt = T.build_optimizer(model, lr=2e-3, weight_decay=0.05)
        sched = T.build_scheduler(opt, warmup_steps=3, total_steps=10)
        if storage == "tensor":
            T.set_capturable(opt, torch.device("cpu"))
        held = [g["lr"] for g in opt.param_groups]
        values = []
        for _ in range(10):
            values += [float(g["lr"]) for g in opt.param_groups]
            T._scheduler_step(sched)
        assert all(g["lr"] is h for g, h in zip(opt.param_groups, held)) == (storage == "tensor")
        runs[storage] = values
    assert runs["tensor"] == pytest.approx(runs["float"], rel=1e-6)
    groups = len(opt.param_groups)  # the first step's rate, and the cosine decay after the warm-up
    assert runs["float"][0] == pytest.approx(2e-3 / 3) and runs["float"][-groups] < runs["float"][3 * groups]


def test_a_resume_puts_back_this_runs_optimizer_settings():
    """load_state_dict restores the saved run's groups (capturable, tensor rates) and step counts;
    set_capturable(None), as a resumed eager run calls it, undoes a graphed run's settings."""
    model = torch.nn.Linear(3, 2)
    opt = T.build_optimizer(model, lr=2e-3, weight_decay=0.05)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    T.set_capturable(opt, torch.device("cpu"))  # as a graphed run saves it (capturable AdamW steps on GPUs only)
    saved = opt.state_dict()
    assert all(g["capturable"] and torch.is_tensor(g["lr"]) for g in saved["param_groups"])
    resumed = T.build_optimizer(model, lr=2e-3, weight_decay=0.05)
    resumed.load_state_dict(saved)
    T.set_capturable(resumed, None)
    assert all(not g["capturable"] and type(g["lr"]) is float and g["lr"] == pytest.approx(2e-3)
               for g in resumed.param_groups)
    steps = [s["step"] for s in resumed.state.values()]
    assert steps and all(s.device.type == "cpu" and float(s) == 1.0 for s in steps)


def test_graphs_providers_parse_and_need_cuda(tmp_path):
    assert benchmark.split_graphs("backend:triton:compile:graphs") == ("backend:triton:compile", True)
    assert benchmark.split_graphs("eager:graphs") == ("eager", True)
    assert benchmark.split_graphs("graphs") == ("graphs", False)
    assert benchmark.parse_provider("backend:triton:compile:graphs") == ("reference", "triton", True)
    assert benchmark.parse_provider("compile:graphs") == ("reference", None, True)
    assert benchmark.parse_provider("timm:graphs") == ("timm", None, False)
    for bad in ("graphs", "backend:triton:graphs:compile", "eager:graphs:graphs"):
        with pytest.raises(benchmark.ProviderError, match="unknown provider"):
            benchmark.parse_provider(bad)
    if HAVE_CUDA:
        return  # test_bench_graphs_providers_on_a_gpu measures them
    out = tmp_path / "graphs.json"
    argv = ["bench", "--smoke", "--models", "coatnet_0", "--providers", "eager,eager:graphs", "--modes", "train",
            "--out", str(out)]
    assert cli.main(argv) == 1
    rows = {r["provider"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["eager"]["images_per_s"] > 0
    assert "eager:graphs: CUDA graphs need a CUDA device" in rows["eager:graphs"]["error"]


# --- replays (GPU) ------------------------------------------------------------------------------

@NEEDS_CUDA
def test_every_call_is_one_step_eager_then_captured_then_replayed():
    counter = torch.zeros(1, device="cuda")
    python_calls = []

    def step():
        python_calls.append(1)
        counter.add_(1)
        return counter * 2

    captured = cuda_graphs.CapturedStep(step, "cuda", eager_calls=2)
    outputs = [captured() for _ in range(5)]
    torch.cuda.synchronize()
    assert counter.item() == 5  # two eager calls, the capturing call's replay, two replays
    assert len(python_calls) == 3 and captured.captured  # the capture ran step's Python once
    assert outputs[2] is outputs[3] is outputs[4] and outputs[4].item() == 10  # static, overwritten
    assert outputs[0] is not outputs[1]


SYNCING_STEP = """
import os
import torch
from coatnet_fast import cuda_graphs
x = torch.ones(1, device="cuda")
captured = cuda_graphs.CapturedStep(lambda: x.add_(1).item(), "cuda", eager_calls=1)
captured()
try:
    captured()
except RuntimeError as e:
    print(e, flush=True)
os._exit(0)  # skip teardown after an invalidated capture
"""


@NEEDS_CUDA
def test_a_step_that_syncs_says_why_it_cannot_be_captured():
    # In a process of its own: a failed capture may leave the CUDA context unusable.
    done = subprocess.run([sys.executable, "-c", SYNCING_STEP], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "capturing the step as a CUDA graph failed" in done.stdout and "must not wait on the host" in done.stdout


GRAPH_STEPS = 8
# 64x64 input, so the last stage's window is 2x2: at 32x32 it is 1x1, where the bias table has no
# effect on the output and eager's gradient is exactly zero while the fused backward's is rounding
# noise (~1e-8), which AdamW normalizes into steps of about lr whose sign differs between any two
# runs (seen on the H200, 2026-11-27: 100% relative difference in s4's table and nowhere else).
PARITY_MODEL = dict(image_size=64, in_channels=1, num_classes=10, num_blocks=(1, 1, 1, 1, 1),
                    channels=(8, 8, 16, 32, 32), heads=(1, 1, 2, 2), dim_head=16, drop_path_rate=0.1)
# ext only with its CUDA part (why_not without inputs asks only whether the extension builds).
GRAPH_BACKENDS = [b for b in dispatch.BACKENDS if any(not dispatch.why_not(op, b) for op in dispatch.ops())
                  and (b != "ext" or ext.cuda_unavailable_reason() is None)]


def _steps(backend, graphed: bool):
    """GRAPH_STEPS AdamW steps (capturable, tensor rates) on CUDA in fp32, stochastic depth on:
    the losses and the final state dict, running statistics included."""
    x, y = (t.cuda() for t in data.digits("train", image_size=PARITY_MODEL["image_size"]).tensors)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: GRAPH_STEPS * 8].cuda()
    torch.manual_seed(0)
    model = T.build_model(dict(PARITY_MODEL)).cuda()
    set_backend(model, backend, ops=[op for op in dispatch.ops() if not dispatch.why_not(op, backend)])
    model.train()
    opt = T.build_optimizer(model, lr=3e-3, weight_decay=0.05)
    sched = T.build_scheduler(opt, warmup_steps=3, total_steps=GRAPH_STEPS)
    T.set_capturable(opt, torch.device("cuda"))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    step = T.GraphedTrainStep(model, opt, criterion, None, torch.device("cuda"), eager_calls=2) if graphed else None
    torch.cuda.manual_seed(1)  # the same stochastic-depth draws for both runs
    losses = []
    for i in range(GRAPH_STEPS):
        idx = order[i * 8:(i + 1) * 8]
        if graphed:
            loss, _ = step(x[idx], y[idx], sched)
        else:
            loss, _ = T.train_step(model, x[idx], y[idx], opt, sched, criterion)
        losses.append(loss.item())
    assert not graphed or step.captured
    return losses, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@NEEDS_CUDA
@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_graphed_training_follows_eager_training(backend):
    """Two eager calls, a capture, five replays: the same losses and final state (parameters,
    BatchNorm running statistics, num_batches_tracked) as eight eager steps. Replays that froze
    the stochastic-depth draws, read a stale learning rate or skipped the running-statistics
    update would drift away from the eager run."""
    ref_losses, ref_state = _steps(backend, graphed=False)
    losses, state = _steps(backend, graphed=True)
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    assert ref_losses[-1] != ref_losses[-2]
    for name, ref in ref_state.items():
        got = state[name]
        if not ref.is_floating_point():
            assert torch.equal(got, ref), name
            continue
        diff = (got - ref).double().norm().item()
        assert diff <= 1e-3 * max(ref.double().norm().item(), 1e-6), f"{name}: {diff}"


@NEEDS_CUDA
def test_train_command_with_cuda_graphs(tmp_path, capsys):
    """The command end to end on the triton backend in bf16: it trains (the loss falls), says it
    replays graphs and logs float learning rates; and a run moves between eager and graphed
    epochs through its checkpoints (each resume puts back its own optimizer settings)."""
    out = tmp_path / "run"
    args = ["train", "--backend", "triton", "--steps-per-epoch", "6", "--batch-size", "32", "--drop-path", "0.1",
            "--no-plot", "--no-progress", "--device", "cuda", "--precision", "bf16", "--out", str(out)]
    assert cli.main(args + ["--cuda-graphs", "--epochs", "2"]) == 0
    captured = capsys.readouterr()
    assert "CUDA graphs" in captured.err and "validation accuracy" in captured.out
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics) == 2 and metrics[1]["train_loss"] < metrics[0]["train_loss"]
    assert all(type(m["lr"]) is float for m in metrics)
    assert cli.main(args + ["--epochs", "3", "--resume", "auto"]) == 0  # eager, from a graphed checkpoint
    assert cli.main(args + ["--cuda-graphs", "--epochs", "4", "--resume", "auto"]) == 0  # and back
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 4 and ckpt["global_step"] == 24
    assert all(g["capturable"] for g in ckpt["optimizer"]["param_groups"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["step"] for m in metrics] == [6, 12, 18, 24] and metrics[3]["train_loss"] < metrics[0]["train_loss"]


@NEEDS_CUDA
def test_bench_graphs_providers_on_a_gpu(tmp_path):
    out = tmp_path / "graphs.json"
    argv = ["bench", "--smoke", "--models", "coatnet_0", "--providers", "eager,eager:graphs,backend:triton:graphs",
            "--out", str(out)]
    assert cli.main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in ("eager", "eager:graphs", "backend:triton:graphs") for m in ("train", "infer")}
    assert all(r["images_per_s"] > 0 for r in rows)
