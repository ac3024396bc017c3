"""The benchmark scripts run (at a smoke size) and write what they promise; no timing is asserted."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_model  # noqa: E402

from coatnet_fast import benchmark, cli  # noqa: E402
from coatnet_fast.ops import dispatch  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests check what the benchmarks write, not speed: one thread keeps them quick and
    light, also on a shared machine where two OpenMP threads would wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bench_model_smoke(tmp_path):
    out = tmp_path / "model.json"
    assert bench_model.main(["--smoke", "--providers", "eager", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["env"]["torch"] and payload["env"]["device"] and payload["env"]["commit"]
    modes = {(r["provider"], r["mode"]) for r in payload["results"]}
    assert modes == {("eager", "train"), ("eager", "infer")}
    assert all(r["images_per_s"] > 0 and r["speedup_vs_eager"] == 1.0 for r in payload["results"])
    assert {r["model"] for r in payload["results"]} == {"coatnet_0", "coatnet_1"}


def test_cli_bench_writes_json_chart_and_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--smoke", "--models", "coatnet_0", "--providers", "eager,backend:eager", "--out", str(out)]
    assert cli.main(argv) == 0
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "model"
    assert payload["env"]["torch"] == torch.__version__ and payload["env"]["device"] and payload["env"]["commit"]
    config = payload["config"]
    assert config["smoke"] and (config["batch"], config["image_size"], config["dtype"]) == (2, 64, "fp32")
    assert config["models"] == "coatnet_0" and config["device"] in ("cpu", "cuda")
    rows = {(r["model"], r["provider"], r["mode"]): r for r in payload["results"]}
    assert set(rows) == {("coatnet_0", p, m) for p in ("eager", "backend:eager") for m in ("train", "infer")}
    for r in rows.values():
        assert r["images_per_s"] > 0 and r["ms_per_step"] > 0 and r["first_call_s"] >= 0 and r["speedup_vs_eager"] > 0
        assert ("peak_memory_gib" in r) == (config["device"] == "cuda")
    assert rows[("coatnet_0", "backend:eager", "train")]["ops"] == dispatch.ops()
    text = capsys.readouterr().out
    assert "images/s" in text and "x eager" in text and "peak GiB" in text and f"wrote {out}" in text
    assert any(line.split()[:3] == ["coatnet_0", "backend:eager", "infer"] for line in text.splitlines())
    chart = out.with_suffix(".png")
    if HAVE_MATPLOTLIB:
        assert chart.read_bytes()[:8] == PNG_MAGIC
    else:
        assert "matplotlib is not installed" in text and not chart.exists()


def test_bench_model_script_runs(tmp_path):
    out = tmp_path / "script.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_model.py"), "--smoke", "--models", "coatnet_0",
         "--providers", "eager", "--modes", "infer", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert [(r["provider"], r["mode"]) for r in json.loads(out.read_text())["results"]] == [("eager", "infer")]


def test_failing_and_unknown_providers_are_recorded_and_exit_1(tmp_path, monkeypatch, capsys):
    real_build = benchmark.build

    def build(provider, model, settings):
        if provider == "compile":
            raise RuntimeError("boom")
        return real_build(provider, model, settings)

    monkeypatch.setattr(benchmark, "build", build)
    out = tmp_path / "errors.json"
    argv = ["bench", "--smoke", "--models", "coatnet_0", "--providers", "compile,nope,eager,backend:nope",
            "--modes", "infer", "--out", str(out)]
    assert cli.main(argv) == 1
    rows = {r["provider"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["compile", "nope", "eager", "backend:nope"]
    assert rows["compile"]["error"] == "RuntimeError: boom"
    assert "unknown provider 'nope'" in rows["nope"]["error"]
    assert "unknown backend 'nope'" in rows["backend:nope"]["error"]
    assert rows["eager"]["images_per_s"] > 0 and rows["eager"]["speedup_vs_eager"] == 1.0
    text = capsys.readouterr().out
    assert "errors:" in text and "coatnet_0 compile infer: RuntimeError: boom" in text


def test_fused_providers_are_checked_against_eager_and_a_wrong_one_fails(tmp_path, monkeypatch, capsys):
    """After timing, a fused provider's logits (inference) and loss and every gradient (training)
    are compared with the eager model loaded with its weights. The ext backend's CPU kernels pass;
    the same provider with its logits scaled by 1.05 (a forward hook on the timed model only) is
    flagged in both modes, listed under the table, and the exit code is 1."""
    out = tmp_path / "checked.json"
    argv = ["bench", "--smoke", "--models", "coatnet_0", "--providers", "eager,backend:ext", "--out", str(out)]
    assert cli.main(argv) == 0
    rows = {(r["provider"], r["mode"]): r for r in json.loads(out.read_text())["results"]}
    assert "correct" not in rows[("eager", "train")]  # the reference itself is not checked
    train, infer = rows[("backend:ext", "train")], rows[("backend:ext", "infer")]
    assert train["correct"] and infer["correct"]
    assert 0 < train["grads_rel_error"] < 1e-5 and train["loss_rel_error"] < 1e-5 and 0 < infer["logits_rel_error"] < 1e-5
    assert train["tolerance"] == infer["tolerance"] == 1e-3  # fp32: no autocast error to scale by

    real_build = benchmark.build

    def build(provider, model, settings):
        net, ops = real_build(provider, model, settings)
        if provider == "backend:ext":
            net.fc.register_forward_hook(lambda module, args, output: output * 1.05)
        return net, ops

    monkeypatch.setattr(benchmark, "build", build)
    capsys.readouterr()
    assert cli.main(argv) == 1
    rows = {(r["provider"], r["mode"]): r for r in json.loads(out.read_text())["results"]}
    train, infer = rows[("backend:ext", "train")], rows[("backend:ext", "infer")]
    assert train["correct"] is False and infer["correct"] is False
    assert infer["logits_rel_error"] > 1e-3 and train["grads_rel_error"] > 1e-3
    assert train["images_per_s"] > 0  # the timing is kept
    text = capsys.readouterr().out
    assert "incorrect (against the eager model" in text
    assert "coatnet_0 backend:ext infer: logits_rel_error" in text and "coatnet_0 backend:ext train: loss_rel_error" in text and "grads_rel_error" in text


def test_a_compiled_provider_is_checked_and_a_check_that_cannot_run_keeps_the_timing(tmp_path, monkeypatch, capsys):
    """The check calls a compiled provider through its torch.compile wrapper, which raises on
    truth-testing (this broke every compiled provider on the H200 on 46adafa). Dynamo's eager
    backend stands in for Inductor here, so the CPU needs no C++ build; the check must run and
    pass. A check that raises records check_error and correct=False beside the timing."""
    real_compile = torch.compile

    def compile_eager(model, mode=None, **kwargs):
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eager)
    out = tmp_path / "compiled.json"
    argv = ["bench", "--smoke", "--models", "coatnet_0", "--providers", "compile", "--out", str(out)]
    assert cli.main(argv) == 0
    rows = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["train"]["correct"] and rows["infer"]["correct"]
    assert rows["train"]["grads_rel_error"] < 1e-5 and rows["infer"]["logits_rel_error"] < 1e-5

    def broken(*args, **kwargs):
        raise RuntimeError("no reference here")

    monkeypatch.setattr(benchmark, "check_against_eager", broken)
    assert cli.main(argv) == 1
    rows = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    for row in rows.values():
        assert row["correct"] is False and row["images_per_s"] > 0 and "error" not in row
        assert row["check_error"] == "the check failed: RuntimeError: no reference here"


def test_fused_expands_to_every_usable_backend_without_running_it(tmp_path, monkeypatch, capsys):
    usable = [b for b in dispatch.BACKENDS
              if b != "eager" and any(b in dispatch.usable_backends(op) for op in dispatch.ops())]
    if dispatch.triton_available() is None:  # under pytest on a CPU: Triton's interpreter
        assert "triton" in usable
    assert benchmark.fused_backends() == usable
    expected = ["eager"] + [f"backend:{b}" for b in usable] + [f"backend:{b}:compile" for b in usable] + ["compile"]
    assert benchmark.expand_providers(["eager", "fused", "compile"], "coatnet_0", smoke=True) == (expected, [])

    calls = []

    def fake_measure(provider, model, mode, settings, device):
        calls.append((model, provider, mode))
        return {"model": model, "provider": provider, "mode": mode, "ms_per_step": 10.0,
                "images_per_s": 200.0 if provider == "eager" else 300.0, "first_call_s": 0.0}

    monkeypatch.setattr(benchmark, "measure", fake_measure)
    out = tmp_path / "fused.json"
    assert cli.main(["bench", "--providers", "eager,fused", "--modes", "train", "--out", str(out)]) == 0
    assert calls == [(m, p, "train") for m in benchmark.DEFAULT_MODELS for p in expected[:-1]]
    rows = json.loads(out.read_text())["results"]
    assert [r["speedup_vs_eager"] for r in rows] == [1.0 if r["provider"] == "eager" else 1.5 for r in rows]

    # Nothing usable: fused adds nothing and says so.
    monkeypatch.setattr(dispatch, "why_not", lambda op, backend, inputs=None: [] if backend == "eager" else ["off"])
    providers, notes = benchmark.expand_providers(["eager", "fused"], "coatnet_0", smoke=True)
    assert providers == ["eager"] and "no fused backend" in notes[0]


def test_ratios_against_eager_and_compile_per_model_and_mode():
    """The issue's targets as columns: images/s over eager's and over torch.compile's, peak
    memory over eager's, each against the same model and mode (never another's)."""
    def row(model, provider, mode, images_per_s, peak=None):
        r = {"model": model, "provider": provider, "mode": mode, "images_per_s": images_per_s, "ms_per_step": 1.0}
        return r if peak is None else {**r, "peak_memory_gib": peak}

    results = [row("coatnet_0", "eager", "train", 100.0, 8.0), row("coatnet_0", "compile", "train", 125.0, 6.0),
               row("coatnet_0", "backend:triton", "train", 250.0, 4.0), row("coatnet_0", "eager", "infer", 400.0),
               row("coatnet_0", "backend:triton", "infer", 1000.0), row("coatnet_1", "backend:triton", "train", 50.0, 9.0),
               {"model": "coatnet_0", "provider": "timm", "mode": "train", "error": "RuntimeError: boom"}]
    benchmark.add_speedups(results)
    fast = results[2]
    assert (fast["speedup_vs_eager"], fast["speedup_vs_compile"], fast["memory_vs_eager"]) == (2.5, 2.0, 0.5)
    assert results[1]["speedup_vs_compile"] == 1.0 and results[1]["memory_vs_eager"] == 0.75
    assert results[4]["speedup_vs_eager"] == 2.5  # infer against eager's infer, not its train
    assert "speedup_vs_compile" not in results[4] and "memory_vs_eager" not in results[4]
    assert not any(k in results[5] for k in ("speedup_vs_eager", "speedup_vs_compile", "memory_vs_eager"))
    lines = benchmark.format_table(results).splitlines()
    assert lines[0].endswith("x eager  x compile  mem x eager")
    assert lines[2 + 2].split()[-3:] == ["2.50", "2.00", "0.50"]
    assert lines[-1].strip() == "coatnet_0 timm train: RuntimeError: boom"


def test_timm_provider_only_for_coatnet_0_at_a_real_size(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", types.ModuleType("timm"))
    assert benchmark.expand_providers(["eager", "timm"], "coatnet_0", smoke=False) == (["eager", "timm"], [])
    for model, smoke in (("coatnet_1", False), ("coatnet_0", True)):
        providers, notes = benchmark.expand_providers(["eager", "timm"], model, smoke=smoke)
        assert providers == ["eager"] and len(notes) == 1 and notes[0].startswith("timm")
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    providers, notes = benchmark.expand_providers(["timm"], "coatnet_0", smoke=False)
    assert providers == [] and "cannot be imported" in notes[0]


def test_settings_smoke_on_cpu_unless_sizes_are_given(monkeypatch, tmp_path):
    def settings(*argv):
        return benchmark.resolve_settings(benchmark.build_parser().parse_args(["--device", "cpu", *argv]))

    s = settings()
    assert s["smoke"] and (s["batch"], s["image_size"], s["dtype"], s["warmup"], s["steps"]) == (2, 64, "fp32", 1, 2)
    assert s["models"] == "coatnet_0,coatnet_1" and s["channels_last"] and s["modes"] == "train,infer"
    s = settings("--full")
    assert not s["smoke"]
    assert (s["batch"], s["image_size"], s["dtype"], s["warmup"], s["steps"]) == (128, 224, "bf16", 5, 20)
    s = settings("--batch", "4")
    assert not s["smoke"] and (s["batch"], s["image_size"], s["dtype"]) == (4, 224, "bf16")
    s = settings("--image-size", "96", "--batch", "2", "--dtype", "fp32", "--no-channels-last", "--model", "seed")
    assert not s["smoke"]
    assert (s["batch"], s["image_size"], s["dtype"], s["channels_last"], s["models"]) == (2, 96, "fp32", False, "seed")
    s = settings("--smoke", "--batch", "3", "--steps", "5")
    assert s["smoke"] and (s["batch"], s["steps"], s["image_size"]) == (3, 5, 64)
    bad_arguments = (["--smoke", "--full"], ["--image-size", "100"], ["--models", "coatnet_9"], ["--modes", "fwd"],
                     ["--batch", "0"])
    for bad in bad_arguments:
        with pytest.raises(SystemExit):
            settings(*bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            benchmark.resolve_settings(benchmark.build_parser().parse_args(["--device", "cuda"]))

    assert benchmark.default_out(torch.device("cpu")) == ROOT / "bench" / "results" / "model_cpu.json"
    monkeypatch.setattr(benchmark, "_CHECKOUT", tmp_path)  # as if installed from a wheel
    assert benchmark.default_out(torch.device("cuda")) == Path("coatnet_fast_bench") / "model_cuda.json"
    monkeypatch.setenv("COATNET_FAST_COMMIT", "abc123")
    assert benchmark.environment()["commit"] == "abc123"
    monkeypatch.setenv("COATNET_FAST_L2_AHEAD_ROWS", "4")  # a knob the row was timed under is written with it
    assert benchmark.environment()["knobs"].get("COATNET_FAST_L2_AHEAD_ROWS") == "4"
    assert "COATNET_FAST_COMMIT" not in benchmark.environment()["knobs"]
    monkeypatch.delenv("COATNET_FAST_COMMIT")
    assert benchmark.commit() == "unknown"


def test_chart_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    payload = {"config": {}, "env": {}, "results": [{"model": "coatnet_0", "provider": "eager", "mode": "train",
                                                     "images_per_s": 1.0}]}
    assert benchmark.write_chart(payload, tmp_path / "x.png") is None
    assert capsys.readouterr().out.strip() == "matplotlib is not installed: no chart (pip install matplotlib)"
    assert not (tmp_path / "x.png").exists()


def test_bench_dwconv_bn_gelu_smoke(tmp_path):
    import bench_dwconv_bn_gelu

    out = tmp_path / "dw.json"
    assert bench_dwconv_bn_gelu.main(["--smoke", "--modes", "eval", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = payload["results"]
    assert {r["provider"] for r in rows} >= {"eager"}
    assert all(r["correct"] for r in rows if "correct" in r)
    assert payload["env"]["torch"] and payload["env"]["commit"]


def test_bench_max_pool2d_smoke(tmp_path):
    """The max-pool benchmark runs every usable backend, checks each against float64 and
    writes rows with positive bandwidths."""
    import bench_max_pool2d

    out = tmp_path / "pool.json"
    assert bench_max_pool2d.main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    expected = {"eager"} | {b for b in dispatch.usable_backends("max_pool2d") if b != "eager"}
    assert {r["provider"] for r in rows} == expected | ({"compile"} if torch.cuda.is_available() else set())
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r["correct"] and r["gbps"] > 0 for r in rows)


def test_bench_batch_norm_act_smoke(tmp_path):
    import bench_batch_norm_act

    from coatnet_fast.kernels import batch_norm_act as kernels

    out = tmp_path / "bna.json"
    assert bench_batch_norm_act.main(["--smoke", "--tiles", "16x16x2", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = payload["results"]
    assert {(r["part"], r["mode"], r["pass"]) for r in rows} == {
        (part, mode, which) for part in ("expand", "projection") for mode in ("train", "eval")
        for which in ("fwd", "fwd+bwd")}
    assert all(r["correct"] and r["gbps"] > 0 for r in rows)
    # Device-only times and their ratios beside the host-inclusive ones on a GPU (none on the CPU).
    on_gpu = torch.cuda.is_available()
    assert all(("graph_ms" in r and "graph_speedup_vs_eager" in r) == on_gpu for r in rows)
    triton = {"triton", "triton@16x16x2"} if dispatch.triton_available() is None else set()
    assert {r["provider"] for r in rows} >= {"eager"} | triton and kernels.FORCED_TILES is None


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_bench_rel_bias_attention_smoke(tmp_path):
    """Every record: the timings, TFLOP/s and GB/s (finite, positive, TFLOP/s from the documented
    flop count), the ratios to eager and to the best peer (sdpa, the only peer on a CPU), the
    case; and the environment beside them (device, torch and triton versions, commit)."""
    import importlib.metadata

    import bench_rel_bias_attention

    out = tmp_path / "attn.json"
    assert bench_rel_bias_attention.main(["--smoke", "--providers", "eager,sdpa", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = payload["results"]
    assert {r["provider"] for r in rows} == {"eager", "sdpa"} and all(r["correct"] for r in rows)

    assert payload["benchmark"] == "rel_bias_attention"
    env = payload["env"]
    on_gpu = torch.cuda.is_available()
    assert env["device"].startswith(torch.cuda.get_device_name() if on_gpu else "cpu ("), env
    assert env["torch"] == torch.__version__
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    assert env["triton"] == triton_version
    assert env["commit"] and env["commit"] == benchmark.commit(), env
    bandwidth = payload["copy_bandwidth_gbps"]
    assert _finite_positive(bandwidth) if on_gpu else math.isnan(bandwidth)

    # Seed model at 64x64: S3 a 4x4 window, S4 2x2, 8 heads; batch 2, d 32, fp32.
    cases = {(r["window"], r["mode"]) for r in rows}
    assert cases == {(w, m) for w in (4, 2) for m in ("fwd", "fwd+bwd")}
    for r in rows:
        where = (r["provider"], r["mode"], r["window"])
        assert (r["N"], r["heads"], r["d"], r["batch"], r["dtype"]) == (r["window"] ** 2, 8, 32, 2, "fp32"), where
        for key in ("ms", "ms_p20", "ms_p80", "tflops", "gbps", "speedup_vs_eager", "speedup_vs_best_peer"):
            assert _finite_positive(r.get(key)), (where, key, r.get(key))
        assert r["ms_p20"] <= r["ms"] <= r["ms_p80"], where
        per_pass = {"fwd": 4, "fwd+bwd": 14}[r["mode"]]  # 2 matmuls forward, 5 backward
        flops = per_pass * r["batch"] * r["heads"] * r["N"] ** 2 * r["d"]
        assert r["tflops"] == pytest.approx(flops / (r["ms"] * 1e-3) / 1e12, rel=1e-9), where
        assert set(r["rel_errors"]) == {"out", "dq", "dk", "dv", "dtable"}
        assert all(0 <= e <= 1e-4 for e in r["rel_errors"].values()), where
        peers = {p["provider"]: p["ms"] for p in rows if (p["window"], p["mode"]) == (r["window"], r["mode"])}
        assert r["speedup_vs_eager"] == pytest.approx(peers["eager"] / r["ms"]), where
        assert r["speedup_vs_best_peer"] == pytest.approx(peers["sdpa"] / r["ms"]), where
        assert ("fraction_of_copy_bandwidth" in r) == on_gpu, where
        if on_gpu:
            assert r["fraction_of_copy_bandwidth"] == pytest.approx(r["gbps"] / bandwidth), where
        # Device time alone (CUDA graph replays) beside it on a GPU, with the same derived fields.
        graph_keys = ("graph_ms", "graph_ms_p20", "graph_ms_p80", "graph_tflops", "graph_gbps",
                      "graph_fraction_of_copy_bandwidth", "graph_speedup_vs_eager", "graph_speedup_vs_best_peer")
        assert all((key in r) == on_gpu for key in graph_keys) and "graph_error" not in r, (where, r)
        if on_gpu:
            assert r["graph_tflops"] == pytest.approx(flops / (r["graph_ms"] * 1e-3) / 1e12, rel=1e-9), where
            graph_peers = {p["provider"]: p["graph_ms"] for p in rows
                           if (p["window"], p["mode"]) == (r["window"], r["mode"])}
            assert r["graph_speedup_vs_best_peer"] == pytest.approx(graph_peers["sdpa"] / r["graph_ms"]), where


def test_profile_ops_smoke(tmp_path):
    import profile_ops

    out = tmp_path / "profile.json"
    providers = "eager,triton" if "triton" in dispatch.usable_backends("rel_bias_attention") else "eager"
    ops = "rel_bias_attention,dwconv_bn_gelu,batch_norm_act"
    assert profile_ops.main(["--smoke", "--ops", ops, "--providers", providers, "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = payload["results"]
    expected = {(op, p, m) for op in ops.split(",") for p in providers.split(",") for m in ("fwd", "fwd+bwd")}
    assert {(r["op"], r["provider"], r["mode"]) for r in rows} == expected
    on_gpu = torch.cuda.is_available()
    for r in rows:
        assert "error" not in r, r
        assert 0 < r["host_us"] <= r["wall_us"] and r["top_cpu_ops"], r
        assert (r["kernel_us"] > 0 and r["kernels"]) if on_gpu else r["kernel_us"] is None
    assert payload["env"]["torch"] and payload["env"]["commit"]
    with pytest.raises(SystemExit):
        profile_ops.main(["--smoke", "--ops", "nope", "--out", str(out)])


def test_profile_ops_model_smoke(tmp_path):
    import profile_ops

    out = tmp_path / "profile_model.json"
    assert profile_ops.main(["--smoke", "--ops", "model", "--providers", "eager", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {(r["op"], r["provider"], r["mode"]) for r in rows} == {("model", "eager", m) for m in ("fwd", "fwd+bwd")}
    for r in rows:
        assert "error" not in r and r["wall_us"] > 0 and r["top_cpu_ops"], r
        names = {op["name"] for op in r["top_cpu_ops"]}
        assert any("conv" in n or "mm" in n for n in names), names


def test_profile_ops_model_compiles_the_providers_it_is_asked_for():
    """``--providers <backend>:compile`` profiles that backend's model under torch.compile (the
    compiled step is a GPU run's: here the cases are built, not run)."""
    import profile_ops

    backend = (benchmark.fused_backends() or ["eager"])[0]
    args = types.SimpleNamespace(smoke=True, batch=2, providers=f"eager,{backend}:compile,eager:compile")
    cases = list(profile_ops.model_cases(args, torch.device("cpu"), torch.float32))
    runners = {(provider, mode): step.__defaults__[1] for _, provider, mode, step in cases}
    expected = ["eager", *benchmark.fused_backends(), f"{backend}:compile", "eager:compile"]
    assert list(dict.fromkeys(provider for provider, _ in runners)) == expected
    for (provider, _), runner in runners.items():
        assert isinstance(runner, torch._dynamo.eval_frame.OptimizedModule) == provider.endswith(":compile")


