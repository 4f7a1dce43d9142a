"""Free-running float32 runs judged against the rounding envelope measured in the same run.

Two float32 runs of the same training drift apart by as much as float32
rounding, amplified by the trajectory, carries them: for a stable strategy
1e-7, for one that trains on batch statistics 1e-1 after 100 steps, and for
one that passes a point where rounding decides (a ReLU at zero, a near tie)
a jump. No fixed tolerance fits every strategy on every CPU. The envelope is
measured instead: the reference framework reruns the same training from
starts moved one unit in the last place (``RunConfig.rounding_seed``, a few
seeds), and its spread around the unperturbed run, per step, is how far
rounding alone carries this training from this start on this machine. The
cross-framework difference passes within ``ENVELOPE_MULTIPLE`` times that
spread (its running maximum: a step's spread is never smaller than an
earlier step's), or within one forward pass's rounding
(``LOCKSTEP_LOSS_*``), whichever is larger.

Each float32 run is also measured against the float64 run from the same
start (exact arithmetic, to 1e-13: the two frameworks agree in float64).
When the cross-framework difference leaves the envelope and only one
framework's float32 left float64 beyond it, that framework's float32 is
named, as a numerics finding, apart from the freezing-semantics verdict
(which the lockstep comparison, ``shared.lockstep``, gives); when both left
it, no framework explains the difference and the free run fails.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from shared import tolerances as tol
from shared.record import RunRecord

__all__ = ["SERIES", "Envelope", "FreeRun", "envelope_from", "judge_free_run", "loss_series"]

SERIES = ("train_loss", "eval_loss", "heldout_loss")


def loss_series(record: RunRecord) -> dict[str, np.ndarray]:
    """The losses a free-run comparison looks at: per step, and at each held-out point."""
    return {"train_loss": np.array(record.train_losses, np.float64),
            "eval_loss": np.array(record.eval_losses, np.float64),
            "heldout_loss": np.array([h.loss for h in record.heldout], np.float64)}


@dataclass
class Envelope:
    """How far reruns from one-ulp-perturbed starts stray from the run, per point."""
    framework: str
    seeds: list[int]
    # series -> per point: the largest |rerun - run| over the seeds so far
    spread: dict[str, list[float]]
    # held-out accuracy after the last step: the run's, then each rerun's
    final_accuracy: list[float] = field(default_factory=list)

    def band(self, series: str) -> np.ndarray:
        """The running maximum of the spread: what rounding carried this run to by each point."""
        return np.maximum.accumulate(np.asarray(self.spread[series], np.float64))

    @property
    def max_spread(self) -> float:
        return max(max(v, default=0.0) for v in self.spread.values())

    def accuracy_band(self) -> tuple[float, float]:
        return min(self.final_accuracy), max(self.final_accuracy)

    def to_dict(self) -> dict:
        return asdict(self)


def envelope_from(run: RunRecord, reruns: list[RunRecord]) -> Envelope:
    """The envelope of ``run`` from its perturbed ``reruns`` (same config but the start)."""
    base = loss_series(run)
    spread = {name: np.zeros_like(values) for name, values in base.items()}
    seeds = []
    for rerun in reruns:
        if rerun.config.get("rounding_seed") is None:
            raise ValueError("envelope: a rerun without a perturbed start (rounding_seed)")
        seeds.append(int(rerun.config["rounding_seed"]))
        other = loss_series(rerun)
        for name, values in base.items():
            if other[name].shape != values.shape:
                raise ValueError(f"envelope: rerun seed {seeds[-1]} has {other[name].size} "
                                 f"{name} points, the run {values.size}")
            spread[name] = np.maximum(spread[name], np.abs(other[name] - values))
    accuracy = [run.heldout[-1].accuracy] + [r.heldout[-1].accuracy for r in reruns]
    return Envelope(run.framework, seeds, {k: v.tolist() for k, v in spread.items()}, accuracy)


@dataclass
class FreeRun:
    """The free-running comparison of one strategy against its envelope."""
    strategy: str
    expected_to_match: bool
    multiple: float
    max_diff: float = 0.0       # largest |tf - torch| over every series and point
    max_diff_at: str = ""
    # largest |tf - torch| / allowed (the envelope times the multiple, or one forward)
    max_ratio: float = 0.0
    max_ratio_at: str = ""
    envelope: float = 0.0       # the envelope's largest spread over the run
    # largest |float32 - float64| of each framework (None: no float64 run to measure it)
    tf_departure: float | None = None
    torch_departure: float | None = None
    departs: str = ""           # whose float32 left float64 beyond the envelope: tf, torch, both
    finding: str = ""           # a numerics finding (not a failure), or ""
    failures: list[str] = field(default_factory=list)

    @property
    def within(self) -> bool:
        return self.max_ratio <= 1.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ok"], data["within"] = self.ok, self.within
        return data


def _allowed(values: np.ndarray, band: np.ndarray, multiple: float) -> np.ndarray:
    forward = tol.LOCKSTEP_LOSS_ATOL + tol.LOCKSTEP_LOSS_RTOL * np.abs(values)
    return np.maximum(multiple * band, forward)


def _common(a: RunRecord, b: RunRecord, name: str, x: np.ndarray, y: np.ndarray):
    """``x``, ``y`` at the points both records have (held-out points may differ in number)."""
    if name != "heldout_loss":
        return x, y, list(range(len(x)))
    steps_a = [h.step for h in a.heldout]
    steps_b = {h.step: i for i, h in enumerate(b.heldout)}
    shared = [(i, steps_b[s], s) for i, s in enumerate(steps_a) if s in steps_b]
    return (x[[i for i, _, _ in shared]], y[[j for _, j, _ in shared]], [s for *_, s in shared])


def _departure(run: RunRecord, exact: RunRecord, env: Envelope, multiple: float):
    """(largest |run - exact|, first point beyond the envelope or None) over common points."""
    worst, first = 0.0, None
    a, b = loss_series(run), loss_series(exact)
    for name in SERIES:
        x, y, points = _common(run, exact, name, a[name], b[name])
        band = env.band(name)
        if name == "heldout_loss":
            index = {h.step: i for i, h in enumerate(run.heldout)}
            band = band[[index[p] for p in points]]
        diff = np.abs(x - y)
        worst = max(worst, float(diff.max(initial=0.0)))
        beyond = np.flatnonzero(diff > _allowed(y, band, multiple))
        if beyond.size and first is None:
            first = f"{name} at step {points[int(beyond[0])]}"
    return worst, first


def judge_free_run(tf: RunRecord, torch: RunRecord, envelope: Envelope,
                   exact: RunRecord | None = None, expected_to_match: bool = True,
                   multiple: float | None = None) -> FreeRun:
    """``tf`` against ``torch``, float32, within ``multiple`` times ``envelope``.

    ``exact``: the float64 run from the same start (attributes a difference outside the
    envelope to the framework whose float32 left it). ``multiple`` None:
    ``ENVELOPE_MULTIPLE``.
    """
    multiple = tol.ENVELOPE_MULTIPLE if multiple is None else multiple
    if len(tf.steps) != len(torch.steps) or len(tf.heldout) != len(torch.heldout):
        raise ValueError(f"free run: step counts differ (tf {len(tf.steps)}, torch "
                         f"{len(torch.steps)})")
    result = FreeRun(tf.strategy, expected_to_match, multiple, envelope=envelope.max_spread)
    a, b = loss_series(tf), loss_series(torch)
    for name in SERIES:
        band = envelope.band(name)
        if band.shape != b[name].shape:
            raise ValueError(f"free run: envelope has {band.size} {name} points, the runs "
                             f"{b[name].size}")
        diff = np.abs(a[name] - b[name])
        ratio = diff / _allowed(b[name], band, multiple)
        i, j = int(np.argmax(diff)), int(np.argmax(ratio))
        point = (lambda k: torch.heldout[k].step) if name == "heldout_loss" else (lambda k: k)
        if diff[i] > result.max_diff:
            result.max_diff, result.max_diff_at = float(diff[i]), f"{name} at step {point(i)}"
        if ratio[j] > result.max_ratio:
            result.max_ratio, result.max_ratio_at = float(ratio[j]), f"{name} at step {point(j)}"
    if exact is not None:
        departures = {fw: _departure(run, exact, envelope, multiple)
                      for fw, run in (("tf", tf), ("torch", torch))}
        result.tf_departure, result.torch_departure = (departures[fw][0] for fw in ("tf", "torch"))
        beyond = [fw for fw, (_, first) in departures.items() if first is not None]
        result.departs = "both" if len(beyond) == 2 else (beyond[0] if beyond else "")
    allowed = f"{multiple:g} x the rounding envelope ({envelope.framework} reruns, seeds " \
              f"{','.join(map(str, envelope.seeds))})"
    if not expected_to_match:
        if result.within:
            result.failures.append(f"{tf.strategy}: free run: tf and torch were expected to "
                                   f"differ (different classic mistakes) but stay within "
                                   f"{allowed}")
        return result
    if result.within:
        return result
    where = (f"{tf.strategy}: free run: tf vs torch {result.max_diff:.3g} apart "
             f"({result.max_ratio_at}: {result.max_ratio:.3g} x what {allowed} allows)")
    if result.departs in ("tf", "torch"):
        other = "torch" if result.departs == "tf" else "tf"
        mine, theirs = departures[result.departs], departures[other]
        result.finding = (f"{where}: {result.departs}'s float32 leaves the float64 run beyond "
                          f"the envelope from {mine[1]} (largest {mine[0]:.3g}), {other}'s "
                          f"stays within it (largest {theirs[0]:.3g}): {result.departs}'s "
                          f"float32 arithmetic on this run, not its semantics (lockstep decides "
                          f"those)")
    elif result.departs == "both":
        result.failures.append(f"{where}; both frameworks' float32 leave the float64 run beyond "
                               f"the envelope, so neither framework's rounding explains it")
    elif exact is None:
        result.failures.append(where + "; no float64 run to attribute it")
    # else: each framework stays within the envelope of the float64 run, on opposite sides
    return result
