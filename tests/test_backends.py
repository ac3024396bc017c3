"""The backend table, "auto" selection, and swapping backends on a built model."""
import pytest
import torch

import coatnet_fast
from coatnet_fast import BackendUnavailableError, CoAtNet, get_backend, set_backend
from coatnet_fast.models import Attention, ConvBN, DWConvBNGELU, MaxPool2d
from coatnet_fast.ops import batch_norm_act, dispatch, dwconv_bn_gelu, rel_bias_attention
from coatnet_fast.ops.rel_bias_attention import rel_bias_attention_eager, table_rows

SMALL = dict(image_size=(64, 64), num_blocks=(1, 1, 1, 1, 1), channels=(8, 12, 16, 32, 32), num_classes=4)


@pytest.fixture
def table_snapshot(monkeypatch):
    """Let a test register entries; the table is restored afterwards."""
    saved = {op: dict(entries) for op, entries in dispatch._TABLE.items()}
    yield
    dispatch._TABLE.clear()
    dispatch._TABLE.update(saved)


def _close(a, b):
    return ((a - b).norm() / b.norm()).item() < 1e-6


def attention_inputs(n_window=(3, 3)):
    n = n_window[0] * n_window[1]
    return [torch.randn(2, 2, n, 8) for _ in range(3)] + [torch.randn(table_rows(n_window), 2)]


def test_every_op_has_every_backend_entry_and_eager_is_usable():
    assert set(dispatch.ops()) == {"rel_bias_attention", "dwconv_bn_gelu", "batch_norm_act", "max_pool2d"}
    for op in dispatch.ops():
        assert set(dispatch._TABLE[op]) == set(dispatch.BACKENDS)
        assert "eager" in dispatch.usable_backends(op)
    # Every backend has an implementation of every op (whether it runs here is why_not's question),
    # but the C++ extension of max_pool2d (set_backend leaves the pools on eager).
    assert [(op, b) for op in dispatch.ops() for b in dispatch.BACKENDS
            if not dispatch.implemented(op, b)] == [("max_pool2d", "ext")]


def test_an_entry_without_implementation_says_so(table_snapshot):
    dispatch.register("batch_norm_act", "ext", None)
    assert not dispatch.implemented("batch_norm_act", "ext")
    assert dispatch.why_not("batch_norm_act", "ext") == ["no implementation registered"]
    assert "ext" not in dispatch.usable_backends("batch_norm_act")
    with pytest.raises(BackendUnavailableError, match="ext: no implementation registered"):
        coatnet_fast.ops.batch_norm_act(torch.randn(2, 3, 4, 4), torch.ones(3), torch.zeros(3), torch.zeros(3),
                                        torch.ones(3), training=True, backend="ext")


def test_auto_prefers_the_first_capable_backend(table_snapshot):
    calls = []

    def recording(*args):
        calls.append("triton")
        return rel_bias_attention_eager(*args)

    dispatch.register("rel_bias_attention", "triton", recording)
    q, k, v, table = attention_inputs()
    out = rel_bias_attention(q, k, v, table, (3, 3))
    assert calls == ["triton"]
    assert torch.equal(out, rel_bias_attention(q, k, v, table, (3, 3), backend="eager"))
    assert calls == ["triton"]


def test_auto_falls_back_to_eager_and_a_named_backend_raises_its_reasons(table_snapshot):
    calls = []

    def never(*args):
        calls.append("ext")
        raise AssertionError("must not run")

    dispatch.register("rel_bias_attention", "ext", never,
                      reasons=lambda q, **_: ["head dim 8 is not supported (needs 16, 32, 64 or 128)"])
    q, k, v, table = attention_inputs()
    out = rel_bias_attention(q, k, v, table, (3, 3), backend="auto")
    assert calls == [] and torch.equal(out, rel_bias_attention_eager(q, k, v, table, (3, 3), 8 ** -0.5))
    with pytest.raises(BackendUnavailableError, match=r"ext: head dim 8 is not supported") as info:
        rel_bias_attention(q, k, v, table, (3, 3), backend="ext")
    assert info.value.reasons == {"ext": ["head dim 8 is not supported (needs 16, 32, 64 or 128)"]}


def test_error_lists_every_backend_when_nothing_fits(table_snapshot):
    for backend in dispatch.BACKENDS:
        dispatch.register("dwconv_bn_gelu", backend, None, available=lambda b=backend: f"{b} disabled for this test")
    c = 2
    with pytest.raises(BackendUnavailableError) as info:
        dwconv_bn_gelu(torch.randn(2, c, 4, 4), torch.randn(c, 1, 3, 3), torch.ones(c), torch.zeros(c),
                       torch.zeros(c), torch.ones(c), training=False)
    assert set(info.value.reasons) == set(dispatch.AUTO_ORDER)
    assert all(f"{b} disabled for this test" in str(info.value) for b in dispatch.BACKENDS)


