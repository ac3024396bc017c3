"""The C++/CUDA extension behind the "ext" backend: building, caching, the loading rules, and
float64 gradcheck. Parity of its kernels with float64 eager (outputs, every gradient, running
statistics, layouts, dtypes, poisoned outputs, determinism, the model in train and eval) runs
in test_rel_bias_attention.py, test_dwconv_bn_gelu.py, test_batch_norm_act.py and
test_model.py, which take every usable backend."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from coatnet_fast import cli, ext
from coatnet_fast.ops import (BackendUnavailableError, batch_norm_act, dispatch, dwconv_bn_gelu_pool,
                              rel_bias_attention)
from coatnet_fast.ops.rel_bias_attention import table_rows

OPS = ("rel_bias_attention", "dwconv_bn_gelu", "batch_norm_act")


def _toolchain_reason():
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler on PATH"
    return None


# The one condition under which these tests cannot run: no toolchain to build with. CI has
# one (and .ci/run builds the extension before the tests, failing on a build error).
needs_toolchain = pytest.mark.skipif(_toolchain_reason() is not None,
                                     reason=f"cannot build the extension here: {_toolchain_reason()}")


@pytest.fixture(scope="module")
def library():
    ext.load()
    return torch.ops.coatnet_fast_ext


@needs_toolchain
def test_ext_is_usable_for_every_op_with_a_toolchain(library):
    for op in OPS:
        assert "ext" in dispatch.usable_backends(op), dispatch.why_not(op, "ext")
    assert ext.is_loaded() and ext.status()["built"]


@needs_toolchain
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "qkv-views"])
def test_attention_gradcheck_float64(library, strided, device):
    g = torch.Generator().manual_seed(0)
    window, heads, d = (2, 3), 2, 4
    n = window[0] * window[1]
    if strided:
        qkv = torch.randn(2, n, 3 * heads * d, generator=g, dtype=torch.float64).to(device)
        q, k, v = (t.detach().requires_grad_() for t in qkv.unflatten(-1, (3, heads, d)).permute(2, 0, 3, 1, 4))
    else:
        q, k, v = (torch.randn(2, heads, n, d, generator=g, dtype=torch.float64, device=device).requires_grad_()
                   for _ in range(3))
    table = torch.randn(table_rows(window), heads, generator=g, dtype=torch.float64).to(device).requires_grad_()

    def fn(q, k, v, table):
        return rel_bias_attention(q, k, v, table, window, backend="ext")

    assert torch.autograd.gradcheck(fn, (q, k, v, table))


@needs_toolchain
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride, channels_last", [(1, False), (2, True)], ids=["s1-nchw", "s2-nhwc"])
def test_dwconv_gradcheck_float64(library, training, stride, channels_last, device):
    """x, conv weight, BN weight and bias; the output and the pooled SE squeeze both carry
    gradient (the pooled one flows back through the kernel's epilogue)."""
    g = torch.Generator().manual_seed(1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64).to(device).contiguous(memory_format=fmt)
    weight = torch.randn(3, 1, 3, 3, generator=g, dtype=torch.float64).to(device)
    gamma = (1 + 0.3 * torch.randn(3, generator=g, dtype=torch.float64)).to(device)
    beta = (0.3 * torch.randn(3, generator=g, dtype=torch.float64)).to(device)
    running_mean = torch.randn(3, generator=g, dtype=torch.float64).to(device)
    running_var = torch.rand(3, generator=g, dtype=torch.float64).to(device) + 0.5
    inputs = tuple(t.requires_grad_() for t in (x, weight, gamma, beta))

    def fn(x, weight, gamma, beta):
        # Fresh running statistics per call: training updates them in place.
        return dwconv_bn_gelu_pool(x, weight, gamma, beta, running_mean.clone(), running_var.clone(),
                                   training=training, stride=stride, backend="ext")

    assert torch.autograd.gradcheck(fn, inputs)


def _bn_inputs(shape, channels_last, device, seed=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    b, c = shape[:2]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, generator=g, dtype=dtype).to(device).contiguous(memory_format=fmt)
    gamma = (1 + 0.3 * torch.randn(c, generator=g, dtype=dtype)).to(device)
    beta = (0.3 * torch.randn(c, generator=g, dtype=dtype)).to(device)
    running_mean = torch.randn(c, generator=g, dtype=dtype).to(device)
    running_var = torch.rand(c, generator=g, dtype=dtype).to(device) + 0.5
    residual = torch.randn(shape, generator=g, dtype=dtype).to(device)
    branch_scale = torch.tensor([0.0, 1 / 0.7][:b] + [1 / 0.7] * max(0, b - 2), dtype=dtype).to(device)
    return x, gamma, beta, running_mean, running_var, residual, branch_scale


@needs_toolchain
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("activation, with_residual", [("gelu", False), ("identity", True)],
                         ids=["expand", "projection"])
def test_batch_norm_act_gradcheck_float64(library, training, channels_last, activation, with_residual, device):
    """x, BN weight and bias, and the residual (MBConv's projection: with the per-image
    stochastic-depth scale, one image dropped)."""
    x, gamma, beta, running_mean, running_var, residual, branch_scale = _bn_inputs((3, 4, 5, 3), channels_last,
                                                                                   device)
    inputs = (x, gamma, beta) + ((residual,) if with_residual else ())
    inputs = tuple(t.requires_grad_() for t in inputs)

    def fn(x, gamma, beta, residual=None):
        # Fresh running statistics per call: training updates them in place.
        return batch_norm_act(x, gamma, beta, running_mean.clone(), running_var.clone(), training=training,
                              activation=activation, residual=residual,
                              branch_scale=branch_scale if with_residual else None, backend="ext")

    assert torch.autograd.gradcheck(fn, inputs)


@needs_toolchain
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_batch_norm_act_ops_pass_opcheck(library, channels_last, device):
    """The schemas, the fake kernels registered from Python (dtypes and strides as the real
    kernels produce them, also for a residual of another dtype and layout) and the autograd
    registration of the differentiable op."""
    x, gamma, beta, mean, var, residual, scale = _bn_inputs((2, 5, 4, 3), channels_last, device, dtype=torch.float32)
    rstd = torch.rsqrt(var + 1e-5)
    gamma, beta = gamma.requires_grad_(), beta.requires_grad_()
    x = x.requires_grad_()
    res_half = residual.half().contiguous().requires_grad_()  # NCHW and fp16 whatever x is
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    for args in ((x, gamma, beta, mean, rstd, True, True, None, None),
                 (x, gamma, beta, mean, rstd, False, False, res_half, scale)):
        torch.library.opcheck(library.batch_norm_act_forward.default, args, test_utils=utils)
    torch.library.opcheck(library.batch_norm_stats.default, (x.detach(),), test_utils=utils[:2])
    torch.library.opcheck(library.batch_norm_act_apply.default,
                          (x.detach(), mean, gamma.detach() * rstd, beta.detach(), True, res_half.detach(), scale),
                          test_utils=utils[:2])
    dy = torch.randn(x.shape, device=device)
    for training in (True, False):
        torch.library.opcheck(library.batch_norm_act_backward.default,
                              (dy, x.detach(), gamma.detach(), beta.detach(), mean, rstd, True, scale, training),
                              test_utils=utils[:2])


@needs_toolchain
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_batch_norm_act_results_do_not_depend_on_the_thread_count(library, channels_last):
    """Work items depend on the shape alone and are merged in a fixed order: statistics,
    outputs and gradients are bit-identical with one thread and with several (shapes of several
    work items each: an NCHW plane past 2**14 positions, channels_last rows past one block, as in
    test_batch_norm_act.py::test_many_work_items_merge_right)."""
    shape = (1, 2, 130, 128) if not channels_last else (2, 67, 24, 24)
    x, gamma, beta, _, _, residual, scale = _bn_inputs(shape, channels_last, "cpu", dtype=torch.float32)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(7))

    def run():
        mean, var = library.batch_norm_stats(x)
        rstd = torch.rsqrt(var + 1e-5)
        y = library.batch_norm_act_apply(x, mean, gamma * rstd, beta, True, residual, scale)
        grads = library.batch_norm_act_backward(dy, x, gamma, beta, mean, rstd, True, scale, True)
        return (mean, var, y) + tuple(grads)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(max(2, threads))
        several = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, several):
        assert torch.equal(a, b)


