"""pytest-benchmark cases for rel_bias_attention; the script beside it does the full sweep.

Each provider is switched to the backward path its name says (``use_backward_path``, as the
script does), checked once against the eager provider in float64 on the same inputs (output
and the four gradients), and then timed; the switch is put back afterwards.
"""
import pytest
import torch

from bench_rel_bias_attention import make_inputs, provider_fns, use_backward_path

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# CoAtNet-0 S3 at 224x224 (14x14 window, 12 heads) in bf16 on a GPU; a smoke size on a CPU.
BATCH, SIDE, HEADS, DTYPE = (128, 14, 12, torch.bfloat16) if DEVICE.type == "cuda" else (2, 7, 2, torch.float32)
HEAD_DIM = 32
PROVIDERS = list(provider_fns((SIDE, SIDE), DEVICE))
# Relative error of the output and each gradient against float64 (the script's tolerances).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _forward_backward(fn, inputs, grad_out):
    out = fn(*inputs)
    return (out,) + torch.autograd.grad(out, inputs, grad_out)


class _Launches:
    """Records (kernel name, launch keyword arguments) of the backward kernels by wrapping each
    kernel object's ``run`` (what both ``kernel[grid](...)`` and the autotuner call)."""

    NAMES = ("_bwd_small", "_bwd_dq_dbias")

    def __init__(self, monkeypatch):
        from coatnet_fast.kernels import rel_bias_attention as kernels

        self.log = []
        for name in self.NAMES:
            kernel = getattr(kernels, name)
            monkeypatch.setattr(kernel, "run", self._recording(name, kernel.run), raising=False)

    def _recording(self, name, run):
        def wrapped(*args, **kwargs):
            self.log.append((name, kwargs))
            return run(*args, **kwargs)
        return wrapped


def _check_backward_path(provider, launches):
    """The launches of a checked fwd+bwd match the provider's name: ``triton@tiled`` takes the
    tiled kernels, ``triton@small-8w`` the single-tile one at 8 warps, ``triton`` the default."""
    import triton

    from coatnet_fast.kernels import rel_bias_attention as kernels

    names = {name for name, _ in launches.log}  # a set: on a GPU the autotuner launches each config
    warps = {kwargs["num_warps"] for name, kwargs in launches.log if name == "_bwd_small"}
    n = SIDE * SIDE
    if provider == "triton@tiled":
        assert names == {"_bwd_dq_dbias"}, launches.log
    elif provider == "triton@small-8w":
        assert names == {"_bwd_small"} and warps == {8}, launches.log
        # fp32 (the CPU size) defaults to 8 warps too: the forced options must be what is in effect.
        assert kernels.FORCED_TILES.get(kernels._bwd_small) == dict(num_warps=8, num_stages=1)
    else:  # the default: the single-tile kernel for small windows, at its own launch options
        assert kernels._bwd_small not in kernels.FORCED_TILES
        assert names == ({"_bwd_small"} if n <= kernels.SMALL_N_MAX else {"_bwd_dq_dbias"}), launches.log
        if warps:
            block = max(16, triton.next_power_of_2(n))
            assert warps == {kernels._small_config(block, HEAD_DIM, DTYPE == torch.float32)["num_warps"]}, launches.log


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_rel_bias_attention(benchmark, provider, mode, monkeypatch):
    fns = provider_fns((SIDE, SIDE), DEVICE)
    fn = fns[provider]
    inputs, grad_out = make_inputs(BATCH, HEADS, SIDE, HEAD_DIM, DTYPE, DEVICE)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    expected = _forward_backward(fns["eager"], ref_inputs, grad_out.double())

    use_backward_path(provider)
    try:
        if provider.startswith("triton"):
            launches = _Launches(monkeypatch)
            actual = _forward_backward(fn, inputs, grad_out)
            _check_backward_path(provider, launches)
            monkeypatch.undo()  # the launches are not recorded while timing
        else:
            actual = _forward_backward(fn, inputs, grad_out)
        for name, a, b in zip(("out", "dq", "dk", "dv", "dtable"), actual, expected):
            assert a.shape == b.shape, name
            err = ((a.double() - b).norm() / b.norm()).item()
            assert err <= TOLERANCE[DTYPE], f"{provider} {name}: relative error {err:.2e} against eager float64"

        def step():
            if mode == "fwd":
                with torch.no_grad():
                    out = fn(*inputs)
            else:
                out = fn(*inputs)
                torch.autograd.grad(out, inputs, grad_out)
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            return out

        step()  # compile / autotune outside the timing
        benchmark.extra_info.update(provider=provider, mode=mode, batch=BATCH, window=SIDE, heads=HEADS,
                                    dtype=str(DTYPE))
        benchmark(step)
    finally:
        use_backward_path("triton")  # the defaults back: SMALL_N_MAX, no forced _bwd_small launch options
