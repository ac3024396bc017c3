"""rel_bias_attention: every usable backend against an independent float64 computation."""
import importlib
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
def test_windows_of_one_size_and_other_shapes_in_one_process(backend, device, monkeypatch):
    """The Triton kernels compile the window in (N, H, W are compile-time constants, and the
    autotuner keys on N): 7x5, 5x7 and 35x1 share N = 35, and each must still get its own bias
    offsets, forward and backward, when run one after another (on a GPU, through the tiled
    backward too)."""
    from coatnet_fast.kernels import rel_bias_attention as kernels

    for small_n_max in (kernels.SMALL_N_MAX, 0):
        monkeypatch.setattr(kernels, "SMALL_N_MAX", small_n_max)
        for window in [(7, 5), (5, 7), (35, 1), (7, 5)]:
            check_against_reference(backend, window, 16, torch.float32, device, strided=True)


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


def test_an_index_first_built_in_inference_mode_still_trains(device):
    """The eager formulation caches each window's index; built first inside inference_mode it
    must not become an inference tensor, which every later training call would then refuse
    ("Inference tensors cannot be saved for backward")."""
    importlib.import_module("coatnet_fast.ops.rel_bias_attention")._cached_index.cache_clear()
    inputs, grad_out = make_inputs(1, 2, (2, 3), 8, torch.float64, device, False)
    with torch.inference_mode():
        rel_bias_attention(*inputs, (2, 3), backend="eager")
    out, grads = run(rel_bias_attention, inputs, grad_out, window=(2, 3), backend="eager")
    assert_matches_reference(out, grads, inputs, grad_out, (2, 3), TOLERANCE[torch.float64])


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


def test_fixed_gpu_tiles_take_every_key_of_a_window_of_up_to_256_in_one_tile():
    """Without autotuning a GPU runs _bwd_dq_dbias with one key tile spanning windows of up to
    256 positions (dq sums in registers, no fp32 scratch) at head dims up to 64, and 32x32 tiles
    past either; those fixed tiles are ones the tuning list holds (so the every-config test
    above covers them)."""
    from coatnet_fast.kernels import rel_bias_attention as kernels

    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    listed = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in kernels.DQ_DBIAS_CONFIGS}
    for n, d, dtype, expected in [(196, 32, bf16, (16, 256, 8)), (144, 64, torch.float16, (16, 256, 8)),
                                  (100, 32, bf16, (16, 128, 8)), (256, 32, bf16, (16, 256, 8)),
                                  (576, 32, bf16, (32, 32, 8)),
                                  # spills (d = 16, 128) or too much shared memory (fp32: 152 KB at d = 64)
                                  (196, 128, bf16, (32, 32, 8)), (196, 16, bf16, (32, 32, 8)),
                                  (196, 64, torch.float32, (32, 32, 8))]:
        tiles = kernels._fixed(kernels._bwd_dq_dbias, n, d, cuda, dtype)
        assert (tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["num_warps"]) == expected, (n, d, dtype, tiles)
        assert expected in listed


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


# --- d(table) partials, determinism, a 32x32 window, the in-kernel bias gather ----------------

def _fake_gpu(monkeypatch, sms):
    """torch.cuda.get_device_properties as on a GPU with ``sms`` SMs (the batch-group helpers
    read only the SM count), so that the GPU sizing is checked on any machine."""
    import types

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(multi_processor_count=sms))


@pytest.mark.parametrize("sms", [None, 1, 78, 132], ids=lambda s: "cpu" if s is None else f"gpu-{s}sm")
def test_dtable_partials_are_bounded_independent_of_batch(sms, monkeypatch):
    """The [groups, heads, N, N] d(bias) partials of both backward paths: ``groups`` comes from
    the machine (and the window), not the batch: at most a few programs per SM (two on the
    CPU) at any batch, the same at 2**20 and 2**24; a batch-sized buffer (groups = batch) fails."""
    from coatnet_fast.kernels import rel_bias_attention as kernels

    if sms is None:
        device, per_machine = torch.device("cpu"), 2
    else:
        _fake_gpu(monkeypatch, sms)
        device, per_machine = torch.device("cuda"), 8 * sms
    for heads in (1, 2, 12, 32):
        for n in (1, 49, 196, 1024):
            sizes = {"_small_groups": lambda b: kernels._small_groups(b, heads, device),
                     "_batch_groups": lambda b: kernels._batch_groups(b, heads, n, device)}
            for name, groups in sizes.items():
                where = f"{name} heads={heads} N={n} sms={sms}"
                assert groups(0) == 0, where  # an empty batch: no partials
                for batch in (1, 2, 3, 7, 64, 100, 512, 4096, 2**16, 2**20, 2**24):
                    assert 1 <= groups(batch) <= min(batch, per_machine), (where, batch)
                assert groups(2**20) == groups(2**24), where


