"""PyTorch <-> canonical tensors. The only module that knows torch's layout.

The canonical form *is* torch's layout (conv (O, I, kh, kw), linear
(out, in)) under the model's own state_dict keys, so this side is mostly an
identity map. ``num_batches_tracked`` is torch bookkeeping with no effect
when BatchNorm has a momentum (and Keras has no such variable): it is not
part of the canonical form; import keeps the model's own counter.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from shared.checkpoint import check_tensors

__all__ = ["canonical_shapes", "export_weights", "import_weights", "export_bookkeeping",
           "to_canonical", "from_canonical", "activation_to_canonical",
           "activation_from_canonical"]

_BOOKKEEPING = "num_batches_tracked"


def _canonical_items(model: nn.Module):
    for key, value in model.state_dict(keep_vars=True).items():
        if key.rsplit(".", 1)[-1] != _BOOKKEEPING:
            yield key, value


def canonical_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Canonical key -> shape for every tensor of ``model``."""
    return {key: tuple(value.shape) for key, value in _canonical_items(model)}


def export_weights(model: nn.Module, dtype=np.float32) -> dict[str, np.ndarray]:
    """Every parameter and BN statistic as numpy (float32 = the canonical form), canonical keys."""
    return {key: value.detach().cpu().numpy().astype(dtype, copy=True)
            for key, value in _canonical_items(model)}


@torch.no_grad()
def import_weights(model: nn.Module, tensors: dict[str, np.ndarray], where: str = "tensors") -> None:
    """Load canonical tensors into ``model``; strict about keys, shapes, dtype, finiteness."""
    check_tensors(tensors, canonical_shapes(model), where)
    for key, target in _canonical_items(model):
        target.copy_(torch.from_numpy(np.ascontiguousarray(tensors[key])))  # casts to the model's dtype


def export_bookkeeping(model: nn.Module) -> dict[str, np.ndarray]:
    """Framework-only state outside the canonical form: torch's ``num_batches_tracked``.

    Runs compare it too: a frozen BatchNorm whose counter moved was in training mode.
    """
    return {key: value.detach().cpu().numpy().astype(np.float64)
            for key, value in model.state_dict().items()
            if key.rsplit(".", 1)[-1] == _BOOKKEEPING}


# --- single tensors, for modules outside the project's own trees (``torch_impl/port.py``) ---
def to_canonical(value: np.ndarray, kind: str, flatten_from: tuple | None = None) -> np.ndarray:
    """One torch tensor in the canonical layout: torch's own for every kind but "scale", a
    per-channel scale stored broadcastable (ConvNeXt's ``layer_scale`` (C, 1, 1)): (C,)."""
    if kind == "scale":
        return np.ascontiguousarray(np.reshape(value, -1))
    return np.ascontiguousarray(value)


def from_canonical(value: np.ndarray, kind: str, shape: tuple,
                   flatten_from: tuple | None = None) -> np.ndarray:
    """Inverse of :func:`to_canonical` for a tensor of ``shape``."""
    if kind == "scale":
        return np.ascontiguousarray(np.reshape(value, shape))
    return np.ascontiguousarray(value)


def activation_to_canonical(value: np.ndarray, features_last: bool = False) -> np.ndarray:
    """A torch activation in the canonical layout: NCHW already, except the channels-last
    maps a Linear or LayerNorm returns inside a block that permuted to (N, H, W, C)."""
    value = np.asarray(value)
    if features_last and value.ndim == 4:
        return np.ascontiguousarray(value.transpose(0, 3, 1, 2))
    return value


def activation_from_canonical(value: np.ndarray) -> np.ndarray:
    """Inverse of :func:`activation_to_canonical` for the model's input: the identity."""
    return np.asarray(value)
