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
           "make_batches"]

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

    def describe(self) -> str:
        if self.shapes is not None:
            return (f"the outputs have different shapes (keras {tuple(self.shapes[0])}, torch "
                    f"{tuple(self.shapes[1])}, channels first)")
        return f"max |keras - torch| {self.max_abs:.3g} (relative {self.max_rel:.3g})"


def _squeezed(shape: tuple) -> tuple:
    return tuple(d for d in shape if d != 1)


def _diff(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> tuple:
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
    return biggest, rel, bool(np.all(d <= atol + rtol * np.abs(b64))), None


def divergence(pairs: Sequence[Pair], keras_out: Mapping[str, np.ndarray],
               torch_out: Mapping[str, np.ndarray], atol: float, rtol: float) -> list[LayerDiff]:
    """One row per pair, in call order (outputs are canonical NCHW arrays)."""
    rows = []
    for p in pairs:
        a, b = keras_out[p.keras.name], torch_out[p.torch.name]
        rows.append(LayerDiff(p.keras.name, p.torch.name, *_diff(a, b, atol, rtol)))
    return rows


def first_out(rows: Sequence[LayerDiff]) -> LayerDiff | None:
    return next((r for r in rows if not r.within), None)


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
    if len(pairs) > DEEP_PAIR_COUNT:
        return {"name": "RESNET_FORWARD", "atol": tol.RESNET_FORWARD_ATOL,
                "rtol": tol.RESNET_FORWARD_RTOL}
    return {"name": "FORWARD", "atol": tol.FORWARD_ATOL, "rtol": tol.FORWARD_RTOL}
