"""Compare two RunRecords of the same run in two frameworks, with named tolerances.

Differences are taken per step for the training-mode loss, the
inference-mode loss, and at each held-out point for the held-out loss; a
value passes when ``|a - b| <= atol + rtol * |b|`` (numpy's ``allclose``
rule). The tolerance comes from :mod:`shared.tolerances` by name: the
default ``STEP_LOSS_*``, or an exception with its reason (see
:func:`step_tolerance`: ``full`` in float32 or with Adam, and on ResNet-18
every strategy that normalises with batch statistics in float32). ``naive``
is expected to *differ*: each framework's classic mistake is a different
mistake.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from shared import tolerances as tol
from shared.record import RunRecord
from shared.strategies import check_expectations, get_strategy

__all__ = [
    "EXPECTED_TO_DIFFER",
    "Comparison",
    "Tolerance",
    "compare_records",
    "expectation_failures",
    "step_tolerance",
]

# Strategies whose two frameworks are *meant* to disagree (the traps differ).
EXPECTED_TO_DIFFER = ("naive",)


@dataclass(frozen=True)
class Tolerance:
    name: str
    atol: float
    rtol: float


def step_tolerance(strategy: str, optimizer: str, dtype: str = "float32",
                   arch: str = "tinyconv") -> Tolerance:
    """The named tolerance for cross-framework per-step losses of this run."""
    batch_statistics = get_strategy(strategy).bn_mode == "batch"
    if arch == "resnet18" and dtype == "float32" and batch_statistics:
        if strategy == "full":
            return Tolerance("RESNET_FULL_FLOAT32_STEP", tol.RESNET_FULL_FLOAT32_STEP_ATOL,
                             tol.RESNET_FULL_FLOAT32_STEP_RTOL)
        return Tolerance("RESNET_BATCH_STATS_STEP", tol.RESNET_BATCH_STATS_STEP_ATOL,
                         tol.RESNET_BATCH_STATS_STEP_RTOL)
    if strategy == "full" and optimizer == "adam":
        if dtype == "float64":
            return Tolerance("FULL_ADAM_FLOAT64_STEP_ATOL", tol.FULL_ADAM_FLOAT64_STEP_ATOL, 0.0)
        return Tolerance("FULL_FLOAT32_STEP", tol.FULL_FLOAT32_STEP_ATOL, tol.FULL_FLOAT32_STEP_RTOL)
    if strategy == "full" and dtype == "float32":
        return Tolerance("FULL_FLOAT32_STEP", tol.FULL_FLOAT32_STEP_ATOL, tol.FULL_FLOAT32_STEP_RTOL)
    if get_strategy(strategy).bn_mode == "batch" and dtype == "float32":
        return Tolerance("BATCH_STATS_STEP", tol.BATCH_STATS_STEP_ATOL, tol.BATCH_STATS_STEP_RTOL)
    return Tolerance("STEP_LOSS", tol.STEP_LOSS_ATOL, tol.STEP_LOSS_RTOL)


@dataclass
class Comparison:
    strategy: str
    arch: str
    steps: int
    tolerance: Tolerance
    expected_to_match: bool
    max_train_diff: float
    max_eval_diff: float
    max_heldout_diff: float
    train_diffs: list[float] = field(repr=False)
    eval_diffs: list[float] = field(repr=False)
    failures: list[str] = field(default_factory=list)

    @property
    def max_diff(self) -> float:
        return max(self.max_train_diff, self.max_eval_diff, self.max_heldout_diff)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        data = asdict(self)
        data["max_diff"] = self.max_diff
        data["ok"] = self.ok
        return data


def _excess(a: np.ndarray, b: np.ndarray, t: Tolerance) -> np.ndarray:
    return np.abs(a - b) - (t.atol + t.rtol * np.abs(b))


def compare_records(tf_record: RunRecord, torch_record: RunRecord,
                    tolerance: Tolerance | None = None) -> Comparison:
    """Per-step differences of two records of the same config, and a verdict."""
    a, b = tf_record, torch_record
    if (a.strategy, a.arch) != (b.strategy, b.arch) or a.config != b.config:
        raise ValueError(f"compare: records are of different runs ({a.framework}: {a.strategy}/"
                         f"{a.arch}, {b.framework}: {b.strategy}/{b.arch}, or different configs)")
    if len(a.steps) != len(b.steps) or len(a.heldout) != len(b.heldout):
        raise ValueError(f"compare: step counts differ ({len(a.steps)} vs {len(b.steps)})")
    config = a.config
    t = tolerance or step_tolerance(a.strategy, config.get("optimizer", "sgd"),
                                    config.get("dtype", "float32"), a.arch)
    train = (np.array(a.train_losses), np.array(b.train_losses))
    evals = (np.array(a.eval_losses), np.array(b.eval_losses))
    held = (np.array([h.loss for h in a.heldout]), np.array([h.loss for h in b.heldout]))
    expected_to_match = a.strategy not in EXPECTED_TO_DIFFER
    cmp = Comparison(
        strategy=a.strategy, arch=a.arch, steps=len(a.steps), tolerance=t,
        expected_to_match=expected_to_match,
        max_train_diff=float(np.max(np.abs(train[0] - train[1]), initial=0.0)),
        max_eval_diff=float(np.max(np.abs(evals[0] - evals[1]), initial=0.0)),
        max_heldout_diff=float(np.max(np.abs(held[0] - held[1]), initial=0.0)),
        train_diffs=np.abs(train[0] - train[1]).tolist(),
        eval_diffs=np.abs(evals[0] - evals[1]).tolist(),
    )
    within = all((_excess(x, y, t) <= 0).all() for x, y in (train, evals, held))
    if expected_to_match and not within:
        for label, (x, y) in (("train_loss", train), ("eval_loss", evals), ("heldout loss", held)):
            bad = np.flatnonzero(_excess(x, y, t) > 0)
            if bad.size:
                i = int(bad[0])
                cmp.failures.append(
                    f"{a.strategy}: {label} tf vs torch differ by {abs(x[i] - y[i]):.3g} at index {i} "
                    f"(tolerance {t.name}: atol {t.atol:g} + rtol {t.rtol:g})")
    elif not expected_to_match and within:
        cmp.failures.append(f"{a.strategy}: tf and torch were expected to differ (different classic "
                            f"mistakes) but agree within {t.name}")
    return cmp


def expectation_failures(record: RunRecord) -> list[str]:
    """What ``record`` shows against its strategy's declared expectations."""
    return check_expectations(
        record.strategy, record.framework,
        train_eval_match=record.max_train_eval_gap <= tol.SAME_FRAMEWORK_ATOL,
        frozen_unchanged=record.frozen_unchanged, bn_stats_changed=record.bn_stats_changed)
