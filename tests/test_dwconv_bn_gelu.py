"""dwconv_bn_gelu: every usable backend against an independent float64 computation."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coatnet_fast.ops import BackendUnavailableError, dispatch, dwconv_bn_gelu, dwconv_bn_gelu_pool
from coatnet_fast.ops.dwconv_bn_gelu import supported_reasons
from reference import (RUNNING_STATISTICS_PATHS, TOLERANCE, dwconv_bn_gelu_reference, memory_layout,
                       relative_error, running_statistics_on_path)

OP = "dwconv_bn_gelu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(shape, device, dtype, seed=0, channel_mean=0.0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) + channel_mean
    weight = torch.randn(c, 1, 3, 3, generator=g, dtype=torch.float64) / 3
    gamma = 1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64)
    beta = 0.3 * torch.randn(c, generator=g, dtype=torch.float64)
    mean = 0.2 * torch.randn(c, generator=g, dtype=torch.float64)
    var = 0.5 + torch.rand(c, generator=g, dtype=torch.float64)
    return x, weight, gamma, beta, mean, var, g


def check(backend, shape, stride, training, channels_last, dtype, device, momentum=0.1, channel_mean=0.0, seed=0):
    x64, w64, g64, b64, m64, v64, gen = make_inputs(shape, device, dtype, seed, channel_mean)
    ho, wo = (shape[2] - 1) // stride + 1, (shape[3] - 1) // stride + 1
    grad_out = torch.randn(shape[0], shape[1], ho, wo, generator=gen, dtype=torch.float64).to(device)

    x = x64.to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if _refused(backend, x, training):
        return
    params = [t.to(device, dtype).requires_grad_(True) for t in (w64, g64, b64)]
    x.requires_grad_(True)
    running_mean, running_var = m64.to(device, dtype), v64.to(device, dtype)
    out = dwconv_bn_gelu(x, *params, running_mean, running_var, training=training, momentum=momentum,
                         stride=stride, backend=backend)
    grads = torch.autograd.grad(out, [x] + params, grad_out.to(out.dtype))

    ref_in = [t.clone().requires_grad_(True) for t in (x64, w64, g64, b64)]
    ref_out, ref_mean, ref_var = dwconv_bn_gelu_reference(*ref_in, m64, v64, training, momentum, 1e-5, stride)
    ref_grads = torch.autograd.grad(ref_out, ref_in, grad_out.cpu())

    assert out.shape == ref_out.shape and out.dtype == dtype
    checks = zip(
        ("out", "dx", "dweight", "dbn_weight", "dbn_bias", "running_mean", "running_var"),
        (out,) + grads + (running_mean, running_var),
        (ref_out,) + ref_grads + (ref_mean, ref_var),
    )
    for name, a, b in checks:
        err = relative_error(a, b)
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


SHAPES = [(2, 6, 9, 7), (3, 5, 8, 8), (1, 3, 7, 7), (2, 4, 13, 11)]


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_reference_fp32(backend, shape, stride, training, channels_last, device):
    check(backend, shape, stride, training, channels_last, torch.float32, device)


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_reference_dtypes(backend, dtype, training, device):
    check(backend, (2, 6, 9, 7), 1, training, True, dtype, device)


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_large_mean_channel_keeps_its_variance(backend, channels_last, device):
    """The conv output has mean ~1e3 and std ~1 in every channel, at the borders too: x has mean
    1e3 and each channel's weight is a centre tap in about 0.7..1.3 with off-centre taps of ~1e-4
    (a border position, missing three or five taps, moves by ~0.2, not by hundreds as with taps
    of ~0.3). E[z^2] - E[z]^2 in fp32 then cancels 1e6 against 1e6 and loses the variance whole;
    shifted (Welford / Chan) statistics keep it to fp32 rounding.

    The running variance (momentum 1: the unbiased batch variance) and mean are checked at fp32
    tolerance. Outputs and gradients can be no closer than the fp32 conv output allows: half an
    ulp of 1e3 is 3e-5 of the unit std, in every element, and d(weight) sums dz (whose channel
    sum is zero in training) times x ~ 1e3, so it takes that cancellation: ~3e-4 relative here,
    hence 1e-3. A lost variance is off by far more (see the assertion on the premise below)."""
    shape, stride = (2, 8, 7, 9), 1
    g = torch.Generator().manual_seed(11)
    c = shape[1]
    # The op gets fp32 values: the reference starts from the same ones (at 1e3 an fp32 x alone
    # is 3e-5 off its float64 draw, relative to a unit std).
    x64 = (torch.randn(shape, generator=g, dtype=torch.float64) + 1e3).float().double()
    w64 = 1e-4 * torch.randn(c, 1, 3, 3, generator=g, dtype=torch.float64)
    w64[:, 0, 1, 1] = 1 + 0.1 * torch.randn(c, generator=g, dtype=torch.float64)
    w64 = w64.float().double()
    g64, b64 = ((1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64)).float().double(),
                (0.3 * torch.randn(c, generator=g, dtype=torch.float64)).float().double())
    m64, v64 = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    grad_out = torch.randn(shape, generator=g, dtype=torch.float64).float().double()

    # The premise: every channel of the conv output (borders included) has mean ~1e3, std ~1.
    z = torch.nn.functional.conv2d(x64, w64, None, stride, 1, 1, c)
    assert (z.mean(dim=(0, 2, 3)) > 500).all() and (z.std(dim=(0, 2, 3)) - 1).abs().max() < 0.5

    x = x64.float().to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if _refused(backend, x):
        return
    x.requires_grad_(True)
    params = [t.float().to(device).requires_grad_(True) for t in (w64, g64, b64)]
    running_mean, running_var = m64.float().to(device), v64.float().to(device)
    out = dwconv_bn_gelu(x, *params, running_mean, running_var, training=True, momentum=1.0, stride=stride,
                         backend=backend)
    grads = torch.autograd.grad(out, [x] + params, grad_out.float().to(device))

    ref_in = [t.clone().requires_grad_(True) for t in (x64, w64, g64, b64)]
    ref_out, ref_mean, ref_var = dwconv_bn_gelu_reference(*ref_in, m64, v64, True, 1.0, 1e-5, stride)
    ref_grads = torch.autograd.grad(ref_out, ref_in, grad_out)
    assert relative_error(ref_var, z.var(dim=(0, 2, 3), unbiased=True)) < 1e-12  # momentum 1: the batch's

    for name, a, b, tolerance in (("running_var", running_var, ref_var, TOLERANCE[torch.float32]),
                                  ("running_mean", running_mean, ref_mean, 1e-6)):
        err = relative_error(a, b)
        assert err <= tolerance, f"{name}: relative error {err:.2e} > {tolerance:.0e}"
    for name, a, b in zip(("out", "dx", "dweight", "dbn_weight", "dbn_bias"), (out,) + grads,
                          (ref_out,) + ref_grads):
        err = relative_error(a, b)
        assert err <= 1e-3, f"{name}: relative error {err:.2e} > 1e-3"


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stride, channels_last", [(1, False), (2, False), (2, True)],
                         ids=["s1-nchw", "s2-nchw", "s2-nhwc"])
def test_half_precision_layouts_and_strides(backend, dtype, stride, channels_last, device):
    """fp16 and bf16 beyond test_matches_reference_dtypes' channels_last stride 1: NCHW, and
    stride 2 in both layouts, train and eval. (bf16 runs on the CPU interpreter too: these
    kernels convert every load to fp32 and do no bf16 arithmetic, unlike the elementwise
    kernels the interpreter's bf16 defect concerns; test_matches_reference_dtypes runs it too.)"""
    for training in (True, False):
        check(backend, (2, 8, 7, 9), stride, training, channels_last, dtype, device)


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
def test_momentum_values(backend, device):
    for momentum in (0.0, 0.5, 1.0):
        check(backend, (2, 3, 6, 5), 1, True, False, torch.float32, device, momentum=momentum)


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
# The device fixture is a torch.device, which no example changes: sharing it across examples is safe.
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 3), c=st.integers(1, 9), h=st.integers(1, 12), w=st.integers(1, 12),
    stride=st.sampled_from([1, 2]), training=st.booleans(), channels_last=st.booleans(), seed=st.integers(0, 99),
)
def test_fuzzed_small_shapes(backend, device, b, c, h, w, stride, training, channels_last, seed):
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    if training and b * ho * wo < 3:
        # One value per channel has no batch variance (its rejection is tested below). With two,
        # xhat is +-1 whatever the values, so BatchNorm's training gradient at the conv output is
        # exactly zero: dx is rounding noise scaled by 1 / std, which no tolerance bounds (a
        # 1x2x2x1 draw once gave 1.15e-4 against the relative-error floor).
        return
    check(backend, (b, c, h, w), stride, training, channels_last, torch.float32, device, seed=seed)


