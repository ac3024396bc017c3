"""batch_norm_act: every usable backend against an independent float64 computation."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coatnet_fast.ops import BackendUnavailableError, batch_norm_act, dispatch
from coatnet_fast.ops.batch_norm_act import supported_reasons
from reference import (RUNNING_STATISTICS_PATHS, TOLERANCE, batch_norm_act_reference, memory_layout,
                       relative_error, running_statistics_on_path)

OP = "batch_norm_act"
BACKENDS = dispatch.usable_backends(OP)
FUSED = [b for b in BACKENDS if b != "eager"]
# Tests of the Triton launchers' own machinery (forced tiles, position splits, merge_stats).
TRITON = [b for b in FUSED if b == "triton"]


def _refused(backend, x, residual=None, training=True):
    """A backend may decline inputs it declares unsupported (e.g. CPU tensors without the
    interpreter); then it must raise with that reason rather than run."""
    c = x.shape[1]
    params = [torch.ones(c, device=x.device), torch.zeros(c, device=x.device), torch.zeros(c, device=x.device),
              torch.ones(c, device=x.device)]
    why = supported_reasons(backend, x, *params, training=training, residual=residual)
    if why:
        assert backend != "eager"
        with pytest.raises(BackendUnavailableError):
            batch_norm_act(x, *params, training=training, residual=residual, backend=backend)
    return bool(why)


def check(backend, shape, device, *, training=True, gelu=True, residual=False, branch_scale=False,
          channels_last=False, dtype=torch.float32, residual_dtype=None, momentum=0.1, channel_mean=0.0, seed=0,
          tolerance=None):
    g = torch.Generator().manual_seed(seed)
    b, c = shape[:2]
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) + channel_mean
    gamma64 = 1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64)
    beta64 = 0.3 * torch.randn(c, generator=g, dtype=torch.float64)
    mean64 = 0.2 * torch.randn(c, generator=g, dtype=torch.float64) + (channel_mean if not training else 0.0)
    var64 = 0.5 + torch.rand(c, generator=g, dtype=torch.float64)
    res64 = torch.randn(shape, generator=g, dtype=torch.float64) if residual else None
    scale64 = (torch.rand(b, generator=g, dtype=torch.float64) < 0.7).double() / 0.7 if branch_scale else None
    grad_out = torch.randn(shape, generator=g, dtype=torch.float64)

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x64.to(device, dtype).contiguous(memory_format=fmt)
    res = None if res64 is None else res64.to(device, residual_dtype or dtype).contiguous(memory_format=fmt)
    if _refused(backend, x, res, training):
        return
    x.requires_grad_(True)
    inputs = [x]
    if res is not None:
        res.requires_grad_(True)
        inputs.append(res)
    params = [t.to(device, dtype).requires_grad_(True) for t in (gamma64, beta64)]
    running_mean, running_var = mean64.to(device, dtype), var64.to(device, dtype)
    scale = None if scale64 is None else scale64.to(device, dtype)
    out = batch_norm_act(x, *params, running_mean, running_var, training=training, momentum=momentum,
                         activation="gelu" if gelu else "identity", residual=res, branch_scale=scale, backend=backend)
    grads = torch.autograd.grad(out, inputs + params, grad_out.to(device, out.dtype))
    # The reference starts from the values the op got (rounded to their dtypes): at mean 1e3 an
    # fp32 input alone is 6e-5 off its float64 draw, relative to a unit std.
    x64, gamma64, beta64, mean64, var64 = (t.to(dtype).double() for t in (x64, gamma64, beta64, mean64, var64))
    res64 = None if res64 is None else res64.to(res.dtype).double()
    scale64 = None if scale64 is None else scale64.to(dtype).double()
    grad_out = grad_out.to(out.dtype).double()

    ref_inputs = [t.clone().requires_grad_(True) for t in [x64] + ([res64] if residual else []) + [gamma64, beta64]]
    ref_res = ref_inputs[1] if residual else None
    ref_out, ref_mean, ref_var = batch_norm_act_reference(
        ref_inputs[0], ref_inputs[-2], ref_inputs[-1], mean64, var64, training, momentum, 1e-5, gelu, ref_res, scale64)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad_out)

    expected_dtype = torch.promote_types(dtype, residual_dtype or dtype)
    assert out.shape == x.shape and out.dtype == expected_dtype
    assert out.is_contiguous(memory_format=fmt)
    assert all(gr.dtype == t.dtype for gr, t in zip(grads, inputs + params))
    names = ["out", "dx"] + (["dresidual"] if residual else []) + ["dbn_weight", "dbn_bias", "running_mean",
                                                                     "running_var"]
    tolerance = tolerance or TOLERANCE[dtype]
    for name, a, b in zip(names, (out,) + grads + (running_mean, running_var),
                          (ref_out,) + ref_grads + (ref_mean, ref_var)):
        err = relative_error(a, b)
        assert err <= tolerance, f"{name}: relative error {err:.2e} > {tolerance:.0e}"


SHAPES = [(2, 6, 9, 7), (3, 5, 8, 8), (2, 37, 3, 5), (4, 3, 1, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_expand_bn_gelu_matches_reference_fp32(backend, shape, training, channels_last, device):
    check(backend, shape, device, training=training, gelu=True, channels_last=channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("branch_scale", [False, True], ids=["plain", "drop_path"])
def test_projection_bn_residual_matches_reference_fp32(backend, training, channels_last, branch_scale, device):
    """MBConv's projection: BatchNorm, stochastic depth's per-image scale, residual add."""
    check(backend, (4, 7, 6, 5), device, training=training, gelu=False, residual=True, branch_scale=branch_scale,
          channels_last=channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gelu", [True, False], ids=["gelu", "identity"])
def test_every_combination_of_parts(backend, gelu, device):
    """GELU with a residual, and a scale without one: the parts are independent."""
    check(backend, (3, 6, 5, 4), device, gelu=gelu, residual=True, branch_scale=False)
    check(backend, (3, 6, 5, 4), device, gelu=gelu, residual=False, branch_scale=True)


def _half_dtypes(backend, device):
    # bf16 runs where the kernels compile (the C++ kernels everywhere); Triton's interpreter
    # handles fp16 elementwise maths but not bf16.
    return [torch.float16] + ([torch.bfloat16] if device.type == "cuda" or backend == "ext" else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_half_precision(backend, training, device):
    for dtype in _half_dtypes(backend, device):
        if backend == "eager" and device.type == "cpu" and dtype == torch.float16:
            continue  # CPU batch_norm has no fp16 kernel; the fused backends are what is under test
        check(backend, (3, 10, 7, 6), device, training=training, dtype=dtype, channels_last=True)
        check(backend, (3, 10, 7, 6), device, training=training, dtype=dtype, gelu=False, residual=True,
              branch_scale=True)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype, residual_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float64),
                                                   (torch.float16, torch.bfloat16)], ids=["fp16+fp32", "fp32+fp64",
                                                                                          "fp16+bf16"])
def test_mixed_dtype_residual_promotes(backend, dtype, residual_dtype, device):
    """A branch onto a residual of another dtype: the output has the promoted dtype, as eager's
    add (float32 for fp16 + bf16), and d(residual) the residual's. A backend that does not take a
    float64 residual declines it (checked by check)."""
    if torch.bfloat16 in _half_dtypes(backend, device) or residual_dtype != torch.bfloat16:
        check(backend, (3, 6, 5, 4), device, dtype=dtype, residual=True, residual_dtype=residual_dtype, gelu=False)
        check(backend, (3, 6, 5, 4), device, dtype=dtype, residual=True, residual_dtype=residual_dtype,
              branch_scale=True, channels_last=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_channel_keeps_its_variance(backend, device):
    """A channel with mean 1e3 and std 1: statistics from shifted (Chan) sums keep the variance
    to fp32 rounding, where E[x^2] - E[x]^2 would lose it whole (1e6 - 1e6). Outputs and
    gradients can be no closer than an fp32 mean allows: half an ulp of 1e3 is 3e-5 of the unit
    std, an offset shared by every position, so d(beta) (a sum whose terms cancel) takes it
    coherently, ~6e-4 relative here for both backends: 1e-3."""
    check(backend, (4, 3, 16, 16), device, channel_mean=1e3, gelu=True, tolerance=1e-3)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64) + 1e3).float()
    running_var = torch.ones(3)
    if _refused(backend, x.to(device)):
        return
    batch_norm_act(x.to(device), torch.ones(3, device=device), torch.zeros(3, device=device),
                   torch.zeros(3, device=device), running_var_dev := running_var.to(device), training=True,
                   momentum=1.0, backend=backend)
    expected = x.double().var(dim=(0, 2, 3), unbiased=True)
    assert relative_error(running_var_dev, expected) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 0.25, 1.0])
def test_momentum_values(backend, momentum, device):
    check(backend, (2, 4, 5, 5), device, momentum=momentum)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_split_positions_and_tiles(backend, channels_last, device, monkeypatch):
    """Programs split an image's positions (an uneven last split), walk each split in several
    chunks, and cover more than one channel block: statistics and gradients merge right."""
    from coatnet_fast.kernels import batch_norm_act as kernels

    monkeypatch.setattr(kernels, "POSITIONS_PER_PROGRAM", 48)
    for tiles in ((16, 16, 4), (32, 64, 4), (16, 32, 2)):
        monkeypatch.setattr(kernels, "FORCED_TILES", tiles)
        for training in (True, False):
            check(backend, (2, 37, 11, 13), device, training=training, channels_last=channels_last,
                  residual=True, branch_scale=True)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_many_work_items_merge_right(backend, training, device):
    """Shapes past one work item of every kernel: an NCHW plane of more than 2**14 positions (the
    C++ kernels split it in two), channels_last rows past one block (C=67: chunks of 244 rows,
    blocks of 976, so 1152 rows make a full block and a partial one, with a partial channel
    vector), and more than one Triton position split. Statistics and the backward's sums are
    merged across them; the running variance keeps float32 accuracy at mean 1e3 across items too."""
    check(backend, (1, 2, 130, 128), device, training=training, residual=True, branch_scale=True)
    check(backend, (2, 67, 24, 24), device, training=training, channels_last=True, residual=True, branch_scale=True)
    if not training:
        return
    g = torch.Generator().manual_seed(4)
    for shape, fmt in (((1, 2, 130, 128), torch.contiguous_format), ((2, 67, 24, 24), torch.channels_last)):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.5 + 1e3).float()
        x_dev = x.to(device).contiguous(memory_format=fmt)
        if _refused(backend, x_dev):
            return
        c = shape[1]
        running_mean, running_var = torch.zeros(c, device=device), torch.ones(c, device=device)
        batch_norm_act(x_dev, torch.ones(c, device=device), torch.zeros(c, device=device), running_mean, running_var,
                       training=True, momentum=1.0, backend=backend)
        x64 = x.double()
        assert relative_error(running_var, x64.var(dim=(0, 2, 3), unbiased=True)) < 1e-6, shape
        assert relative_error(running_mean, x64.mean(dim=(0, 2, 3))) < 1e-7, shape


@pytest.mark.parametrize("backend", FUSED)
def test_fused_kernels_write_every_output_element(backend, device, poison_empty):
    """Outputs, statistics and gradients allocated NaN-filled: anything a kernel skips shows up."""
    for training in (True, False):
        for channels_last in (False, True):
            check(backend, (2, 37, 11, 13), device, training=training, channels_last=channels_last)
            check(backend, (3, 5, 16, 15), device, training=training, channels_last=channels_last, gelu=False,
                  residual=True, branch_scale=True)


@pytest.mark.parametrize("x_layout, other_layout", [("channels_last", "nchw"), ("nchw", "channels_last"),
                                                     ("channels_last", "channels_last")])
def test_triton_reads_dy_and_residual_in_x_layout(device, launch_spy, x_layout, other_layout):
    """The kernels' tiles follow x's layout; a gradient or residual in the other layout is copied
    into x's before a kernel reads it (match_layout) rather than gathered across its tiles, and
    output and gradients match float64 either way."""
    from coatnet_fast.kernels import batch_norm_act as kernels

    fmt = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
    g = torch.Generator().manual_seed(3)
    x64, res64, grad64 = (torch.randn(2, 24, 5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    gamma64, beta64 = 1 + 0.3 * torch.randn(24, generator=g, dtype=torch.float64), torch.randn(24, generator=g,
                                                                                                 dtype=torch.float64)
    x = x64.float().to(device).contiguous(memory_format=fmt[x_layout]).requires_grad_(True)
    res = res64.float().to(device).contiguous(memory_format=fmt[other_layout]).requires_grad_(True)
    if _refused("triton", x, res):
        return
    applied, backward = launch_spy(kernels, "_apply"), launch_spy(kernels, "_bwd")
    params = [t.float().to(device).requires_grad_(True) for t in (gamma64, beta64)]
    out = batch_norm_act(x, *params, torch.zeros(24, device=device), torch.ones(24, device=device), training=True,
                         residual=res, backend="triton")
    dy = grad64.float().to(device).contiguous(memory_format=fmt[other_layout])
    grads = torch.autograd.grad(out, [x, res] + params, dy)
    assert len(applied) == 1 and memory_layout(applied[0][5]) == x_layout  # the residual
    assert len(backward) == 2 and all(memory_layout(args[1]) == x_layout for args in backward)  # dy
    ref_in = [t.clone().requires_grad_(True) for t in (x64, res64, gamma64, beta64)]
    ref_out, _, _ = batch_norm_act_reference(ref_in[0], ref_in[2], ref_in[3], torch.zeros(24, dtype=torch.float64),
                                             torch.ones(24, dtype=torch.float64), True, 0.1, 1e-5, True, ref_in[1])
    assert relative_error(out, ref_out) <= TOLERANCE[torch.float32]
    for got, want in zip(grads, torch.autograd.grad(ref_out, ref_in, grad64)):
        assert relative_error(got, want) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", FUSED)
def test_strided_views_are_read_or_copied_right(backend, device):
    """A view whose positions are not at one stride (every other column) is copied densely; a
    channel slice of a bigger tensor is read in place. Both match the reference."""
    base = torch.randn(2, 10, 6, 14, device=device)
    params = [torch.rand(5, device=device) + 0.5, torch.randn(5, device=device), torch.zeros(5, device=device),
              torch.ones(5, device=device)]
    for view in (base[:, :5, :, ::2], base[:, 3:8]):
        if _refused(backend, view):
            return
        out = batch_norm_act(view, *params, training=True, backend=backend)
        ref, _, _ = batch_norm_act_reference(view.double().cpu(), *(p.double().cpu() for p in params), True, 0.1,
                                             1e-5, True)
        assert relative_error(out, ref) <= TOLERANCE[torch.float32]


def test_triton_offsets_past_32_bits_within_an_image_take_a_dense_copy():
    """Offsets within one image are 32-bit in the kernels: a view spanning 2**31 elements or more
    within an image is copied densely first, and an image that large is refused by name. (Only
    shapes and strides are read, so meta tensors stand in for the gigabytes.)"""
    from coatnet_fast.kernels import batch_norm_act as kernels

    small = torch.randn(2, 3, 4, 5)
    assert kernels.flat_positions("x", small) is small
    wide = torch.empty_strided((2, 3, 4, 5), (60, 2**30, 5, 1), device="meta")
    assert kernels.flat_positions("x", wide).stride() == (60, 20, 5, 1)
    wide_nhwc = torch.empty_strided((2, 3, 4, 5), (60, 1, 2**30, 3), device="meta")
    assert kernels.flat_positions("dy", wide_nhwc).stride() == (60, 1, 15, 3)
    huge = torch.empty((1, 2**15, 2**8, 2**8 + 1), device="meta")
    with pytest.raises(ValueError, match="residual: one image of shape"):
        kernels.flat_positions("residual", huge)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_deterministic(backend, device):
    def run():
        torch.manual_seed(0)
        x = torch.randn(3, 9, 10, 10, device=device).requires_grad_(True)
        res = torch.randn(3, 9, 10, 10, device=device).requires_grad_(True)
        params = [(torch.rand(9, device=device) + 0.5).requires_grad_(True),
                  torch.randn(9, device=device).requires_grad_(True)]
        if _refused(backend, x.detach()):
            return None
        y = batch_norm_act(x, *params, torch.zeros(9, device=device), torch.ones(9, device=device), training=True,
                           residual=res, backend=backend)
        return (y,) + torch.autograd.grad(y, [x, res] + params, torch.cos(y))

    first, second = run(), run()
    if first is not None:
        for a, b in zip(first, second):
            assert torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_runs_its_kernels_and_no_aten_op_on_activations(training, device, monkeypatch):
    """Forward and backward come from the Triton launchers: no ATen op (batch_norm, gelu, add,
    mul) produces an activation-sized tensor, only the per-channel statistics' bookkeeping runs
    in ATen."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from coatnet_fast.kernels import batch_norm_act as kernels

    shape = (2, 5, 7, 9)
    numel = 2 * 5 * 7 * 9

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.aten = []
            self.activation_sized = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            views = any(r.alias_info is not None for r in func._schema.returns)  # detach and the like move nothing
            if str(func).startswith("aten.") and not views:
                self.aten.append(str(func))
                outs = out if isinstance(out, (tuple, list)) else (out,)
                if any(isinstance(t, torch.Tensor) and t.numel() == numel for t in outs):
                    self.activation_sized.append(str(func))
            return out

    calls = []
    for name in ("apply", "backward"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    if _refused("triton", x.detach(), training=training):
        return
    params = [torch.ones(5, device=device, requires_grad=True), torch.zeros(5, device=device, requires_grad=True)]
    res = torch.randn_like(x).requires_grad_(True)
    dy = torch.randn_like(x)
    # A dispatch mode sends the call down the custom-op path; the same launchers run under it.
    with RecordOps() as record:
        y = batch_norm_act(x, *params, torch.zeros(5, device=device), torch.ones(5, device=device),
                           training=training, residual=res, branch_scale=torch.rand(2, device=device),
                           backend="triton")
        torch.autograd.grad(y, [x, res] + params, dy)
    assert calls == ["apply", "backward"]
    assert record.aten and not record.activation_sized, record.activation_sized


@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_unavailable_backend_raises_with_reason(backend, monkeypatch):
    """A backend named explicitly that cannot run here raises with its reason (switched off
    here, so that the test runs whether or not the machine has the backend)."""
    entry = dispatch._TABLE[OP][backend]
    monkeypatch.setitem(dispatch._TABLE[OP], backend, dispatch.OpBackend(
        OP, backend, entry.impl, lambda: "not available: switched off for this test", entry.reasons))
    with pytest.raises(BackendUnavailableError, match=rf"{backend}: .*not available"):
        batch_norm_act(torch.randn(2, 3, 4, 4), torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3),
                       training=True, backend=backend)