@needs_toolchain
def test_set_backend_moves_every_fusable_module_to_ext(library, monkeypatch):
    """With a kernel for every op but the max pool, set_backend(model, "ext") moves the 1x1 conv +
    BatchNorm modules (batch_norm_act) too, leaves the pools on eager, and the model runs the
    extension's ops and matches eager."""
    from coatnet_fast import CoAtNet, get_backend, set_backend
    from coatnet_fast.models import ConvBN, FusedOpModule, MaxPool2d

    calls = []
    entry = dispatch._TABLE["batch_norm_act"]["ext"]
    monkeypatch.setitem(dispatch._TABLE["batch_norm_act"], "ext", dispatch.OpBackend(
        entry.op, "ext", lambda *a: calls.append(a[8]) or entry.impl(*a), entry.available, entry.reasons))
    model = CoAtNet(image_size=(32, 32), num_blocks=(1, 1, 1, 1, 1), channels=(8, 12, 16, 24, 32),
                    num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    assert set_backend(model, "ext") is model and get_backend(model) == "ext"
    fused = [m for m in model.modules() if isinstance(m, FusedOpModule)]
    assert {m.backend for m in fused if not isinstance(m, MaxPool2d)} == {"ext"}
    assert {m.backend for m in model.modules() if isinstance(m, MaxPool2d)} == {"eager"}  # no kernel in the extension
    n_pw = sum(isinstance(m, ConvBN) for m in model.modules())
    out = model(x)
    assert len(calls) == n_pw and set(calls) == {"gelu", "identity"}
    assert ((out - expected).norm() / expected.norm()).item() < 1e-5


def test_build_directory_is_keyed_by_sources_and_versions(tmp_path, monkeypatch):
    sources = tmp_path / "csrc"
    shutil.copytree(ext.csrc_dir(), sources)
    monkeypatch.setattr(ext, "csrc_dir", lambda: sources)
    first = ext._key(False)
    assert ext._key(False) == first
    assert ext._key(True) != first  # the CUDA build lives apart from the CPU-only one
    with open(sources / "ops.cpp", "a") as f:
        f.write("\n// an edit\n")
    assert ext._key(False) != first
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    edited = ext._key(False)
    assert edited != first and ext._build_dir(False).name.endswith(edited)


def _run_python(code, tmp_path, **env):
    """Run ``code`` in a fresh interpreter; ``env`` entries set to None are removed."""
    full_env = dict(os.environ, COATNET_FAST_EXT_DIR=str(tmp_path / "cache"))
    full_env.update(env)
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=600)