@pytest.mark.parametrize("backend", [b for b in dispatch.usable_backends(OP) if b == "triton"])
@pytest.mark.parametrize("path", ["single-tile", "tiled"])
def test_dtable_partials_do_not_grow_with_batch(backend, path, device, monkeypatch):
    """The backward's allocations with a trailing [N, N]: only the d(bias) partials, [groups,
    heads, N, N] with the helpers' group count (on the CPU the same two groups at batch 2 and
    16); the gradients against float64 at both sizes. torch.empty / zeros / full / ones and their
    _like forms are recorded while the backward runs."""
    from coatnet_fast.kernels import rel_bias_attention as kernels

    if path == "tiled":
        monkeypatch.setattr(kernels, "SMALL_N_MAX", 0)
    window, heads, d = (4, 5), 2, 16
    n = window[0] * window[1]
    leading = {}
    for batch in (2, 16):
        inputs, grad_out = make_inputs(batch, heads, window, d, torch.float32, device, strided=True, seed=batch)
        if refused(backend, inputs, window):
            return
        out = rel_bias_attention(*inputs, window, backend=backend)
        shapes = []
        with monkeypatch.context() as m:
            for factory in ("empty", "zeros", "full", "ones", "empty_like", "zeros_like", "full_like", "ones_like",
                            "empty_strided"):
                real = getattr(torch, factory)

                def recording(*args, _real=real, **kwargs):
                    t = _real(*args, **kwargs)
                    shapes.append(tuple(t.shape))
                    return t

                m.setattr(torch, factory, recording)
            grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
        assert_matches_reference(out, grads, inputs, grad_out, window, TOLERANCE[torch.float32])
        square = [s for s in shapes if s[-2:] == (n, n)]
        groups = (kernels._small_groups(batch, heads, device) if path == "single-tile"
                  else kernels._batch_groups(batch, heads, n, device))
        assert square == [(groups, heads, n, n)], (batch, shapes)
        leading[batch] = square[0][0]
    if device.type == "cpu":
        assert leading[2] == leading[16] == 2, leading


