"""A training state in canonical form: model tensors, optimizer slots, step count.

What a training run needs to continue, in either framework: every model
tensor (canonical keys and layouts, :mod:`shared.checkpoint`), the
optimizer's per-parameter state under torch's slot names, and the number of
optimizer steps taken. Each framework's ``weights.py`` converts its own
optimizer state to and from this form (``export_training_state`` /
``import_training_state``); the lockstep comparison (:mod:`shared.lockstep`)
moves states between the frameworks every step, and a user resumes in torch a
training started in Keras (or the reverse) through a training checkpoint file.

Slot conventions (torch's):

* SGD with momentum: ``momentum_buffer`` ``b``, updated ``b = momentum * b + g``
  and applied ``p -= lr * b``. Keras keeps the velocity ``v = -lr * b``
  (``v = momentum * v - lr * g``; ``p += v``): its ``weights.py`` divides by the
  learning rate, in float64, so Keras -> canonical -> Keras is exact. With a
  learning-rate schedule the two forms are different optimizers (Keras's
  velocity carries the old learning rates); the conversion uses the current one.
  A key without a buffer has none yet (before the first step): torch creates
  it from the first gradient, Keras starts from zeros, the same update without
  dampening.
* Adam: ``exp_avg`` and ``exp_avg_sq`` (Keras's momentums and velocities, the
  same moments); ``step`` counts the updates (torch keeps one per parameter,
  Keras one ``iterations``). torch's SGD keeps no step count: a state exported
  from it says 0 (SGD's update does not read it).

``parameters`` lists the canonical keys the optimizer updates, in its order
(which tensors train: the freezing strategy), so a state with no slots yet
still says what the optimizer holds, and a torch training file written from it
(``torch_impl.weights.write_training_file``) numbers its parameters the way
``torch.optim.Optimizer.load_state_dict`` expects.

Arrays are held as given (float64 for a float64 run, and for the slots that
Keras's velocity was divided into); a training checkpoint file stores them as
they are, float32 or float64, so a file round trip is as exact as one in memory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.checkpoint import (
    FLOAT32_OR_64,
    CheckpointError,
    check_tensors,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["KIND", "OPTIMIZER_SLOTS", "NotATrainingFile", "TrainingState",
           "is_training_checkpoint", "load_training_checkpoint", "save_training_checkpoint"]

KIND = "training"
# canonical slot names per optimizer (torch's names)
OPTIMIZER_SLOTS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq")}
_MODEL = "model/"


class NotATrainingFile(CheckpointError):
    """A readable file that holds no training state (a weights checkpoint, a state_dict)."""


@dataclass
class TrainingState:
    """Model tensors + optimizer slots (slot -> canonical key -> array) + steps taken."""

    tensors: dict[str, np.ndarray]
    optimizer: str = "sgd"
    slots: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    step: int = 0
    # the optimizer's hyperparameters (learning_rate, momentum, betas, epsilon), as floats
    hyper: dict[str, float] = field(default_factory=dict)
    # canonical keys the optimizer updates, in its order ([]: not recorded, the slot keys)
    parameters: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZER_SLOTS:
            raise ValueError(f"training state: unknown optimizer {self.optimizer!r}; expected "
                             f"one of: {', '.join(OPTIMIZER_SLOTS)}")
        unknown = sorted(set(self.slots) - set(OPTIMIZER_SLOTS[self.optimizer]))
        if unknown:
            raise ValueError(f"training state: {self.optimizer} has no slot {unknown[0]!r}; "
                             f"expected {', '.join(OPTIMIZER_SLOTS[self.optimizer])}")
        self.parameters = list(self.parameters)
        unknown = [k for k in self.parameters if k not in self.tensors]
        if unknown:
            raise ValueError(f"training state: parameter {unknown[0]!r} is not a model tensor")
        if len(set(self.parameters)) != len(self.parameters):
            twice = next(k for k in self.parameters if self.parameters.count(k) > 1)
            raise ValueError(f"training state: parameter {twice!r} is listed twice")
        for name, values in self.slots.items():
            stray = sorted(set(values) - set(self.tensors))
            if stray:
                raise ValueError(f"training state: slot {name!r} key {stray[0]!r} is not a "
                                 f"model tensor")
            stray = sorted(set(values) - set(self.parameters)) if self.parameters else []
            if stray:
                raise ValueError(f"training state: slot {name!r} key {stray[0]!r} is not one "
                                 f"of the optimizer's parameters")
            for key in sorted(values):
                got, want = np.shape(values[key]), np.shape(self.tensors[key])
                if got != want:
                    raise ValueError(f"training state: slot {name!r} key {key!r}: shape "
                                     f"expected {want}, got {got}")
        if int(self.step) < 0:
            raise ValueError(f"training state: step must be >= 0, got {self.step}")
        self.step = int(self.step)

    def astype(self, dtype) -> TrainingState:
        """A copy whose arrays are ``dtype`` (float32 -> float64 is exact)."""
        return TrainingState(
            {k: np.asarray(v, dtype) for k, v in self.tensors.items()}, self.optimizer,
            {s: {k: np.asarray(v, dtype) for k, v in vals.items()} for s, vals in self.slots.items()},
            self.step, dict(self.hyper), list(self.parameters))

    def trainable_keys(self) -> list[str]:
        """Keys that carry optimizer state (every slot's keys, sorted)."""
        return sorted({k for vals in self.slots.values() for k in vals})


def save_training_checkpoint(path, state: TrainingState, meta: Mapping[str, str]) -> Path:
    """Write ``state`` atomically (arrays as they are); ``meta`` needs ``arch`` like any
    checkpoint."""
    tensors = {_MODEL + k: np.asarray(v) for k, v in state.tensors.items()}
    for name, values in state.slots.items():
        tensors.update({f"{name}/{k}": np.asarray(v) for k, v in values.items()})
    meta = {**meta, "kind": KIND, "optimizer": state.optimizer, "step": str(state.step),
            "hyper": json.dumps({k: float(v) for k, v in sorted(state.hyper.items())}),
            "parameters": json.dumps(list(state.parameters))}
    return save_checkpoint(path, tensors, meta, dtypes=FLOAT32_OR_64)


def is_training_checkpoint(path) -> bool:
    """True for a canonical checkpoint whose meta says kind "training" (reads the header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001  (not a readable safetensors file: not one)
        return False
    return meta.get("kind") == KIND and "format_version" in meta


def load_training_checkpoint(path, *, expected: Mapping[str, tuple[int, ...]] | None = None
                             ) -> tuple[TrainingState, dict[str, str]]:
    """Read a training checkpoint; ``expected`` (model key -> shape) checks the model tensors.

    Every error is a one-line :class:`CheckpointError` naming the file and the key.
    """
    tensors, meta = load_checkpoint(path, dtypes=FLOAT32_OR_64)
    where = f"checkpoint {path}"
    if meta.get("kind") != KIND:
        raise NotATrainingFile(f"{where}: not a training checkpoint (meta 'kind' is "
                              f"{meta.get('kind')!r}, expected {KIND!r})")
    optimizer = meta.get("optimizer", "")
    if optimizer not in OPTIMIZER_SLOTS:
        raise CheckpointError(f"{where}: meta key 'optimizer': expected one of "
                              f"{', '.join(OPTIMIZER_SLOTS)}, got {optimizer!r}")
    try:
        step = int(meta.get("step", ""))
        hyper = {str(k): float(v) for k, v in json.loads(meta.get("hyper", "{}")).items()}
        parameters = json.loads(meta.get("parameters", "[]"))
        if not (isinstance(parameters, list) and all(isinstance(k, str) for k in parameters)):
            raise ValueError(f"'parameters' is not a list of keys: {meta['parameters'][:80]!r}")
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{where}: meta 'step'/'hyper'/'parameters' unreadable: "
                              f"{' '.join(str(exc).split())}") from None
    model, slots = {}, {}
    for key, value in tensors.items():
        prefix, _, name = key.partition("/")
        if prefix + "/" == _MODEL:
            model[name] = value
        elif prefix in OPTIMIZER_SLOTS[optimizer] and name:
            slots.setdefault(prefix, {})[name] = value
        else:
            raise CheckpointError(f"{where}: key {key!r}: neither 'model/...' nor a {optimizer} "
                                  f"slot ({', '.join(OPTIMIZER_SLOTS[optimizer])})")
    if expected is not None:
        check_tensors(model, expected, where, FLOAT32_OR_64)
    try:
        state = TrainingState(model, optimizer, slots, step, hyper, parameters)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return state, meta