def test_import_and_info_compile_nothing(tmp_path):
    code = """
        import torch, coatnet_fast
        from coatnet_fast import cli, ext
        assert not ext.is_loaded()
        assert cli.main(["info"]) == 0
        assert not ext.is_loaded() and not torch.cuda.is_initialized()
    """
    done = _run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "C++/CUDA extension: " in done.stdout
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir()), "importing or `info` started a build"


def test_without_ninja_auto_moves_on_and_ext_says_why(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(cpp, "is_ninja_available", lambda: False)
    monkeypatch.setattr(ext, "_loaded_path", None)  # as in a fresh process
    monkeypatch.setattr(ext, "_verdict", None)
    monkeypatch.setenv("COATNET_FAST_EXT_DIR", str(tmp_path))  # nothing built there
    why = ext.unavailable_reason()
    assert why and "ninja" in why
    assert "ninja" in ext.describe_status()
    for op in OPS:
        assert dispatch.why_not(op, "ext") == [why]
    # "auto" passes over ext (triton switched off so that ext would be next) and runs eager.
    calls = []
    for op in OPS:
        eager = dispatch._TABLE[op]["eager"]
        monkeypatch.setitem(dispatch._TABLE[op], "triton", dispatch.OpBackend(
            op, "triton", None, lambda: "switched off for this test", dispatch._no_reasons))
        monkeypatch.setitem(dispatch._TABLE[op], "eager", dispatch.OpBackend(
            op, "eager", lambda *a, _f=eager.impl, **k: calls.append(1) or _f(*a, **k), eager.available,
            eager.reasons))
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    table = torch.randn(table_rows((2, 2)), 2)
    rel_bias_attention(q, k, v, table, (2, 2))
    assert calls == [1]
    with pytest.raises(BackendUnavailableError, match="ext: cannot build the C\\+\\+ extension: ninja"):
        rel_bias_attention(q, k, v, table, (2, 2), backend="ext")


@needs_toolchain
def test_a_failed_build_raises_clearly_then_auto_moves_on(tmp_path):
    """A compiler error surfaces as ExtensionUnavailableError with the compiler's message;
    afterwards the backend reports the failure and "auto" runs something else."""
    broken = tmp_path / "csrc"
    shutil.copytree(ext.csrc_dir(), broken)
    with open(broken / "rel_bias_attention_cpu.cpp", "a") as f:
        f.write("\nthis_is_not_cpp;\n")
    code = f"""
        import torch
        from pathlib import Path
        from coatnet_fast import ext
        from coatnet_fast.ops import dispatch, rel_bias_attention
        ext.csrc_dir = lambda: Path({str(broken)!r})
        try:
            ext.load()
        except ext.ExtensionUnavailableError as e:
            assert "this_is_not_cpp" in str(e), str(e)[-2000:]
        else:
            raise AssertionError("the broken build loaded")
        assert "building the C++ extension failed" in dispatch.why_not("rel_bias_attention", "ext")[0]
        q = torch.randn(1, 1, 4, 16)
        assert dispatch.select("rel_bias_attention", "auto", dict(q=q, k=q, v=q, table=torch.randn(9, 1),
                               window=(2, 2), scale=0.25)).backend == "eager"
        rel_bias_attention(q, q, q, torch.randn(9, 1), (2, 2))
        print("ok")
    """
    done = _run_python(code, tmp_path, TRITON_INTERPRET=None)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@needs_toolchain
def test_build_ext_command_reports_what_it_built_against(library, capsys):
    assert cli.main(["build-ext"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("built ") and f"torch: {torch.__version__}" in out
    assert "compiler: " in out and "rel_bias_attention_forward" in out and "dwconv_bn_gelu_backward" in out
    assert "batch_norm_act_backward" in out
    assert cli.main(["info"]) == 0
    assert "C++/CUDA extension: loaded" in capsys.readouterr().out


@needs_toolchain
def test_a_cached_build_loads_in_a_new_process_without_compiling(library, tmp_path):
    """The second process finds the library by its key and only loads it."""
    code = """
        import time, torch
        from coatnet_fast import ext
        from torch.utils import cpp_extension
        def refuse(*a, **k):
            raise AssertionError("compiled although a build was cached")
        cpp_extension.load = refuse
        ext.load()
        q = torch.randn(1, 1, 4, 16)
        print(torch.ops.coatnet_fast_ext.rel_bias_attention_forward(q, q, q, torch.randn(9, 1), 2, 2, 0.25)[0].shape)
    """
    done = _run_python(code, tmp_path, COATNET_FAST_EXT_DIR=str(ext.cache_root()))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.Size([1, 1, 4, 16])" in done.stdout


@needs_toolchain
def test_c_plus_plus_checks_name_the_argument(library):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match=r"table must have shape \[\(2H-1\)\(2W-1\), heads\] = \[9, 2\]"):
        library.rel_bias_attention_forward(q, q, q, torch.randn(8, 2), 2, 2, 0.5)
    with pytest.raises(RuntimeError, match=r"window \(3, 2\) must have H\*W == N = 4"):
        library.rel_bias_attention_forward(q, q, q, torch.randn(15, 2), 3, 2, 0.5)
    x, c = torch.randn(2, 3, 4, 5), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"batch_norm_act_apply: scale must have shape \[C\] = \[3\]"):
        library.batch_norm_act_apply(x, c, torch.ones(4), c, True, None, None)
    with pytest.raises(RuntimeError, match=r"batch_norm_act_apply: residual must have x's shape"):
        library.batch_norm_act_apply(x, c, c, c, True, torch.randn(2, 3, 5, 4), None)
    with pytest.raises(RuntimeError, match=r"batch_norm_act_apply: branch_scale must have shape \[B\] = \[2\]"):
        library.batch_norm_act_apply(x, c, c, c, False, None, torch.ones(3))
    with pytest.raises(RuntimeError, match=r"batch_norm_act_apply: x must be a 4-D \[B, C, H, W\] tensor"):
        library.batch_norm_act_apply(x[0], c, c, c, True, None, None)
    with pytest.raises(RuntimeError, match=r"batch_norm_act_backward: grad_y must have x's shape"):
        library.batch_norm_act_backward(torch.randn(2, 3, 4), x, c, c, c, c, True, None, True)
    with pytest.raises(RuntimeError, match=r"batch_norm_act_backward: rstd must have shape \[C\] = \[3\]"):
        library.batch_norm_act_backward(x, x, c, c, c, torch.ones(2), True, None, True)
    with pytest.raises(RuntimeError, match=r"batch_norm_stats: batch statistics need at least one value"):
        library.batch_norm_stats(torch.randn(0, 3, 4, 5))
    with pytest.raises(RuntimeError, match=r"batch_norm_stats: x must be float32, float64, float16 or bfloat16"):
        library.batch_norm_stats(torch.ones(2, 3, 4, 5, dtype=torch.int32))
