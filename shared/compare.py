"""Compare two RunRecords of the same run, point by point, within a given tolerance.

Differences are taken per step for the training-mode loss, the
inference-mode loss, and at each held-out point for the held-out loss; a
value passes when ``|a - b| <= atol + rtol * |b|`` (numpy's ``allclose``
rule). The tolerance is always the caller's, by name: float64 runs of the
two frameworks against ``FLOAT64_RUN_ATOL`` (``shared.matrix``), replicas
against one process, a framework against itself. Free-running float32 runs
of two frameworks are not judged here but against the rounding envelope
measured in the same run (``shared.envelope``), and the freezing semantics
step by step (``shared.lockstep``). ``naive`` is expected to *differ*: each
framework's classic mistake is a different mistake.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from shared import tolerances as tol
from shared.record import RunRecord
from shared.strategies import check_expectations

__all__ = [
    "EXPECTED_TO_DIFFER",
    "Comparison",
    "Tolerance",
    "compare_records",
    "expectation_failures",
    "expected_to_match",
]

# Strategies whose two frameworks are *meant* to disagree (the traps differ), and the archs
# where they do. tinyconv, resnet18: torch's requires_grad_(False) leaves BatchNorm on batch
# statistics and moving its statistics, Keras's pre-TF-2.0 layer uses batch statistics with
# its statistics fixed. vit: both make the same mistake (gradients off, the base called in
# training mode, its dropout and drop-path on), which with the verdict runs' rates at 0
# (RunConfig.base_dropout) is frozen's maths: expected to match there.
EXPECTED_TO_DIFFER = {"naive": ("tinyconv", "resnet18")}


def expected_to_match(strategy: str, arch: str) -> bool:
    """Whether the two frameworks' runs of ``strategy`` on ``arch`` are meant to agree."""
    return arch not in EXPECTED_TO_DIFFER.get(strategy, ())


@dataclass(frozen=True)
class Tolerance:
    name: str
    atol: float
    rtol: float


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
                    tolerance: Tolerance) -> Comparison:
    """Per-step differences of two records of the same config, and a verdict."""
    a, b = tf_record, torch_record
    if (a.strategy, a.arch) != (b.strategy, b.arch) or a.config != b.config:
        raise ValueError(f"compare: records are of different runs ({a.framework}: {a.strategy}/"
                         f"{a.arch}, {b.framework}: {b.strategy}/{b.arch}, or different configs)")
    if len(a.steps) != len(b.steps) or len(a.heldout) != len(b.heldout):
        raise ValueError(f"compare: step counts differ ({len(a.steps)} vs {len(b.steps)})")
    t = tolerance
    train = (np.array(a.train_losses), np.array(b.train_losses))
    evals = (np.array(a.eval_losses), np.array(b.eval_losses))
    held = (np.array([h.loss for h in a.heldout]), np.array([h.loss for h in b.heldout]))
    expected = expected_to_match(a.strategy, a.arch)
    cmp = Comparison(
        strategy=a.strategy, arch=a.arch, steps=len(a.steps), tolerance=t,
        expected_to_match=expected,
        max_train_diff=float(np.max(np.abs(train[0] - train[1]), initial=0.0)),
        max_eval_diff=float(np.max(np.abs(evals[0] - evals[1]), initial=0.0)),
        max_heldout_diff=float(np.max(np.abs(held[0] - held[1]), initial=0.0)),
        train_diffs=np.abs(train[0] - train[1]).tolist(),
        eval_diffs=np.abs(evals[0] - evals[1]).tolist(),
    )
    within = all((_excess(x, y, t) <= 0).all() for x, y in (train, evals, held))
    if expected and not within:
        for label, (x, y) in (("train_loss", train), ("eval_loss", evals), ("heldout loss", held)):
            bad = np.flatnonzero(_excess(x, y, t) > 0)
            if bad.size:
                i = int(bad[0])
                cmp.failures.append(
                    f"{a.strategy}: {label} tf vs torch differ by {abs(x[i] - y[i]):.3g} at index {i} "
                    f"(tolerance {t.name}: atol {t.atol:g} + rtol {t.rtol:g})")
    elif not expected and within:
        cmp.failures.append(f"{a.strategy}: tf and torch were expected to differ (different classic "
                            f"mistakes) but agree within {t.name}")
    return cmp


def expectation_failures(record: RunRecord) -> list[str]:
    """What ``record`` shows against its strategy's declared expectations."""
    return check_expectations(
        record.strategy, record.framework,
        train_eval_match=record.max_train_eval_gap <= tol.SAME_FRAMEWORK_ATOL,
        frozen_unchanged=record.frozen_unchanged, bn_stats_changed=record.bn_stats_changed,
        arch=record.arch, base_dropout=record.config.get("base_dropout", True))
