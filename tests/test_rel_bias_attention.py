"""rel_bias_attention: every usable backend against an independent float64 computation."""
import re

import pytest
import torch

from coatnet_fast.ops import BackendUnavailableError, dispatch, rel_bias_attention, relative_position_index
from coatnet_fast.ops.rel_bias_attention import supported_reasons, table_rows
from reference import TOLERANCE, rel_bias_attention_reference, relative_error, relative_index_by_loops

OP = "rel_bias_attention"
# Windows of the model (7x7, 14x14 at 224 input; 12x12 at 384) and odd, non-square ones.
WINDOWS = [(7, 7), (14, 14), (7, 5), (2, 9), (1, 1), (12, 12)]
HEAD_DIMS = [16, 32, 64]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(batch, heads, window, d, dtype, device, strided, seed=0, table_dtype=None):
    g = torch.Generator().manual_seed(seed)
    n = window[0] * window[1]
    if strided:
        # The model's layout: three [B, heads, N, d] views of one [B, N, 3 * heads * d] projection.
        qkv = torch.randn(batch, n, 3 * heads * d, generator=g, dtype=torch.float64)
        q, k, v = qkv.to(device, dtype).unflatten(-1, (3, heads, d)).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(3))
    table = torch.randn(table_rows(window), heads, generator=g, dtype=torch.float64).to(device, table_dtype or dtype)
    grad_out = torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64).to(device)
    return [t.detach().requires_grad_(True) for t in (q, k, v, table)], grad_out


def run(fn, inputs, grad_out, **kwargs):
    out = fn(*inputs, **kwargs)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    return out, grads


def refused(backend, inputs, window):
    """A backend may decline inputs it declares unsupported (e.g. bf16 on the CPU
    interpreter); then it must raise with that reason rather than run."""
    why = supported_reasons(backend, *inputs, window)
    if why:
        assert backend != "eager", why
        with pytest.raises(BackendUnavailableError, match=re.escape(why[0])):
            rel_bias_attention(*inputs, window, backend=backend)
    return bool(why)


def assert_matches_reference(out, grads, inputs, grad_out, window, tol, finite=False):
    """out and the four gradients against the float64 reference on the same inputs."""
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    ref_out, ref_grads = run(rel_bias_attention_reference, ref_inputs, grad_out.double(), window=window)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dtable"), (out,) + grads, (ref_out,) + ref_grads):
        assert a.shape == b.shape, name
        assert not finite or torch.isfinite(a).all(), name
        err = relative_error(a, b)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def check_against_reference(backend, window, d, dtype, device, strided, batch=2, heads=3):
    inputs, grad_out = make_inputs(batch, heads, window, d, dtype, device, strided)
    if refused(backend, inputs, window):
        return
    out, grads = run(rel_bias_attention, inputs, grad_out, window=window, backend=backend)
    assert out.shape == inputs[0].shape and out.dtype == dtype
    assert_matches_reference(out, grads, inputs, grad_out, window, TOLERANCE[dtype])


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"{w[0]}x{w[1]}")
def test_matches_reference_fp32_windows(backend, window, device):
    check_against_reference(backend, window, 32, torch.float32, device, strided=True)


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_matches_reference_dtypes_head_dims(backend, d, dtype, strided, device):
    check_against_reference(backend, (7, 5), d, dtype, device, strided)


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
def test_fp32_table_with_low_precision_activations(backend, device):
    """Under autocast the table stays an fp32 parameter while q, k, v are half precision."""
    inputs, grad_out = make_inputs(2, 2, (4, 6), 16, torch.float16, device, True, table_dtype=torch.float32)
    if refused(backend, inputs, (4, 6)):
        return
    out, grads = run(rel_bias_attention, inputs, grad_out, window=(4, 6), backend=backend)
    assert out.dtype == torch.float16 and grads[3].dtype == torch.float32
    assert_matches_reference(out, grads, inputs, grad_out, (4, 6), TOLERANCE[torch.float16])


def test_explicit_scale_and_default(device):
    inputs, _ = make_inputs(1, 2, (3, 3), 8, torch.float64, device, False)
    for scale in (None, 0.3):
        out = rel_bias_attention(*inputs, (3, 3), scale, backend="eager")
        ref = rel_bias_attention_reference(*inputs, (3, 3), scale)
        assert relative_error(out, ref) < 1e-12


