"""Argument checks shared by the ops: each failure names the argument and what was expected."""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch


def tensor(name: str, value: Any, *, dim: int, shape_doc: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}; got {type(value).__name__}")
    if value.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims {shape_doc}; got shape {tuple(value.shape)}")
    return value


def floating(name: str, value: torch.Tensor) -> None:
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {value.dtype}")


def same_device(names_values: Sequence[tuple]) -> None:
    first_name, first = names_values[0]
    for name, value in names_values[1:]:
        if value.device != first.device:
            raise ValueError(
                f"{name} is on {value.device} but {first_name} is on {first.device}; "
                "all tensors must be on one device"
            )


def master_dtype(name: str, value: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    """Parameters may be the activations' dtype or an fp32 master copy (what autocast feeds)."""
    if value.dtype not in (reference.dtype, torch.float32):
        raise TypeError(
            f"{name} must have dtype {reference.dtype} (like {reference_name}) or torch.float32; "
            f"got {value.dtype}"
        )


def positive_int_pair(name: str, value: Any) -> tuple:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{name} must be a pair of positive ints (H, W); got {value!r}")
    return int(value[0]), int(value[1])


def positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return float(value)
