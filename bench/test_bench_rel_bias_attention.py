"""pytest-benchmark cases for rel_bias_attention; the script beside it does the full sweep."""
import pytest
import torch

from bench_rel_bias_attention import make_inputs, provider_fns

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# CoAtNet-0 S3 at 224x224 (14x14 window, 12 heads) in bf16 on a GPU; a smoke size on a CPU.
BATCH, SIDE, HEADS, DTYPE = (128, 14, 12, torch.bfloat16) if DEVICE.type == "cuda" else (2, 7, 2, torch.float32)
PROVIDERS = list(provider_fns((SIDE, SIDE), DEVICE))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_rel_bias_attention(benchmark, provider, mode):
    fn = provider_fns((SIDE, SIDE), DEVICE)[provider]
    inputs, grad_out = make_inputs(BATCH, HEADS, SIDE, 32, DTYPE, DEVICE)

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
    benchmark.extra_info.update(provider=provider, mode=mode, batch=BATCH, window=SIDE, heads=HEADS, dtype=str(DTYPE))
    benchmark(step)