def test_relative_position_index_matches_loops():
    for window in [(7, 7), (7, 5), (2, 9), (1, 4)]:
        assert torch.equal(relative_position_index(*window), relative_index_by_loops(*window))


def test_relative_position_index_is_a_copy():
    a = relative_position_index(3, 3)
    a.zero_()
    assert relative_position_index(3, 3).max() == table_rows((3, 3)) - 1


@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_unavailable_backend_raises_with_reason(backend, monkeypatch):
    """A backend named explicitly that cannot run here raises with its reason (switched off
    here, so that the test runs whether or not the machine has the backend)."""
    entry = dispatch._TABLE[OP][backend]
    monkeypatch.setitem(dispatch._TABLE[OP], backend, dispatch.OpBackend(
        OP, backend, entry.impl, lambda: "not available: switched off for this test", entry.reasons))
    inputs, _ = make_inputs(1, 2, (3, 3), 8, torch.float32, "cpu", False)
    with pytest.raises(BackendUnavailableError, match=rf"{backend}: .*not available"):
        rel_bias_attention(*inputs, (3, 3), backend=backend)


def _good(**overrides):
    q = torch.randn(2, 3, 12, 8)
    args = dict(q=q, k=torch.randn(2, 3, 12, 8), v=torch.randn(2, 3, 12, 8),
                table=torch.randn(table_rows((3, 4)), 3), window=(3, 4))
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(q=torch.randn(3, 12, 8)), ValueError, r"q must have 4 dims"),
        (dict(k=torch.randn(2, 3, 12, 4)), ValueError, r"k must have q's shape"),
        (dict(v=torch.randn(2, 3, 11, 8)), ValueError, r"v must have q's shape"),
        (dict(q=[1.0]), TypeError, r"q must be a torch.Tensor"),
        (dict(window=(4, 4)), ValueError, r"window \(4, 4\) has 16 positions .* N=12"),
        (dict(window=(3, 0)), ValueError, r"window must be a pair of positive ints"),
        (dict(window=12), ValueError, r"window must be a pair"),
        (dict(table=torch.randn(34, 3)), ValueError, r"table must have shape .*\[35, 3\]"),
        (dict(table=torch.randn(35, 2)), ValueError, r"table must have shape"),
        (dict(table=torch.randn(35)), ValueError, r"table must have 2 dims"),
        (dict(k=torch.randn(2, 3, 12, 8, dtype=torch.float64)), TypeError, r"k must have q's dtype"),
        (dict(table=torch.randn(35, 3, dtype=torch.float16)), TypeError, r"table must have dtype"),
        (dict(q=torch.ones(2, 3, 12, 8, dtype=torch.long)), TypeError, r"q must be a floating-point"),
        (dict(table=torch.randn(35, 3, device="meta")), ValueError, r"table is on meta but q is on cpu"),
        (dict(scale=-1.0), ValueError, r"scale must be a positive finite number"),
        (dict(backend="cuda"), ValueError, r"backend must be one of"),
    ],
)
def test_bad_input_names_the_argument(overrides, error, message):
    args = _good(**overrides)
    with pytest.raises(error, match=message):
        rel_bias_attention(**args)


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
def test_above_one_key_tile(backend, device):
    """24x24 = 576 keys: several key tiles, so the online softmax and dq accumulation run."""
    check_against_reference(backend, (24, 24), 32, torch.float32, device, strided=True, batch=2, heads=2)


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
def test_gradients_are_deterministic(backend, device):
    inputs, grad_out = make_inputs(5, 3, (7, 7), 32, torch.float32, device, True)
    if refused(backend, inputs, (7, 7)):
        return
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = run(rel_bias_attention, inputs, grad_out, window=(7, 7), backend=backend)
        second = run(rel_bias_attention, inputs, grad_out, window=(7, 7), backend=backend)
    finally:
        torch.use_deterministic_algorithms(saved)
    for a, b in zip((first[0],) + first[1], (second[0],) + second[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", [b for b in dispatch.usable_backends(OP) if b != "eager"])
def test_fused_kernels_write_every_output_element(backend, device, poison_empty):
    """Outputs and gradients allocated NaN-filled: any element a kernel skips shows up."""
    check_against_reference(backend, (7, 5), 16, torch.float32, device, strided=True, batch=3, heads=2)
    check_against_reference(backend, (24, 24), 16, torch.float32, device, strided=False, batch=1, heads=1)


def test_triton_output_merges_heads_without_a_copy(device):
    """The Triton forward stores o as [B, N, heads, d], so Attention's "b h n d -> b n (h d)" is a
    view of it, and the backward reads that layout's gradient in place. The custom ops' fake
    kernels give torch.compile the same strides (opcheck compares them with a real run)."""
    import importlib

    from einops import rearrange

    op_module = importlib.import_module("coatnet_fast.ops.rel_bias_attention")
    window = (7, 5)
    inputs, grad_out = make_inputs(2, 3, window, 16, torch.float32, device, strided=True, seed=5)
    out = rel_bias_attention(*inputs, window, backend="triton")
    rows = rearrange(out, "b h n d -> b n (h d)")
    assert rows.data_ptr() == out.data_ptr() and rows._base is not None  # a view
    grads = torch.autograd.grad(rows, inputs, rearrange(grad_out, "b h n d -> b n (h d)"))
    assert_matches_reference(out, grads, inputs, grad_out, window, TOLERANCE[torch.float32])
    q, k, v, table = (t.detach() for t in inputs)
    args = (q, k, v, table, window[0], window[1], 16 ** -0.5)
    torch.library.opcheck(op_module._triton_forward, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    o, lse = op_module._triton_forward(*args)
    do = rearrange(torch.randn(2, 35, 3 * 16, device=device), "b n (h d) -> b h n d", h=3)
    torch.library.opcheck(op_module._triton_backward, (do, q, k, v, table, o, lse, window[0], window[1], 16 ** -0.5),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", [b for b in dispatch.usable_backends(OP) if b != "eager"])
def test_auto_picks_the_fused_backend_where_it_can(backend, device, monkeypatch):
    """"auto" takes a capable fused backend (proved by the call landing in it), and eager
    for inputs it declines. Fused backends ahead of it in the order are switched off."""
    calls = []
    entry = dispatch._TABLE[OP][backend]
    monkeypatch.setitem(dispatch._TABLE[OP], backend, dispatch.OpBackend(
        OP, backend, lambda *a: calls.append(1) or entry.impl(*a), entry.available, entry.reasons))
    for other in dispatch.AUTO_ORDER[:dispatch.AUTO_ORDER.index(backend)]:
        monkeypatch.setitem(dispatch._TABLE[OP], other, dispatch.OpBackend(
            OP, other, None, lambda: "switched off for this test", dispatch._no_reasons))
    inputs, _ = make_inputs(1, 2, (3, 3), 16, torch.float32, device, False)
    capable = not supported_reasons(backend, *inputs, (3, 3))  # e.g. CPU tensors without the interpreter
    rel_bias_attention(*inputs, (3, 3))
    assert calls == ([1] if capable else [])
    # A head dim the backend declines: triton takes d in (16, 32, 64, 128), ext on CUDA d <= 128.
    declined_d = {"triton": 8, "ext": 160 if device.type == "cuda" else None}[backend]
    if declined_d is None:
        return  # ext on the CPU declines no valid input
    inputs, _ = make_inputs(1, 2, (3, 3), declined_d, torch.float32, device, False)
    assert supported_reasons(backend, *inputs, (3, 3))
    rel_bias_attention(*inputs, (3, 3))
    assert calls == ([1] if capable else [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with ~30 GB free: 2**31-element q, k, v, o")
@pytest.mark.parametrize("backend", [b for b in dispatch.usable_backends(OP) if b != "eager"])
def test_offsets_past_32_bits(backend):
    """B * heads * N * d > 2**31: the last batch items must still be right (int64 offsets)."""
    if torch.cuda.mem_get_info()[0] < 30 * 2**30:
        pytest.fail("this GPU has less than 30 GB free for the 32-bit overflow test")
    heads, window, d = 4, (7, 7), 32
    batch = 2**31 // (heads * 49 * d) + 2
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, 49, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    table = torch.randn(table_rows(window), heads, device="cuda", generator=g)
    out = rel_bias_attention(q, k, v, table, window, backend=backend)
    tail = slice(batch - 3, batch)
    expected = rel_bias_attention_reference(q[tail].double(), k[tail].double(), v[tail].double(), table.double(), window)
    assert relative_error(out[tail], expected) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("backend", [b for b in dispatch.usable_backends(OP) if b == "triton"])
@pytest.mark.parametrize("window, d", [((7, 5), 16), ((12, 12), 32)], ids=["7x5-d16", "12x12-d32"])
def test_every_tile_config_of_the_tuning_lists(backend, window, d, device, monkeypatch):
    """Autotuning may pick any config of the lists on a GPU: each must be right. Small windows
    are sent through the tiled backward too, which otherwise only takes larger ones; the
    single-tile backward runs with each launch option it may be given."""
    import triton

    from coatnet_fast.kernels import rel_bias_attention as kernels

    inputs, _ = make_inputs(2, 2, window, d, torch.float32, device, True)
    if refused(backend, inputs, window):
        return
    n, small_n_max = window[0] * window[1], kernels.SMALL_N_MAX
    lists = [(kernels._fwd, kernels._prune(kernels.FWD_CONFIGS, {"N": n}), small_n_max),
             (kernels._bwd_dkdv, kernels._prune(kernels.DKDV_CONFIGS, {"N": n}), 0),
             (kernels._bwd_dq_dbias, kernels._prune(kernels.DQ_DBIAS_CONFIGS, {"N": n}), 0)]
    if n <= small_n_max:
        lists.append((kernels._bwd_small, kernels.SMALL_CONFIGS, small_n_max))
    for kernel, configs, small_n_max in lists:
        monkeypatch.setattr(kernels, "SMALL_N_MAX", small_n_max)
        ran = 0
        for config in configs:
            if isinstance(config, triton.Config):
                config = dict(config.kwargs, num_warps=config.num_warps)
            kernels.FORCED_TILES[kernel] = config
            try:
                check_against_reference(backend, window, d, torch.float32, device, strided=True, batch=3, heads=2)
                ran += 1
            except triton.runtime.errors.OutOfResources:
                # Too much shared memory for this GPU at this dtype: the autotuner skips such a
                # config the same way (it times it as infinite), so it can never be picked.
                pass
            finally:
                kernels.FORCED_TILES.clear()
        assert ran, f"no config of {kernel} fits this device"


class _LaunchLog:
    """Stands in for a Triton kernel (or its autotuned wrapper): records its name per launch."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


def _log_backward_launches(monkeypatch):
    from coatnet_fast.kernels import rel_bias_attention as kernels

    log = []
    for name in ("_bwd_small", "_bwd_delta", "_bwd_dkdv", "_bwd_dq_dbias", "_bias_to_table"):
        monkeypatch.setattr(kernels, name, _LaunchLog(getattr(kernels, name), name, log))
        if hasattr(kernels, name + "_tuned"):
            monkeypatch.setattr(kernels, name + "_tuned", _LaunchLog(getattr(kernels, name + "_tuned"), name, log))
    return log


@pytest.mark.parametrize("backend", [b for b in dispatch.usable_backends(OP) if b == "triton"])
def test_small_windows_take_the_single_tile_backward(backend, device, monkeypatch):
    """Up to SMALL_N_MAX positions one kernel does the backward; past it, the tiled kernels.
    The windows straddle the limit (8x8 = 64 positions, 5x13 = 65), each against float64."""
    from coatnet_fast.kernels import rel_bias_attention as kernels

    assert kernels.SMALL_N_MAX == 64
    log = _log_backward_launches(monkeypatch)
    small, tiled = ["_bwd_small", "_bias_to_table"], ["_bwd_delta", "_bwd_dkdv", "_bwd_dq_dbias", "_bias_to_table"]
    for window, expected in [((8, 8), small), ((4, 4), small), ((5, 13), tiled)]:
        inputs, _ = make_inputs(3, 2, window, 16, torch.float32, device, True)
        if refused(backend, inputs, window):
            return
        log.clear()
        check_against_reference(backend, window, 16, torch.float32, device, strided=True, batch=3, heads=2)
        assert log == expected, window
    # fp32 with d > 64 stays tiled (the single tile would need 128 KB of shared memory on a GPU);
    # half precision at d = 128 takes the single tile.
    for dtype, expected in [(torch.float32, tiled), (torch.float16, small)]:
        log.clear()
        check_against_reference(backend, (4, 4), 128, dtype, device, strided=False, batch=2, heads=1)
        assert log == expected, dtype


@pytest.mark.parametrize("backend", [b for b in dispatch.usable_backends(OP) if b == "triton"])
@pytest.mark.parametrize("window", [(7, 7), (8, 8), (2, 9), (4, 4), (1, 1)], ids=lambda w: f"{w[0]}x{w[1]}")
@pytest.mark.parametrize("path", ["single-tile", "tiled"])
def test_small_windows_through_either_backward(backend, window, path, device, monkeypatch, poison_empty):
    """The same small-window inputs through the single-tile and the tiled backward, each against
    float64 (outputs allocated NaN-filled: an element either path skips shows up)."""
    from coatnet_fast.kernels import rel_bias_attention as kernels

    log = _log_backward_launches(monkeypatch)
    if path == "tiled":
        monkeypatch.setattr(kernels, "SMALL_N_MAX", 0)
    check_against_reference(backend, window, 32, torch.float32, device, strided=True, batch=3, heads=2)
    check_against_reference(backend, window, 16, torch.float16, device, strided=False, batch=2, heads=3)
    if log:  # not refused
        assert ("_bwd_small" in log) == (path == "single-tile")


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
def test_autocast(backend, device):
    """Under autocast q, k, v run in the autocast dtype, the fp32 table stays fp32, and the
    gradients come back to the fp32 inputs in fp32."""
    low = torch.bfloat16 if device.type == "cuda" else torch.float16
    inputs, grad_out = make_inputs(2, 3, (7, 5), 16, torch.float32, device, True)
    with torch.autocast(device.type, dtype=low):
        why = supported_reasons(backend, *inputs, (7, 5))
        if why:
            assert backend != "eager"
            with pytest.raises(BackendUnavailableError):
                rel_bias_attention(*inputs, (7, 5), backend=backend)
            return
        out, grads = run(rel_bias_attention, inputs, grad_out, window=(7, 5), backend=backend)
    assert out.dtype == low
    assert all(g.dtype == torch.float32 for g in grads)
    assert_matches_reference(out, grads, inputs, grad_out, (7, 5), TOLERANCE[low])


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
def test_row_offsets_past_32_bits(backend, device):
    """A view whose row stride fits in int32 but row * stride does not (4 GiB of fp16)."""
    stride = 2**30 + 64
    store = torch.zeros(2 * stride + 16, dtype=torch.float16, device=device)
    q = store.as_strided((1, 1, 3, 16), (0, 0, stride, 1))
    g = torch.Generator().manual_seed(0)
    q.copy_(torch.randn(1, 1, 3, 16, generator=g).half())
    k, v = (torch.randn(1, 1, 3, 16, generator=g).half().to(device) for _ in range(2))
    table = torch.randn(5, 1, generator=g).to(device)
    if refused(backend, [q, k, v, table], (1, 3)):
        return
    out = rel_bias_attention(q, k, v, table, (1, 3), backend=backend)
    expected = rel_bias_attention_reference(q.double(), k.double(), v.double(), table.double(), (1, 3))
    assert relative_error(out, expected) <= TOLERANCE[torch.float16]


@pytest.mark.parametrize("backend", dispatch.usable_backends(OP))
def test_minus_inf_table_entries_mask_pairs(backend, device):
    """-inf in the table masks (query, key) pairs; a key tile masked whole must not give NaN."""
    window = (1, 200)
    inputs, _ = make_inputs(1, 1, window, 16, torch.float32, device, False)
    q, k, v, table = (t.detach() for t in inputs)
    dx = torch.arange(table.shape[0], device=device) - (window[1] - 1)
    table[dx >= 72] = float("-inf")
    if refused(backend, [q, k, v, table], window):
        return
    out = rel_bias_attention(q, k, v, table, window, backend=backend)
    expected = rel_bias_attention_reference(q.double(), k.double(), v.double(), table.double(), window)
    assert torch.isfinite(out).all()
    assert relative_error(out, expected) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", [b for b in dispatch.usable_backends(OP) if b == "triton"])
@pytest.mark.parametrize("small_n_max", [64, 0], ids=["single-tile", "tiled"])
def test_backward_row_offsets_past_32_bits(backend, small_n_max, device, monkeypatch):
    """The gradients of q and do views whose row * stride passes 2**31 (4 GiB of fp16), through
    either backward (a 3-position window takes the single-tile one unless switched off)."""
    from coatnet_fast.kernels import rel_bias_attention as kernels

    monkeypatch.setattr(kernels, "SMALL_N_MAX", small_n_max)
    stride = 2**30 + 64
    store = torch.zeros(2 * stride + 32, dtype=torch.float16, device=device)
    q = store.as_strided((1, 1, 3, 16), (0, 0, stride, 1))
    grad_out = store.as_strided((1, 1, 3, 16), (0, 0, stride, 1), storage_offset=16)
    g = torch.Generator().manual_seed(0)
    q.copy_(torch.randn(1, 1, 3, 16, generator=g).half())
    grad_out.copy_(torch.randn(1, 1, 3, 16, generator=g).half())
    k, v = (torch.randn(1, 1, 3, 16, generator=g).half().to(device) for _ in range(2))
    table = torch.randn(5, 1, generator=g).to(device)
    if refused(backend, [q, k, v, table], (1, 3)):
        return
    inputs = [q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True), table.requires_grad_(True)]
    out, grads = run(rel_bias_attention, inputs, grad_out, window=(1, 3), backend=backend)
    assert_matches_reference(out, grads, inputs, grad_out, (1, 3), TOLERANCE[torch.float16])


@pytest.mark.parametrize("backend", [b for b in dispatch.usable_backends(OP) if b == "triton"])
@pytest.mark.parametrize("window, small_n_max", [((1, 40), 64), ((1, 40), 0), ((1, 200), 64)],
                         ids=["1x40-single-tile", "1x40-tiled", "1x200-tiled"])
def test_minus_inf_table_entries_backward(backend, window, small_n_max, device, monkeypatch):
    """Gradients with -inf table entries (masked pairs) are finite and right, through either
    backward; at 1x200 some query rows see a key tile masked whole."""
    from coatnet_fast.kernels import rel_bias_attention as kernels

    monkeypatch.setattr(kernels, "SMALL_N_MAX", small_n_max)
    inputs, grad_out = make_inputs(2, 2, window, 16, torch.float32, device, False)
    table = inputs[3].detach().clone()
    dx = torch.arange(table.shape[0], device=device) - (window[1] - 1)
    table[dx >= window[1] * 9 // 25] = float("-inf")
    inputs[3] = table.requires_grad_(True)
    if refused(backend, inputs, window):
        return
    out, grads = run(rel_bias_attention, inputs, grad_out, window=window, backend=backend)
    assert_matches_reference(out, grads, inputs, grad_out, window, TOLERANCE[torch.float32], finite=True)


@pytest.mark.parametrize("backend", [b for b in dispatch.usable_backends(OP) if b == "triton"])
@pytest.mark.parametrize("path", ["single-tile", "tiled"])
# The tiled kernels take exp on padded lanes before masking them out: numpy (the interpreter)
# warns of the overflow in values that are then discarded.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_far_negative_scores(backend, path, device, monkeypatch):
    """A table shifted far below zero leaves softmax unchanged, with lse near the shift: padded
    rows and columns of a tile must stay masked there (exp(-lse) would overflow, inf * 0 = NaN)."""
    from coatnet_fast.kernels import rel_bias_attention as kernels

    if path == "tiled":
        monkeypatch.setattr(kernels, "SMALL_N_MAX", 0)
    window = (7, 7)
    for dtype, shift in [(torch.float32, 100.0), (torch.float16, 20.0)]:  # exp(100) > fp32 max, exp(20) > fp16 max
        inputs, grad_out = make_inputs(2, 2, window, 16, dtype, device, False)
        inputs[3] = (inputs[3].detach() - shift).requires_grad_(True)
        if refused(backend, inputs, window):
            return
        out, grads = run(rel_bias_attention, inputs, grad_out, window=window, backend=backend)
        assert_matches_reference(out, grads, inputs, grad_out, window, TOLERANCE[dtype])


@pytest.mark.parametrize("backend", [b for b in dispatch.usable_backends(OP) if b == "triton"])
@pytest.mark.parametrize("window", [(7, 7), (9, 9)], ids=["7x7-single-tile", "9x9-tiled"])
def test_empty_batch(backend, window, device, poison_empty):
    """No batch items: empty gradients, and a table gradient of zeros (no partials to sum)."""
    inputs, _ = make_inputs(0, 2, window, 16, torch.float32, device, False)
    if refused(backend, inputs, window):
        return
    out = rel_bias_attention(*inputs, window, backend=backend)
    grads = torch.autograd.grad(out.sum(), inputs)
    assert out.shape == inputs[0].shape and all(g.shape == t.shape for g, t in zip(grads, inputs))
    assert torch.equal(grads[3], torch.zeros_like(grads[3]))
