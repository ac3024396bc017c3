"""The model family: one config table, timm-style constructors and look-ups."""
from __future__ import annotations

from typing import Dict, List

from .coatnet import CoAtNet


def _paper(num_blocks, channels) -> dict:
    # The paper's variants use 32-wide heads, as many as the stage width allows.
    return dict(num_blocks=num_blocks, channels=channels, heads=tuple(c // 32 for c in channels[1:]), dim_head=32)


MODEL_CONFIGS: Dict[str, dict] = {
    # The blog's model exactly: CoAtNet-0's layout with 8 heads in every stage.
    "seed": dict(num_blocks=(2, 2, 3, 5, 2), channels=(64, 96, 192, 384, 768), heads=8, dim_head=32),
    "coatnet_0": _paper((2, 2, 3, 5, 2), (64, 96, 192, 384, 768)),
    "coatnet_1": _paper((2, 2, 6, 14, 2), (64, 96, 192, 384, 768)),
    "coatnet_2": _paper((2, 2, 6, 14, 2), (128, 128, 256, 512, 1024)),
    "coatnet_3": _paper((2, 2, 6, 14, 2), (192, 192, 384, 768, 1536)),
    "coatnet_4": _paper((2, 2, 12, 28, 2), (192, 192, 384, 768, 1536)),
}


def list_models() -> List[str]:
    return sorted(MODEL_CONFIGS)


def create_model(name: str, **overrides) -> CoAtNet:
    """Build a named variant; keyword arguments override its config or set CoAtNet's others."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    return CoAtNet(**{**MODEL_CONFIGS[name], **overrides})


def coatnet_0(**overrides) -> CoAtNet:
    return create_model("coatnet_0", **overrides)


def coatnet_1(**overrides) -> CoAtNet:
    return create_model("coatnet_1", **overrides)


def coatnet_2(**overrides) -> CoAtNet:
    return create_model("coatnet_2", **overrides)


def coatnet_3(**overrides) -> CoAtNet:
    return create_model("coatnet_3", **overrides)


def coatnet_4(**overrides) -> CoAtNet:
    return create_model("coatnet_4", **overrides)
