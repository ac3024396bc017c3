"""`coatnet-fast train`: the digits data, the command end to end, exact resume (fp32 and fp16 with
its grad scaler), training parity of the fused backends with eager, DistributedDataParallel on
the CPU (gloo), the >= 95% digits claim of the README's default run, --precision,
--channels-last and --compile, and --data through an ImageFolder (a stub torchvision here, the
real one where it is installed)."""
import csv
import importlib.util
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import types

import pytest
import torch

from coatnet_fast import cli, data, get_backend, set_backend
from coatnet_fast.models import ConvBN
from coatnet_fast import train as T
from coatnet_fast.ops import dispatch

FINAL_LINE = re.compile(r"^validation accuracy: (\d+\.\d\d)%$")


def last_stdout_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "nothing on stdout"
    return lines[-1]


def strip_timing(metrics):
    return [{k: v for k, v in m.items() if k not in T.TIMING_KEYS} for m in metrics]


# The smallest model the command tests train (0.03M parameters; a few steps take about a second).
TINY_CONFIG = '{"channels": [8, 16, 16, 32, 32], "heads": 2}'
TINY_RUN = ["train", "--config", TINY_CONFIG, "--batch-size", "16", "--epochs", "1", "--no-plot", "--no-progress",
            "--device", "cpu"]


@pytest.fixture
def forwards(monkeypatch):
    """Watches the model train() builds: a record per forward of whether it was training, the
    autocast state inside it, the input's and logits' shape and dtype, and the memory format of
    stage s1's input (8 channels at 16x16, where channels_last is observable; a 1-channel image is
    both layouts at once)."""
    records = []
    real_build = T.build_model

    def build_and_watch(kwargs):
        model = real_build(kwargs)
        s1_inputs = []

        def on_s1(module, inputs):
            x = inputs[0]
            s1_inputs.append((x.is_contiguous(memory_format=torch.channels_last), x.is_contiguous()))

        def on_forward(module, inputs, output):
            x = inputs[0]
            records.append(dict(
                training=module.training, autocast=torch.is_autocast_enabled("cpu"),
                autocast_dtype=torch.get_autocast_dtype("cpu"), input_shape=tuple(x.shape), input_dtype=x.dtype,
                logits_shape=tuple(output.shape), logits_dtype=output.dtype,
                logits_finite=bool(torch.isfinite(output).all()), s1_input=s1_inputs.pop()))

        model.s1.register_forward_pre_hook(on_s1)
        model.register_forward_hook(on_forward)
        return model

    monkeypatch.setattr(T, "build_model", build_and_watch)
    return records


# --- 1. data --------------------------------------------------------------------------------

def test_digits_shapes_split_and_normalisation():
    train_set, val_set = data.digits("train"), data.digits("val")
    xt, yt = train_set.tensors
    xv, yv = val_set.tensors
    assert xt.shape[1:] == (1, 32, 32) and xv.shape[1:] == (1, 32, 32)
    assert xt.dtype == torch.float32 and yt.dtype == torch.int64 and yv.dtype == torch.int64
    assert len(xt) + len(xv) == 1797
    assert len(xv) == pytest.approx(0.2 * 1797, abs=10)
    # Stratified: every class about 20% in validation.
    for c in range(10):
        n_val, n_all = int((yv == c).sum()), int((yt == c).sum() + (yv == c).sum())
        assert abs(n_val - 0.2 * n_all) <= 1, (c, n_val, n_all)
    # Normalised with the training split's statistics (so the validation split is close, not exact).
    assert xt.mean().item() == pytest.approx(0.0, abs=1e-5) and xt.std().item() == pytest.approx(1.0, abs=1e-5)
    assert abs(xv.mean().item()) < 0.1 and xv.mean().item() != pytest.approx(0.0, abs=1e-6)


def test_digits_split_is_disjoint_and_deterministic():
    labels = data._load_digits_arrays()[1]
    tr, va = data.digits_split_indices(labels, 0.2, seed=0)
    assert not set(tr.tolist()) & set(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(1797))
    tr2, va2 = data.digits_split_indices(labels, 0.2, seed=0)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert not torch.equal(va, data.digits_split_indices(labels, 0.2, seed=1)[1])
    # The datasets follow the indices: the same call twice gives the same tensors.
    a, b = data.digits("val", seed=3), data.digits("val", seed=3)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert torch.equal(a.tensors[1], labels[data.digits_split_indices(labels, 0.2, seed=3)[1]])


def test_digits_are_upsampled_bilinearly():
    images = data._load_digits_arrays()[0]
    labels = data._load_digits_arrays()[1]
    tr, _ = data.digits_split_indices(labels, 0.2, seed=0)
    x = data.digits("train", image_size=64).tensors[0]
    up = torch.nn.functional.interpolate((images[tr] / 16).unsqueeze(1), size=(64, 64), mode="bilinear",
                                         align_corners=False)
    torch.testing.assert_close(x, (up - up.mean()) / up.std())


