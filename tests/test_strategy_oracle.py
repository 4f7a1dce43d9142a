"""Real runs against the hand-written strategy oracle (tests/strategy_oracle.py).

A tinyconv run must move exactly the tensors the oracle lists as trained
(every one of them, by more than float32 rounding could over the run: a run
that learns nothing fails) and leave every other tensor bit-identical, and its
held-out loss must end below where it started; ``frozen_keys`` must declare
frozen exactly what the oracle does, for tinyconv and ResNet-18. Records come
from the session fixture ``run_record``.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from strategy_oracle import (
    HEAD,
    RESNET_DECLARED_FROZEN_RULE,
    RESNET_LAYER4_CONV,
    TINY_BN_AFFINE,
    TINY_BN_COUNTERS,
    TINY_BN_STATS,
    TINY_CONV,
    TINY_DECLARED_FROZEN,
    resnet_keys,
    tiny_all,
    tiny_moved_by_run,
)

from shared.strategies import STRATEGIES, frozen_keys

FRAMEWORKS = ["tf", "torch"]


@functools.cache
def _start_scales(config: tuple) -> dict[str, float]:
    """Largest |value| of every canonical tensor a run of ``config`` starts from."""
    from shared.finetune import prepare
    from shared.record import RunConfig

    initial = prepare(RunConfig(**dict(config))).initial
    return {k: float(np.max(np.abs(v))) for k, v in initial.items()}


def _not_trained(record, expected: set[str], framework: str) -> list[str]:
    """The expected tensors whose change rounding alone could explain, one line each.

    A float tensor must have moved by more than ``steps`` float32 ulps at its largest
    starting magnitude (what a step that only re-rounds its values could add up to); a
    torch BatchNorm counter by exactly one per step (one training-mode forward each).
    """
    steps = record.config["steps"]
    scales = _start_scales(tuple(sorted(record.config.items())))
    lines = []
    for key in sorted(expected):
        change = record.moved.get(key, 0.0)
        if key in TINY_BN_COUNTERS[framework]:
            if change != steps:
                lines.append(f"{key} counted {change:g}, expected {steps} (one per step)")
            continue
        rounding = steps * float(np.spacing(np.float32(scales[key])))
        if not change > rounding:
            lines.append(f"{key} moved {change:.3g}, within {steps} float32 ulps at its scale "
                         f"{scales[key]:.3g} ({rounding:.3g})")
    return lines


def test_oracle_covers_every_strategy():
    assert set(TINY_DECLARED_FROZEN) == set(STRATEGIES)
    assert set(RESNET_DECLARED_FROZEN_RULE) == set(STRATEGIES)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_tinyconv_run_moves_exactly_the_hand_listed_tensors(run_record, framework, strategy):
    record = run_record(framework, strategy)
    moved = set(record.moved)
    expected = tiny_moved_by_run(strategy, framework)
    label = f"{strategy}[{framework}]"
    assert moved <= tiny_all(framework), f"{label}: unknown tensors {sorted(moved - tiny_all(framework))}"
    assert not expected - moved, f"{label}: declared trainable but never moved {sorted(expected - moved)}"
    assert not moved - expected, f"{label}: must stay bit-identical but moved {sorted(moved - expected)}"
    assert not (weak := _not_trained(record, expected, framework)), f"{label}: {weak}"


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_tinyconv_run_heldout_loss_ends_below_start(run_record, framework, strategy):
    record = run_record(framework, strategy)
    start, end = record.heldout[0], record.heldout[-1]
    assert start.step == 0 and end.step == record.config["steps"]
    if (strategy, framework) == ("naive", "tf"):
        # Keras's classic mistake learns on batch-statistics features (the training-mode
        # loss falls) but infers with the stored source statistics: held-out loss rises
        assert record.steps[-1].train_loss < record.steps[0].train_loss
        assert end.loss > start.loss, f"naive[tf]: held-out {start.loss:.4f} -> {end.loss:.4f}"
        return
    assert end.loss < start.loss, (f"{strategy}[{framework}]: held-out loss {start.loss:.4f} at "
                                   f"step 0, {end.loss:.4f} at the end: nothing was learned")


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_frozen_keys_tinyconv_equal_hand_list(strategy):
    keys = HEAD + TINY_CONV + TINY_BN_AFFINE + TINY_BN_STATS
    assert sorted(frozen_keys(strategy, keys, "tinyconv")) == sorted(TINY_DECLARED_FROZEN[strategy])


def test_resnet_hand_keys_are_102_tensors_20_batchnorms():
    k = resnet_keys()
    assert len(k["conv"]) == 20 and len(k["bn_affine"]) == 40 and len(k["bn_stats"]) == 40
    assert len(set(HEAD + k["conv"] + k["bn_affine"] + k["bn_stats"])) == 102
    assert set(RESNET_LAYER4_CONV) <= set(k["conv"])


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_frozen_keys_resnet18_equal_hand_rules(strategy):
    k = resnet_keys()
    keys = HEAD + k["conv"] + k["bn_affine"] + k["bn_stats"]
    expected = RESNET_DECLARED_FROZEN_RULE[strategy](k)
    assert sorted(frozen_keys(strategy, keys, "resnet18")) == sorted(expected)
