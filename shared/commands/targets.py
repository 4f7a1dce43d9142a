"""Command-line targets: a saved Keras model or a factory, loaded as one model (audit, port).

A target is a ``.keras`` file (Keras only) or ``package.module:function`` returning
the model, or ``(model, optimizer)``, set up as the user's training loop uses it.
Loading imports torch before TensorFlow (the import-order crash) and the user's
module from the working directory, as ``python -m`` would; anything that fails is a
one-line :class:`~shared.errors.UsageError` naming the target.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from shared import frameworks
from shared.audit import framework_of
from shared.errors import UsageError

__all__ = ["load_target"]

_KERAS_SUFFIXES = (".keras",)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _load_keras_file(target: str, framework: str | None):
    if framework not in (None, "tf"):
        raise UsageError(f"{target}: a .keras file is a Keras model, not --framework {framework}")
    path = Path(target)
    if not path.is_file():
        raise UsageError(f"{target}: no such file")
    keras = frameworks.load("tf").keras
    try:
        return keras.saving.load_model(path), None
    except Exception as exc:  # noqa: BLE001  (any loading failure is bad input here)
        raise UsageError(f"{target}: cannot load it as a Keras model "
                         f"({_first_line(exc)})") from None


def _call_factory(target: str, framework: str | None):
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise UsageError(f"{target}: expected a .keras file or a factory package.module:function")
    # Import order: torch before TensorFlow, before the user's module can import either.
    frameworks.load(framework or "torch")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the user's package from here
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{target}: cannot import module {module_name!r} "
                         f"({_first_line(exc)})") from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise UsageError(f"{target}: module {module_name!r} has no function {function_name!r}")
    try:
        result = factory()
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{target}: the factory raised {_first_line(exc)}") from None
    if isinstance(result, tuple) and len(result) == 2:
        return result
    return result, None


def load_target(target: str, framework: str | None = None):
    """``(model, optimizer or None, framework)`` for a CLI target; UsageError if it cannot be."""
    if framework is not None:
        frameworks.check_framework(framework)
    if target.endswith(_KERAS_SUFFIXES):
        model, optimizer = _load_keras_file(target, framework)
    else:
        model, optimizer = _call_factory(target, framework)
    found = framework_of(model)
    if found is None:
        raise UsageError(f"{target}: got a {type(model).__module__}.{type(model).__name__}, "
                         "expected a torch.nn.Module or a keras.Model")
    if framework is not None and found != framework:
        raise UsageError(f"{target}: got a {found} model, but --framework {framework} was given")
    return model, optimizer, found
