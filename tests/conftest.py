"""Shared test set-up.

Triton kernels run on the CPU through Triton's interpreter, which reads TRITON_INTERPRET when
triton is first imported: set it here, before anything imports triton. On a machine with a
GPU the same tests run on CUDA with compiled kernels, and on the CPU too.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Autotuning every test shape would take minutes; the fixed tiles, and every config of the
# tuning lists (test_every_tile_config_of_the_tuning_lists), are tested instead.
os.environ.setdefault("COATNET_FAST_AUTOTUNE", "0")
# Under pytest-xdist (the README's `-n 2`) the workers share the cores: each takes its share of
# torch's threads instead of all of them, so the workers' CPU ops do not oversubscribe the cores.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 comparisons against float64 need TF32 off on GPUs (cuDNN enables it by default)."""
    from coatnet_fast.verify import exact_fp32

    with exact_fp32():
        yield


@pytest.fixture
def poison_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled floating tensors for the test's duration, so
    any output element a kernel forgets to write shows up in the comparison. The C++
    extension allocates in C++, and poisons its outputs under COATNET_FAST_POISON_OUTPUTS=1."""
    monkeypatch.setenv("COATNET_FAST_POISON_OUTPUTS", "1")
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def poisoned_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    monkeypatch.setattr(torch, "empty_like", poisoned_like)


@pytest.fixture
def launch_spy(monkeypatch):
    """spy(module, kernel_name) -> a list that receives each launch's positional arguments while
    the Triton kernel still runs: which tensors a kernel was handed, not just what came out."""
    def spy(module, name):
        kernel, calls = getattr(module, name), []

        class Spy:
            def __getitem__(self, grid):
                launch = kernel[grid]

                def run(*args, **kwargs):
                    calls.append(args)
                    return launch(*args, **kwargs)
                return run

        monkeypatch.setattr(module, name, Spy())
        return calls
    return spy
