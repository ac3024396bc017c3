"""The backend table: which implementation of each fused op can run which inputs.

Every op registers one entry per backend. An entry answers two questions, as xformers'
dispatcher does: can this backend run here at all (``available``, a property of the
installation and the machine), and if so, what stops it taking these particular inputs
(``reasons``, a list of sentences; empty means capable). ``"auto"`` takes the first capable
backend in ``AUTO_ORDER`` and ends at eager, which takes every valid input; a backend the
caller names either runs or raises with its reasons, never falling back behind their back.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

BACKENDS: tuple = ("eager", "triton", "ext")
BACKEND_CHOICES: tuple = BACKENDS + ("auto",)
# Fastest first; eager closes the list because it accepts every input that passes validation.
AUTO_ORDER: tuple = ("triton", "ext", "eager")


class BackendUnavailableError(RuntimeError):
    """A backend cannot run an op, here or on these inputs; ``reasons`` maps backend -> reasons."""

    def __init__(self, op: str, reasons: Mapping[str, Sequence[str]]):
        self.op = op
        self.reasons = {name: list(why) for name, why in reasons.items()}
        lines = [f"{op}: no requested backend can run these inputs:"]
        for name, why in self.reasons.items():
            lines.append(f"  {name}: " + "; ".join(why))
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class OpBackend:
    """One op on one backend.

    ``impl`` is the callable (same signature as the public op, without ``backend``), or None
    where this build has no implementation. ``available()`` returns None when the backend can
    run on this installation and machine, else the reason it cannot. ``reasons(**inputs)``
    lists why it rejects particular inputs. ``prepare()``, when given, readies the backend
    ahead of the first call (the extension builds or loads there), so that a model switched
    to it does not stall, or get traced by torch.compile, halfway through a forward.
    """

    op: str
    backend: str
    impl: Optional[Callable[..., Any]]
    available: Callable[[], Optional[str]]
    reasons: Callable[..., List[str]]
    prepare: Optional[Callable[[], Any]] = None


_TABLE: Dict[str, Dict[str, OpBackend]] = {}


def _no_reasons(**_inputs) -> List[str]:
    return []


def _always() -> Optional[str]:
    return None


def register(
    op: str,
    backend: str,
    impl: Optional[Callable[..., Any]],
    *,
    available: Callable[[], Optional[str]] = _always,
    reasons: Callable[..., List[str]] = _no_reasons,
    prepare: Optional[Callable[[], Any]] = None,
) -> None:
    """Add or replace the entry for ``op`` on ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    _TABLE.setdefault(op, {})[backend] = OpBackend(op, backend, impl, available, reasons, prepare)



def interpreting() -> bool:
    """Triton kernels run on CPU tensors through Triton's interpreter (set before import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Looked up once at import (find_spec locates triton without importing it), so that
# torch.compile traces a constant here.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> Optional[str]:
    """Whether Triton kernels can run on this installation and machine (None: yes)."""
    import torch

    if not _TRITON_INSTALLED:
        return "triton is not installed"
    if not torch.cuda.is_available() and not interpreting():
        return "needs a CUDA GPU, or TRITON_INTERPRET=1 (set before triton is imported) for the CPU interpreter"
    return None


def triton_device_reasons(t) -> List[str]:
    """Triton kernels take CUDA tensors, and CPU tensors only under the interpreter."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
        return []
    return [f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); got {t.device}"]


def eager_fast_path(*tensors) -> bool:
    """Whether a fused op may skip its torch.library custom op and run its autograd.Function.

    A custom op costs about 40 us of Python per call in eager mode on the 2-core development
    CPU (argument normalisation, the Python autograd wrapper, a redispatch), on top of the
    kernel launch; a forward and backward pays it twice or more (bench/bench_dispatch_overhead.py).
    That is a sizeable share of a window attention at N=49 (0.20 ms forward on an H200, host
    time included), so eager calls take the plain autograd.Function over the same launchers.
    The custom op stays the path torch.compile, export and fake or subclass tensors see (they
    need its schema and fake kernel)."""
    import torch

    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if torch._C._len_torch_dispatch_stack():  # make_fx, FakeTensorMode, FlopCounterMode: they need the op
        return False
    plain = (torch.Tensor, torch.nn.Parameter)
    return all(type(t) in plain and t.device.type != "meta" for t in tensors)


def no_double_backward(op: str) -> None:
    """Called first in a fused op's autograd.Function backward: grad mode is on there only when
    the caller asked for a graph of the gradients (create_graph=True), which the fused kernels
    cannot give. Raising beats returning gradients that silently carry no graph."""
    import torch

    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: the fused backends have no double backward (create_graph=True); "
                           "use backend='eager' for higher-order gradients")


def implemented(op: str, backend: str) -> bool:
    """Whether ``backend`` has an implementation of ``op`` in this build at all (whether it can
    run here is ``why_not``'s question)."""
    e = _TABLE.get(op, {}).get(backend)
    return e is not None and e.impl is not None


def ops() -> List[str]:
    return sorted(_TABLE)


def entry(op: str, backend: str) -> OpBackend:
    if op not in _TABLE:
        raise ValueError(f"op must be one of {ops()}; got {op!r}")
    check_backend_name(backend, allow_auto=False)
    return _TABLE[op][backend]


def check_backend_name(backend: Any, *, allow_auto: bool = True) -> str:
    choices = BACKEND_CHOICES if allow_auto else BACKENDS
    if not isinstance(backend, str) or backend not in choices:
        raise ValueError(f"backend must be one of {choices}; got {backend!r}")
    return backend


def why_not(op: str, backend: str, inputs: Optional[Mapping[str, Any]] = None) -> List[str]:
    """Reasons ``backend`` cannot run ``op`` (on ``inputs`` when given); empty when it can."""
    e = entry(op, backend)
    unavailable = e.available()
    if unavailable is not None or e.impl is None:
        return [unavailable or "no implementation registered"]
    return list(e.reasons(**inputs)) if inputs is not None else []


def select(op: str, backend: str, inputs: Mapping[str, Any]) -> OpBackend:
    """The entry that will run ``op`` on ``inputs`` for the requested ``backend``."""
    check_backend_name(backend)
    if backend != "auto":
        why = why_not(op, backend, inputs)
        if why:
            raise BackendUnavailableError(op, {backend: why})
        return _TABLE[op][backend]
    rejected = {}
    for name in AUTO_ORDER:
        why = why_not(op, name, inputs)
        if not why:
            return _TABLE[op][name]
        rejected[name] = why
    raise BackendUnavailableError(op, rejected)


def prepare(op: str, backend: str) -> None:
    """Ready ``backend`` for ``op`` (for "auto": the first backend usable here)."""
    names = AUTO_ORDER if backend == "auto" else (backend,)
    for name in names:
        if not why_not(op, name):
            e = _TABLE[op][name]
            if e.prepare is not None:
                e.prepare()
            return


def usable_backends(op: str) -> List[str]:
    """Backends that can run ``op`` on this installation and machine (inputs aside)."""
    return [name for name in BACKENDS if not why_not(op, name)]