def test_random_translate_moves_each_image_by_at_most_max_shift():
    x = torch.zeros(64, 1, 12, 12) - 1.0
    x[:, :, 6, 5] = 3.0  # one bright pixel on a background of -1
    g = torch.Generator().manual_seed(0)
    y = data.random_translate(x, 2, g)
    assert y.shape == x.shape
    assert torch.all(y.amin(dim=(1, 2, 3)) == -1.0)  # the border is filled with the background
    pos = (y[:, 0] == 3.0).flatten(1).float().argmax(dim=1)
    rows, cols = pos // 12, pos % 12
    assert ((rows - 6).abs() <= 2).all() and ((cols - 5).abs() <= 2).all()
    assert len({(int(r), int(c)) for r, c in zip(rows, cols)}) > 10  # per-image shifts, all 25 possible
    assert torch.equal(y, data.random_translate(x, 2, torch.Generator().manual_seed(0)))
    assert data.random_translate(x, 0, g) is x
    # The input's memory format is kept exactly: a 1-channel NCHW batch does not come back with
    # channels_last strides (which convolutions follow), and a channels_last batch stays so.
    assert y.stride() == x.stride()
    xc = torch.randn(4, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    yc = data.random_translate(xc, 2, g)
    assert yc.stride() == xc.stride() and not yc.is_contiguous()
    assert data.random_translate(xc.contiguous(), 2, g).is_contiguous()


# --- schedule and progress ---------------------------------------------------------------------

def test_warmup_then_cosine_per_step():
    model = torch.nn.Linear(2, 2)
    opt = T.build_optimizer(model, lr=1.0, weight_decay=0.1)
    sched = T.build_scheduler(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[8] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine reaches 0 at the end
    # Weight decay on matrices only.
    decays = {tuple(p.shape): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays == {(2, 2): 0.1, (2,): 0.0}


def test_progress_lines_without_a_terminal_and_in_place_with_one():
    plain = io.StringIO()
    p = T.Progress(True, plain, lines=2)
    for step in range(1, 5):
        p.update(f"step {step}", step, 4)
    p.end("done")
    assert plain.getvalue() == "step 2\nstep 4\ndone\n"

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    p = T.Progress(True, tty)
    p.update("step 1", 1, 2)
    p.end("done")
    assert tty.getvalue().startswith("\rstep 1") and "\n" not in tty.getvalue()[:-1]
    assert T.Progress(False, plain).enabled is False


# --- 2. the command end to end -------------------------------------------------------------

@pytest.mark.parametrize("log_format", ["json", "csv"])
def test_train_command_writes_checkpoints_log_plot_and_final_line(tmp_path, capsys, log_format):
    out = tmp_path / "run"
    code = cli.main(["train", "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "32",
                     "--out", str(out), "--log-format", log_format])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for name in ("checkpoint_epoch1.pt", "checkpoint_epoch2.pt", "last.pt", "curves.png"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if log_format == "json":
        metrics = json.loads((out / "metrics.json").read_text())
        assert not (out / "metrics.csv").exists()
    else:
        assert not (out / "metrics.json").exists()
        rows = list(csv.DictReader((out / "metrics.csv").open()))
        assert list(rows[0]) == list(T.METRIC_KEYS)
        metrics = [{k: float(v) for k, v in row.items()} for row in rows]
    assert [m["epoch"] for m in metrics] == [1, 2] and [m["step"] for m in metrics] == [2, 4]
    for m in metrics:
        assert set(T.METRIC_KEYS) <= set(m)
        assert 0.0 <= m["val_acc"] <= 1.0 and m["train_loss"] > 0 and m["images_per_s"] > 0
    final = last_stdout_line(captured.out)
    match = FINAL_LINE.match(final)
    assert match, final
    assert float(match.group(1)) == pytest.approx(100 * metrics[-1]["val_acc"], abs=0.006)
    # Progress went to stderr: epoch, step, loss, lr, images per second.
    assert re.search(r"epoch 1/2 step 2/2 loss \d+\.\d+ lr \S+ \d+ img/s", captured.err), captured.err
    ckpt = torch.load(out / "last.pt", weights_only=True)  # plain data: loads without pickle
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 4
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "metrics", "model_kwargs"} <= set(ckpt)
    assert {"python", "torch", "numpy"} <= set(ckpt["rng"][0])
    model = T.build_model(ckpt["model_kwargs"])
    model.load_state_dict(ckpt["model"])


def test_no_plot_max_steps_and_a_config(tmp_path, capsys):
    out = tmp_path / "run"
    config = '{"channels": [8, 16, 16, 32, 32], "heads": 2}'
    code = cli.main(["train", "--config", config, "--epochs", "3", "--steps-per-epoch", "2", "--max-steps", "3",
                     "--batch-size", "16", "--no-plot", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["step"] for m in metrics] == [2, 3]  # the cap ends training within epoch 2
    assert not (out / "curves.png").exists() and not (out / "checkpoint_epoch3.pt").exists()
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["model_kwargs"]["channels"] == [8, 16, 16, 32, 32] and ckpt["model_kwargs"]["heads"] == 2
    assert FINAL_LINE.match(last_stdout_line(captured.out))


def test_bad_config_and_sync_bn_on_cpu_are_clear_errors(tmp_path, capsys, monkeypatch):
    code = cli.main(["train", "--config", '{"chanels": [8, 16, 16, 32, 32]}', "--out", str(tmp_path)])
    assert code == 2 and "chanels" in capsys.readouterr().err
    code = cli.main(["train", "--model", "coatnet_0", "--config", '{"channels": [64, 96]}', "--out", str(tmp_path)])
    assert code == 2 and "channels" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = cli.main(["train", "--sync-bn", "--device", "cpu", "--out", str(tmp_path)])
    assert code == 2 and "SyncBatchNorm" in capsys.readouterr().err


# --- 3. exact resume ------------------------------------------------------------------------

class _Interrupted(Exception):
    pass


def _straight_and_resumed(tmp_path, monkeypatch, args):
    """Runs ``args`` (2 epochs) straight, and again interrupted after epoch 1's checkpoint and log,
    then resumed with --resume auto from a different process RNG state. Returns the two
    last.pt checkpoints and the two metrics.json logs."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli.main(args + ["--out", str(straight)]) == 0

    real_write = T.write_metrics

    def write_then_stop(metrics, out, fmt):
        real_write(metrics, out, fmt)
        raise _Interrupted  # as if the process died after epoch 1's checkpoint and log

    monkeypatch.setattr(T, "write_metrics", write_then_stop)
    with pytest.raises(_Interrupted):
        cli.main(args + ["--out", str(resumed)])
    monkeypatch.setattr(T, "write_metrics", real_write)
    assert not (resumed / "checkpoint_epoch2.pt").exists()
    torch.manual_seed(1234)  # the process's RNG state must not matter: the checkpoint's is restored
    assert cli.main(args + ["--out", str(resumed), "--resume", "auto"]) == 0
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    ma = json.loads((straight / "metrics.json").read_text())
    mb = json.loads((resumed / "metrics.json").read_text())
    return a, b, ma, mb


def _assert_same_training_state(a, b, steps):
    """Bit-identical model, optimizer, scheduler, grad scaler and RNG states."""
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"] == steps
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["scheduler"] == b["scheduler"]
    assert a["scaler"] == b["scaler"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    assert a["rng"][0]["python"] == b["rng"][0]["python"]


def test_resume_continues_exactly(tmp_path, capsys, monkeypatch):
    """CPU, fp32: 2 epochs straight vs 1 epoch, an interruption, and --resume auto: bit-identical model,
    optimizer, scheduler and RNG states, and the same logged metrics (timings aside). Stochastic
    depth and the digits translation make the RNG states matter."""
    args = ["train", "--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "32", "--drop-path", "0.2",
            "--warmup-epochs", "0.5", "--no-plot", "--device", "cpu", "--precision", "fp32"]
    a, b, ma, mb = _straight_and_resumed(tmp_path, monkeypatch, args)
    assert "resuming from" in capsys.readouterr().err
    _assert_same_training_state(a, b, steps=6)
    assert a["scaler"] == {}  # fp32: the grad scaler is disabled
    assert len(ma) == 2 and strip_timing(ma) == strip_timing(mb)
    # And a model that really trained: the straight run's epoch-1 and epoch-2 weights differ.
    first = torch.load(tmp_path / "straight" / "checkpoint_epoch1.pt", weights_only=True)
    assert not torch.equal(first["model"]["fc.weight"], a["model"]["fc.weight"])


def test_resume_continues_exactly_under_fp16(tmp_path, capsys, monkeypatch):
    """CPU, fp16 autocast with the grad scaler (torch.amp.GradScaler("cpu")): as above, and the
    scaler's state carries over. At its initial scale of 2**16 this model's first fp16 backward
    passes overflow, so the scaler skips steps and halves its scale, then counts good steps
    (measured: epoch 1 ends at scale 2**14, growth tracker 2, 2 of 4 steps taken). A resume
    that did not restore the scaler would start again at 2**16, skip other steps and diverge."""
    args = ["train", "--config", TINY_CONFIG, "--epochs", "2", "--steps-per-epoch", "4", "--batch-size", "16",
            "--drop-path", "0.2", "--warmup-epochs", "0.5", "--no-plot", "--device", "cpu", "--precision", "fp16"]
    a, b, ma, mb = _straight_and_resumed(tmp_path, monkeypatch, args)
    assert "resuming from" in capsys.readouterr().err
    # The state at the interruption is one a fresh scaler does not have: backed off, counting.
    first = torch.load(tmp_path / "resumed" / "checkpoint_epoch1.pt", weights_only=True)
    assert first["scaler"]["scale"] < 2.0 ** 16 and first["scaler"]["_growth_tracker"] > 0, first["scaler"]
    assert 0 < int(first["optimizer"]["state"][0]["step"]) < 4  # some of epoch 1's steps were skipped
    _assert_same_training_state(a, b, steps=8)
    assert a["scaler"]["scale"] == b["scaler"]["scale"] and a["scaler"]["_growth_tracker"] == b["scaler"]["_growth_tracker"]
    assert int(a["optimizer"]["state"][0]["step"]) > int(first["optimizer"]["state"][0]["step"])  # epoch 2 stepped
    assert len(ma) == 2 and strip_timing(ma) == strip_timing(mb)
    assert all(math.isfinite(m[k]) for m in ma for k in ("train_loss", "val_loss"))


def test_resume_rejects_another_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "1", "--steps-per-epoch", "1", "--no-plot", "--out", str(out)]) == 0
    code = cli.main(["train", "--config", '{"channels": [8, 16, 16, 32, 32]}', "--resume", str(out / "last.pt"),
                     "--out", str(tmp_path / "other")])
    assert code == 2 and "last.pt" in capsys.readouterr().err


# --- 4. training parity of the fused backends ----------------------------------------------

PARITY_STEPS = 20
# Loss at every step: relative 1e-4. Final parameters: per tensor, ||p - p_eager|| / ||p_eager||
# <= 1e-3. Measured on CPU: about 3e-7 for the loss and 1e-6 for the parameters.
LOSS_RTOL, PARAM_RTOL = 1e-4, 1e-3
# Small enough for Triton's interpreter (about 30 s): 32x32 input, 16-wide heads (Triton's
# head dims are 16/32/64/128), batch 4. S1/S2 are MBConv (dwconv_bn_gelu), S3/S4 attention over
# 2x2 and 1x1 windows (rel_bias_attention).
PARITY_MODEL = dict(image_size=32, in_channels=1, num_classes=10, num_blocks=(1, 1, 1, 1, 1),
                    channels=(4, 4, 8, 16, 16), heads=(1, 1, 2, 2), dim_head=16, drop_path_rate=0.1)
# Triton takes CPU tensors only under its interpreter (set by conftest where there is no GPU).
PARITY_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED_BACKENDS = [b for b in dispatch.BACKENDS
                  if b != "eager" and any(not dispatch.why_not(op, b) for op in dispatch.ops())]


def _train_steps(backend, conv_bn_in_training=False):
    """PARITY_STEPS AdamW steps, fp32, same seed and data for every backend (with
    ``conv_bn_in_training``, ConvBN's batch_norm_act in training too). Returns the losses,
    the final state dict, and (for the reference) which parameter elements never had a nonzero
    gradient."""
    x, y = (t.to(PARITY_DEVICE) for t in data.digits("train").tensors)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: PARITY_STEPS * 4].to(y.device)
    torch.manual_seed(0)
    model = T.build_model(dict(PARITY_MODEL)).to(PARITY_DEVICE)
    ops = [op for op in dispatch.ops() if not dispatch.why_not(op, backend)]
    set_backend(model, backend, ops=ops)
    assert get_backend(model) == backend
    for module in model.modules():
        if isinstance(module, ConvBN):
            module.fused_in_training = conv_bn_in_training
    model.train()
    opt = T.build_optimizer(model, lr=3e-3, weight_decay=0.05)
    sched = T.build_scheduler(opt, warmup_steps=5, total_steps=PARITY_STEPS)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    dead = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    losses = []
    for i in range(PARITY_STEPS):
        idx = order[i * 4:(i + 1) * 4]
        loss, _ = T.train_step(model, x[idx], y[idx], opt, sched, criterion)
        losses.append(loss.item())
        for n, p in model.named_parameters():
            if p.grad is not None:
                dead[n] &= p.grad == 0
    return losses, {k: v.cpu().clone() for k, v in model.state_dict().items()}, {k: v.cpu() for k, v in dead.items()}


@pytest.fixture(scope="module")
def eager_run():
    return _train_steps("eager")


def test_parity_covers_every_fused_backend_here():
    # On a CPU machine with Triton and a C++ compiler both run; the list is what the test runs.
    assert FUSED_BACKENDS, "no fused backend is usable here: nothing to compare with eager"


@pytest.mark.parametrize("backend, conv_bn_in_training",
                         [(b, False) for b in FUSED_BACKENDS]
                         + [(b, True) for b in FUSED_BACKENDS if not dispatch.why_not("batch_norm_act", b)],
                         ids=lambda v: {False: "default", True: "conv-bn-fused-in-training"}.get(v, v))
def test_training_parity_with_eager(backend, conv_bn_in_training, eager_run):
    ref_losses, ref_state, dead = eager_run
    losses, state, _ = _train_steps(backend, conv_bn_in_training)
    assert len(losses) == PARITY_STEPS
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"step {step}: loss {a} vs eager {b}"
    assert ref_losses[-1] < ref_losses[0]  # it trains
    # Parameters whose eager gradient was exactly zero at every step do not affect the loss (q and
    # k of attention over a 1x1 window, whose softmax is constant, and that window's bias table).
    # A fused kernel's rounding gives them ~1e-9 gradients, which Adam normalises into
    # learning-rate-sized steps; they are left out of the comparison, and must be exactly those.
    assert {name for name, m in dead.items() if m.any()} == {"s4.0.attn.qkv.weight", "s4.0.attn.relative_bias_table"}
    qk_rows = 2 * PARITY_MODEL["heads"][3] * PARITY_MODEL["dim_head"]  # qkv's rows are q, k, v
    assert dead["s4.0.attn.qkv.weight"][:qk_rows].all() and not dead["s4.0.attn.qkv.weight"][qk_rows:].any()
    for name, ref in ref_state.items():
        got = state[name]
        if not ref.is_floating_point():
            assert torch.equal(got, ref), name
            continue
        keep = ~dead[name] if name in dead else torch.ones_like(ref, dtype=torch.bool)
        diff = (got[keep] - ref[keep]).double().norm().item()
        scale = max(ref[keep].double().norm().item(), 1e-6)
        assert diff <= PARAM_RTOL * scale, f"{name}: relative difference {diff / scale:.2e}"


# --- 5. DistributedDataParallel on the CPU ---------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    args = cli.build_parser().parse_args(
        ["train", "--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "32", "--drop-path", "0.1",
         "--device", "cpu", "--out", out, "--no-progress"])
    result = T.train(T.config_from_args(args))
    torch.save({"state": result.model.state_dict(), "val_acc": result.val_acc, "metrics": result.metrics},
               os.path.join(out, f"rank{rank}.pt"))


def test_ddp_two_cpu_processes_with_gloo(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "ddp")
    os.makedirs(out)
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    r0 = torch.load(os.path.join(out, "rank0.pt"), weights_only=True)
    r1 = torch.load(os.path.join(out, "rank1.pt"), weights_only=True)
    for k in r0["state"]:  # parameters and buffers identical in both processes
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["val_acc"] == r1["val_acc"]  # validation metrics are reduced over both processes
    assert strip_timing(r0["metrics"]) == strip_timing(r1["metrics"])
    # Only rank 0 wrote the log and checkpoints, and they hold what the processes trained.
    metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert strip_timing(metrics) == strip_timing(r0["metrics"]) and [m["step"] for m in metrics] == [3, 6]
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    for k in ckpt["model"]:
        assert torch.equal(ckpt["model"][k], r0["state"][k]), k
    assert len(ckpt["rng"]) == 2  # each process's RNG state, for an exact resume
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    # Each validation image was counted exactly once: one process on the whole split agrees.
    model = T.build_model(ckpt["model_kwargs"])
    model.load_state_dict(ckpt["model"])
    val = torch.utils.data.DataLoader(data.digits("val"), batch_size=512)
    _, acc = T.evaluate(model, val, torch.device("cpu"), None, False, T._Dist())
    assert acc == pytest.approx(r0["val_acc"], abs=1e-12)


# --- 6. the README's default run reaches 95% ------------------------------------------------

def test_default_digits_run_reaches_95_percent(tmp_path):
    """`coatnet-fast train` with its defaults (the README's command; --out only keeps the run
    out of the working tree): the small digits CoAtNet on the CPU, >= 95% validation accuracy.
    About 20 s of training on two idle cores."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-m", "coatnet_fast", "train", "--out", str(tmp_path / "digits")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    final = last_stdout_line(done.stdout)
    match = FINAL_LINE.match(final)
    assert match, final
    assert float(match.group(1)) >= 95.0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "digits" / "metrics.json").read_text())
    assert len(metrics) == T.TrainConfig().epochs and metrics[-1]["val_acc"] >= 0.95


# --- 7. --data errors -------------------------------------------------------------------------

def _image_folder_tree(root):
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
    return root


def test_data_without_torchvision_names_it(tmp_path, capsys, monkeypatch):
    root = _image_folder_tree(tmp_path / "images")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    code = cli.main(["train", "--data", str(root), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "torchvision" in err and "pip install torchvision" in err
    assert not (tmp_path / "run").exists()


def test_data_with_a_wrong_path_names_it(tmp_path, capsys):
    missing = tmp_path / "no_such_dir"
    assert cli.main(["train", "--data", str(missing), "--out", str(tmp_path / "run")]) == 2
    assert str(missing) in capsys.readouterr().err
    flat = tmp_path / "flat"
    flat.mkdir()
    assert cli.main(["train", "--data", str(flat), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert str(flat) in err and "train/" in err
    with pytest.raises(ValueError, match="no_such_dir"):
        data.image_folder(missing, "train", 32)


# --- 8. --precision, --channels-last, --compile ----------------------------------------------

@pytest.mark.parametrize("precision, dtype", [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_precision_autocasts_the_forward_and_fp16_scales_the_loss(tmp_path, capsys, forwards, precision, dtype):
    """CPU, 4 steps of the tiny model: every forward (training and validation) ran under autocast
    in the asked dtype (logits in that dtype) or with autocast off for fp32; losses, logits and the
    fp32 master weights stay finite; the grad scaler is on for fp16 only, and its state in the
    checkpoint is what it did: from 2**16, halved once per skipped (overflowing) step."""
    out = tmp_path / "run"
    code = cli.main(TINY_RUN + ["--steps-per-epoch", "4", "--precision", precision, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"backend eager, {precision}" in captured.err  # the start line names the precision
    train_fw = [r for r in forwards if r["training"]]
    val_fw = [r for r in forwards if not r["training"]]
    assert len(train_fw) == 4 and len(val_fw) == 2  # 359 validation images in batches of 256
    for r in forwards:
        assert r["autocast"] == (dtype is not None), r
        if dtype is not None:
            assert r["autocast_dtype"] == dtype, r
        assert r["input_dtype"] == torch.float32  # autocast casts inside the ops, not the data
        assert r["logits_dtype"] == (dtype or torch.float32), r
        assert r["logits_finite"], r
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics[0]["train_loss"]) and math.isfinite(metrics[0]["val_loss"])
    ckpt = torch.load(out / "last.pt", weights_only=True)
    for name, value in ckpt["model"].items():
        if value.is_floating_point():
            assert value.dtype == torch.float32 and torch.isfinite(value).all(), name
    taken = int(ckpt["optimizer"]["state"][0]["step"])
    if dtype is torch.float16:
        scaler = ckpt["scaler"]
        assert scaler, "fp16 must use an enabled GradScaler (a disabled one saves {})"
        skipped = ckpt["global_step"] - taken
        # The initial scale 2**16 overflows this model's fp16 backward (measured: the first 2 of
        # 4 steps), so the skip path is exercised; and some steps went through.
        assert 1 <= skipped < 4, (skipped, scaler)
        assert scaler["scale"] == 2.0 ** 16 / 2 ** skipped, (skipped, scaler)
        assert 1 <= scaler["_growth_tracker"] <= taken
    else:
        assert ckpt["scaler"] == {}  # disabled: no loss scaling for bf16 or fp32
        assert taken == 4  # no step is ever skipped


def _train_from_argv(argv):
    return T.train(T.config_from_args(cli.build_parser().parse_args(argv)))


@pytest.mark.parametrize("flag", ["--channels-last", "--no-channels-last", None])
def test_channels_last_puts_weights_and_activations_in_channels_last(tmp_path, capsys, forwards, flag):
    """--channels-last: every 4-D weight of the trained model and the activations inside it
    (stage s1's input, in training and validation) are channels_last and not NCHW-contiguous;
    --no-channels-last and the CPU's default (off): all NCHW."""
    on = flag == "--channels-last"
    result = _train_from_argv(TINY_RUN + ["--steps-per-epoch", "2", "--out", str(tmp_path / "run")]
                              + ([flag] if flag else []))
    assert ("fp32, channels_last" in capsys.readouterr().err.splitlines()[0]) == on
    assert len([r for r in forwards if r["training"]]) == 2 and len(forwards) == 4
    for r in forwards:
        assert r["s1_input"] == ((True, False) if on else (False, True)), r
        assert r["logits_finite"]
    assert math.isfinite(result.metrics[0]["train_loss"])
    # Exact strides: this model's 4-D weights are 1x1 or depthwise (one input channel), for which
    # both layouts count as contiguous, yet convolutions follow the strides.
    weights = [(n, p) for n, p in result.model.named_parameters() if p.ndim == 4]
    assert len(weights) > 5
    for name, p in weights:
        want = torch.empty(p.shape, memory_format=torch.channels_last if on else torch.contiguous_format).stride()
        assert p.stride() == want, (name, p.stride(), want)
    assert any(torch.empty(p.shape).stride() != torch.empty(p.shape, memory_format=torch.channels_last).stride()
               for _, p in weights)  # the check tells the layouts apart


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_trains_through_the_compiled_model(tmp_path, capsys, monkeypatch, fresh_dynamo):
    """--compile wraps the model in torch.compile and every training step runs the compiled graph.
    train.py calls torch.compile(model) with its defaults (inductor), which takes over a minute
    on two CPU cores (measured: 74 s), so torch.compile is wrapped here to compile the same model
    with a counting eager backend: TorchDynamo still captures the whole forward, which is what
    --compile depends on the model allowing. The result is the same training as without --compile
    (same ops, same order), and the returned model and the checkpoint are the plain CoAtNet."""
    real_compile = torch.compile
    compiled, graphs, graph_calls = [], [], []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            graph_calls.append(1)
            return gm.forward(*args)

        return run

    def compile_with_counting_backend(model, *args, **kwargs):
        assert not args and not kwargs, (args, kwargs)  # train.py's call: torch.compile(model)
        compiled.append(model)
        return real_compile(model, backend=counting_backend)

    monkeypatch.setattr(torch, "compile", compile_with_counting_backend)
    base = TINY_RUN + ["--steps-per-epoch", "3", "--drop-path", "0.1", "--precision", "fp32"]
    result = _train_from_argv(base + ["--compile", "--out", str(tmp_path / "c")])
    assert "compiled" in capsys.readouterr().err.splitlines()[0]
    assert len(compiled) == 1 and type(compiled[0]).__name__ == "CoAtNet"
    assert len(graphs) == 1, f"the forward split into {len(graphs)} graphs (graph breaks)"
    assert len(graph_calls) == 3  # one compiled forward per training step (validation runs eagerly)
    assert result.model is compiled[0]  # unwrapped
    ckpt = torch.load(tmp_path / "c" / "last.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    plain = _train_from_argv(base + ["--out", str(tmp_path / "p")])
    assert len(compiled) == 1
    for a, b in zip(strip_timing(result.metrics), strip_timing(plain.metrics)):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    for (name, p), q in zip(result.model.state_dict().items(), plain.model.state_dict().values()):
        if p.is_floating_point():
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
        else:
            assert torch.equal(p, q), name


# --- 9. --data through an ImageFolder --------------------------------------------------------

HAVE_TORCHVISION = importlib.util.find_spec("torchvision") is not None
CLASS_COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255)}  # the validation images: one solid colour a class


def _png_tree(root):
    """root/{train,val}/{cat,dog}/*.png: 4 training images a class (random pixels, 40x48, not
    square, so resizing and cropping matter) and 2 validation images a class (solid colours)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls, colour in CLASS_COLOURS.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                if split == "train":
                    pixels = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
                else:
                    pixels = np.broadcast_to(np.array(colour, dtype=np.uint8), (48, 40, 3)).copy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _stub_torchvision(calls):
    """A minimal torchvision: datasets.ImageFolder and the transforms data.image_folder uses,
    each constructor call recorded in ``calls`` as (name, args, kwargs). Random crops are a plain
    resize here; the real torchvision variant of the test covers the real ones."""
    import numpy as np
    from PIL import Image

    class Recorded:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs
            calls.append((type(self).__name__, args, kwargs))

    class Compose(Recorded):
        def __call__(self, img):
            for t in self.args[0]:
                img = t(img)
            return img

    class RandomResizedCrop(Recorded):
        def __call__(self, img):
            return img.resize((self.args[0], self.args[0]), Image.BILINEAR)

    class RandomHorizontalFlip(Recorded):
        def __call__(self, img):
            return img.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(()) < 0.5 else img

    class Resize(Recorded):  # the shorter side to size
        def __call__(self, img):
            w, h = img.size
            r = self.args[0] / min(w, h)
            return img.resize((round(w * r), round(h * r)), Image.BILINEAR)

    class CenterCrop(Recorded):
        def __call__(self, img):
            s, (w, h) = self.args[0], img.size
            left, top = (w - s) // 2, (h - s) // 2
            return img.crop((left, top, left + s, top + s))

    class ToTensor(Recorded):
        def __call__(self, img):
            return torch.from_numpy(np.array(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    class Normalize(Recorded):
        def __call__(self, x):
            mean, std = (torch.tensor(v, dtype=x.dtype).view(-1, 1, 1) for v in self.args)
            return (x - mean) / std

    class ImageFolder(Recorded):  # root/<class>/<image>, classes sorted, labels their indices
        def __init__(self, root, transform=None):
            super().__init__(root, transform=transform)
            self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
            if not self.classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {root}.")
            self.samples = [(os.path.join(root, c, f), i) for i, c in enumerate(self.classes)
                            for f in sorted(os.listdir(os.path.join(root, c)))]
            self.transform = transform

        def __len__(self):
            return len(self.samples)

        def __getitem__(self, index):
            path, label = self.samples[index]
            with Image.open(path) as img:
                return self.transform(img.convert("RGB")), label

    tv = types.ModuleType("torchvision")
    tv.datasets = types.ModuleType("torchvision.datasets")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.datasets.ImageFolder = ImageFolder
    for cls in (Compose, RandomResizedCrop, RandomHorizontalFlip, Resize, CenterCrop, ToTensor, Normalize):
        setattr(tv.transforms, cls.__name__, cls)
    return tv


@pytest.mark.parametrize("torchvision", [
    "stub",
    pytest.param("real", marks=pytest.mark.skipif(
        not HAVE_TORCHVISION, reason="torchvision is not installed (PyPI's has no build beside this torch); "
                                     "the stub variant tests the same wiring")),
])
def test_data_image_folder_trains_a_3_channel_model(tmp_path, capsys, monkeypatch, forwards, torchvision):
    """--data PATH: 2 classes of PNGs; the model is built for 3 input channels and 2 classes at
    --image-size, one training step runs on [4, 3, 32, 32] batches, and validation sees the
    val/ images resized, centre-cropped and normalised with the ImageNet statistics."""
    root = _png_tree(tmp_path / "images")
    calls = []
    if torchvision == "stub":
        tv = _stub_torchvision(calls)
        monkeypatch.setitem(sys.modules, "torchvision", tv)
        monkeypatch.setitem(sys.modules, "torchvision.datasets", tv.datasets)
        monkeypatch.setitem(sys.modules, "torchvision.transforms", tv.transforms)
    out = tmp_path / "run"
    code = cli.main(["train", "--data", str(root), "--image-size", "32", "--config", TINY_CONFIG, "--batch-size", "4",
                     "--epochs", "1", "--steps-per-epoch", "1", "--workers", "0" if torchvision == "stub" else "2",
                     "--no-plot", "--device", "cpu", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "8 training / 4 validation images at 32x32; 1 steps of 4" in captured.err, captured.err
    ckpt = torch.load(out / "last.pt", weights_only=True)
    kw = ckpt["model_kwargs"]
    assert (kw["in_channels"], kw["num_classes"], kw["image_size"]) == (3, 2, 32)
    assert ckpt["model"]["s0.0.0.weight"].shape[1] == 3 and ckpt["model"]["fc.weight"].shape[0] == 2
    train_fw = [r for r in forwards if r["training"]]
    val_fw = [r for r in forwards if not r["training"]]
    assert [r["input_shape"] for r in train_fw] == [(4, 3, 32, 32)]
    assert [r["input_shape"] for r in val_fw] == [(4, 3, 32, 32)]
    assert all(r["logits_shape"][1] == 2 and r["logits_finite"] for r in forwards)
    assert ckpt["global_step"] == 1 and int(ckpt["optimizer"]["state"][0]["step"]) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics[0]["train_loss"]) and metrics[0]["val_acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert FINAL_LINE.match(last_stdout_line(captured.out))
    # The validation pipeline, image by image: a solid class colour, normalised with ImageNet's statistics.
    val_set = data.image_folder(root, "val", 32)
    assert list(val_set.classes) == ["cat", "dog"] and len(val_set) == 4
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    for i in range(len(val_set)):
        x, label = val_set[i]
        colour = torch.tensor(CLASS_COLOURS[val_set.classes[label]], dtype=torch.float32).view(3, 1, 1) / 255
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        torch.testing.assert_close(x, ((colour - mean) / std).expand(3, 32, 32), atol=1e-5, rtol=0)
    if torchvision == "stub":  # what data.py asked torchvision for
        made = [(name, args) for name, args, _ in calls]
        assert made.count(("ImageFolder", (str(root / "train"),))) == 1
        assert made.count(("ImageFolder", (str(root / "val"),))) == 2
        assert ("RandomResizedCrop", (32,)) in made and ("RandomHorizontalFlip", ()) in made
        assert ("Resize", (37,)) in made and ("CenterCrop", (32,)) in made  # 32 * 256 / 224, the usual ratio
        assert ("Normalize", (data.IMAGENET_MEAN, data.IMAGENET_STD)) in made


@pytest.mark.parametrize("given, expected", [(None, "cuda:1"), ("cuda", "cuda:1"), ("cuda:0", "cuda:0")])
def test_a_cuda_device_without_an_index_is_the_current_one(monkeypatch, given, expected):
    """torch.cuda.set_device refuses a device without an index ("Expected a torch.device with a
    specified index"): `train` on a GPU failed so with no --device or --device cuda (seen on the
    H200, 2026-11-27). The fake set_device runs torch's own index check."""
    from torch.cuda._utils import _get_device_index
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    selected = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: selected.append(_get_device_index(device)))
    device = T._resolve_device(T.TrainConfig(device=given))
    assert device == torch.device(expected)
    assert selected == [device.index]
