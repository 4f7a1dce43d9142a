"""Keras <-> canonical tensors. The only module that knows Keras's layout.

Canonical layouts are torch's: a Keras Conv2D kernel (kh, kw, I, O) becomes
(O, I, kh, kw); a Dense kernel (in, out) becomes (out, in); BatchNorm's
gamma / beta / moving_mean / moving_variance become weight / bias /
running_mean / running_var. Keys follow the model tree given by each
container layer's ``named_children()`` (see ``tf_impl/model.py``).
"""

from __future__ import annotations

import keras
import numpy as np

from shared.checkpoint import check_tensors
from tf_impl.model import named_leaves

__all__ = ["canonical_shapes", "export_weights", "import_weights", "export_bookkeeping",
           "to_canonical", "from_canonical", "activation_to_canonical",
           "activation_from_canonical"]

# Keras layout -> canonical layout, and back (the one place transposes live).
_TO_CANONICAL = {"conv": (3, 2, 0, 1), "dense": (1, 0), "vector": None}
_FROM_CANONICAL = {"conv": (2, 3, 1, 0), "dense": (1, 0), "vector": None}


def _variables(model) -> dict[str, tuple[keras.Variable, str]]:
    """Canonical key -> (Keras variable, layout kind) for every weighted leaf layer."""
    out: dict[str, tuple[keras.Variable, str]] = {}
    for path, layer in named_leaves(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            out[f"{path}.weight"] = (layer.gamma, "vector")
            out[f"{path}.bias"] = (layer.beta, "vector")
            out[f"{path}.running_mean"] = (layer.moving_mean, "vector")
            out[f"{path}.running_var"] = (layer.moving_variance, "vector")
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            kind = "conv" if isinstance(layer, keras.layers.Conv2D) else "dense"
            out[f"{path}.weight"] = (layer.kernel, kind)
            if layer.use_bias:
                out[f"{path}.bias"] = (layer.bias, "vector")
        else:
            raise TypeError(f"weights: no canonical mapping for layer {path!r} "
                            f"of type {type(layer).__name__}")
    return out


def _to_canonical(value: np.ndarray, kind: str) -> np.ndarray:
    axes = _TO_CANONICAL[kind]
    return np.ascontiguousarray(value if axes is None else np.transpose(value, axes))


def canonical_shapes(model) -> dict[str, tuple[int, ...]]:
    """Canonical key -> shape (torch layout) for every tensor of ``model``."""
    return {key: _to_canonical(np.zeros(var.shape, np.float32), kind).shape
            for key, (var, kind) in _variables(model).items()}


def export_weights(model, dtype=np.float32) -> dict[str, np.ndarray]:
    """Every weight and BN statistic as numpy (float32 = the canonical form), canonical keys."""
    return {key: _to_canonical(np.asarray(keras.ops.convert_to_numpy(var), dtype), kind)
            for key, (var, kind) in _variables(model).items()}


def import_weights(model, tensors: dict[str, np.ndarray], where: str = "tensors") -> None:
    """Load canonical tensors into ``model``; strict about keys, shapes, dtype, finiteness."""
    variables = _variables(model)
    check_tensors(tensors, canonical_shapes(model), where)
    for key, (var, kind) in variables.items():
        axes = _FROM_CANONICAL[kind]
        value = tensors[key] if axes is None else np.transpose(tensors[key], axes)
        var.assign(np.ascontiguousarray(value, dtype=var.dtype))


def export_bookkeeping(model) -> dict[str, np.ndarray]:
    """Framework-only state outside the canonical form: none in Keras (no BN counter)."""
    return {}


# --- single tensors, for layers outside the project's own trees (``tf_impl/port.py``) ---
def to_canonical(value: np.ndarray, kind: str, flatten_from: tuple | None = None) -> np.ndarray:
    """One Keras tensor in the canonical layout.

    ``kind``: "conv" (kh, kw, I, O) -> (O, I, kh, kw); "depthwise" (kh, kw, C, M) ->
    (C * M, 1, kh, kw) (torch groups=C, output channel c * M + m, as TensorFlow orders them);
    "dense" (in, out) -> (out, in), with ``flatten_from`` (H, W, C) when the Dense reads a
    Flatten of an NHWC map: its rows are (h, w, c) and become torch's (c, h, w) columns;
    "vector" unchanged.
    """
    value = np.asarray(value)
    if kind == "depthwise":
        kh, kw, c, m = value.shape
        return np.ascontiguousarray(value.reshape(kh, kw, c * m).transpose(2, 0, 1)[:, None])
    if kind == "dense" and flatten_from is not None:
        h, w, c = flatten_from
        out = value.shape[1]
        return np.ascontiguousarray(value.reshape(h, w, c, out).transpose(3, 2, 0, 1)
                                    .reshape(out, c * h * w))
    return _to_canonical(value, kind)


def from_canonical(value: np.ndarray, kind: str, shape: tuple,
                   flatten_from: tuple | None = None) -> np.ndarray:
    """Inverse of :func:`to_canonical` for a Keras variable of ``shape``."""
    value = np.asarray(value)
    if kind == "depthwise":
        kh, kw, c, m = shape
        return np.ascontiguousarray(value[:, 0].transpose(1, 2, 0).reshape(kh, kw, c, m))
    if kind == "dense" and flatten_from is not None:
        h, w, c = flatten_from
        out = value.shape[0]
        return np.ascontiguousarray(value.reshape(out, c, h, w).transpose(2, 3, 1, 0)
                                    .reshape(h * w * c, out))
    axes = _FROM_CANONICAL[kind]
    return np.ascontiguousarray(value if axes is None else np.transpose(value, axes))


def activation_to_canonical(value: np.ndarray) -> np.ndarray:
    """A Keras activation (NHWC maps) in the canonical layout (NCHW); others unchanged."""
    value = np.asarray(value)
    return np.ascontiguousarray(value.transpose(0, 3, 1, 2)) if value.ndim == 4 else value


def activation_from_canonical(value: np.ndarray) -> np.ndarray:
    """Inverse of :func:`activation_to_canonical` (NCHW -> NHWC)."""
    value = np.asarray(value)
    return np.ascontiguousarray(value.transpose(0, 2, 3, 1)) if value.ndim == 4 else value
