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
  Keras one ``iterations``).

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

__all__ = ["KIND", "OPTIMIZER_SLOTS", "TrainingState", "load_training_checkpoint",
           "save_training_checkpoint"]

KIND = "training"
# canonical slot names per optimizer (torch's names)
OPTIMIZER_SLOTS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq")}
_MODEL = "model/"


@dataclass
class TrainingState:
    """Model tensors + optimizer slots (slot -> canonical key -> array) + steps taken."""

    tensors: dict[str, np.ndarray]
    optimizer: str = "sgd"
    slots: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    step: int = 0
    # the optimizer's hyperparameters (learning_rate, momentum, betas, epsilon), as floats
    hyper: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZER_SLOTS:
            raise ValueError(f"training state: unknown optimizer {self.optimizer!r}; expected "
                             f"one of: {', '.join(OPTIMIZER_SLOTS)}")
        unknown = sorted(set(self.slots) - set(OPTIMIZER_SLOTS[self.optimizer]))
        if unknown:
            raise ValueError(f"training state: {self.optimizer} has no slot {unknown[0]!r}; "
                             f"expected {', '.join(OPTIMIZER_SLOTS[self.optimizer])}")
        for name, values in self.slots.items():
            stray = sorted(set(values) - set(self.tensors))
            if stray:
                raise ValueError(f"training state: slot {name!r} key {stray[0]!r} is not a "
                                 f"model tensor")
        if int(self.step) < 0:
            raise ValueError(f"training state: step must be >= 0, got {self.step}")
        self.step = int(self.step)

    def astype(self, dtype) -> TrainingState:
        """A copy whose arrays are ``dtype`` (float32 -> float64 is exact)."""
        return TrainingState(
            {k: np.asarray(v, dtype) for k, v in self.tensors.items()}, self.optimizer,
            {s: {k: np.asarray(v, dtype) for k, v in vals.items()} for s, vals in self.slots.items()},
            self.step, dict(self.hyper))

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
            "hyper": json.dumps({k: float(v) for k, v in sorted(state.hyper.items())})}
    return save_checkpoint(path, tensors, meta, dtypes=FLOAT32_OR_64)


def load_training_checkpoint(path, *, expected: Mapping[str, tuple[int, ...]] | None = None
                             ) -> tuple[TrainingState, dict[str, str]]:
    """Read a training checkpoint; ``expected`` (model key -> shape) checks the model tensors.

    Every error is a one-line :class:`CheckpointError` naming the file and the key.
    """
    tensors, meta = load_checkpoint(path, dtypes=FLOAT32_OR_64)
    where = f"checkpoint {path}"
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{where}: not a training checkpoint (meta 'kind' is "
                              f"{meta.get('kind')!r}, expected {KIND!r})")
    optimizer = meta.get("optimizer", "")
    if optimizer not in OPTIMIZER_SLOTS:
        raise CheckpointError(f"{where}: meta key 'optimizer': expected one of "
                              f"{', '.join(OPTIMIZER_SLOTS)}, got {optimizer!r}")
    try:
        step = int(meta.get("step", ""))
        hyper = {str(k): float(v) for k, v in json.loads(meta.get("hyper", "{}")).items()}
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{where}: meta 'step'/'hyper' unreadable: {exc}") from None
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
        state = TrainingState(model, optimizer, slots, step, hyper)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    for name, values in slots.items():
        for key, value in values.items():
            if value.shape != model[key].shape:
                raise CheckpointError(f"{where}: key {name + '/' + key!r}: shape expected "
                                      f"{model[key].shape}, got {value.shape}")
    return state, meta
