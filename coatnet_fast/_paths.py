"""Where the package's non-Python parts live, installed or in a source checkout.

In a wheel, ``kernels/`` is installed as ``coatnet_fast/kernels`` and ``csrc/`` as
``coatnet_fast/csrc`` (pyproject.toml maps them). Run from a checkout (``PYTHONPATH=.``), both
sit beside the package; a finder then serves ``coatnet_fast.kernels`` from ``kernels/`` so that
every import spells the one name.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT = PACKAGE_DIR.parent


def csrc_dir() -> Path:
    """The C++/CUDA sources that the extension is built from."""
    installed = PACKAGE_DIR / "csrc"
    return installed if installed.is_dir() else _CHECKOUT / "csrc"


class _CheckoutKernelsFinder(importlib.abc.MetaPathFinder):
    def __init__(self, directory: Path):
        self.directory = directory

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "coatnet_fast.kernels":
            return importlib.util.spec_from_file_location(
                fullname, self.directory / "__init__.py", submodule_search_locations=[str(self.directory)]
            )
        return None


def install_checkout_finder() -> None:
    """Serve ``coatnet_fast.kernels`` from ``kernels/`` when running from a source checkout."""
    if (PACKAGE_DIR / "kernels").is_dir():
        return
    source = _CHECKOUT / "kernels"
    if (source / "__init__.py").is_file() and not any(isinstance(f, _CheckoutKernelsFinder) for f in sys.meta_path):
        sys.meta_path.append(_CheckoutKernelsFinder(source))
