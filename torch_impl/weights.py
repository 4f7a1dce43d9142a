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

from shared.checkpoint import FLOAT32_OR_64, check_holdable, check_tensors
from shared.training_state import OPTIMIZER_SLOTS, TrainingState

__all__ = ["canonical_shapes", "export_weights", "import_weights", "export_bookkeeping",
           "export_training_state", "import_training_state",
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
    """Load canonical tensors into ``model``; strict about keys, shapes, dtype, finiteness.

    float32 or float64 arrays; float64 into a float32 model only where exact.
    """
    check_tensors(tensors, canonical_shapes(model), where, FLOAT32_OR_64)
    check_holdable(tensors, str(next(model.parameters()).dtype).removeprefix("torch."), where)
    for key, target in _canonical_items(model):
        target.copy_(torch.from_numpy(np.ascontiguousarray(tensors[key])))  # casts to the model's dtype


def export_bookkeeping(model: nn.Module) -> dict[str, np.ndarray]:
    """Framework-only state outside the canonical form: torch's ``num_batches_tracked``.

    Runs compare it too: a frozen BatchNorm whose counter moved was in training mode.
    """
    return {key: value.detach().cpu().numpy().astype(np.float64)
            for key, value in model.state_dict().items()
            if key.rsplit(".", 1)[-1] == _BOOKKEEPING}


# --- optimizer state: torch's own slot names are the canonical ones ------------------------
def _optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return "adam"
    raise TypeError(f"training state: no canonical form for {type(optimizer).__name__} "
                    f"(expected SGD, Adam or AdamW)")


def _optimized(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, nn.Parameter]]:
    """``(canonical key, parameter)`` for every parameter the optimizer updates."""
    names = {id(p): k for k, p in model.named_parameters()}
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("training state: the optimizer updates a tensor that is not "
                                 "a parameter of the model")
            out.append((names[id(p)], p))
    return out


def _hyper(optimizer: torch.optim.Optimizer, kind: str) -> dict[str, float]:
    group = optimizer.param_groups[0]
    names = ("lr", "momentum") if kind == "sgd" else ("lr", "betas", "eps")
    for other in optimizer.param_groups[1:]:
        if any(other[n] != group[n] for n in names):
            raise ValueError("training state: parameter groups with different hyperparameters "
                             "have no one canonical form")
    if kind == "sgd":
        return {"learning_rate": float(group["lr"]), "momentum": float(group["momentum"])}
    return {"learning_rate": float(group["lr"]), "beta_1": float(group["betas"][0]),
            "beta_2": float(group["betas"][1]), "epsilon": float(group["eps"])}


def export_training_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                          dtype=np.float64) -> TrainingState:
    """Model tensors and optimizer slots in canonical form (float64 unless told: exact)."""
    kind = _optimizer_kind(optimizer)
    slots: dict[str, dict[str, np.ndarray]] = {name: {} for name in OPTIMIZER_SLOTS[kind]}
    steps = set()
    for key, p in _optimized(model, optimizer):
        state = optimizer.state.get(p, {})
        for name in OPTIMIZER_SLOTS[kind]:
            if state.get(name) is not None:
                slots[name][key] = state[name].detach().cpu().numpy().astype(dtype, copy=True)
        if "step" in state:
            steps.add(int(float(state["step"])))
    if len(steps) > 1:
        raise ValueError(f"training state: parameters took different numbers of steps "
                         f"({sorted(steps)}); the canonical form has one step count")
    return TrainingState(export_weights(model, dtype), kind,
                         {name: values for name, values in slots.items() if values},
                         steps.pop() if steps else 0, _hyper(optimizer, kind))


@torch.no_grad()
def import_training_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                          state: TrainingState, where: str = "training state") -> None:
    """Load ``state`` into ``model`` and ``optimizer`` (slots, step); exact for its dtype.

    A parameter the state has no slot for starts without one, as before its first step.
    """
    kind = _optimizer_kind(optimizer)
    if state.optimizer != kind:
        raise ValueError(f"{where}: holds {state.optimizer} state, the optimizer is {kind}")
    optimized = _optimized(model, optimizer)
    keys = {key for key, _ in optimized}
    stray = sorted(set(state.trainable_keys()) - keys)
    if stray:
        raise ValueError(f"{where}: slot for {stray[0]!r}, which the optimizer does not update "
                         f"(frozen here, trained where the state comes from?)")
    import_weights(model, state.tensors, where)
    for key, p in optimized:
        held = {name: state.slots[name][key] for name in OPTIMIZER_SLOTS[kind]
                if key in state.slots.get(name, {})}
        if kind == "adam" and state.step > 0 and not held:
            raise ValueError(f"{where}: key {key!r}: no adam slots at step {state.step} "
                             f"(Adam's bias correction needs the moments of every parameter)")
        if held and len(held) != len(OPTIMIZER_SLOTS[kind]):
            raise ValueError(f"{where}: key {key!r}: has {sorted(held)} but not every "
                             f"{kind} slot ({', '.join(OPTIMIZER_SLOTS[kind])})")
        for name, value in held.items():
            if value.shape != tuple(p.shape):
                raise ValueError(f"{where}: slot {name!r} key {key!r}: shape expected "
                                 f"{tuple(p.shape)}, got {value.shape}")
        new = {name: torch.from_numpy(np.array(value)).to(p.dtype) for name, value in held.items()}
        if kind == "adam" and new:
            new["step"] = torch.tensor(float(state.step), dtype=torch.float32)
        optimizer.state[p] = new


# --- single tensors, for modules outside the project's own trees (``torch_impl/port.py``) ---
def to_canonical(value: np.ndarray, kind: str, flatten_from: tuple | None = None) -> np.ndarray:
    """One torch tensor in the canonical layout: torch's own, for every kind."""
    return np.ascontiguousarray(value)


def from_canonical(value: np.ndarray, kind: str, shape: tuple,
                   flatten_from: tuple | None = None) -> np.ndarray:
    """Inverse of :func:`to_canonical`: the identity."""
    return np.ascontiguousarray(value)


def activation_to_canonical(value: np.ndarray) -> np.ndarray:
    """A torch activation in the canonical layout: NCHW already."""
    return np.asarray(value)


def activation_from_canonical(value: np.ndarray) -> np.ndarray:
    """Inverse of :func:`activation_to_canonical`: the identity."""
    return np.asarray(value)