def test_bench_dispatch_overhead_smoke(tmp_path):
    import bench_dispatch_overhead
    from coatnet_fast.kernels import rel_bias_attention as attn_kernels

    launcher = attn_kernels.rel_bias_attention_fwd
    out = tmp_path / "overhead.json"
    assert bench_dispatch_overhead.main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    fused = ["rel_bias_attention", "dwconv_bn_gelu (train)", "batch_norm_act (train)", "batch_norm_act (eval)"]
    eager = ["eager BatchNorm2d + GELU (train)", "eager BatchNorm2d + GELU (eval)"]
    assert [r["op"] for r in rows] == fused + eager
    for r in rows[:len(fused)]:
        assert all(r[f"{path}_{mode}_us"] > 0 for path in ("custom_op", "autograd_function") for mode in ("fwd", "fwd_bwd"))
    for r in rows[len(fused):]:
        assert r["eager_fwd_us"] > 0 and r["eager_fwd_bwd_us"] > 0
    # The stubs and the fast-path switch are put back.
    assert attn_kernels.rel_bias_attention_fwd is launcher and dispatch.eager_fast_path.__module__ == dispatch.__name__


def test_graph_timing_replays_the_captured_work():
    """graph_ms times the device's work alone: fn is captured once and the replays run it (a
    counter moves by one per call and per replay, not per capture). CUDA graphs exist only on
    GPUs: on the CPU the fields are absent and nothing runs."""
    from _common import graph_fields, graph_ms

    calls = []
    counter = torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")

    def fn():
        calls.append(1)
        counter.add_(1)

    if not torch.cuda.is_available():
        assert graph_ms(fn, counter.device) is None and graph_fields(fn, counter.device) == {}
        assert not calls and counter.item() == 0
        return
    median, low, high = graph_ms(fn, counter.device, warmup=1, rep=5)
    assert 0 < low <= median <= high
    torch.cuda.synchronize()
    # 2 warm-up calls and the capture on the host; the replays add to the counter without calls.
    assert len(calls) == 3 and counter.item() > 3
    fields = graph_fields(fn, counter.device, flops=1e9, moved_bytes=1e9, bandwidth_gbps=1000.0)
    assert fields["graph_tflops"] == pytest.approx(1e9 / (fields["graph_ms"] * 1e-3) / 1e12)
    assert fields["graph_fraction_of_copy_bandwidth"] == pytest.approx(fields["graph_gbps"] / 1000.0)


