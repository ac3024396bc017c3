"""A training or inference step captured once as a CUDA graph and replayed.

The fused ops' kernels beat eager's and torch.compile's on device time, but a call costs a few
hundred microseconds of host work (Python, autograd, Triton's launcher; bench/NOTES.md), so a
CoAtNet step on the ``"triton"`` backend waits on the host. A CUDA graph records every kernel of
a step once; a replay launches them all with one call, whatever the Python around them cost.
This is what ``torch.compile(mode="reduce-overhead")`` does for compiled graphs, here for the
eager module tree (the fused ops are plain kernel launches and capture as they are).

``CapturedStep(fn, device)`` runs ``fn`` eagerly for its first ``eager_calls`` calls, on a side
stream (Triton compiles and autotunes there, AdamW creates its state, cuBLAS its workspaces:
none of that may happen inside a capture), captures the next call and replays it, and from then
on replays. Every call is one real step: a capture only records, so the capturing call replays
once before it returns. ``fn`` must read its inputs from tensors that the caller refills in
place (``copy_``) and must not wait on the host: no ``.item()``, no GradScaler (its skipped
steps read a flag on the host), no ``BatchNorm2d(momentum=None)`` (its factor is read from
``num_batches_tracked``), no DistributedDataParallel (it needs its own warm-up and a static
graph). The outputs of a replayed call are the same tensors every time, overwritten by the
next call.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

# What must have happened before a capture: Triton's compilation and autotuning, the
# optimizer's lazy state, library workspaces. PyTorch's make_graphed_callables warms up 3 times.
DEFAULT_EAGER_CALLS = 3

CAPTURE_HINT = ("a step captured as a CUDA graph must not wait on the host: no .item() or .tolist(), "
                "no GradScaler (fp16), no BatchNorm2d(momentum=None), no host-to-device copy of "
                "pageable memory, and nothing compiled or autotuned for the first time")


def check_device(device) -> torch.device:
    """``device`` as a torch.device with its index (``"cuda"`` is the current device: tensors
    report ``cuda:0``, and comparisons with a bare ``cuda`` fail), or ValueError when it cannot
    run CUDA graphs."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device; got device {str(device)!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"CUDA graphs need a CUDA device, and torch {torch.__version__} sees none")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class CapturedStep:
    """``fn`` eagerly for ``eager_calls`` calls, then captured and replayed (see the module doc).

    Args:
        fn: one step, reading its inputs from tensors the caller refills in place; returns the
            tensors the caller reads (loss, logits: anything, kept as the graph's outputs).
        device: the CUDA device the step runs on.
        eager_calls: calls run eagerly before the capture (at least 1).
    """

    def __init__(self, fn: Callable[[], Any], device, eager_calls: int = DEFAULT_EAGER_CALLS):
        if not callable(fn):
            raise TypeError(f"fn must be callable; got {type(fn).__name__}")
        if isinstance(eager_calls, bool) or not isinstance(eager_calls, int) or eager_calls < 1:
            raise ValueError(f"eager_calls must be an integer >= 1 (Triton compiles, autotuning and the "
                             f"optimizer's state must come before the capture); got {eager_calls!r}")
        self.device = check_device(device)
        self._fn = fn
        self._eager_left = eager_calls
        self._side: Optional[torch.cuda.Stream] = None
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._outputs: Any = None

    @property
    def captured(self) -> bool:
        """Whether the step has been captured (every later call is a replay)."""
        return self._graph is not None

    def __call__(self) -> Any:
        if self._graph is not None:
            self._graph.replay()
            return self._outputs
        if self._eager_left > 0:
            self._eager_left -= 1
            return self._eager()
        return self._capture()

    def _eager(self) -> Any:
        # On a side stream, as PyTorch's capture recipe warms up: what the capture's stream
        # will use (allocator pools, library handles) is set up off the default stream.
        current = torch.cuda.current_stream(self.device)
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            outputs = self._fn()
        current.wait_stream(self._side)
        return outputs

    def _capture(self) -> Any:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(self.device)
        try:
            # thread_local: only this thread's calls may break the capture; the default ("global")
            # would also fail on a DataLoader's pin-memory thread prefetching the next batch.
            with torch.cuda.device(self.device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self._fn()
        except Exception as e:
            # torch.cuda.graph leaves its capture stream current when ending the capture raises.
            torch.cuda.set_stream(stream)
            raise RuntimeError(f"capturing the step as a CUDA graph failed ({type(e).__name__}: {e}); "
                               f"{CAPTURE_HINT}") from e
        self._graph, self._outputs = graph, outputs
        graph.replay()  # the capture only recorded this call's step: run it
        return outputs