def _atomics_in(source: str) -> list:
    """The ``atomic_*`` names (tl.atomic_add, atomic_cas, an imported atomic_max, ...) in Python source."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        names = ([node.attr] if isinstance(node, ast.Attribute) else [node.id] if isinstance(node, ast.Name)
                 else [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else [])
        found += [f"line {node.lineno}: {name}" for name in names if name.startswith("atomic_")]
    return found


def test_no_kernel_uses_atomics():
    """Bit-identical gradients across runs need a fixed summation order: no kernel under
    kernels/ may use tl.atomic_* (the interpreter runs programs one by one, so the run-twice
    test cannot see a race on the CPU). Every file is parsed, and each @triton.jit function's
    own source too; the checker itself must flag an atomic."""
    import importlib
    import inspect
    import pkgutil
    from pathlib import Path

    import triton
    from triton.runtime.interpreter import InterpretedFunction

    import coatnet_fast.kernels as package

    assert _atomics_in("@triton.jit\ndef k(P):\n    tl.atomic_add(P, 1.0)\n") == ["line 3: atomic_add"]
    assert _atomics_in("from triton.language import atomic_max as m\n") == ["line 1: atomic_max"]
    files = sorted(Path(package.__path__[0]).glob("*.py"))
    assert "rel_bias_attention.py" in {f.name for f in files}
    for f in files:
        text = f.read_text()
        assert _atomics_in(text) == [] and "atomic_" not in text, f
    kernels = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, (triton.runtime.JITFunction, InterpretedFunction)):
                kernels.append(f"{info.name}.{name}")
                source = inspect.cleandoc("\n" + inspect.getsource(obj.fn))
                assert _atomics_in(source) == [], kernels[-1]
    assert {"rel_bias_attention._fwd", "rel_bias_attention._bwd_small", "rel_bias_attention._bwd_dq_dbias",
            "rel_bias_attention._bias_to_table"} <= set(kernels), kernels


def test_deterministic_mode_switches_autotuning_off(monkeypatch):
    """Autotuning (on GPUs, COATNET_FAST_AUTOTUNE unset) picks tiles by a timing race, and the
    tiles set the summation order: under torch.use_deterministic_algorithms(True) it is off and
    the tiles are the fixed ones, otherwise on. A CUDA stand-in (only ``.device`` and ``.dtype``
    are read), so this runs on any machine; the global flag is put back."""
    import types

    from coatnet_fast.kernels import rel_bias_attention as kernels

    monkeypatch.setenv("COATNET_FAST_AUTOTUNE", "1")
    on_gpu = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert kernels.autotuning(on_gpu) is True
        assert kernels._pinned(kernels._bwd_dq_dbias, 196, 32, on_gpu) is None  # the autotuner picks
        torch.use_deterministic_algorithms(True)
        assert kernels.autotuning(on_gpu) is False
        assert kernels._pinned(kernels._bwd_dq_dbias, 196, 32, on_gpu) == kernels._fixed(
            kernels._bwd_dq_dbias, 196, 32, torch.device("cuda"), torch.bfloat16)
        torch.use_deterministic_algorithms(True, warn_only=True)
        assert kernels.autotuning(on_gpu) is False
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    restored = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    assert restored == saved
    assert kernels.autotuning(torch.zeros(1)) is False  # CPU tensors: the interpreter, never tuned
    monkeypatch.setenv("COATNET_FAST_AUTOTUNE", "0")
    assert kernels.autotuning(on_gpu) is False


def _float64_attention(q, k, v, table, window):
    """softmax(q k^T / sqrt(d) + bias) v in float64, the relative index built by broadcasting
    (relative_index_by_loops takes seconds at N = 1024)."""
    height, width = window
    pos = torch.arange(height * width)
    y, x = pos // width, pos % width
    index = (y[:, None] - y[None, :] + height - 1) * (2 * width - 1) + (x[:, None] - x[None, :] + width - 1)
    q, k, v, table = (t.detach().double().cpu() for t in (q, k, v, table))
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + table[index].permute(2, 0, 1)
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("backend", [b for b in dispatch.usable_backends(OP) if b == "triton"])
def test_32x32_window_forward(backend, device):
    """N = 1024 (a 32x32 window: 16 query tiles by 8 key tiles on the CPU) against float64.
    The backward at this size takes ~18 s under the interpreter (14 s of it _bias_to_table),
    too long for the CPU suite; test_above_one_key_tile covers the tiled backward at 24x24."""
    window = (32, 32)
    inputs, _ = make_inputs(1, 1, window, 16, torch.float32, device, strided=True, seed=3)
    if refused(backend, inputs, window):
        return
    with torch.no_grad():
        out = rel_bias_attention(*inputs, window, backend=backend)
    err = relative_error(out.cpu(), _float64_attention(*inputs, window))
    assert err <= TOLERANCE[torch.float32], err




class _TensorOps:
    """A TorchDispatchMode log of every aten op run and the bytes of the largest tensor it
    returns. Factory calls (torch.empty, ...) and copies go through it too (under the
    interpreter, also its byte-wise host staging of the kernel arguments); a kernel's loads and
    stores are not torch ops."""

    GATHERS = ("index", "_unsafe_index", "index_select", "gather", "take", "embedding", "take_along_dim")

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        log = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                log.ops.append(func.overloadpacket.__name__)
                log.nbytes.append(max([t.numel() * t.element_size() for t in tree_leaves(out)
                                       if isinstance(t, torch.Tensor)], default=0))
                return out

        self.mode, self.ops, self.nbytes = Mode(), [], []

    def gathers(self):
        return [op for op in self.ops if op in self.GATHERS]

    def created_at_least(self, nbytes):
        return [(op, n) for op, n in zip(self.ops, self.nbytes) if n >= nbytes]


@pytest.mark.parametrize("backend", [b for b in dispatch.usable_backends(OP) if b == "triton"])
def test_triton_forward_gathers_the_bias_in_the_kernel(backend, device, monkeypatch):
    """The forward reads table[offset(i, j), h] inside the kernel: no aten index / gather /
    index_select / embedding op runs and no tensor as large as a [heads, N, N] bias even in
    half precision is made (q, k, v, o are smaller at d = 16, batch 1). Checked through the autograd.Function
    eager path (a dispatch mode would otherwise switch it to the custom op, whose body the mode
    does not see) and through the launcher the custom op runs; the same check on the eager
    backend must see its gather, or it proves nothing."""
    from coatnet_fast.kernels import rel_bias_attention as kernels

    window, heads, d = (7, 7), 2, 16
    n = window[0] * window[1]
    inputs, _ = make_inputs(1, heads, window, d, torch.float32, device, strided=False, seed=7)
    if refused(backend, inputs, window):
        return
    expected = _float64_attention(*inputs, window)
    monkeypatch.setattr(dispatch, "eager_fast_path", lambda *tensors: True)  # as in eager use, without a mode
    for name, forward in [
        ("op", lambda q, k, v, t: rel_bias_attention(q, k, v, t, window, backend=backend)),
        ("launcher", lambda q, k, v, t: kernels.rel_bias_attention_fwd(q, k, v, t, *window, d ** -0.5)[0]),
    ]:
        log = _TensorOps()
        with log.mode:
            out = forward(*inputs)
        assert "empty" in log.ops, (name, log.ops)  # the mode sees the launcher's allocations
        assert log.gathers() == [], (name, log.ops)
        assert log.created_at_least(heads * n * n * 2) == [], (name, log.ops, log.nbytes)
        assert relative_error(out.detach().cpu(), expected) <= TOLERANCE[torch.float32], name

    log = _TensorOps()
    with log.mode:
        rel_bias_attention(*inputs, window, backend="eager")
    assert "index_select" in log.gathers(), log.ops
    assert ("index_select", heads * n * n * 4) in log.created_at_least(heads * n * n * 2), log.ops


def test_autotuned_pick_is_reused_without_the_autotuner(device, monkeypatch):
    """Once the autotuner has picked a forward tile for a key (N, d, the tensors' dtypes), later
    calls launch the kernel with that pick directly, skipping the autotuner's per-call key
    building. An autotuner stand-in (the interpreter does not autotune) picks a tile, records
    its runs and sets ``best_config`` as Triton's does; the second call must not reach it, must
    launch the kernel itself, and must give the same output, which matches float64."""
    import triton

    from coatnet_fast.kernels import rel_bias_attention as kernels

    q, k, v, table = (t.detach() for t in make_inputs(2, 2, (3, 4), 16, torch.float32, device, strided=False)[0])
    if supported_reasons("triton", q, k, v, table, (3, 4)):
        return
    monkeypatch.setattr(kernels, "TUNED_CONFIGS", {})
    monkeypatch.setattr(kernels, "autotuning", lambda t: True)
    pick = triton.Config(dict(BLOCK_M=16, BLOCK_N=16), num_warps=4, num_stages=2)
    log = []

    class Autotuner:
        best_config = None

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                log.append("autotuner")
                self.best_config = pick
                return kernels._fwd[grid(pick.kwargs)](*args, **kwargs, **pick.all_kwargs())
            return run

    monkeypatch.setattr(kernels, "_fwd_tuned", Autotuner())
    monkeypatch.setattr(kernels, "_fwd", _LaunchLog(kernels._fwd, "kernel", log))
    with torch.no_grad():
        first = rel_bias_attention(q, k, v, table, (3, 4), backend="triton")
        second = rel_bias_attention(q, k, v, table, (3, 4), backend="triton")
    assert log == ["autotuner", "kernel", "kernel"], log  # the stand-in's own launch, then the direct one
    assert torch.equal(first, second)
    expected = rel_bias_attention_reference(q.double(), k.double(), v.double(), table.double(), (3, 4))
    assert relative_error(second, expected) < TOLERANCE[torch.float32]
    assert list(kernels.TUNED_CONFIGS.values()) == [pick.all_kwargs()]
