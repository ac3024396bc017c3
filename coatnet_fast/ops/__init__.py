"""Functional ops with one contract and several backends ("eager", "triton", "ext", "auto").

The eager backend is the reference every fused backend is tested against.
"""
from .batch_norm_act import batch_norm_act
from .dispatch import AUTO_ORDER, BACKEND_CHOICES, BACKENDS, BackendUnavailableError, usable_backends, why_not
from .dwconv_bn_gelu import dwconv_bn_gelu, dwconv_bn_gelu_pool
from .max_pool2d import max_pool2d
from .rel_bias_attention import rel_bias_attention, relative_position_index

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BACKEND_CHOICES",
    "BackendUnavailableError",
    "batch_norm_act",
    "dwconv_bn_gelu",
    "dwconv_bn_gelu_pool",
    "max_pool2d",
    "rel_bias_attention",
    "relative_position_index",
    "usable_backends",
    "why_not",
]
