"""Why ``fit`` reports one loss and ``evaluate`` on the same data another: the arithmetic.

One epoch of ``fit`` over batches ``b = 1..B`` (sizes ``n_b``, ``N = sum n_b``)
reports the batch-size-weighted running mean of the *training-mode* losses at
the *pre-update* state ``w_b`` (weights and BatchNorm statistics), while
``evaluate`` afterwards gives the *inference-mode* loss at the final state
``w_F`` over the whole data. With the weighted mean ``M[x] = sum n_b x_b / N``::

    fit        = M[train(w_b, b)]                          (what fit reports)
    (a) BN mode         = M[train(w_b, b)] - M[eval(w_b, b)]   same state, same batches
    (b) weight updates  = M[eval(w_b, b)]  - M[eval(w_F, b)]   same mode, same batches
    (c) batch averaging = M[eval(w_F, b)]  - evaluate(w_F)     same state, same mode

a telescoping sum: ``(a) + (b) + (c) = M[train(w_b, b)] - evaluate(w_F)``
exactly; what is left of ``fit - evaluate`` is the rounding of the framework's
own running mean (float32 in Keras). (a) is where BatchNorm's batch statistics
(and Dropout) show: 0 when the base is frozen in inference mode. (b) includes
BatchNorm running statistics that moved during the epoch. (c) is 0 up to
rounding whenever the mean is weighted by batch size, since inference-mode
losses are per example: the "averaging over the epoch" people blame is (b).

This module is framework-free; ``{tf,torch}_impl.explain`` measure the terms.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from shared import data
from shared.frameworks import check_framework
from shared.strategies import get_strategy

__all__ = [
    "PARTS",
    "Decomposition",
    "FitEvaluate",
    "batch_slices",
    "decompose",
    "epoch_indices",
    "largest_part",
    "reading",
    "render_table",
    "weighted_mean",
]

# (attribute, label, what it compares): the order of the telescoping sum
PARTS = (
    ("bn_mode", "(a) BN mode", "training-mode vs inference-mode loss, same weights and batches"),
    ("weight_updates", "(b) weight updates",
     "pre-update vs post-update weights and BN statistics, inference mode"),
    ("averaging", "(c) batch averaging",
     "batch-size-weighted mean over the epoch's batches vs whole-data loss, final weights"),
)


@dataclass(frozen=True)
class FitEvaluate:
    """What one ``fit`` epoch and the ``evaluate`` after it measured, per batch."""

    framework: str
    strategy: str
    batch_sizes: list[int]
    # training-mode loss at the pre-update state: the loss whose gradients made the update
    train_losses: list[float]
    # inference-mode loss, same batch, same pre-update state
    eval_losses_before: list[float]
    # inference-mode loss, same batch, state after the whole epoch
    eval_losses_after: list[float]
    # the loss fit itself reported for the epoch (its running mean)
    fit_reported: float
    # the loss evaluate reported on the same data after fit
    evaluated: float
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        check_framework(self.framework)
        get_strategy(self.strategy)
        lengths = {len(self.batch_sizes), len(self.train_losses), len(self.eval_losses_before),
                   len(self.eval_losses_after)}
        if len(lengths) != 1 or not self.batch_sizes:
            raise ValueError(f"FitEvaluate: per-batch lists must be non-empty and of one length, "
                             f"got lengths {sorted(lengths)}")
        if any(int(n) < 1 for n in self.batch_sizes):
            raise ValueError(f"FitEvaluate: batch sizes must be >= 1, got {self.batch_sizes}")


def epoch_indices(n: int, seed: int = 0, examples: int | None = None) -> np.ndarray:
    """The data of the one ``fit`` epoch: indices into a split of ``n`` items.

    The run's shuffled order of epoch 0 (the batches a ``run`` with the same seed
    takes first), all ``n`` items or the first ``examples``. A count that is not a
    multiple of the batch size leaves a smaller last batch, as ``fit`` does.
    """
    order = data.take_batch_indices(n, n, 1, seed=seed)[0]
    if examples is None:
        return order
    if isinstance(examples, bool) or not 1 <= int(examples) <= n:
        raise ValueError(f"examples must be in [1, {n}], got {examples}")
    return order[: int(examples)]


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive batches of ``batch_size`` over ``n`` items, the last one possibly smaller
    (how ``fit(..., shuffle=False)`` batches an array)."""
    return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def weighted_mean(values, sizes) -> float:
    """``sum n_b x_b / sum n_b`` in float64: fit's running mean without its rounding."""
    values = np.asarray(values, np.float64)
    sizes = np.asarray(sizes, np.float64)
    return float(np.sum(values * sizes) / np.sum(sizes))


