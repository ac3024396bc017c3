"""coatnet-fast: a seed-exact reference CoAtNet in PyTorch, with fused kernels behind the same modules.

Importing the package compiles nothing, imports no Triton and does not initialise CUDA.
"""
from . import _paths

_paths.install_checkout_finder()

from . import ops  # noqa: E402
from .models import (  # noqa: E402
    MODEL_CONFIGS,
    CoAtNet,
    coatnet_0,
    coatnet_1,
    coatnet_2,
    coatnet_3,
    coatnet_4,
    create_model,
    get_backend,
    list_models,
    set_backend,
)
from .ops.dispatch import BACKEND_CHOICES, BACKENDS, BackendUnavailableError  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BACKEND_CHOICES",
    "BackendUnavailableError",
    "CoAtNet",
    "MODEL_CONFIGS",
    "coatnet_0",
    "coatnet_1",
    "coatnet_2",
    "coatnet_3",
    "coatnet_4",
    "create_model",
    "get_backend",
    "list_models",
    "ops",
    "set_backend",
    "__version__",
]
