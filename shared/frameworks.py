"""Load framework implementations in the one import order that is safe.

With the pinned wheels, TensorFlow imported before torchvision or
``torch._dynamo`` segfaults the process. Everything in ``shared`` reaches the
frameworks through :func:`load`, which always imports ``torch_impl`` first.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FRAMEWORKS = ("tf", "torch")
_PACKAGES = {"torch": "torch_impl", "tf": "tf_impl"}


def check_framework(name: str) -> str:
    if name not in _PACKAGES:
        raise ValueError(f"unknown framework {name!r}; expected one of: {', '.join(FRAMEWORKS)}")
    return name


def load(framework: str, module: str | None = None) -> ModuleType:
    """Return ``<framework>_impl[.module]``, importing torch_impl first."""
    check_framework(framework)
    importlib.import_module("torch_impl")  # always first: see module docstring
    package = _PACKAGES[framework]
    return importlib.import_module(f"{package}.{module}" if module else package)