@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_unavailable_backend_raises_with_reason(backend, monkeypatch):
    """A backend named explicitly that cannot run here raises with its reason (switched off
    here, so that the test runs whether or not the machine has the backend)."""
    entry = dispatch._TABLE[OP][backend]
    monkeypatch.setitem(dispatch._TABLE[OP], backend, dispatch.OpBackend(
        OP, backend, entry.impl, lambda: "not available: switched off for this test", entry.reasons))
    c = 3
    with pytest.raises(BackendUnavailableError, match=rf"{backend}: .*not available"):
        dwconv_bn_gelu(torch.randn(2, c, 5, 5), torch.randn(c, 1, 3, 3), torch.ones(c), torch.zeros(c),
                       torch.zeros(c), torch.ones(c), training=True, backend=backend)


def _good(**overrides):
    c = 4
    args = dict(x=torch.randn(2, c, 6, 6), weight=torch.randn(c, 1, 3, 3), bn_weight=torch.ones(c),
                bn_bias=torch.zeros(c), running_mean=torch.zeros(c), running_var=torch.ones(c), training=True)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(x=torch.randn(4, 6, 6)), ValueError, r"x must have 4 dims"),
        (dict(x="image"), TypeError, r"x must be a torch.Tensor"),
        (dict(weight=torch.randn(4, 1, 5, 5)), ValueError, r"weight must have shape \[C, 1, 3, 3\]"),
        (dict(weight=torch.randn(5, 1, 3, 3)), ValueError, r"weight must have shape"),
        (dict(bn_weight=torch.ones(3)), ValueError, r"bn_weight must have shape \[C\] = \[4\]"),
        (dict(running_var=torch.ones(4, 1)), ValueError, r"running_var must have 1 dims"),
        (dict(weight=torch.randn(4, 1, 3, 3, dtype=torch.float16)), TypeError, r"weight must have dtype"),
        (dict(running_mean=torch.zeros(4, dtype=torch.long)), TypeError, r"running_mean must be a floating"),
        (dict(bn_bias=torch.zeros(4, device="meta")), ValueError, r"bn_bias is on meta but x is on cpu"),
        (dict(stride=3), ValueError, r"stride must be 1 or 2"),
        (dict(momentum=1.5), ValueError, r"momentum must be a number in \[0, 1\]"),
        (dict(momentum=None), ValueError, r"momentum must be a number"),
        (dict(eps=0.0), ValueError, r"eps must be a positive"),
        (dict(training=1), TypeError, r"training must be a bool"),
        (dict(x=torch.randn(1, 4, 1, 1)), ValueError, r"more than one value per channel"),
        (dict(backend="fast"), ValueError, r"backend must be one of"),
    ] + [(dict(x=torch.randn(2, 4, *hw), training=False, backend=backend), ValueError, r"x must have H >= 1 and W >= 1")
         for hw in ((3, 0), (0, 5)) for backend in dispatch.usable_backends(OP)],
)
def test_bad_input_names_the_argument(overrides, error, message):
    args = _good(**overrides)
    x = args.pop("x")
    weight = args.pop("weight")
    positional = [args.pop(k) for k in ("bn_weight", "bn_bias", "running_mean", "running_var")]
    with pytest.raises(error, match=message):
        dwconv_bn_gelu(x, weight, *positional, **args)


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("stride", [1, 2])
def test_pooled_variant_feeds_se(backend, training, channels_last, stride, device):
    """dwconv_bn_gelu_pool: the output and its per-image channel mean, gradients through both."""
    shape = (3, 7, 10, 9)
    x64, w64, g64, b64, m64, v64, gen = make_inputs(shape, device, torch.float32)
    x = x64.float().to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if _refused(backend, x):
        return
    params = [t.float().to(device).requires_grad_(True) for t in (w64, g64, b64)]
    x.requires_grad_(True)
    y, pooled = dwconv_bn_gelu_pool(x, *params, m64.float().to(device), v64.float().to(device),
                                    training=training, stride=stride, backend=backend)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    gp = torch.randn(pooled.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad([y, pooled], [x] + params, [gy.to(device, y.dtype), gp.to(device, pooled.dtype)])

    ref_in = [t.clone().requires_grad_(True) for t in (x64, w64, g64, b64)]
    ref_y, _, _ = dwconv_bn_gelu_reference(*ref_in, m64, v64, training, 0.1, 1e-5, stride)
    ref_pooled = ref_y.mean(dim=(2, 3))
    ref_grads = torch.autograd.grad([ref_y, ref_pooled], ref_in, [gy, gp])
    assert pooled.shape == (3, 7) and pooled.dtype == torch.float32
    for name, a, b in zip(("y", "pooled", "dx", "dweight", "dbn_weight", "dbn_bias"),
                          (y, pooled) + grads, (ref_y, ref_pooled) + ref_grads):
        assert relative_error(a, b) <= TOLERANCE[torch.float32], name


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
def test_gradients_are_deterministic(backend, device):
    x64, w64, g64, b64, m64, v64, _ = make_inputs((3, 5, 9, 9), device, torch.float32)
    if _refused(backend, x64.float().to(device)):
        return

    def run():
        x = x64.float().to(device).requires_grad_(True)
        params = [t.float().to(device).requires_grad_(True) for t in (w64, g64, b64)]
        y = dwconv_bn_gelu(x, *params, m64.float().to(device), v64.float().to(device), training=True, backend=backend)
        return (y,) + torch.autograd.grad(y, [x] + params, torch.ones_like(y))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stride", [1, 2])
def test_triton_backward_runs_no_aten_conv(stride, device, monkeypatch):
    """dx and d(weight) come from the Triton kernels: no ATen convolution op runs in the backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    calls = []
    real_backward = kernels.backward
    monkeypatch.setattr(kernels, "backward", lambda *a: calls.append(a) or real_backward(*a))
    c = 5
    x = torch.randn(2, c, 7, 9, device=device).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    if _refused("triton", x):
        return
    params = [torch.randn(c, 1, 3, 3, device=device), torch.ones(c, device=device), torch.zeros(c, device=device)]
    params = [p.requires_grad_(True) for p in params]
    y = dwconv_bn_gelu(x, *params, torch.zeros(c, device=device), torch.ones(c, device=device), training=True,
                       stride=stride, backend="triton")
    dy = torch.randn_like(y)
    with RecordOps() as record:
        grads = torch.autograd.grad(y, [x] + params, dy)
    assert len(calls) == 1 and grads[0].shape == x.shape
    convs = [name for name in record.names if "convolution" in name]
    assert not convs and record.names, convs


def _refused(backend, x, training=True):
    """A backend may decline inputs it declares unsupported (e.g. CPU tensors without the
    interpreter); then it must raise with that reason rather than run."""
    c = x.shape[1]
    args = (x, torch.randn(c, 1, 3, 3, device=x.device), torch.ones(c, device=x.device), torch.zeros(c, device=x.device),
            torch.zeros(c, device=x.device), torch.ones(c, device=x.device))
    why = supported_reasons(backend, *args, training=training)
    if why:
        assert backend != "eager"
        with pytest.raises(BackendUnavailableError):
            dwconv_bn_gelu(*args, training=training, backend=backend)
    return bool(why)


@pytest.mark.parametrize("x_layout, dy_layout", [("channels_last", "nchw"), ("nchw", "channels_last"),
                                                  ("channels_last", "channels_last")])
def test_triton_backward_reads_dy_in_x_layout(device, launch_spy, x_layout, dy_layout):
    """The backward's tiles follow x's layout; a gradient in the other layout is copied into x's
    before the kernels read it (match_layout) rather than gathered across their tiles, and the
    gradients match float64 either way."""
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    x64, w64, g64, b64, m64, v64, gen = make_inputs((2, 24, 9, 7), device, torch.float32)
    fmt = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
    x = x64.float().to(device).contiguous(memory_format=fmt[x_layout])
    if _refused("triton", x):
        return
    grad_out = torch.randn(2, 24, 9, 7, generator=gen, dtype=torch.float64)
    calls = launch_spy(kernels, "_bwd_reduce")
    params = [t.float().to(device).requires_grad_(True) for t in (w64, g64, b64)]
    x.requires_grad_(True)
    out = dwconv_bn_gelu(x, *params, m64.float().to(device), v64.float().to(device), training=True, backend="triton")
    dy = grad_out.float().to(device).contiguous(memory_format=fmt[dy_layout])
    assert memory_layout(dy) == dy_layout
    grads = torch.autograd.grad(out, [x] + params, dy)
    assert len(calls) == 1 and memory_layout(calls[0][2]) == x_layout
    ref_in = [t.clone().requires_grad_(True) for t in (x64, w64, g64, b64)]
    ref_out, _, _ = dwconv_bn_gelu_reference(*ref_in, m64, v64, True, 0.1, 1e-5, 1)
    for got, want in zip(grads, torch.autograd.grad(ref_out, ref_in, grad_out)):
        assert relative_error(got, want) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", [b for b in dispatch.usable_backends(OP) if b != "eager"])
def test_fused_kernels_write_every_output_element(backend, device, poison_empty):
    """Outputs, statistics and gradients allocated NaN-filled: anything a kernel skips shows up."""
    for training in (True, False):
        for channels_last in (False, True):
            check(backend, (2, 37, 11, 13), 2, training, channels_last, torch.float32, device)
            check(backend, (3, 5, 16, 15), 1, training, channels_last, torch.float32, device)


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autocast(backend, training, device):
    """Under autocast the activation runs in the autocast dtype, parameters and statistics stay
    fp32, and their gradients come back fp32."""
    low = torch.bfloat16 if device.type == "cuda" else torch.float16
    x64, w64, g64, b64, m64, v64, gen = make_inputs((2, 6, 9, 7), device, torch.float32)
    x = x64.float().to(device).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    params = [t.float().to(device).requires_grad_(True) for t in (w64, g64, b64)]
    running = [m64.float().to(device), v64.float().to(device)]
    with torch.autocast(device.type, dtype=low):
        if _refused(backend, x.to(low), training):
            return
        y = dwconv_bn_gelu(x.to(low), *params, *running, training=training, backend=backend)
    assert y.dtype == low
    grad_out = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(y, [x] + params, grad_out.to(device, low))
    assert all(g.dtype == torch.float32 for g in grads)
    ref_in = [t.clone().requires_grad_(True) for t in (x64, w64, g64, b64)]
    ref_y, ref_mean, ref_var = dwconv_bn_gelu_reference(*ref_in, m64, v64, training, 0.1, 1e-5, 1)
    ref_grads = torch.autograd.grad(ref_y, ref_in, grad_out)
    checks = zip(("y", "dx", "dweight", "dbn_weight", "dbn_bias", "running_mean", "running_var"),
                 (y,) + grads + tuple(running), (ref_y,) + ref_grads + (ref_mean, ref_var))
    for name, a, b in checks:
        assert relative_error(a, b) <= TOLERANCE[low], name


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
def test_stage_one_resolution_112x112(backend, device):
    """The largest map the model feeds it (112x112 at 224 input): many position chunks."""
    check(backend, (1, 3, 112, 112), 2, True, True, torch.float32, device)
    check(backend, (1, 3, 112, 112), 1, False, False, torch.float32, device)


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
def test_module_momentum_none_over_steps(backend, device):
    """DWConvBNGELU on each backend against nn modules: momentum=None (cumulative average by
    num_batches_tracked), four training steps, then eval."""
    from coatnet_fast.models import DWConvBNGELU

    torch.manual_seed(0)
    fused = DWConvBNGELU(5).to(device)
    fused[1].momentum = None
    with torch.no_grad():
        fused[1].weight.uniform_(0.5, 1.5)
        fused[1].bias.uniform_(-0.5, 0.5)
    plain = torch.nn.Sequential(*[m for m in DWConvBNGELU(5)]).to(device)
    plain[1].momentum = None
    plain.load_state_dict(fused.state_dict())
    fused.backend = backend
    x = torch.randn(2, 5, 6, 6, device=device)
    if _refused(backend, x):
        return
    for step in range(4):
        x = torch.randn(2, 5, 6, 6, device=device) + step
        assert relative_error(fused(x), plain(x)) < 1e-5, step
    for key, value in plain.state_dict().items():
        assert relative_error(fused.state_dict()[key].double(), value.double()) < 1e-5, key
    fused.eval(), plain.eval()
    assert relative_error(fused(x), plain(x)) < 1e-5


# (4, 32, 1): strips 4 columns wide, so the row kernels walk a 7-wide image in two (the second
# padded); the CPU's own tiles take a whole row of up to 64 columns in one strip.
TRITON_TILES = [(16, 64, 4), (64, 16, 4), (64, 64, 4), (128, 16, 4), (32, 64, 8), (16, 16, 2), (4, 32, 1)]


def use_backward(kernels, monkeypatch, backward):
    """Send the Triton backward down one of its paths: dz through memory (the default), dz in
    a per-program scratch of two rows, or the flattened kernel's ring."""
    if backward == "scratch":
        monkeypatch.setattr(kernels, "DZ_PATH", "scratch")
    elif backward == "flattened":
        monkeypatch.setattr(kernels, "ROW_BACKWARD_MAX_WIDTH", 0)
    else:
        assert backward == "memory" and kernels.DZ_PATH == "memory"


BACKWARD_PATHS = ["memory", "scratch", "flattened"]


@pytest.mark.parametrize("tiles", TRITON_TILES, ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backward", BACKWARD_PATHS)
def test_triton_every_tile_choice(tiles, channels_last, backward, device, monkeypatch):
    """The tiles benchmarks may force (FORCED_TILES), defaults included: one image walked in
    several chunks (several strips for the row kernels), more than one channel block, both
    strides, train (both passes) and eval; with the backward down each of its paths."""
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    monkeypatch.setattr(kernels, "FORCED_TILES", tiles)
    monkeypatch.setattr(kernels, "FORCED_ROW_BACKWARD_TILES", tiles[1:])
    use_backward(kernels, monkeypatch, backward)
    for stride, training in ((1, True), (2, True), (2, False)):
        check("triton", (2, 21, 9, 7), stride, training, channels_last, torch.float32, device)


def _spy_kwarg(kernels, names, key, monkeypatch):
    """A list that receives (kernel name, the launch's ``key`` keyword) for each launch of the
    named kernels, which still run."""
    built = []
    for name in names:
        kernel = getattr(kernels, name)

        class Spy:
            def __getitem__(self, grid, kernel=kernel, name=name):
                def run(*args, **kwargs):
                    built.append((name, kwargs[key]))
                    return kernel[grid](*args, **kwargs)
                return run

        monkeypatch.setattr(kernels, name, Spy())
    return built


@pytest.mark.parametrize("prefetch", [True, False], ids=["rows_ahead", "no_rows_ahead"])
def test_triton_rows_loaded_ahead_or_not(prefetch, device, monkeypatch):
    """The row-streaming kernels with their loads one row ahead (the default) and without, both
    strides, train and eval, several strips and channel blocks, odd sizes, channels_last (the
    fast path; the other tests run NCHW with the default): each run checked against float64,
    and the launches show which way the kernels were built."""
    channels_last = True
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    streaming = ("_stats", "_apply", "_bwd_reduce", "_bwd_dz")
    built = _spy_kwarg(kernels, streaming, "PREFETCH", monkeypatch)
    monkeypatch.setattr(kernels, "PREFETCH_ROWS", prefetch)
    monkeypatch.setattr(kernels, "FORCED_TILES", (4, 16, 4))
    for stride, training in ((1, True), (2, True), (1, False), (2, False)):
        check("triton", (2, 21, 11, 9), stride, training, channels_last, torch.float32, device)
    assert {name for name, _ in built} == set(streaming)
    assert all(flag is prefetch for _, flag in built)


def _op_results(x, params, stats, grad_out, stride, training):
    """Output, the gradients of x and the parameters, and the running statistics after one call."""
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    running_mean, running_var = (s.clone() for s in stats)
    out = dwconv_bn_gelu(x, *params, running_mean, running_var, training=training, momentum=0.1, stride=stride,
                         backend="triton")
    return (out, *torch.autograd.grad(out, [x] + params, grad_out), running_mean, running_var)


@pytest.mark.parametrize("ahead", [0, 3], ids=["no_l2_prefetch", "l2_prefetch_3_rows"])
def test_triton_l2_prefetch_is_only_a_hint(ahead, device, monkeypatch):
    """The row kernels' L2 prefetch (L2_AHEAD_ROWS steps ahead; ``_stats``, ``_apply``,
    ``_bwd_reduce``, ``_bwd_dz``, ``_bwd_dx_dw``) asks for memory and changes no result. On a GPU
    the channels_last launches get the distance and NCHW's get 0; fp32 matches float64 (both
    strides, train and eval, strips, channel blocks and rows past the prefetch's clamps), and
    bf16 results match a run without the prefetch bit for bit. The interpreter runs no PTX: on
    the CPU every launch gets 0 (checked) and one parity run is all there is to do."""
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    names = ("_stats", "_apply", "_bwd_reduce", "_bwd_dz", "_bwd_dx_dw")
    built = _spy_kwarg(kernels, names, "L2_AHEAD", monkeypatch)
    monkeypatch.setattr(kernels, "L2_AHEAD_ROWS", ahead)
    gpu = device.type == "cuda"
    for stride, training in ((1, True), (2, True), (1, False), (2, False)) if gpu else ((1, True),):
        check("triton", (2, 21, 11, 9), stride, training, True, torch.float32, device)
    assert {name for name, _ in built} == set(names)
    assert all(value == (ahead if gpu else 0) for _, value in built), built
    if not gpu:
        return
    built.clear()
    check("triton", (2, 21, 11, 9), 1, True, False, torch.float32, device)  # NCHW: never prefetched
    assert built and all(value == 0 for _, value in built), built
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 192, 30, 30, generator=gen).to(device, torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    params = [(torch.randn(192, 1, 3, 3, generator=gen) / 3).to(device), (1 + 0.1 * torch.randn(192, generator=gen)).to(device),
              (0.1 * torch.randn(192, generator=gen)).to(device)]
    stats = [(0.1 * torch.randn(192, generator=gen)).to(device), (0.5 + torch.rand(192, generator=gen)).to(device)]
    for stride in (1, 2):
        size = (30 - 1) // stride + 1
        grad_out = torch.randn(4, 192, size, size, generator=gen).to(device, torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        monkeypatch.setattr(kernels, "L2_AHEAD_ROWS", ahead)
        hinted = _op_results(x, params, stats, grad_out, stride, True)
        monkeypatch.setattr(kernels, "L2_AHEAD_ROWS", 0)
        plain = _op_results(x, params, stats, grad_out, stride, True)
        for name, a, b in zip(("out", "dx", "dweight", "dgamma", "dbeta", "running_mean", "running_var"), hinted, plain):
            assert torch.equal(a, b), f"{name} differs with the L2 prefetch at stride {stride}"


def test_triton_l2_prefetch_launch_options(monkeypatch):
    """Which launches get the L2 prefetch, and its tile: channels_last on a GPU only, one address
    per 32 bytes of the channel block (16 channels at 2 bytes, 8 at 4, the whole block when it is
    narrower), a power-of-two column count."""
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    monkeypatch.setattr(kernels, "L2_AHEAD_ROWS", 4)  # off by default: the options as they would be
    nhwc = torch.empty(2, 384, 8, 8, device="meta", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    nchw = torch.empty(2, 384, 8, 8, device="meta", dtype=torch.bfloat16)
    on = kernels._l2_prefetch(nhwc, 128, 10, gpu=True)
    assert on == {"L2_AHEAD": 4, "L2_COLS": 16, "L2_CHANS": 8, "L2_STEP": 16}
    assert kernels._l2_prefetch(nhwc, 128, 10)["L2_AHEAD"] == 0  # a meta tensor is not on a GPU
    assert kernels._l2_prefetch(nchw, 128, 10, gpu=True)["L2_AHEAD"] == 0
    assert kernels._l2_prefetch(nhwc.float(), 64, 64, gpu=True) == {
        "L2_AHEAD": 4, "L2_COLS": 64, "L2_CHANS": 8, "L2_STEP": 8}
    narrow = kernels._l2_prefetch(nhwc, 8, 56, gpu=True)
    assert (narrow["L2_CHANS"], narrow["L2_STEP"], narrow["L2_COLS"]) == (1, 8, 64)


def test_triton_row_bands(device, monkeypatch):
    """The row-streaming kernels with each image's output rows split into bands (ROW_BANDS), one
    program a band: 11 output rows in bands of 4 + 4 + 3 (a band's first row takes the
    input rows above it; its per-band statistics, pooled sums and BatchNorm-backward sums are
    merged afterwards), both strides, train and eval, channels_last and NCHW, and the pooled
    variant, each against float64; the launches show the band grid."""
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    grids = []
    for name in ("_stats", "_apply", "_bwd_reduce", "_bwd_dz"):
        kernel = getattr(kernels, name)

        class Spy:
            def __getitem__(self, grid, kernel=kernel, name=name):
                grids.append((name, grid))
                return kernel[grid]

        monkeypatch.setattr(kernels, name, Spy())
    bands = 3
    monkeypatch.setattr(kernels, "ROW_BANDS", bands)
    for channels_last, stride, training in ((True, 1, True), (True, 2, True), (True, 1, False), (False, 1, True)):
        height = 11 if stride == 1 else 21  # 11 output rows either way
        check("triton", (2, 21, height, 9), stride, training, channels_last, torch.float32, device)
    assert {name for name, _ in grids} == {"_stats", "_apply", "_bwd_reduce", "_bwd_dz"}
    assert all(len(grid) == 2 and grid[1] == bands for _, grid in grids), grids
    # The pooled variant (per-band sums of the output, summed over the bands) and its gradients.
    for stride in (1, 2):
        test_pooled_variant_feeds_se("triton", True, True, stride, device)


def test_triton_row_bands_fill_the_gpu():
    """``best_row_bands``: bands when an image's programs leave slots empty, not when they fill
    them, with CoAtNet-0's launches on a 132-SM H200 (168 registers a thread under the cap)."""
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    assert kernels.best_row_bands(384, 4, 56, 168, 132) == 1  # S1 56x56 C384: 384 of 396 slots
    assert kernels.best_row_bands(768, 2, 28, 168, 132) == 1  # S2 28x28 C768: 768 of 792
    assert kernels.best_row_bands(384, 2, 28, 168, 132) == 2  # S2 28x28 C384: 384 of 792
    assert kernels.best_row_bands(256, 4, 56, 168, 132) == 3  # S1's first block, C256: 256 of 396
    assert kernels.best_row_bands(8, 4, 10, 168, 132) == 1  # rows too few to split
    assert kernels.best_row_bands(8, 4, 56, 168, 132) == 8  # a small batch: as many bands as rows allow


def test_triton_row_knobs_from_the_environment():
    """COATNET_FAST_L2_AHEAD_ROWS and COATNET_FAST_ROW_BANDS set the prefetch distance and the
    row bands for a process; anything else is refused with the variable's name."""
    import os
    import subprocess
    import sys

    probe = "from coatnet_fast.kernels import dwconv_bn_gelu as k; print(k.L2_AHEAD_ROWS)"
    env = dict(os.environ, COATNET_FAST_L2_AHEAD_ROWS="6")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.split()[-1] == "6", done.stderr[-2000:]
    env["COATNET_FAST_L2_AHEAD_ROWS"] = "-1"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "COATNET_FAST_L2_AHEAD_ROWS='-1'" in done.stderr, done.stderr[-2000:]
    # COATNET_FAST_ROW_BANDS likewise: a count, or "auto" (None: the GPU's fill decides)
    probe = "from coatnet_fast.kernels import dwconv_bn_gelu as k; print(k.ROW_BANDS)"
    for value, printed in (("3", "3"), ("1", "1"), ("auto", "None"), ("", "None")):
        env = dict(os.environ, COATNET_FAST_ROW_BANDS=value)
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.split()[-1] == printed, done.stderr[-2000:]
    env["COATNET_FAST_ROW_BANDS"] = "0"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "COATNET_FAST_ROW_BANDS='0'" in done.stderr, done.stderr[-2000:]


def _ring_reach(height, width, stride, block_p):
    """What _bwd_dx's ring must hold, by walking its loop in Python: the most output positions
    between the oldest dz a chunk of input positions reads (or the chunk before it read) and
    the newest dz computed by then. Also checks every dz read was computed before the read."""
    ho, wo = (height - 1) // stride + 1, (width - 1) // stride + 1
    done, reach, previous_low = 0, 0, None
    for start in range(0, height * width, block_p):
        last_row = min(height - 1, (start + block_p - 1) // width)
        needed = min(ho, (last_row + 1) // stride + 1) * wo
        while done < needed:
            done += block_p
        reads = [(hi + 1 - ky) // stride * wo + (wi + 1 - kx) // stride
                 for hi, wi in (divmod(p, width) for p in range(start, min(start + block_p, height * width)))
                 for ky in range(3) for kx in range(3)
                 if hi + 1 - ky >= 0 and wi + 1 - kx >= 0 and (hi + 1 - ky) % stride == 0
                 and (wi + 1 - kx) % stride == 0 and (hi + 1 - ky) // stride < ho and (wi + 1 - kx) // stride < wo]
        if reads:
            assert max(reads) < done
            low = min(reads) if previous_low is None else min(min(reads), previous_low)
            # dz past the last output position is computed but never stored
            reach, previous_low = max(reach, min(done, ho * wo) - low), min(reads)
    return reach


def test_triton_backward_ring_holds_every_dz_row_it_reads():
    """ring_rows against a walk of the kernel's loop: no dz is read before it is computed, or
    after a later one took its row (nor while the previous chunk may still read it); and the
    ring never has twice the rows of the output positions (a small image's dz fits whole)."""
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    for height, width in [(1, 1), (2, 19), (7, 5), (13, 1), (28, 28), (29, 31), (56, 56), (41, 3), (1, 300)]:
        for stride in (1, 2):
            for block_p in (16, 64, 128):
                rows = kernels.ring_rows(height, width, stride, block_p)
                positions = ((height - 1) // stride + 1) * ((width - 1) // stride + 1)
                assert rows & (rows - 1) == 0 and rows < 2 * positions  # never far past the dz it holds
                assert _ring_reach(height, width, stride, block_p) <= rows, (height, width, stride, block_p)


@pytest.mark.parametrize("tiles, shape, stride, training, channels_last", [
    ((16, 16, 2), (2, 3, 60, 3), 1, True, False),
    ((16, 16, 2), (1, 18, 70, 3), 2, False, True),
    ((64, 16, 4), (1, 3, 100, 3), 1, True, True),
], ids=["16x16-s1-train", "16x16-s2-eval", "64x16-s1-train"])
def test_triton_backward_ring_wraps(tiles, shape, stride, training, channels_last, device, monkeypatch,
                                    poison_empty):
    """Images with more output positions than the ring has rows (one to three times over), the
    ring NaN-filled first: a row read before it is written, or after it was reused, shows up."""
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    monkeypatch.setattr(kernels, "FORCED_TILES", tiles)
    monkeypatch.setattr(kernels, "ROW_BACKWARD_MAX_WIDTH", 0)  # the ring is the flattened kernel's
    ho, wo = (shape[2] - 1) // stride + 1, (shape[3] - 1) // stride + 1
    assert kernels.ring_rows(shape[2], shape[3], stride, tiles[0]) < ho * wo  # its rows are reused
    check("triton", shape, stride, training, channels_last, torch.float32, device)


@pytest.mark.parametrize("backward", BACKWARD_PATHS)
@pytest.mark.parametrize("stride", [1, 2])
def test_triton_backward_allocations(stride, backward, device, monkeypatch):
    """What the backward allocates past per-channel values: dx, and dz (the gradient at the
    conv output) either as one [B, C, HO, WO] tensor (through memory, fp32 here) or in each
    program's scratch: two rows ([2, 64 or 32, 16] here, for a 24x56 image of one 16-channel
    block) for the row kernel; for the flattened one a ring of 256 (stride 1) or 128 rows of 16
    channels."""
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    monkeypatch.setattr(kernels, "FORCED_TILES", (16, 16, 2))
    monkeypatch.setattr(kernels, "FORCED_ROW_BACKWARD_TILES", (16, 2))
    use_backward(kernels, monkeypatch, backward)
    x = torch.randn(1, 16, 24, 56, device=device)
    if _refused("triton", x):
        return
    params = [torch.randn(16, 1, 3, 3, device=device), torch.rand(16, device=device) + 0.5,
              torch.randn(16, device=device)]
    running = [torch.zeros(16, device=device), torch.ones(16, device=device)]
    x.requires_grad_(True)
    out = dwconv_bn_gelu(x, *params, *running, training=True, stride=stride, backend="triton")
    allocated = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        allocated.append(t.numel())
        return t

    monkeypatch.setattr(torch, "empty", empty)
    dx, = torch.autograd.grad(out, x, torch.randn_like(out))
    monkeypatch.undo()
    if backward == "memory":
        assert sorted(allocated)[-2:] == sorted([out.numel(), x.numel()]), allocated  # dz and dx
        return
    if backward == "scratch":  # whole output rows, 56 or 28 columns padded to 64 or 32
        scratch = 2 * (1 << (out.shape[3] - 1).bit_length()) * 16
    else:
        scratch = kernels.ring_rows(24, 56, stride, 16) * 16
    assert scratch < out.numel() / 2
    assert sorted(allocated)[-2:] == [scratch, x.numel()], allocated  # the scratch, then dx


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_one_and_two_row_or_column_images(channels_last, device):
    """The row kernels' first and last rows and columns at once: images of one or two rows or
    columns (every row a boundary row, the stride-2 row pairs cut short), both strides, train
    and eval, in one place rather than left to the fuzzed shapes' draws. The loads one row ahead
    (PREFETCH_ROWS, the default) make their last load past the image here."""
    for h, w in ((1, 1), (1, 2), (2, 1), (2, 2), (1, 5), (5, 1), (2, 7), (3, 2)):
        for stride in (1, 2):
            for training in (True, False):
                if training and 2 * ((h - 1) // stride + 1) * ((w - 1) // stride + 1) < 3:
                    continue  # too few values a channel for batch statistics (test_fuzzed_small_shapes)
                check("triton", (2, 5, h, w), stride, training, channels_last, torch.float32, device)


@pytest.mark.parametrize("width, path, kernels_run", [
    (56, "memory", ("_bwd_dz", "_bwd_dx_dw")), (256, "memory", ("_bwd_dz", "_bwd_dx_dw")),
    (257, "memory", ("_bwd_dx",)), (300, "memory", ("_bwd_dx",)),
    (256, "scratch", ("_bwd_dx_rows",)), (257, "scratch", ("_bwd_dx",))])
def test_triton_backward_kernel_by_width(width, path, kernels_run, device, monkeypatch):
    """Rows up to ROW_BACKWARD_MAX_WIDTH input columns take a row backward (dz through memory
    by default, or DZ_PATH "scratch"); wider ones the flattened kernel (counted launches), and
    each matches the reference."""
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    launches = {"_bwd_dz": 0, "_bwd_dx_dw": 0, "_bwd_dx_rows": 0, "_bwd_dx": 0}

    class Counted:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(kernels, name)

        def __getitem__(self, grid):
            launches[self.name] += 1
            return self.kernel[grid]

    if _refused("triton", torch.randn(1, 3, 2, width, device=device)):
        return
    for name in launches:
        monkeypatch.setattr(kernels, name, Counted(name))
    assert kernels.ROW_BACKWARD_MAX_WIDTH == 256 and kernels.DZ_PATH == "memory"
    monkeypatch.setattr(kernels, "DZ_PATH", path)
    for stride in (1, 2):
        check("triton", (1, 3, 2, width), stride, True, True, torch.float32, device)
    assert launches == {name: 2 if name in kernels_run else 0 for name in launches}, launches


def test_triton_gpu_tiles_keep_eight_elements_a_thread():
    """What the ptxas measurement behind _blocks found: sixteen tile elements a thread spill.
    (Meta tensors stand in for CUDA ones: only the device type and the layout are read.)"""
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    for memory_format in (torch.channels_last, torch.contiguous_format):
        for channels in (384, 768):
            x = torch.empty(2, channels, 8, 8, device="meta").contiguous(memory_format=memory_format)
            block_p, block_c, warps = kernels._blocks(x, channels)
            assert block_p * block_c == 8 * 32 * warps
        for channels in (384, 768, 256, 96, 40, 3):
            for width_out in (56, 28, 14, 7, 1, 100):
                x = torch.empty(2, channels, 8, width_out, device="meta").contiguous(memory_format=memory_format)
                block_w, block_c, warps = kernels._row_blocks(x, channels, width_out)
                # eight a thread, or fewer in one warp where the image has fewer (NCHW, few channels)
                assert block_w * block_c == 8 * 32 * warps or warps == 1 and block_w * block_c < 256, \
                    (channels, width_out)


def test_triton_row_strips_pad_coatnet_mbconv_images_not_at_all():
    """The row kernels' strips and channel blocks at CoAtNet's MBConv shapes (channels_last, 4x
    expansion: 256 or 384 channels into S1's stride-2 block and 384 in S1, 384 and 768 in S2)
    cover the output with no padded column or channel: a padded one costs as much as a real one."""
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    for channels, width_out in ((256, 56), (384, 56), (384, 28), (768, 28)):
        x = torch.empty(2, channels, 8, width_out, device="meta").contiguous(memory_format=torch.channels_last)
        block_w, block_c, _ = kernels._row_blocks(x, channels, width_out)
        assert width_out % block_w == 0 and channels % block_c == 0, (channels, width_out, block_w, block_c)


def test_triton_offsets_past_32_bits_within_an_image_take_a_dense_copy():
    """Offsets within one image are 32-bit in the kernels: a view spanning 2**31 elements or more
    within an image is copied densely first, and an image that large is refused by name. (Only
    shapes and strides are read, so meta tensors stand in for the gigabytes.)"""
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    small = torch.randn(2, 3, 4, 5)
    assert kernels._fit_offsets("x", small) is small
    wide = torch.empty_strided((2, 3, 4, 5), (60, 2**30, 5, 1), device="meta")  # channel stride 2**30
    dense = kernels._fit_offsets("x", wide)
    assert dense.shape == wide.shape and dense.stride() == (60, 20, 5, 1)
    wide_nhwc = torch.empty_strided((2, 3, 4, 5), (60, 1, 2**30, 3), device="meta")
    assert kernels._fit_offsets("dy", wide_nhwc).stride() == (60, 1, 15, 3)  # stays channels_last
    huge = torch.empty((1, 2**15, 2**8, 2**8 + 1), device="meta")
    with pytest.raises(ValueError, match="dy: one image of shape"):
        kernels._fit_offsets("dy", huge)


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_eval_with_an_empty_batch(backend, channels_last, device):
    """Eval accepts B = 0 (nothing to normalise with but the running statistics): an empty
    output, and gradients of zero for the parameters, as eager gives."""
    x = torch.randn(0, 5, 7, 9, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if _refused(backend, x, training=False):
        return
    x.requires_grad_(True)
    params = [torch.randn(5, 1, 3, 3, device=device), torch.ones(5, device=device), torch.zeros(5, device=device)]
    params = [p.requires_grad_(True) for p in params]
    y = dwconv_bn_gelu(x, *params, torch.zeros(5, device=device), torch.ones(5, device=device), training=False,
                       stride=2, backend=backend)
    assert y.shape == (0, 5, 4, 5)
    grads = torch.autograd.grad(y.sum(), [x] + params, allow_unused=True)
    assert grads[0] is None or grads[0].shape == x.shape
    for g in grads[1:]:
        assert g is None or (g == 0).all()


@pytest.mark.parametrize("backend", [b for b in dispatch.usable_backends(OP) if b != "eager"])
def test_strided_parameters_are_read_right(backend, device):
    """Per-channel vectors that are strided views (every other element of a buffer) give what
    eager gives, gradients included: the kernels index them densely, so they are made contiguous."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 7, 5, generator=g).to(device)
    if _refused(backend, x):
        return
    weight = torch.randn(6, 1, 3, 3, generator=g).to(device)
    buffers = [torch.randn(12, generator=g).to(device) for _ in range(4)]
    buffers[3] = buffers[3].abs() + 0.5
    for training in (True, False):
        results = []
        for be, strided in (("eager", False), (backend, True)):
            xs = x.clone().requires_grad_(True)
            if strided:
                gamma, beta = (b.clone().requires_grad_(True) for b in buffers[:2])
                params = (gamma[::2], beta[::2], buffers[2].clone()[::2], buffers[3].clone()[::2])
            else:
                gamma, beta = (b[::2].clone().requires_grad_(True) for b in buffers[:2])
                params = (gamma, beta, buffers[2][::2].clone(), buffers[3][::2].clone())
            out = dwconv_bn_gelu(xs, weight, *params, training=training, backend=be)
            grads = torch.autograd.grad(out, [xs, gamma, beta], torch.cos(out))
            grads = (grads[0],) + tuple(gr[::2] if strided else gr for gr in grads[1:])
            results.append((out,) + grads + params[2:])
        for name, a, b in zip(("out", "dx", "dgamma", "dbeta", "running_mean", "running_var"), *results):
            assert relative_error(a, b) < 1e-5, (training, name)


def _custom_ops(backend):
    """(stats, forward, backward, apply or None) of a fused backend, as torch.compile sees them."""
    if backend == "triton":
        import importlib

        # The package exports the op under the module's name.
        op_module = importlib.import_module("coatnet_fast.ops.dwconv_bn_gelu")
        return op_module._triton_stats, op_module._triton_forward, op_module._triton_backward, None
    from coatnet_fast import ext

    ext.load()
    library = torch.ops.coatnet_fast_ext
    return (library.dwconv_bn_stats.default, library.dwconv_bn_gelu_forward.default,
            library.dwconv_bn_gelu_backward.default, library.dwconv_bn_gelu_apply.default)


@pytest.mark.parametrize("backend", [b for b in dispatch.usable_backends(OP) if b != "eager"])
@pytest.mark.parametrize("make", [
    lambda d: torch.randn(2, 5, 5, 6, device=d)[:, :, :, 1:5],
    lambda d: torch.randn(2, 5, 5, 4, device=d).contiguous(memory_format=torch.channels_last),
], ids=["nchw-cropped", "nhwc"])
def test_custom_ops_pass_opcheck(backend, make, device):
    """The schemas, the fake kernels (output shapes, dtypes and strides as the real kernels give
    them: channels_last for channels_last x, contiguous for any other x, a view included; and
    for an fp16 x with fp32 parameters) and the autograd registration of the differentiable op,
    for the Triton custom ops and the extension's ops."""
    x = make(device)
    if _refused(backend, x):
        return
    stats, forward, backward, apply = _custom_ops(backend)
    g = torch.Generator().manual_seed(6)
    c = x.shape[1]
    weight, gamma, beta, mean = (t.to(device) for t in (torch.randn(c, 1, 3, 3, generator=g), 1 + 0.3 * torch.randn(
        c, generator=g), 0.3 * torch.randn(c, generator=g), torch.randn(c, generator=g)))
    rstd = (torch.rand(c, generator=g) + 0.5).to(device)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    for dtype, training, stride, pool in ((torch.float32, True, 1, False), (torch.float16, False, 2, True)):
        xs = x.to(dtype).requires_grad_(True)
        params = [t.clone().requires_grad_(True) for t in (weight, gamma, beta)]
        torch.library.opcheck(forward, (xs, *params, mean, rstd, training, stride, pool), test_utils=utils)
        torch.library.opcheck(stats, (xs.detach(), weight, stride), test_utils=utils[:2])
        y, sums = forward(xs.detach(), weight, gamma, beta, mean, rstd, training, stride, pool)
        dy = torch.randn(y.shape, generator=g).to(device, dtype)
        dsums = torch.randn(sums.shape, generator=g).to(device) if pool else None
        torch.library.opcheck(backward, (dy, dsums, xs.detach(), weight, gamma, beta, mean, rstd, stride, training),
                              test_utils=utils[:2])
        if apply is not None:
            scale = gamma * rstd
            torch.library.opcheck(apply, (xs.detach(), weight, scale, beta - mean * scale, stride, pool),
                                  test_utils=utils[:2])
            torch.library.opcheck(apply, (xs.detach(), weight * scale.view(-1, 1, 1, 1), None, beta, stride, pool),
                                  test_utils=utils[:2])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_forward_reads_the_activation_twice_in_training_once_in_eval(channels_last, device, monkeypatch):
    """The forward's passes over the activation: statistics then apply in training, the apply
    alone in eval (BatchNorm folded into the weights), with or without the SE pool in the
    epilogue. Every Triton launch is recorded (any kernel of any module), and a pass over the
    activation is a launch given a tensor of the output's size or more: the statistics' merge
    reads [B, C] partials only. A third pass, or statistics moved out of the kernels, changes the list."""
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    launcher = type(kernels._stats)  # JITFunction, or InterpretedFunction under TRITON_INTERPRET=1
    real_run = launcher.run
    launches = []

    def run(self, *args, **kwargs):
        tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
        launches.append((self.fn.__name__, any(t.numel() >= activation for t in tensors)))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(launcher, "run", run)
    c, stride = 8, 2
    x = torch.randn(2, c, 7, 9, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if _refused("triton", x):
        return
    activation = 2 * c * 4 * 5  # the output's numel (stride 2); x has 2 * c * 7 * 9
    params = [torch.randn(c, 1, 3, 3, device=device), torch.rand(c, device=device) + 0.5,
              torch.randn(c, device=device)]
    for training in (True, False):
        for op in (dwconv_bn_gelu, dwconv_bn_gelu_pool):
            launches.clear()
            running = [torch.zeros(c, device=device), torch.ones(c, device=device)]
            op(x, *params, *running, training=training, stride=stride, backend="triton")
            passes = [name for name, over_activation in launches if over_activation]
            assert passes == (["_stats", "_apply"] if training else ["_apply"]), (training, op.__name__, launches)
            assert all(name.startswith("_") for name, _ in launches)  # the recording sees kernels by name


@pytest.mark.parametrize("path", RUNNING_STATISTICS_PATHS)
def test_triton_running_statistics_update_where_it_runs(path, device, monkeypatch):
    """As batch_norm_act's test of the same name: the eager call updates the running statistics
    in the merge kernel, the custom op and strided running statistics with torch ops; each
    matches nn.BatchNorm2d's update of the conv output's statistics (float64), and the test
    records which path ran."""
    from coatnet_fast.kernels import dwconv_bn_gelu as kernels

    x = torch.randn(3, 6, 7, 5, device=device) * 2 + 0.5
    if _refused("triton", x):
        return
    running_mean, running_var, merged = running_statistics_on_path(kernels, dispatch, path, 6, device, monkeypatch)
    start_mean, start_var = running_mean.double().clone(), running_var.double().clone()
    weight = torch.randn(6, 1, 3, 3, device=device)
    gamma, beta = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
    y = dwconv_bn_gelu(x, weight, gamma, beta, running_mean, running_var, training=True, momentum=0.3, stride=2,
                       backend="triton")
    z = torch.nn.functional.conv2d(x.double(), weight.double(), None, 2, 1, 1, 6)
    mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=True)
    assert relative_error(running_mean, start_mean * 0.7 + mean * 0.3) < 1e-5
    assert relative_error(running_var, start_var * 0.7 + var * 0.3) < 1e-5
    rstd = torch.rsqrt(z.var((0, 2, 3), unbiased=False) + 1e-5)
    expected = torch.nn.functional.gelu((z - mean[:, None, None]) * (rstd * gamma.double())[:, None, None]
                                        + beta.double()[:, None, None])
    assert relative_error(y, expected) < TOLERANCE[torch.float32]
    assert merged == [path == "merge kernel"]
