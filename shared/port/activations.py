"""Activation functions compared by function, not by name.

Each framework half reports an activation with its own name (Keras ``hard_silu``,
torch ``Hardswish`` as ``hard_swish``) and the parameters that change it (a
leaky slope, GELU's approximation). :func:`function_of` maps every name to one
name per function, and :func:`fold` reads a chain of recorded operations
(``x + 3``, ``relu6``, ``x / 6``) as the function it computes. Which names are
the same function is pinned by tests/test_port_families.py, which evaluates both
frameworks' functions on one grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["GELU_TANH_MAX_ABS", "UNKNOWN", "fold", "function_of", "token"]

# An activation a describer saw but cannot name (a lambda, an unrecorded composite).
UNKNOWN = "unknown"

# The framework's name -> the function (None: the identity).
_SAME_FUNCTION = {
    "linear": None, "identity": None,
    "relu": "relu", "relu6": "relu6",
    "sigmoid": "sigmoid", "tanh": "tanh", "softmax": "softmax",
    "silu": "silu", "swish": "silu",
    "hard_silu": "hard_silu", "hard_swish": "hard_silu", "hardswish": "hard_silu",
    "hard_sigmoid": "hard_sigmoid", "hardsigmoid": "hard_sigmoid",
    "gelu": "gelu", "gelu_tanh": "gelu_tanh",
    "elu": "elu", "selu": "selu", "mish": "mish", "softplus": "softplus",
    "leaky_relu": "leaky_relu",
}

# max |GELU(x) - its tanh approximation| over x in [-8, 8]: 4.73e-4 at |x| = 2.70,
# measured in float32 by both frameworks (keras.activations.gelu(approximate=True),
# torch's GELU(approximate="tanh"); tests/test_port_families.py).
GELU_TANH_MAX_ABS = 4.7e-4


def function_of(name: str | None, params: dict | None = None) -> str | None:
    """One name per function: ``hard_swish`` and ``hard_silu`` are ``hard_silu``; a leaky
    ReLU carries its slope (``leaky_relu(0.01)``); None is the identity; a name that is
    no known function is :data:`UNKNOWN`."""
    if name is None:
        return None
    params = params or {}
    if name == "gelu" and params.get("approximate") in (True, "tanh"):
        name = "gelu_tanh"
    known = _SAME_FUNCTION.get(name, UNKNOWN)
    if known == "leaky_relu":
        return f"leaky_relu({float(params.get('slope', 0.01)):g})"
    return known


def token(kind: str, params: dict) -> str | None:
    """One recorded record as a chain token: an activation's function, or ``op value``."""
    if kind == "activation":
        return function_of(params.get("name"), params)
    if kind == "op":
        return f"{params['op']} {float(np.float32(params['value'])):.8g}"
    return None


def _c(value: float) -> str:
    return f"{float(np.float32(value)):.8g}"


# Chains of operations that compute one activation (constants compared in float32, as
# both frameworks hold them): Keras's MobileNetV3 writes hard sigmoid as
# ReLU(6.)(x + 3.) * (1. / 6.).
_PATTERNS = (
    ((f"add {_c(3)}", "relu6", f"mul {_c(1 / 6)}"), "hard_sigmoid"),
    ((f"add {_c(3)}", "relu6", f"div {_c(6)}"), "hard_sigmoid"),
)


def fold(tokens: Sequence[str | None]) -> str | None:
    """The activation a chain of tokens starts with: None for an empty chain, UNKNOWN when
    it starts with arithmetic that is no known activation."""
    chain = [t for t in tokens if t is not None]
    for pattern, function in _PATTERNS:
        if tuple(chain[:len(pattern)]) == pattern:
            return function
    if not chain:
        return None
    first = chain[0]
    return UNKNOWN if first.split(" ")[0] in ("add", "sub", "mul", "div") else first
