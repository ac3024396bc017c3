"""max_pool2d: every usable backend against float64 F.max_pool2d, ties, -inf and NaN included."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coatnet_fast.ops import BackendUnavailableError, dispatch, max_pool2d
from coatnet_fast.ops.max_pool2d import supported_reasons
from reference import TOLERANCE, relative_error

OP = "max_pool2d"
BACKENDS = dispatch.usable_backends(OP)
FUSED = [b for b in BACKENDS if b != "eager"]
TRITON = [b for b in FUSED if b == "triton"]
op_module = importlib.import_module("coatnet_fast.ops.max_pool2d")  # the package exports the op by that name


def _refused(backend, x, kernel_size=3, stride=2, padding=1):
    why = supported_reasons(backend, x, kernel_size, stride, padding)
    if why:
        assert backend != "eager"
        with pytest.raises(BackendUnavailableError):
            max_pool2d(x, kernel_size, stride, padding, backend=backend)
    return bool(why)


def _input(shape, g, *, ties=False, specials=False):
    """float64 values: small integers make ties in most windows; specials add -inf and NaN."""
    if ties:
        x = torch.randint(-2, 3, shape, generator=g).double()
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    if specials:
        flat = x.view(-1)
        picks = torch.randperm(flat.numel(), generator=g)[:max(2, flat.numel() // 20)]
        flat[picks[::2]] = float("-inf")
        flat[picks[1::2]] = float("nan")
    return x


def check(backend, shape, device, *, kernel_size=3, stride=2, padding=1, dtype=torch.float32,
          channels_last=False, ties=False, specials=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x64 = _input(shape, g, ties=ties, specials=specials).to(dtype).double()  # values x's dtype holds
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x64.to(device, dtype).contiguous(memory_format=fmt)
    if _refused(backend, x, kernel_size, stride, padding):
        return
    x.requires_grad_(True)
    ref_x = x64.clone().requires_grad_(True)
    y = max_pool2d(x, kernel_size, stride, padding, backend=backend)
    ref = F.max_pool2d(ref_x, kernel_size, stride, padding)
    assert y.shape == ref.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=fmt)
    # A max is exact: the same values, NaN where the reference has NaN.
    assert torch.equal(y.detach().cpu().double().isnan(), ref.isnan())
    assert torch.equal(torch.nan_to_num(y.detach().cpu().double(), 0.0), torch.nan_to_num(ref.detach(), 0.0))
    dy64 = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (dx,) = torch.autograd.grad(y, x, dy64.to(device, dtype).contiguous(memory_format=fmt))
    (ref_dx,) = torch.autograd.grad(ref, ref_x, dy64.to(dtype).double())
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=fmt)
    # The gradient lands where PyTorch puts it (ties and NaN windows included), summed over windows.
    assert torch.equal(dx.detach().cpu() != 0, ref_dx != 0)
    assert relative_error(dx, ref_dx) < TOLERANCE[dtype]


SHAPES = [(2, 5, 9, 11), (3, 8, 14, 14), (1, 70, 7, 7), (2, 3, 1, 1), (1, 4, 2, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_reference_fp32(backend, shape, channels_last, device):
    check(backend, shape, device, channels_last=channels_last, seed=sum(shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("specials", [False, True], ids=["ties", "ties-inf-nan"])
def test_ties_inf_and_nan_pick_pytorchs_element(backend, channels_last, specials, device):
    check(backend, (2, 6, 10, 9), device, channels_last=channels_last, ties=True, specials=specials, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool", [(2, 2, 0), (3, 1, 1), (5, 3, 2), (1, 1, 0), (11, 4, 5)], ids=str)
def test_other_windows(backend, pool, device):
    k, s, p = pool
    check(backend, (2, 5, 13, 12), device, kernel_size=k, stride=s, padding=p, channels_last=True, ties=True,
          seed=k * 7 + s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(backend, dtype, device):
    check(backend, (2, 24, 14, 14), device, dtype=dtype, channels_last=True, ties=True)


@pytest.mark.parametrize("backend", FUSED)
def test_kernels_write_every_output_element(backend, device, poison_empty):
    """Outputs and gradients start as NaN (poison_empty): a position or channel a tile misses
    stays NaN and fails the comparison. Sizes leave partial tiles on both axes."""
    check(backend, (3, 67, 9, 13), device, channels_last=True, seed=5)
    check(backend, (3, 11, 17, 10), device, channels_last=False, seed=6)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_runs_its_kernels_and_keeps_a_one_byte_index(backend, device, launch_spy):
    """Which path ran: the forward and backward kernels, with an int8 window index in x's
    layout; autograd keeps the index alone, not x."""
    from coatnet_fast.kernels import max_pool2d as kernels

    x = torch.randn(2, 16, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
    if _refused(backend, x):
        return
    forwards, backwards = launch_spy(kernels, "_fwd"), launch_spy(kernels, "_bwd")
    x.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = max_pool2d(x, backend=backend)
    assert len(forwards) == 1 and backwards == []
    index = forwards[0][2]
    assert index.dtype == torch.int8 and index.is_contiguous(memory_format=torch.channels_last)
    assert [t.dtype for t in saved] == [torch.int8]
    y.sum().backward()
    assert len(backwards) == 1 and backwards[0][1] is index


@pytest.mark.parametrize("backend", FUSED)
def test_no_double_backward(backend, device):
    x = torch.randn(2, 3, 6, 6, device=device, requires_grad=True)
    if _refused(backend, x.detach()):
        return
    y = max_pool2d(x, backend=backend)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views(backend, device):
    """Views are read through their strides, no copy needed for a right answer."""
    base = torch.randn(2, 9, 12, 14, device=device).contiguous(memory_format=torch.channels_last)
    for view in (base[:, 1:8, ::2, 1:12], base.permute(0, 1, 3, 2)):
        if _refused(backend, view):
            return
        leaf = view.detach().requires_grad_(True)  # a leaf with the view's strides
        got = max_pool2d(leaf, backend=backend)
        ref_leaf = view.detach().double().cpu().requires_grad_(True)
        ref = F.max_pool2d(ref_leaf, 3, 2, 1)
        assert torch.equal(got.detach().cpu(), ref.detach().float())
        dy = torch.randn(ref.shape, dtype=torch.float64)
        (dx,) = torch.autograd.grad(got, leaf, dy.float().to(device))
        (ref_dx,) = torch.autograd.grad(ref, ref_leaf, dy)
        assert dx.stride() == leaf.stride() or dx.is_contiguous() or dx.is_contiguous(memory_format=torch.channels_last)
        assert relative_error(dx, ref_dx) < 1e-6


def test_custom_ops_pass_opcheck(device):
    x = torch.randn(2, 6, 7, 5, device=device).contiguous(memory_format=torch.channels_last)
    if _refused("triton", x):
        return
    for with_index in (True, False):
        torch.library.opcheck(op_module._triton_forward, (x.requires_grad_(True), 3, 2, 1, with_index),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    y, index = op_module._triton_forward(x.detach(), 3, 2, 1, True)
    dy = torch.randn(y.shape, device=device).contiguous(memory_format=torch.channels_last)
    for channels_last in (True, False):
        torch.library.opcheck(op_module._triton_backward, (dy, index, list(x.shape), channels_last, 3, 2, 1),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(x=torch.randn(3, 8, 8)), ValueError, "x must have 4 dims"),
    (dict(x=torch.ones(1, 2, 8, 8, dtype=torch.int32)), TypeError, "x must be a floating-point"),
    (dict(kernel_size=12), ValueError, "kernel_size must be at most 11"),
    (dict(kernel_size=0), ValueError, "kernel_size must be an int >= 1"),
    (dict(kernel_size=(3, 3)), ValueError, "kernel_size must be an int"),
    (dict(stride=0), ValueError, "stride must be an int >= 1"),
    (dict(padding=2), ValueError, "padding must be at most kernel_size // 2"),
    (dict(padding=-1), ValueError, "padding must be an int >= 0"),
    (dict(x=torch.randn(1, 2, 1, 8), padding=0), ValueError, "smaller than the 3 x 3 window"),
    (dict(backend="fast"), ValueError, "backend"),
])
def test_bad_input_names_the_argument(kwargs, error, message):
    args = dict(x=torch.randn(1, 2, 8, 8), kernel_size=3, stride=2, padding=1, backend="eager")
    args.update(kwargs)
    with pytest.raises(error, match=message):
        max_pool2d(args.pop("x"), **args)


def test_ext_has_no_kernel_and_models_keep_their_pools_on_eager():
    """The C++ extension has no max pool: the op refuses "ext" by name, and set_backend leaves
    a model's pools on eager while its other modules move."""
    from coatnet_fast import create_model, set_backend
    from coatnet_fast.models import MaxPool2d

    assert not dispatch.implemented(OP, "ext")
    with pytest.raises(BackendUnavailableError, match="no max_pool2d kernel"):
        max_pool2d(torch.randn(1, 2, 5, 5), backend="ext")
    net = create_model("coatnet_0", image_size=64, num_classes=10)
    pools = [m for m in net.modules() if isinstance(m, MaxPool2d)]
    assert len(pools) == 6  # MBConv's shortcut in S1 and S2, two a Transformer block in S3 and S4
    if "ext" in dispatch.usable_backends("batch_norm_act"):
        set_backend(net, "ext")
        assert {m.backend for m in pools} == {"eager"}
    if "triton" in BACKENDS:
        set_backend(net, "triton")
        assert {m.backend for m in pools} == {"triton"}