@dataclass(frozen=True)
class Decomposition:
    framework: str
    strategy: str
    fit_reported: float
    evaluated: float
    # M[train(w_b, b)]: fit's running mean recomputed in float64 from the batch losses
    fit_mean: float
    bn_mode: float
    weight_updates: float
    averaging: float
    batches: int
    examples: int

    @property
    def total(self) -> float:
        """The gap to explain: what fit reported minus what evaluate reported."""
        return self.fit_reported - self.evaluated

    @property
    def parts_sum(self) -> float:
        return self.bn_mode + self.weight_updates + self.averaging

    @property
    def rounding(self) -> float:
        """``total - parts_sum`` = fit's own running-mean rounding (``fit_reported - fit_mean``)."""
        return self.total - self.parts_sum

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(total=self.total, parts_sum=self.parts_sum, rounding=self.rounding)
        return data


def decompose(measured: FitEvaluate) -> Decomposition:
    """The telescoping decomposition of ``fit_reported - evaluated`` (see module docstring)."""
    n = measured.batch_sizes
    train = weighted_mean(measured.train_losses, n)
    before = weighted_mean(measured.eval_losses_before, n)
    after = weighted_mean(measured.eval_losses_after, n)
    values = (measured.fit_reported, measured.evaluated, train, before, after)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{measured.framework} {measured.strategy}: non-finite loss in the "
                         f"measurement (fit {measured.fit_reported}, evaluate {measured.evaluated})")
    return Decomposition(
        framework=measured.framework, strategy=measured.strategy,
        fit_reported=float(measured.fit_reported), evaluated=float(measured.evaluated),
        fit_mean=train,
        bn_mode=train - before,
        weight_updates=before - after,
        averaging=after - float(measured.evaluated),
        batches=len(n), examples=int(sum(n)),
    )


# --------------------------------------------------------------------------- #
# rendering
# --------------------------------------------------------------------------- #
def _signed(value: float) -> str:
    text = f"{value:+.4f}"
    return "+0.0000" if text == "-0.0000" else text


def largest_part(d: Decomposition) -> tuple[str, float]:
    """``(label, value)`` of the part with the largest magnitude."""
    attr, label, _ = max(PARTS, key=lambda part: abs(getattr(d, part[0])))
    return label, getattr(d, attr)


def render_table(decompositions: list[Decomposition], title: str | None = None):
    """A rich Table: one column per (framework, strategy), one row per quantity."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SQUARE, title_justify="left")
    table.add_column("")
    for d in decompositions:
        table.add_column(f"{d.framework} {d.strategy}", justify="right", no_wrap=True)
    rows = [("fit reports", lambda d: f"{d.fit_reported:.4f}"),
            ("evaluate reports", lambda d: f"{d.evaluated:.4f}"),
            ("gap (fit - evaluate)", lambda d: _signed(d.total))]
    rows += [(label, lambda d, attr=attr: _signed(getattr(d, attr))) for attr, label, _ in PARTS]
    rows += [("float rounding", lambda d: f"{d.rounding:.1e}")]
    for label, cell in rows:
        table.add_row(label, *(cell(d) for d in decompositions),
                      end_section=label.startswith("gap"))
    return table


def reading(d: Decomposition) -> str:
    """One line saying where the gap comes from."""
    label, value = largest_part(d)
    return (f"{d.framework} {d.strategy}: fit {d.fit_reported:.4f} vs evaluate {d.evaluated:.4f}; "
            f"largest part {label} {_signed(value)} of {_signed(d.total)}")