def test_register_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.register("rel_bias_attention", "cuda", rel_bias_attention_eager)


def test_set_backend_swaps_every_fusable_module_and_back(table_snapshot):
    # Stand-ins for the fused backends: the eager maths, recording that they ran.
    calls = []
    for op, eager in ((op, dispatch._TABLE[op]["eager"].impl) for op in dispatch.ops()):
        def impl(*args, _op=op, _eager=eager, **kwargs):
            calls.append(_op)
            return _eager(*args, **kwargs)
        dispatch.register(op, "triton", impl)

    model = CoAtNet(**SMALL)
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    expected = model(x)
    assert calls == []
    assert set_backend(model, "triton") is model and get_backend(model) == "triton"
    assert list(model.state_dict()) == keys
    fusable = (Attention, DWConvBNGELU, ConvBN, MaxPool2d)
    assert all(m.backend == "triton" for m in model.modules() if isinstance(m, fusable))
    assert _close(model(x), expected)  # MBConv's fused path folds SE's gate into the projection: reassociated
    n_attn = sum(isinstance(m, Attention) for m in model.modules())
    n_dw = sum(isinstance(m, DWConvBNGELU) for m in model.modules())
    n_pw = sum(isinstance(m, ConvBN) for m in model.modules())
    n_pool = sum(isinstance(m, MaxPool2d) for m in model.modules())
    assert n_pw == 2 * n_dw + len(model.s0) and n_dw > 0  # each MBConv's expand and projection, each stem layer
    assert n_pool > 0  # the downsampling blocks' pools
    assert sorted(calls) == sorted(["rel_bias_attention"] * n_attn + ["dwconv_bn_gelu"] * n_dw
                                   + ["batch_norm_act"] * n_pw + ["max_pool2d"] * n_pool)
    calls.clear()
    set_backend(model, "eager")
    assert get_backend(model) == "eager" and torch.equal(model(x), expected) and calls == []