@pytest.mark.parametrize("backend", FUSED)
def test_module_matches_nn_max_pool2d_and_runs_the_op(backend, device, monkeypatch):
    """MaxPool2d is nn.MaxPool2d on eager, the op on a fused backend, and nn.MaxPool2d's own
    forward for what the op does not take (ceil_mode, dilation, indices, rectangles)."""
    from coatnet_fast.models import MaxPool2d

    x = torch.randn(2, 4, 9, 9, device=device)
    if _refused(backend, x):
        return
    calls = []
    real = op_module.max_pool2d
    monkeypatch.setattr(importlib.import_module("coatnet_fast.models.layers"), "max_pool2d",
                        lambda *a, **k: calls.append(k["backend"]) or real(*a, **k))
    pool = MaxPool2d(kernel_size=3, stride=2, padding=1)
    assert isinstance(pool, torch.nn.MaxPool2d) and pool.state_dict() == {}
    assert torch.equal(pool(x), F.max_pool2d(x, 3, 2, 1)) and calls == []
    pool.backend = backend
    assert torch.equal(pool(x), F.max_pool2d(x, 3, 2, 1)) and calls == [backend]
    square_pairs = MaxPool2d(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
    square_pairs.backend = backend
    assert torch.equal(square_pairs(x), F.max_pool2d(x, 3, 2, 1)) and calls == [backend, backend]
    del calls[1:]
    for other in (dict(ceil_mode=True), dict(dilation=2), dict(kernel_size=(3, 2)), dict(kernel_size=13, padding=6)):
        module = MaxPool2d(**dict(dict(kernel_size=3, stride=2, padding=1), **other))
        module.backend = backend
        assert torch.equal(module(x), torch.nn.MaxPool2d(**dict(dict(kernel_size=3, stride=2, padding=1), **other))(x))
    assert torch.equal(pool(x[0]), F.max_pool2d(x[0], 3, 2, 1))  # unbatched [C, H, W]: the module's own
    assert calls == [backend]


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 2), c=st.integers(1, 20), h=st.integers(1, 9), w=st.integers(1, 9),
       k=st.integers(1, 5), s=st.integers(1, 3), p=st.integers(0, 2), channels_last=st.booleans(),
       ties=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzzed_small_shapes(backend, device, b, c, h, w, k, s, p, channels_last, ties, seed):
    p = min(p, k // 2)
    if h + 2 * p < k or w + 2 * p < k:
        return
    check(backend, (b, c, h, w), device, kernel_size=k, stride=s, padding=p, channels_last=channels_last,
          ties=ties, seed=seed)


@pytest.mark.parametrize("backend", FUSED)
def test_custom_op_path_matches_reference(backend, device, monkeypatch):
    """The torch.library custom ops and their registered autograd (what torch.compile traces),
    not the eager fast path, against float64 F.max_pool2d."""
    monkeypatch.setattr(dispatch, "eager_fast_path", lambda *tensors: False)
    for channels_last, specials in ((False, False), (True, True)):
        check(backend, (2, 7, 11, 9), device, channels_last=channels_last, ties=True, specials=specials, seed=11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_windows_of_only_inf_or_nan(backend, device):
    """Windows of -inf alone give -inf and send their gradient to their first in-window
    element (not a padded slot); windows of NaN give NaN, and their gradient is kept whole
    (which NaN gets it is each kernel's choice: PyTorch's own fp32 and fp64 CPU kernels differ
    under one thread)."""
    for fill in (float("-inf"), float("nan")):
        x = torch.full((1, 3, 5, 6), fill, device=device)
        x[0, 1, 2:, 3:] = torch.arange(9.0, device=device).view(3, 3) - 4  # one channel part finite
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = x.contiguous(memory_format=fmt).detach().requires_grad_(True)
            if _refused(backend, x.detach()):
                return
            ref_x = x.detach().double().cpu().requires_grad_(True)
            y, ref = max_pool2d(x, backend=backend), F.max_pool2d(ref_x, 3, 2, 1)
            assert torch.equal(y.detach().cpu().double().isnan(), ref.isnan())
            assert torch.equal(torch.nan_to_num(y.detach().cpu().double()), torch.nan_to_num(ref.detach()))
            dy = torch.rand(ref.shape, dtype=torch.float64) + 1
            (dx,) = torch.autograd.grad(y, x, dy.float().to(device))
            (ref_dx,) = torch.autograd.grad(ref, ref_x, dy)
            if fill == fill:
                assert torch.equal(dx.cpu().double(), ref_dx.float().double()), (fill, fmt)
            else:
                assert abs(dx.double().sum().item() - ref_dx.sum().item()) <= 1e-5 * ref_dx.abs().sum().item()
                assert torch.equal(dx.cpu()[0, 1, 2:, 3:] != 0, ref_dx[0, 1, 2:, 3:] != 0)  # the finite part


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dy_kind", ["other-layout", "expanded"])
def test_gradient_in_another_layout_or_expanded(backend, dy_kind, device):
    """An incoming gradient that is NCHW for a channels_last x, or expanded (``y.sum()``'s), is
    read through its strides and gives the reference's dx."""
    g = torch.Generator().manual_seed(4)
    x64 = torch.randint(-2, 3, (2, 6, 9, 10), generator=g).double()
    x = x64.float().to(device).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    if _refused(backend, x.detach()):
        return
    ref_x = x64.clone().requires_grad_(True)
    y, ref = max_pool2d(x, backend=backend), F.max_pool2d(ref_x, 3, 2, 1)
    if dy_kind == "expanded":
        dy64 = torch.tensor(1.5, dtype=torch.float64).expand(ref.shape)
    else:
        dy64 = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    dy = dy64.float().to(device)
    assert dy.is_contiguous() or dy.stride() == (0, 0, 0, 0)
    (dx,) = torch.autograd.grad(y, x, dy)
    (ref_dx,) = torch.autograd.grad(ref, ref_x, dy64)
    assert relative_error(dx, ref_dx) < 1e-6


@pytest.mark.parametrize("backend", TRITON)
def test_triton_inference_writes_no_index(backend, device, launch_spy):
    """Without autograd (no_grad, or x without requires_grad) the forward writes no index."""
    from coatnet_fast.kernels import max_pool2d as kernels

    x = torch.randn(2, 16, 9, 9, device=device).contiguous(memory_format=torch.channels_last)
    if _refused(backend, x):
        return
    launches = launch_spy(kernels, "_fwd")
    expected = F.max_pool2d(x, 3, 2, 1)
    assert torch.equal(max_pool2d(x, backend=backend), expected)
    with torch.no_grad():
        assert torch.equal(max_pool2d(x.requires_grad_(True), backend=backend), expected)
    assert [call[2].numel() for call in launches] == [0, 0]


def test_triton_channel_offsets_past_32_bits(device):
    """A view whose channel stride times C passes 2**31 elements (a transposed batch): the
    channel offsets are 64-bit. The storage is allocated, not written: only the view's corner
    is filled and read (untouched pages cost no memory)."""
    if "triton" not in BACKENDS:
        return
    try:
        storage = torch.empty(96, 4, 2**23 + 1024, dtype=torch.float16, device=device)  # 3.2e9 elements
    except RuntimeError as e:  # a machine without the address space: say so rather than pass
        pytest.fail(f"could not reserve the view's storage: {e}")
    view = storage[:, :, :64].view(96, 4, 8, 8).transpose(0, 1)  # [4, 96, 8, 8], channel stride ~3.4e7
    assert view.stride(1) * (view.shape[1] - 1) > 2**31
    view.copy_(torch.randn(view.shape, generator=torch.Generator().manual_seed(9)).half().to(device))
    if _refused("triton", view):
        return
    assert torch.equal(max_pool2d(view, backend="triton").cpu(), F.max_pool2d(view.float().cpu(), 3, 2, 1).half())
