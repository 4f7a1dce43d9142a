"""Per-layer comparison: every pair's output on the same batch, against a named tolerance.

Outputs are canonical arrays (NCHW); the first pair whose output leaves the
tolerance is the first divergent layer of that mode (inference or training).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from shared import tolerances as tol
from shared.port.records import Pair

__all__ = ["DEEP_PAIR_COUNT", "LayerDiff", "choose_tolerance", "divergence", "first_out",
           "make_batches", "training_cutoff"]

# More paired layers than this: the deep-net forward tolerance (summation-order noise
# compounds with depth, see RESNET_FORWARD_ATOL's reason).
DEEP_PAIR_COUNT = 24


@dataclass(frozen=True)
class LayerDiff:
    keras_layer: str
    torch_layer: str
    max_abs: float  # max |keras - torch| over the layer's output
    max_rel: float  # max_abs / max |torch output|
    within: bool
    # both outputs' shapes (batch dimension left out) when they differ: nothing to compare
    shapes: tuple | None = None
    # False: measured but not judged (training mode after a BatchNorm that normalises
    # over too few values per channel: see training_cutoff)
    judged: bool = True

    def describe(self) -> str:
        if self.shapes is not None:
            return (f"the outputs have different shapes (keras {tuple(self.shapes[0])}, torch "
                    f"{tuple(self.shapes[1])}, channels first)")
        return f"max |keras - torch| {self.max_abs:.3g} (relative {self.max_rel:.3g})"


def _squeezed(shape: tuple) -> tuple:
    return tuple(d for d in shape if d != 1)


def _diff(a: np.ndarray, b: np.ndarray, atol: float, rtol: float,
          scale_rtol: float | None = None) -> tuple:
    if a.shape != b.shape:
        if _squeezed(a.shape) != _squeezed(b.shape):  # (N, C) against (N, C, 1, 1) compares
            return math.inf, math.inf, False, (a.shape[1:], b.shape[1:])
        a = a.reshape(b.shape)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    d = np.abs(a64 - b64)
    # relative to the layer's scale (its largest torch output), not element by element:
    # elements near zero would make any rounding look like an infinite relative error
    scale = float(np.abs(b64).max(initial=0.0))
    biggest = float(d.max(initial=0.0))
    rel = biggest / scale if scale > 0 else (0.0 if biggest == 0 else math.inf)
    within = bool(np.all(d <= atol + rtol * np.abs(b64)))
    if scale_rtol is not None:  # or within a fraction of the layer's scale (deep nets)
        within = within or biggest <= atol + scale_rtol * scale
    return biggest, rel, within, None


def divergence(pairs: Sequence[Pair], keras_out: Mapping[str, np.ndarray],
               torch_out: Mapping[str, np.ndarray], atol: float, rtol: float,
               scale_rtol: float | None = None, judged_until: int | None = None
               ) -> list[LayerDiff]:
    """One row per pair, in call order (outputs are canonical NCHW arrays). A layer is
    within when every element is within ``atol + rtol * |torch|``, or, given
    ``scale_rtol``, when its largest difference is within ``atol + scale_rtol`` times its
    largest torch output. Rows from ``judged_until`` on are measured but not judged."""
    rows = []
    for i, p in enumerate(pairs):
        a, b = keras_out[p.keras.name], torch_out[p.torch.name]
        rows.append(LayerDiff(p.keras.name, p.torch.name, *_diff(a, b, atol, rtol, scale_rtol),
                              judged=judged_until is None or i < judged_until))
    return rows


def first_out(rows: Sequence[LayerDiff]) -> LayerDiff | None:
    return next((r for r in rows if r.judged and not r.within), None)


def training_cutoff(pairs: Sequence[Pair], batch_size: int) -> tuple[int, str] | None:
    """The first pair from which training-mode outputs are not judged, and why: a
    BatchNorm whose batch statistics come from fewer than PORT_BN_MIN_VALUES values per
    channel (batch x H x W) amplifies float32 rounding by far more than any tolerance
    allows; everything after it inherits that."""
    for i, p in enumerate(pairs):
        if p.keras.kind == "bn":
            values = batch_size * int(np.prod(p.keras.output_shape[1:], dtype=np.int64))
            if values < tol.PORT_BN_MIN_VALUES:
                return i, (f"training mode is not judged from {p.label} on: its BatchNorm "
                           f"normalises over {values} values per channel (batch {batch_size}), "
                           f"fewer than PORT_BN_MIN_VALUES ({tol.PORT_BN_MIN_VALUES}), where "
                           "float32 rounding is amplified beyond the tolerance; a larger input "
                           "or --batch-size judges it")
    return None


def make_batches(input_shape: tuple[int, int, int], count: int, batch_size: int,
                 classes: int | None, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` seeded batches: NCHW float32 images (+1 shift) and labels ``i % classes``."""
    rng = np.random.default_rng(seed)
    c, h, w = input_shape
    out = []
    for _ in range(count):
        x = (rng.standard_normal((batch_size, c, h, w)) + 1.0).astype(np.float32)
        y = (np.arange(batch_size) % classes if classes else np.zeros(batch_size)).astype(np.int64)
        out.append((x, y))
    return out


def choose_tolerance(pairs: Sequence[Pair]) -> dict:
    """FORWARD_*; beyond DEEP_PAIR_COUNT pairs RESNET_FORWARD_*, with a layer also within
    when its largest difference is a small fraction of its largest output, one fraction per
    mode (PORT_DEEP_*_SCALE_RTOL: a randomly initialised deep net's activations reach the
    hundreds, and BatchNorm on batch statistics amplifies rounding)."""
    if len(pairs) > DEEP_PAIR_COUNT:
        return {"name": "RESNET_FORWARD", "atol": tol.RESNET_FORWARD_ATOL,
                "rtol": tol.RESNET_FORWARD_RTOL,
                "scale_rtol": {"inference": tol.PORT_DEEP_INFERENCE_SCALE_RTOL,
                               "training": tol.PORT_DEEP_TRAINING_SCALE_RTOL}}
    return {"name": "FORWARD", "atol": tol.FORWARD_ATOL, "rtol": tol.FORWARD_RTOL}