def test_set_backend_keeps_the_ops_a_backend_lacks_on_eager(table_snapshot):
    """A backend without an implementation of one op (here a stand-in "ext" entry with none for
    batch_norm_act): set_backend(model, "ext") moves the other fusable modules, keeps the conv +
    BatchNorm modules on eager, and get_backend still says "ext" (stand-ins for the extension's
    other ops record that they ran)."""
    calls = []
    for op in ("rel_bias_attention", "dwconv_bn_gelu"):
        def impl(*args, _op=op, _eager=dispatch._TABLE[op]["eager"].impl, **kwargs):
            calls.append(_op)
            return _eager(*args, **kwargs)
        dispatch.register(op, "ext", impl)
    dispatch.register("batch_norm_act", "ext", None)
    model = CoAtNet(**SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    assert set_backend(model, "ext") is model and get_backend(model) == "ext"
    assert {m.backend for m in model.modules() if isinstance(m, ConvBN)} == {"eager"}
    assert {m.backend for m in model.modules() if isinstance(m, (Attention, DWConvBNGELU))} == {"ext"}
    assert _close(model(x), expected) and set(calls) == {"rel_bias_attention", "dwconv_bn_gelu"}
    model.s1[0].block.pro_conv.backend = "triton"
    assert get_backend(model) == "mixed"


@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_set_backend_to_an_unavailable_backend_raises_and_changes_nothing(backend, table_snapshot):
    for op in dispatch.ops():
        entry = dispatch._TABLE[op][backend]
        dispatch.register(op, backend, entry.impl, available=lambda: "not available: switched off for this test",
                          reasons=entry.reasons)
    model = CoAtNet(**SMALL)
    with pytest.raises(BackendUnavailableError, match="not available"):
        set_backend(model, backend)
    assert get_backend(model) == "eager"
    with pytest.raises(BackendUnavailableError, match="not available"):
        CoAtNet(backend=backend, **SMALL)


def test_set_backend_auto_runs_and_matches_eager():
    model = CoAtNet(**SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    set_backend(model, "auto")
    assert get_backend(model) == "auto"
    out = model(x)  # a fused backend may run where usable: equal up to rounding
    assert ((out - expected).norm() / expected.norm()).item() < 1e-5


def test_set_backend_unknown_name():
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'fast'"):
        set_backend(CoAtNet(**SMALL), "fast")


def test_dwconv_module_follows_batchnorm_momentum_none():
    """momentum=None: cumulative average over num_batches_tracked, exactly as nn.BatchNorm2d."""
    torch.manual_seed(0)
    fused = DWConvBNGELU(5)
    fused[1].momentum = None
    plain = torch.nn.Sequential(*[m for m in DWConvBNGELU(5)])
    plain[1].momentum = None
    plain.load_state_dict(fused.state_dict())
    for _ in range(3):
        x = torch.randn(2, 5, 6, 6)
        assert torch.allclose(fused(x), plain(x), atol=1e-6)
    for key, value in plain.state_dict().items():
        assert torch.allclose(fused.state_dict()[key].double(), value.double(), atol=1e-6), key
    assert int(fused[1].num_batches_tracked) == 3


def test_import_has_no_side_effects():
    import subprocess
    import sys

    code = ("import sys, torch, coatnet_fast; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_public_api():
    for name in ["CoAtNet", "create_model", "list_models", "set_backend", "coatnet_0", "coatnet_4", "ops", "__version__"]:
        assert hasattr(coatnet_fast, name), name
    assert coatnet_fast.ops.rel_bias_attention is rel_bias_attention
    assert coatnet_fast.ops.dwconv_bn_gelu is dwconv_bn_gelu


def test_triton_declines_cpu_tensors_without_the_interpreter(monkeypatch):
    from coatnet_fast.ops.rel_bias_attention import supported_reasons

    q = torch.randn(1, 1, 4, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = supported_reasons("triton", q, q, q, torch.randn(9, 1), (2, 2))
    assert any("TRITON_INTERPRET=1" in w for w in why), why
    # "auto" then runs eager, and says nothing
    out = rel_bias_attention(q, q, q, torch.randn(9, 1), (2, 2), backend="auto")
    assert out.shape == q.shape


def test_sync_batchnorm_across_processes_runs_the_modules(monkeypatch):
    """A SyncBatchNorm training across processes takes statistics over all of them, which the
    fused kernels do not: the depthwise block then runs its modules; otherwise the op runs."""
    import torch.distributed as dist

    block = torch.nn.SyncBatchNorm.convert_sync_batchnorm(DWConvBNGELU(4))
    assert isinstance(block, DWConvBNGELU) and isinstance(block[1], torch.nn.SyncBatchNorm)
    calls = []
    entry = dispatch._TABLE["dwconv_bn_gelu"]["eager"]
    monkeypatch.setitem(dispatch._TABLE["dwconv_bn_gelu"], "eager", dispatch.OpBackend(
        entry.op, "eager", lambda *a, **k: calls.append("op") or entry.impl(*a, **k), entry.available, entry.reasons))
    # SyncBatchNorm's own forward needs a process group; BatchNorm2d's stands in, recorded.
    monkeypatch.setattr(torch.nn.SyncBatchNorm, "forward",
                        lambda self, x: calls.append("sync") or torch.nn.BatchNorm2d.forward(self, x))
    x = torch.randn(2, 4, 6, 6)
    block(x)
    assert calls == ["op"]  # one process: the fused op
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    calls.clear()
    y = block(x)
    y_pooled, squeezed = block.forward_pooled(x)
    assert calls == ["sync", "sync"]
    assert torch.allclose(squeezed, y_pooled.mean(dim=(2, 3))) and y.shape == y_pooled.shape
    calls.clear()
    block.eval()
    block(x)
    assert calls == ["op"]  # inference uses running statistics: the fused op again


def test_triton_backend_is_usable_in_the_test_suite():
    """triton is a dependency on Linux and conftest.py turns on its interpreter where there is no
    GPU, so the triton tests below always run here; this fails rather than let them go unrun."""
    import sys

    if sys.platform == "linux":
        for op in dispatch.ops():
            assert "triton" in dispatch.usable_backends(op), dispatch.why_not(op, "triton")


def _triton_calls(device, backend="triton"):
    """Each fused op called on fresh inputs: name -> (function of the inputs, the inputs that take
    gradients). Attention at fp32 with a 3x3 window; the BatchNorm ops in training (batch
    statistics)."""
    q, k, v = (torch.randn(2, 2, 9, 16, device=device, requires_grad=True) for _ in range(3))
    table = torch.nn.Parameter(torch.randn(table_rows((3, 3)), 2, device=device))
    x = torch.randn(2, 4, 5, 5, device=device, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(4, 1, 3, 3, device=device))
    bn = torch.nn.BatchNorm2d(4).to(device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)

    def attention(q, k, v, table):
        return rel_bias_attention(q, k, v, table, (3, 3), backend=backend)

    def dwconv(x, weight, gamma, beta):
        return dwconv_bn_gelu(x, weight, gamma, beta, bn.running_mean, bn.running_var, training=True,
                              backend=backend)

    def bn_act(x, gamma, beta):
        return batch_norm_act(x, gamma, beta, bn.running_mean, bn.running_var, training=True, backend=backend)

    return {"rel_bias_attention": (attention, (q, k, v, table)),
            "dwconv_bn_gelu": (dwconv, (x, weight, bn.weight, bn.bias)),
            "batch_norm_act": (bn_act, (x, bn.weight, bn.bias))}


@pytest.mark.parametrize("op", ["rel_bias_attention", "dwconv_bn_gelu"])
def test_eager_calls_skip_the_custom_op_and_match_it(op, device, monkeypatch):
    """Eager calls run the op's autograd.Function (no custom-op dispatch cost); forcing the
    custom op gives bit-identical outputs and gradients, since both reach the same launchers."""
    fn, inputs = _triton_calls(device)[op]
    out = fn(*inputs)
    assert out.grad_fn.name() in ("_TritonAttentionFunctionBackward", "_TritonDWConvFunctionBackward")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)

    monkeypatch.setattr(dispatch, "eager_fast_path", lambda *tensors: False)
    out_op = fn(*inputs)
    assert "Backward" in out_op.grad_fn.name() and "Function" not in out_op.grad_fn.name()
    grads_op = torch.autograd.grad(out_op, inputs, grad_out)
    assert torch.equal(out, out_op)
    for g, g_op in zip(grads, grads_op):
        assert torch.equal(g, g_op)


@pytest.mark.parametrize("op", ["rel_bias_attention", "dwconv_bn_gelu"])
def test_torch_compile_traces_the_custom_op(op, device):
    """Under torch.compile the op must appear as its torch.library custom op, whose schema and
    fake kernel the compiler needs, not as the eager path's autograd.Function."""
    import torch._dynamo

    torch._dynamo.reset()
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    fn, inputs = _triton_calls(device)[op]
    out = torch.compile(fn, backend=recording_backend, fullgraph=True)(*inputs)
    assert torch.equal(out, fn(*inputs))
    assert any(f"coatnet_fast.{op}_triton" in t for t in targets), targets


def test_fast_path_yields_to_dispatch_modes_and_tracing():
    """Under a TorchDispatchMode (make_fx, FakeTensorMode, FlopCounterMode) the op must be the
    custom op those modes can see, not a kernel launch hidden inside an autograd.Function."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    t = torch.randn(2)
    assert dispatch.eager_fast_path(t, torch.nn.Parameter(t))
    with PassThrough():
        assert not dispatch.eager_fast_path(t)
    assert not dispatch.eager_fast_path(torch.empty(2, device="meta"))
    from torch.fx.experimental.proxy_tensor import make_fx

    fn, inputs = _triton_calls(torch.device("cpu"))["rel_bias_attention"]
    graph = make_fx(lambda *a: fn(*a), tracing_mode="real")(*inputs)
    assert any("rel_bias_attention_triton" in str(n.target) for n in graph.graph.nodes), graph.code


@pytest.mark.parametrize("op", ["rel_bias_attention", "dwconv_bn_gelu", "batch_norm_act"])
def test_ext_double_backward_raises_rather_than_giving_zeros(op, device):
    """The extension's backward ops have no autograd formula; autograd's fallback for them would
    make second derivatives silently zero, so create_graph=True raises instead."""
    assert "ext" in dispatch.usable_backends(op), dispatch.why_not(op, "ext")  # CI builds it
    fn, inputs = _triton_calls(device, backend="ext")[op]
    out = fn(*inputs)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad((out * out).sum(), inputs, create_graph=True)


@pytest.mark.parametrize("op", ["rel_bias_attention", "dwconv_bn_gelu", "batch_norm_act"])
@pytest.mark.parametrize("fast", [True, False], ids=["autograd-function", "custom-op"])
def test_double_backward_raises_rather_than_dropping_the_graph(op, fast, device, monkeypatch):
    """A fused op has no second derivative: differentiating its gradients raises, on both paths,
    even for a loss linear in the output (where graph-less gradients would silently give zero).
    The autograd.Function raises at create_graph=True; the custom op when the graph is used."""
    if not fast:
        monkeypatch.setattr(dispatch, "eager_fast_path", lambda *tensors: False)
    fn, inputs = _triton_calls(device)[op]
    out = fn(*inputs)
    message = "no double backward" if fast else "no autograd formula was registered"
    with pytest.raises(RuntimeError, match=message):
        grads = torch.autograd.grad(out.sum(), inputs, create_graph=True)
        torch.autograd.grad(sum(g.sum() for g in grads), inputs, allow_unused=True)