def test_a_failed_capture_is_reported_in_the_row(monkeypatch):
    """A provider that cannot be captured (one that syncs with the host) keeps its host-inclusive
    timings and gets graph_error instead of graph_ms. The capture failure itself is simulated:
    a real one can leave a CUDA context unusable for the rest of the process."""
    import _common

    def capture_fails(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(_common, "graph_ms", capture_fails)
    fields = _common.graph_fields(lambda: None, torch.device("cpu"), flops=1.0)
    assert fields == {"graph_error": "RuntimeError: operation not permitted when stream is capturing"}


def test_bench_rel_bias_attention_times_both_backward_paths(tmp_path):
    """A small window is timed through the single-tile backward, as ``triton@small-8w`` through
    it at 8 warps, and as ``triton@tiled`` through the tiled one; the switches are put back."""
    import bench_rel_bias_attention

    from coatnet_fast.kernels import rel_bias_attention as kernels

    default = kernels.SMALL_N_MAX
    out = tmp_path / "attn.json"
    providers = ("triton", "triton@tiled", "triton@small-8w")
    assert bench_rel_bias_attention.main(["--smoke", "--providers", ",".join(providers), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in providers for m in ("fwd", "fwd+bwd")}
    assert all(r["correct"] for r in rows) and kernels.SMALL_N_MAX == default
    assert kernels._bwd_small not in kernels.FORCED_TILES


def test_bench_dwconv_bn_gelu_forced_tiles(tmp_path):
    import bench_dwconv_bn_gelu

    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    out = tmp_path / "dw.json"
    launches = []
    real = {name: getattr(kernels, name) for name in ("_bwd_dx_dw", "_bwd_dx_rows", "_bwd_dx")}

    class Counted:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            launches.append((self.name, kernels.FORCED_ROW_BACKWARD_TILES))
            return real[self.name][grid]

    for name in real:
        setattr(kernels, name, Counted(name))
    try:
        assert bench_dwconv_bn_gelu.main(["--smoke", "--modes", "train", "--tiles", "16x16x2", "--variants",
                                          "scratch,flattened,bwd8x2", "--out", str(out)]) == 0
    finally:
        for name, kernel in real.items():
            setattr(kernels, name, kernel)
    rows = json.loads(out.read_text())["results"]
    assert {r["provider"] for r in rows} >= {"triton", "triton@16x16x2", "triton@scratch", "triton@flattened",
                                             "triton@bwd8x2"}
    assert all(r["correct"] for r in rows if "correct" in r) and kernels.FORCED_TILES is None
    assert kernels.DZ_PATH == "memory" and kernels.ROW_BACKWARD_MAX_WIDTH == 256
    assert kernels.FORCED_ROW_BACKWARD_TILES is None
    # each variant's backward ran its kernel (the forced row tiles with it)
    assert {("_bwd_dx_rows", None), ("_bwd_dx", None), ("_bwd_dx_dw", (8, 2)), ("_bwd_dx_dw", None)} <= set(launches)
    # The row-streaming knobs' variants, set and reset by name (they change nothing a CPU run
    # could see: the interpreter has no registers, and its tiles are fixed).
    knobs = lambda: (kernels.PREFETCH_ROWS, kernels.ROW_ELEMENTS_PER_THREAD, kernels.ROW_MAXNREG,  # noqa: E731
                     kernels.L2_AHEAD_ROWS, kernels.ROW_BANDS)
    default = (True, 8, 168, kernels.L2_AHEAD_ROWS, kernels.ROW_BANDS)
    for variant, expected in (("noprefetch", (False, 8, 168)), ("rows4", (True, 4, 168)), ("maxnreg0", (True, 8, None)),
                              ("maxnreg96", (True, 8, 96))):
        bench_dwconv_bn_gelu.configure(f"triton@{variant}")
        assert knobs() == expected + default[3:], variant
    for ahead in (0, 2, 8):
        bench_dwconv_bn_gelu.configure(f"triton@l2ahead{ahead}")
        assert knobs() == default[:3] + (ahead, default[4])
    for variant, bands in (("bands2", 2), ("bands4", 4), ("bandsauto", None)):
        bench_dwconv_bn_gelu.configure(f"triton@{variant}")
        assert knobs() == default[:4] + (bands,)
    bench_dwconv_bn_gelu.configure("triton")
    assert knobs() == default


def test_a_provider_can_leave_one_fusion_on_eager():
    """backend:<b>[:compile]:no-<op> measures the model without one fused op (what a fusion is
    worth); the names are checked."""
    from coatnet_fast.models import ConvBN, MBConv

    settings = dict(image_size=64, smoke=True)
    assert benchmark.parse_provider("backend:triton:compile:no-batch_norm_act") == ("reference", "triton", True)
    net, ops = benchmark.build("backend:triton:no-batch_norm_act", "coatnet_0", settings)
    if dispatch.triton_available() is None:
        assert ops == [op for op in dispatch.ops() if op != "batch_norm_act"]
        assert {m.backend for m in net.modules() if isinstance(m, ConvBN)} == {"eager"}
    net, _ = benchmark.build("backend:triton:no-se-gate", "coatnet_0", settings)
    assert all(not m.se_gate_in_projection for m in net.modules() if isinstance(m, MBConv))
    assert not any(m.fused_in_training for m in net.modules() if isinstance(m, ConvBN))
    net, _ = benchmark.build("backend:triton:compile:no-se-gate:train-batch_norm_act", "coatnet_0", settings)
    assert all(m.fused_in_training for m in net.modules() if isinstance(m, ConvBN))
    assert not any(m.pad_input_channels for m in net.modules() if isinstance(m, ConvBN))
    net, _ = benchmark.build("backend:triton:compile:pad-conv-input8", "coatnet_0", settings)
    assert {m.pad_input_channels for m in net.modules() if isinstance(m, ConvBN)} == {8}
    for bad, message in (("backend:triton:no-nope", "unknown op 'nope'"),
                         ("backend:triton:fast", "unknown provider"),
                         ("backend:triton:no-batch_norm_act:compile", "unknown provider"),
                         ("backend:triton:no-train-batch_norm_act", "unknown op 'train-batch_norm_act'"),
                         ("backend:triton:pad-conv-input1", "unknown provider"),
                         ("backend:triton:pad-conv-inputs", "unknown provider")):
        with pytest.raises(benchmark.ProviderError, match=message):
            benchmark.parse_provider(bad)


def test_bench_saved_memory_counts_what_autograd_keeps(tmp_path):
    """The fake-tensor trace of a training forward: eager keeps more for the backward than the
    fused backends (which keep inputs and recompute), and each fusion taken away adds back."""
    import bench_saved_memory

    out = tmp_path / "saved.json"
    # 224x224 (fake tensors cost no memory or time): at toy sizes the projection's per-image weights
    # ([B, C_out, C_hidden]) outweigh the activations they spare, at real sizes the reverse.
    assert bench_saved_memory.main(["--batch", "2", "--image-size", "224", "--out", str(out)]) == 0
    rows = {r["provider"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["eager"]["saved_bytes"] > 0 and rows["eager"]["fraction_of_eager"] == 1.0
    assert sum(rows["eager"]["by_module_type_gib"].values()) == pytest.approx(rows["eager"]["saved_gib"])
    if dispatch.triton_available() is None:
        fused = "backend:triton:train-batch_norm_act"
        order = ["eager", "backend:triton:no-dwconv_bn_gelu:no-batch_norm_act",
                 "backend:triton:no-batch_norm_act:no-se-gate", "backend:triton", fused]
        saved = [rows[p]["saved_bytes"] for p in order]
        assert saved == sorted(saved, reverse=True) and len(set(saved)) == len(order), saved
        assert rows["backend:triton:no-se-gate:train-batch_norm_act"]["saved_bytes"] > rows[fused]["saved_bytes"]
        assert "ConvBN" in rows[fused]["by_module_type_gib"]


def test_bench_host_overhead_smoke(tmp_path):
    """Each fused op's eager path and the eager modules it replaces are timed and profiled (on
    the CPU through the interpreter: the figures say nothing there, the rows and their fields do)."""
    import bench_host_overhead

    out = tmp_path / "host.json"
    assert bench_host_overhead.main(["--smoke", "--top", "5", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert [r["call"] for r in payload["calibration"]][0] == "torch add (one small op)"
    rows = {r["op"]: r for r in payload["results"]}
    assert {"batch_norm_act eval", "batch_norm_act train", "dwconv_bn_gelu eval", "dwconv_bn_gelu train",
            "rel_bias_attention", "eager BatchNorm2d + GELU train"} <= set(rows)
    for name, r in rows.items():
        assert r["fwd_us"] > 0, name
        profile = r.get("profile_fwd_bwd") or r["profile_fwd"]
        assert 0 < len(profile) <= 5 and all(e["own_us_per_call"] >= 0 for e in profile), name
        assert ("fwd_bwd_us" in r) == ("eval" not in name), name
