"""``freeze-parity audit TARGET``: list the freezing hazards of a model.

TARGET is a saved Keras model (``model.keras``) or a factory
``package.module:function`` that returns an ``nn.Module`` or a ``keras.Model``,
or ``(model, optimizer)``, prepared as your training loop would use it. Exit
status: 0 no hazards, 1 hazards found, 2 the target could not be loaded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from shared import frameworks
from shared.audit import framework_of
from shared.errors import UsageError

_KERAS_SUFFIXES = (".keras",)


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="a saved Keras model (.keras) or a factory "
                        "package.module:function returning a model or (model, optimizer)")
    parser.add_argument("--framework", choices=frameworks.FRAMEWORKS, default=None,
                        help="the framework the target must be (default: detected)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


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


def run(args: argparse.Namespace) -> int:
    model, optimizer, framework = load_target(args.target, args.framework)
    report = frameworks.load(framework, "audit").audit(model, optimizer)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report.render(), report.notes, report.hazard_lines(), min_width=120)
    return 1 if report.hazards else 0


def print_report(table, notes, lines, min_width: int) -> None:
    """A report as audit and port print it: the rich table, ``note:`` lines, one line each."""
    from rich.console import Console

    Console(width=max(Console().width, min_width)).print(table)
    for note in notes:
        print(f"note: {note}")
    for line in lines:
        print(line)
