"""shared.envelope: free runs judged against the rounding envelope, on records made by hand.

Every envelope, allowance and attribution below is written out here from the numbers the
records are made of, so the judging is checked against arithmetic, not against itself.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from shared import tolerances as tol
from shared.envelope import envelope_from, judge_free_run, loss_series
from shared.record import HeldOut, RunConfig, RunRecord, StepRecord

STEPS = 4
BASE = [2.0, 1.5, 1.2, 1.0]  # per-step losses of the run
HELD = [(0, 2.1), (STEPS, 1.1)]


def _record(framework="torch", *, shift=(0.0,) * STEPS, held_shift=(0.0, 0.0), seed=None,
            strategy="full", dtype="float32") -> RunRecord:
    config = RunConfig(strategy=strategy, steps=STEPS, rounding_seed=seed, dtype=dtype).__dict__
    return RunRecord(framework, strategy, "tinyconv", dict(config),
                     steps=[StepRecord(i, b + d, b + d + 0.3) for i, (b, d) in
                            enumerate(zip(BASE, shift))],
                     heldout=[HeldOut(s, v + d, 0.5) for (s, v), d in zip(HELD, held_shift)])


def _forward(loss: float) -> float:
    return tol.LOCKSTEP_LOSS_ATOL + tol.LOCKSTEP_LOSS_RTOL * abs(loss)


# reruns drifting 1e-6, 4e-6, 2e-6, 1e-5 from the run; the band is the running maximum
RERUNS = [_record(shift=(1e-6, -4e-6, 1e-6, 5e-6), held_shift=(1e-6, 3e-6), seed=1),
          _record(shift=(0.0, 2e-6, -2e-6, -1e-5), held_shift=(0.0, -8e-6), seed=2)]
BAND = np.array([1e-6, 4e-6, 4e-6, 1e-5])


def test_envelope_spread_is_the_largest_rerun_distance_and_band_its_running_max():
    env = envelope_from(_record(), RERUNS)
    assert env.seeds == [1, 2] and env.framework == "torch"
    assert np.max(np.abs(np.subtract(env.spread["train_loss"], [1e-6, 4e-6, 2e-6, 1e-5]))) <= (
        tol.FLOAT64_NOISE)
    assert np.max(np.abs(np.subtract(env.band("train_loss"), BAND))) <= tol.FLOAT64_NOISE
    assert np.max(np.abs(np.subtract(env.band("heldout_loss"), [1e-6, 8e-6]))) <= tol.FLOAT64_NOISE
    assert env.max_spread == pytest.approx(1e-5)
    assert env.accuracy_band() == (0.5, 0.5)


def test_envelope_refuses_a_rerun_without_rounding_seed_or_of_another_length():
    with pytest.raises(ValueError, match="without a perturbed start"):
        envelope_from(_record(), [_record()])
    short = dataclasses.replace(RERUNS[0], steps=RERUNS[0].steps[:2])
    with pytest.raises(ValueError, match="rerun seed 1 has 2 train_loss points, the run 4"):
        envelope_from(_record(), [short])


def test_free_run_within_multiple_of_band_passes_and_just_outside_fails():
    """Allowed at step 3: max(multiple x 1e-5, one forward's rounding); 0.99x passes, 1.01x
    fails naming the series and the step."""
    env = envelope_from(_record(), RERUNS)
    allowed = max(tol.ENVELOPE_MULTIPLE * 1e-5, _forward(BASE[3]))
    inside = judge_free_run(_record("tf", shift=(0, 0, 0, 0.99 * allowed)), _record(), env)
    assert inside.ok and inside.within
    assert inside.max_ratio == pytest.approx(0.99) and inside.max_ratio_at == "train_loss at step 3"
    outside = judge_free_run(_record("tf", shift=(0, 0, 0, 1.01 * allowed)), _record(), env)
    assert not outside.ok and outside.max_ratio == pytest.approx(1.01)
    assert outside.failures[0].startswith("full: free run: tf vs torch ")
    assert "train_loss at step 3" in outside.failures[0]


def test_free_run_floor_is_one_forward_rounding_where_the_band_is_zero():
    env = envelope_from(_record(), [_record(seed=1)])  # a rerun identical to the run
    assert env.max_spread == 0
    just = judge_free_run(_record("tf", shift=(0.9 * _forward(BASE[0]), 0, 0, 0)), _record(), env)
    assert just.ok and just.max_ratio == pytest.approx(0.9)


def test_free_run_outside_with_one_framework_leaving_float64_is_a_finding_not_a_failure():
    """tf 1e-3 from torch at step 2; float64 sits on torch's run: tf's float32 left it."""
    env = envelope_from(_record(), RERUNS)
    exact = _record(dtype="float64")
    tf = _record("tf", shift=(0, 0, 1e-3, 1e-3))
    result = judge_free_run(tf, _record(), env, exact)
    assert result.ok and not result.within and result.departs == "tf"
    assert result.tf_departure == pytest.approx(1e-3) and result.torch_departure == 0
    assert "tf's float32 leaves the float64 run beyond the envelope from train_loss at step 2" \
        in result.finding


def test_free_run_outside_with_both_frameworks_leaving_float64_fails():
    env = envelope_from(_record(), RERUNS)
    exact = _record(dtype="float64", shift=(0, 0, -1e-3, -1e-3))
    result = judge_free_run(_record("tf", shift=(0, 0, 1e-3, 1e-3)), _record(), env, exact)
    assert not result.ok and result.departs == "both"
    assert "both frameworks' float32 leave the float64 run" in result.failures[0]


def test_free_run_naive_must_differ_beyond_the_envelope():
    env = envelope_from(_record(strategy="naive"), [_record(strategy="naive", seed=1)])
    agree = judge_free_run(_record("tf", strategy="naive"), _record(strategy="naive"), env,
                           expected_to_match=False)
    assert not agree.ok and "expected to differ" in agree.failures[0]
    differ = judge_free_run(_record("tf", strategy="naive", shift=(0.5,) * STEPS),
                            _record(strategy="naive"), env, expected_to_match=False)
    assert differ.ok and differ.max_diff == pytest.approx(0.5)


def test_loss_series_holds_train_eval_and_heldout():
    series = loss_series(_record())
    assert series["train_loss"].tolist() == BASE
    assert np.allclose(series["eval_loss"], np.array(BASE) + 0.3)
    assert series["heldout_loss"].tolist() == [2.1, 1.1]