def _good(**overrides):
    c = 4
    args = dict(x=torch.randn(2, c, 6, 6), bn_weight=torch.ones(c), bn_bias=torch.zeros(c),
                running_mean=torch.zeros(c), running_var=torch.ones(c), training=True)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(x=torch.randn(4, 6, 6)), ValueError, r"x must have 4 dims"),
        (dict(x=torch.randn(2, 4, 0, 6)), ValueError, r"x must have positive H and W"),
        (dict(x=torch.ones(2, 4, 6, 6, dtype=torch.long)), TypeError, r"x must be a floating"),
        (dict(bn_weight=torch.ones(3)), ValueError, r"bn_weight must have shape \[C\] = \[4\]"),
        (dict(running_var=torch.ones(4, dtype=torch.float16)), TypeError, r"running_var must have dtype"),
        (dict(bn_bias=torch.zeros(4, device="meta")), ValueError, r"bn_bias is on meta but x is on cpu"),
        (dict(momentum=-0.1), ValueError, r"momentum must be a number in \[0, 1\]"),
        (dict(eps=float("inf")), ValueError, r"eps must be a positive"),
        (dict(training="yes"), TypeError, r"training must be a bool"),
        (dict(x=torch.randn(1, 4, 1, 1)), ValueError, r"more than one value per channel"),
        (dict(activation="relu"), ValueError, r"activation must be one of \('gelu', 'identity'\)"),
        (dict(residual=torch.randn(2, 4, 6, 5)), ValueError, r"residual must have x's shape"),
        (dict(residual=torch.randn(4, 6, 6)), ValueError, r"residual must have 4 dims"),
        (dict(residual=torch.randn(2, 4, 6, 6, device="meta")), ValueError, r"residual is on meta"),
        (dict(branch_scale=torch.ones(3)), ValueError, r"branch_scale must have shape \[B\] = \[2\]"),
        (dict(branch_scale=torch.ones(2, dtype=torch.long)), TypeError, r"branch_scale must be a floating"),
        (dict(branch_scale=torch.ones(2, requires_grad=True)), ValueError, r"branch_scale must not require grad"),
        (dict(backend="fast"), ValueError, r"backend must be one of"),
    ],
)
def test_bad_input_names_the_argument(overrides, error, message):
    args = _good(**overrides)
    positional = [args.pop(k) for k in ("x", "bn_weight", "bn_bias", "running_mean", "running_var")]
    with pytest.raises(error, match=message):
        batch_norm_act(*positional, **args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_eval_with_an_empty_batch(backend, channels_last, device):
    x = torch.randn(0, 5, 7, 9, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if _refused(backend, x, training=False):
        return
    x.requires_grad_(True)
    params = [torch.ones(5, device=device, requires_grad=True), torch.zeros(5, device=device, requires_grad=True)]
    y = batch_norm_act(x, *params, torch.zeros(5, device=device), torch.ones(5, device=device), training=False,
                       backend=backend)
    assert y.shape == x.shape
    grads = torch.autograd.grad(y.sum(), [x] + params, allow_unused=True)
    for g in grads[1:]:
        assert g is None or (g == 0).all()


@pytest.mark.parametrize("backend", FUSED)
def test_no_double_backward(backend, device):
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    if _refused(backend, x.detach()):
        return
    y = batch_norm_act(x, torch.ones(3, device=device), torch.zeros(3, device=device), torch.zeros(3, device=device),
                       torch.ones(3, device=device), training=True, backend=backend)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
# The device fixture is a torch.device, which no example changes: sharing it across examples is safe.
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 3), c=st.integers(1, 20), h=st.integers(1, 9), w=st.integers(1, 9),
       training=st.booleans(), gelu=st.booleans(), residual=st.booleans(), channels_last=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fuzzed_small_shapes(backend, device, b, c, h, w, training, gelu, residual, channels_last, seed):
    if training and b * h * w < 3:  # with two values a channel, dx is exactly zero: noise (test_dwconv_bn_gelu)
        b = 3
    check(backend, (b, c, h, w), device, training=training, gelu=gelu, residual=residual,
          branch_scale=residual, channels_last=channels_last, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gelu", [True, False], ids=["expand", "projection"])
def test_module_matches_the_seed_modules_over_steps(backend, gelu, device):
    """ConvBN on each backend against plain nn modules: momentum=None (cumulative
    average by num_batches_tracked), four training steps, then eval; the state dict is the
    seed Sequential's."""
    from coatnet_fast.models import ConvBN

    torch.manual_seed(0)
    fused = ConvBN(6, 5, gelu=gelu).to(device)
    fused[1].momentum = None
    with torch.no_grad():
        fused[1].weight.uniform_(0.5, 1.5)
        fused[1].bias.uniform_(-0.5, 0.5)
    plain = torch.nn.Sequential(*[m for m in ConvBN(6, 5, gelu=gelu)]).to(device)
    plain[1].momentum = None
    assert list(plain.state_dict()) == list(fused.state_dict())
    plain.load_state_dict(fused.state_dict())
    fused.backend = backend
    fused.fused_in_training = True  # training steps through the op too (the model's default is eval only)
    if _refused(backend, torch.randn(2, 5, 3, 3, device=device)):
        return
    for step in range(4):
        x = torch.randn(2, 6, 5, 4, device=device) + step
        res = torch.randn(2, 5, 5, 4, device=device)
        assert relative_error(fused(x, residual=res), plain(x) + res) < 1e-5, step
    for key, value in plain.state_dict().items():
        assert relative_error(fused.state_dict()[key].double(), value.double()) < 1e-5, key
    fused.eval(), plain.eval()
    assert relative_error(fused(x), plain(x)) < 1e-5


@pytest.mark.parametrize("backend", FUSED)
def test_strided_parameters_are_read_right(backend, device):
    """Per-channel vectors that are views with a stride (every other element of a buffer): the
    kernels index them densely, so the backend makes them contiguous first."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, 5, 4, generator=g).to(device)
    if _refused(backend, x):
        return
    buffers = [torch.randn(12, generator=g).to(device) for _ in range(4)]
    buffers[3] = buffers[3].abs() + 0.5  # a variance
    for training in (True, False):
        views = [b[::2] for b in buffers]
        gamma, beta = (v.clone().requires_grad_(True) for v in views[:2])
        gamma_view, beta_view = (b.clone().requires_grad_(True) for b in buffers[:2])
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        running = [[v.clone() for v in views[2:]], [b.clone() for b in buffers[2:]]]
        ref = batch_norm_act(xs[0], gamma, beta, *running[0], training=training, backend="eager")
        out = batch_norm_act(xs[1], gamma_view[::2], beta_view[::2], running[1][0][::2], running[1][1][::2],
                             training=training, backend=backend)
        dy = torch.randn(ref.shape, generator=g).to(device)
        ref_grads = torch.autograd.grad(ref, [xs[0], gamma, beta], dy)
        grads = torch.autograd.grad(out, [xs[1], gamma_view, beta_view], dy)
        assert relative_error(out, ref) < 1e-5, training
        for name, a, b in zip(("dx", "dgamma", "dbeta"), grads, ref_grads):
            a = a if name == "dx" else a[::2]
            assert relative_error(a, b) < 1e-5, (training, name)
        assert (grads[1][1::2] == 0).all()
        for i, (a, b) in enumerate(zip(running[1], running[0])):
            assert relative_error(a[::2], b) < 1e-6 and torch.equal(a[1::2], buffers[2 + i][1::2])  # gaps untouched


@pytest.mark.parametrize("make", [
    lambda d: torch.randn(2, 5, 12, 7, device=d).contiguous(memory_format=torch.channels_last)[:, :, ::2, :5],
    lambda d: torch.randn(2, 5, 6, 7, device=d)[:, :, :, 1:6],
    lambda d: torch.randn(2, 6, 5, 4, device=d).contiguous(memory_format=torch.channels_last),
], ids=["nhwc-strided", "nchw-cropped", "nhwc"])
def test_custom_ops_pass_opcheck(make, device):
    """The fake kernels tell torch.compile the outputs' real strides, also for views the
    launchers copy before reading (the output follows the caller's x, not the copy)."""
    import importlib

    op_module = importlib.import_module("coatnet_fast.ops.batch_norm_act")  # the package exports the op by that name
    x = make(device)
    if _refused("triton", x):
        return
    c = x.shape[1]
    mean, rstd = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    gamma = torch.rand(c, device=device, requires_grad=True)
    beta = torch.randn(c, device=device, requires_grad=True)
    x = x.requires_grad_(True)
    res = torch.randn(x.shape, device=device).requires_grad_(True)
    scale = torch.rand(x.shape[0], device=device)
    for args in ((x, gamma, beta, mean, rstd, True, True, None, None),
                 (x, gamma, beta, mean, rstd, False, False, res, scale)):
        torch.library.opcheck(op_module._triton_forward, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(op_module._triton_stats, (x.detach(),), test_utils=("test_schema", "test_faketensor"))
    dy = torch.randn(x.shape, device=device)
    torch.library.opcheck(op_module._triton_backward, (dy, x.detach(), gamma.detach(), beta.detach(), mean, rstd,
                                                       False, scale, True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", TRITON)
def test_triton_statistics_merge_counts_past_32_bits(backend, device):
    """The merge's total count (B * H * W, 2**31 here) and row offsets stay exact past 32 bits:
    per-image partials of 2**20 positions each from 2048 images, merged."""
    from coatnet_fast.kernels._common import merge_stats

    if _refused(backend, torch.randn(2, 3, 2, 2, device=device)):
        return

    g = torch.Generator().manual_seed(0)
    batch, channels, positions = 2048, 3, 2**20
    means = (5.0 + 0.01 * torch.randn(batch, 1, channels, generator=g)).to(device)
    m2s = (positions * (1.0 + 0.1 * torch.rand(batch, 1, channels, generator=g))).to(device)
    mean, var = merge_stats(means, m2s, positions, positions)
    m64, s64 = means.double().squeeze(1), m2s.double().squeeze(1)
    expected_mean = m64.mean(0)
    expected_var = (s64.sum(0) + positions * ((m64 - expected_mean) ** 2).sum(0)) / (batch * positions)
    assert relative_error(mean, expected_mean) < 1e-6 and relative_error(var, expected_var) < 1e-6


def test_triton_grid_stays_within_cuda_limits():
    """Images x channel blocks share grid axis 0 (up to 2**31); position splits, on axis 1, never
    pass 65535: a huge image gets longer splits. (Meta tensors: only shapes are read.)"""
    from coatnet_fast.kernels import batch_norm_act as kernels

    for shape in ((1, 16, 8192, 8193), (3, 2**21, 1, 1), (128, 384, 56, 56)):
        x = torch.empty(shape, device="meta")
        grid, per_program, splits, block_p, block_c, _ = kernels._launch(x)
        positions = shape[2] * shape[3]
        assert grid[1] == splits <= 65535 and splits * per_program >= positions > (splits - 1) * per_program
        assert per_program % block_p == 0 and grid[0] == shape[0] * -(-shape[1] // block_c) < 2**31


@pytest.mark.parametrize("backend", FUSED)
def test_variance_of_a_large_mean_channel_from_small_groups(backend, device):
    """Tiny images (3x3) make many small partial groups: about the channel's first value, their
    means carry the spread, not the 1e3 offset, so the merged variance keeps fp32 accuracy."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64) * 0.5 + 1e3).float()
    if _refused(backend, x.to(device)):
        return
    running_mean, running_var = torch.zeros(4, device=device), torch.ones(4, device=device)
    batch_norm_act(x.to(device), torch.ones(4, device=device), torch.zeros(4, device=device), running_mean,
                   running_var, training=True, momentum=1.0, backend=backend)
    x64 = x.double()
    assert relative_error(running_var, x64.var(dim=(0, 2, 3), unbiased=True)) < 1e-6
    assert relative_error(running_mean, x64.mean(dim=(0, 2, 3))) < 1e-7


@pytest.mark.parametrize("backend", FUSED)
def test_modules_the_op_does_not_compute_run_as_modules(backend, device, monkeypatch):
    """A swapped activation (tanh GELU) or a BatchNorm without affine parameters or running
    statistics is not what batch_norm_act computes: those modules run themselves, and match,
    even where the block is fused in training (``fused_in_training``)."""
    from coatnet_fast.models import ConvBN

    if _refused(backend, torch.randn(2, 5, 3, 3, device=device)):
        return
    calls = []
    entry = dispatch._TABLE[OP][backend]
    monkeypatch.setitem(dispatch._TABLE[OP], backend, dispatch.OpBackend(
        OP, backend, lambda *a: calls.append(1) or entry.impl(*a), entry.available, entry.reasons))
    variants = {
        "tanh": lambda m: m.__setitem__(2, torch.nn.GELU(approximate="tanh")),
        "no affine": lambda m: m.__setitem__(1, torch.nn.BatchNorm2d(5, affine=False)),
        "no running stats": lambda m: m.__setitem__(1, torch.nn.BatchNorm2d(5, track_running_stats=False)),
    }
    for name, change in variants.items():
        torch.manual_seed(0)
        module = ConvBN(6, 5).to(device)
        change(module)
        module.to(device)
        plain = torch.nn.Sequential(*[m for m in module]).to(device)
        module.backend, module.fused_in_training = backend, True
        x = torch.randn(2, 6, 4, 4, device=device)
        assert torch.equal(module(x), plain(x)), name
    assert calls == []
    module = ConvBN(6, 5).to(device)
    module.backend, module.fused_in_training = backend, True
    module(torch.randn(2, 6, 4, 4, device=device))
    assert calls == [1]


# Where Triton kernels run: CUDA, or the CPU under the interpreter (conftest sets it without CUDA).
TRITON_DEVICES = [d for d in ("cpu", "cuda") if TRITON and (d == "cuda" and torch.cuda.is_available() or
                                                             d == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")]


if TRITON:
    import triton
    import triton.language as tl

    from coatnet_fast.kernels._common import gelu, gelu_grad

    @triton.jit
    def gelu_and_grad(U, Y, G, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        u = tl.load(U + offs, mask=offs < n, other=0.0)
        tl.store(Y + offs, gelu(u), mask=offs < n)
        tl.store(G + offs, gelu_grad(u), mask=offs < n)


@pytest.mark.parametrize("device_name", TRITON_DEVICES)
def test_triton_gelu_and_its_derivative_against_float64(device_name):
    """The kernels' GELU is u Phi(u) with a fitted normal CDF (``kernels/_common.py``,
    ``tests/fit_normal_cdf.py``), not libdevice's erf: evaluated by a Triton kernel in fp32 on a
    dense grid of |u| <= 14 (plus signed zeros and a random draw), it stays within 1e-5 relative
    of float64's u Phi(u) wherever that is above 1e-6 in size, 1e-3 relative down to 1e-30
    (the tail, which 0.5 u (1 + erf(u / sqrt 2)) loses to cancellation), 1e-6 absolute per unit
    of |u| everywhere; its derivative Phi(u) + u phi(u) within 1e-6 absolute. On a GPU ex2 and
    the reciprocal are the hardware's approximations; the bounds leave room for them."""
    g = torch.Generator().manual_seed(1)
    u = torch.cat([torch.linspace(-14, 14, 400_001), torch.tensor([0.0, -0.0]),
                   3 * torch.randn(100_000, generator=g)]).to(device_name)
    y, grad = torch.full_like(u, float("nan")), torch.full_like(u, float("nan"))
    gelu_and_grad[(triton.cdiv(u.numel(), 1024),)](u, y, grad, u.numel(), BLOCK=1024)
    u64, y, grad = u.double().cpu(), y.double().cpu(), grad.double().cpu()
    cdf = torch.special.erfc(-u64 / 2**0.5) / 2  # not ndtr: in float64 it is 1 + erf's noise below 1e-16
    ref = u64 * cdf
    ref_grad = cdf + u64 * torch.exp(-u64 * u64 / 2) / (2 * torch.pi) ** 0.5
    err = (y - ref).abs()
    assert (err <= 1e-6 * u64.abs().clamp_min(1.0)).all(), f"GELU: absolute error {err.max():.2e}"
    big, tail = ref.abs() > 1e-6, ref.abs() > 1e-30
    assert (err[big] / ref[big].abs()).max() <= 1e-5, f"GELU: relative error {(err[big] / ref[big].abs()).max():.2e}"
    assert (err[tail] / ref[tail].abs()).max() <= 1e-3, "GELU's tail"
    assert (grad - ref_grad).abs().max() <= 1e-6, f"GELU': absolute error {(grad - ref_grad).abs().max():.2e}"
    assert torch.equal(y[u64 == 0], torch.zeros(2, dtype=torch.float64)) and (grad[u64 == 0] == 0.5).all()


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("path", RUNNING_STATISTICS_PATHS)
def test_triton_running_statistics_update_where_it_runs(backend, path, device, monkeypatch):
    """The eager call updates the running statistics inside the statistics' merge kernel (no
    torch ops on the host); the custom op (what torch.compile traces) and running statistics
    that are strided views update them with torch ops. Each path matches nn.BatchNorm2d's update
    (float64, unbiased variance), and the test records which one ran."""
    from coatnet_fast.kernels import batch_norm_act as kernels

    x = torch.randn(3, 5, 6, 7, device=device) * 2 + 0.5
    if _refused(backend, x):
        return
    running_mean, running_var, merged = running_statistics_on_path(kernels, dispatch, path, 5, device, monkeypatch)
    start_mean, start_var = running_mean.double().clone(), running_var.double().clone()
    weight, bias = torch.rand(5, device=device) + 0.5, torch.randn(5, device=device)
    y = batch_norm_act(x, weight, bias, running_mean, running_var, training=True, momentum=0.3, backend=backend)
    x64 = x.double()
    mean, var = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=True)
    assert relative_error(running_mean, start_mean * 0.7 + mean * 0.3) < 1e-5
    assert relative_error(running_var, start_var * 0.7 + var * 0.3) < 1e-5
    rstd = torch.rsqrt(x64.var((0, 2, 3), unbiased=False) + 1e-5)
    expected = torch.nn.functional.gelu((x64 - mean[:, None, None]) * (rstd * weight.double())[:, None, None]
                                        + bias.double()[:, None, None])
    assert relative_error(y, expected) < TOLERANCE[torch.float32]
    assert merged == [path == "merge kernel"]
