"""shared.lockstep: one step from the same state, compared within one step's rounding.

The unit tests build training states by hand and write every bound out (units in the
last place, the relative parts, BatchNorm's momentum x sqrt(n) x eps), so the comparison
is checked against arithmetic done here, not against itself. The runs show that a Keras
step from a loaded state is exactly Keras's own step, that torch's lockstep reference is
exactly its own run, that a check outside its float32 bound is decided in float64, and
that small seeded differences on one side fail `freeze-parity compare` naming the
strategy, the step and the check.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cli_inprocess import cli

from shared import lockstep, tolerances
from shared.record import RunConfig
from shared.training_state import TrainingState

EPS32 = 2.0 ** -23  # float32's unit in the last place at 1
KEYS = ("base.block1.conv.weight", "base.block1.bn.weight", "base.block1.bn.running_mean",
        "base.block1.bn.running_var", "base.block3.bn.running_mean", "base.block3.bn.running_var",
        "head.fc.weight")


def _state(values: dict, slots: dict | None = None, step: int = 0) -> TrainingState:
    tensors = {k: np.asarray(v, np.float64) for k, v in values.items()}
    return TrainingState(tensors, "sgd", {"momentum_buffer": {k: np.asarray(v, np.float64)
                                                            for k, v in (slots or {}).items()}}
                         if slots else {}, step, {"learning_rate": 0.02, "momentum": 0.9})


def _start() -> TrainingState:
    return _state({k: [1.0, -0.5] for k in KEYS}, {"head.fc.weight": [2.0, -1.0]})


def _after(changes: dict, slot=(2.5, -1.25)) -> TrainingState:
    start = _start()
    return _state({k: start.tensors[k] + np.asarray(changes.get(k, (0.0, 0.0))) for k in KEYS},
                  {"head.fc.weight": slot})


def _checks(tf: TrainingState, torch: TrainingState, strategy="frozen", losses=None):
    losses = losses or {"tf": (1.0, 1.0), "torch": (1.0, 1.0)}
    bounds = lockstep.step_bounds("float32", RunConfig(strategy=strategy))
    return {c.check + " " + c.key: c for c in
            lockstep.compare_step(_start(), losses, {"tf": tf, "torch": torch}, strategy, bounds)}


def test_compare_step_identical_steps_every_ratio_zero():
    after = _after({"head.fc.weight": (-0.01, 0.02)})
    checks = _checks(after, after)
    assert set(checks) >= {"train_loss ", "eval_loss ", "tensor head.fc.weight",
                           "slot:momentum_buffer head.fc.weight"}
    assert all(c.ratio == 0 for c in checks.values())


def test_compare_step_parameter_bound_is_ulps_of_scale_plus_rtol_of_change():
    change = (-0.01, 0.02)
    bound = tolerances.LOCKSTEP_ULPS * EPS32 * 1.0 + tolerances.LOCKSTEP_UPDATE_RTOL * 0.02
    torch = _after({"head.fc.weight": change})
    inside = _after({"head.fc.weight": (change[0] + 0.9 * bound, change[1])})
    outside = _after({"head.fc.weight": (change[0] + 1.1 * bound, change[1])})
    check = _checks(inside, torch)["tensor head.fc.weight"]
    assert check.bound == pytest.approx(bound, rel=1e-12) and check.ratio == pytest.approx(0.9)
    assert _checks(outside, torch)["tensor head.fc.weight"].outside


def test_compare_step_batch_statistics_strategy_loosens_base_gradients_only():
    """Under a batch-statistics strategy base tensors get BN's backward allowance; the head
    (after the last BatchNorm) keeps the sharp one."""
    torch = _after({"base.block1.conv.weight": (0.01, 0.0), "head.fc.weight": (0.01, 0.0)})
    tf = _after({"base.block1.conv.weight": (0.0101, 0.0), "head.fc.weight": (0.0101, 0.0)})
    checks = _checks(tf, torch, "full")
    base_bound = tolerances.LOCKSTEP_ULPS * EPS32 + tolerances.LOCKSTEP_BATCH_STATS_RTOL * 0.01
    assert checks["tensor base.block1.conv.weight"].bound == pytest.approx(base_bound, rel=1e-12)
    assert not checks["tensor base.block1.conv.weight"].outside  # 1e-2 of the change
    assert checks["tensor head.fc.weight"].outside


def test_compare_step_slot_bound_is_relative_to_its_value():
    """A momentum buffer is judged against its value (2.5 here), not its change (0.5)."""
    bound = tolerances.LOCKSTEP_ULPS * 2 * EPS32 + tolerances.LOCKSTEP_SLOT_RTOL * 2.5
    torch = _after({}, slot=(2.5, -1.25))
    tf = _after({}, slot=(2.5 + 2 * bound, -1.25))
    check = _checks(tf, torch)["slot:momentum_buffer head.fc.weight"]
    assert check.bound == pytest.approx(bound, rel=1e-12) and check.ratio == pytest.approx(2.0)


def test_compare_step_statistic_bound_is_momentum_sqrt_n_eps_of_its_layer():
    """base.block3.bn sees 32 x 8 x 8 values per channel mean (tinyconv: 32 px, strides 1, 2,
    2); block1 sees 32 x 32 x 32: its bound is four times as loose."""
    n3, n1 = 32 * 8 * 8, 32 * 32 * 32
    # the statistic's largest |value| after the step: 1.0 + 0.05
    bound3 = (tolerances.LOCKSTEP_ULPS * EPS32
              + tolerances.LOCKSTEP_STATS_SUM_C * 0.1 * np.sqrt(n3) * EPS32 * 1.05)
    change = {"base.block3.bn.running_var": (0.05, 0.0), "base.block1.bn.running_mean": (0.05, 0.0)}
    torch = _after(change)
    tf = _after({k: (v[0] + 2 * bound3, 0.0) for k, v in change.items()})
    checks = _checks(tf, torch, "bn_adapt")
    assert checks["tensor base.block3.bn.running_var"].bound == pytest.approx(bound3, rel=1e-12)
    assert checks["tensor base.block3.bn.running_var"].outside
    assert not checks["tensor base.block1.bn.running_mean"].outside  # sqrt(32) / sqrt(2) x looser
    assert lockstep.step_bounds().stats_rtol("base.block1.bn.running_mean") == pytest.approx(
        tolerances.LOCKSTEP_STATS_SUM_C * 0.1 * np.sqrt(n1) * EPS32)


def test_compare_step_tensor_moved_on_one_side_only_is_named():
    torch = _after({"base.block1.bn.running_mean": (0.05, -0.02)})
    checks = _checks(_after({}), torch, "naive")
    moved = checks["moved base.block1.bn.running_mean"]
    assert moved.outside and moved.tf == 0 and moved.torch == pytest.approx(0.05)
    assert "moved on one side only" in moved.describe()


def test_compare_step_loss_bound_is_atol_plus_rtol():
    bound = tolerances.LOCKSTEP_LOSS_ATOL + tolerances.LOCKSTEP_LOSS_RTOL * 2.0
    after = _after({})
    checks = _checks(after, after, losses={"tf": (2.0 + 1.5 * bound, 2.0), "torch": (2.0, 2.0)})
    assert checks["train_loss "].ratio == pytest.approx(1.5) and checks["eval_loss "].ratio == 0


def test_adam_sensitivity_follows_one_over_sqrt_v():
    """Where v (the second moment) is tiny, a gradient's rounding can move Adam's update by up
    to the learning rate; where v is large, by little. Written out for two elements."""
    hyper = {"learning_rate": 0.001, "beta_1": 0.875, "beta_2": 1 - 2.0 ** -10, "epsilon": 1e-16}
    start = TrainingState({"head.fc.weight": np.zeros(2)}, "adam", {}, 0, hyper)
    g = np.array([1.0, 1e-9])
    after = TrainingState({"head.fc.weight": np.zeros(2)}, "adam",
                          {"exp_avg": {"head.fc.weight": (1 - 0.875) * g},
                           "exp_avg_sq": {"head.fc.weight": 2.0 ** -10 * g * g}}, 1, hyper)
    got = lockstep._adam_sensitivity("head.fc.weight", start, after, 1e-4)
    dg = 1e-4 * 1.0
    v_hat = 2.0 ** -10 * g * g / (1 - (1 - 2.0 ** -10))
    expected = 2 * 0.001 / (1 - 0.875) * (1 - 0.875) * dg / (np.sqrt(v_hat) + 1e-16)
    assert np.max(np.abs(got / expected - 1)) <= tolerances.FLOAT64_NOISE  # one formula, twice
    assert got[1] > 1e8 * got[0]


# --------------------------------------------------------------------------- #
# runs
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def config(tinyconv_checkpoint):
    return RunConfig(strategy="full", steps=3, checkpoint=str(tinyconv_checkpoint))


def test_keras_step_from_a_loaded_state_is_train_on_batch_bit_for_bit(config):
    """The lockstep's traced load-and-step is Keras's own train_step: the same losses and
    every variable the same bits as setting the variables and calling train_on_batch."""
    from shared import frameworks
    from tf_impl.weights import import_training_state

    state = frameworks.load("torch", "train").Stepper(config).state()
    idx = frameworks.load("torch", "train").Stepper(config).prepared.indices[1]
    train = frameworks.load("tf", "train")
    fused, plain = train.Stepper(config), train.Stepper(config)
    fused.load(state)
    import_training_state(plain.model, plain.trainee.optimizer, state)
    assert fused.step(idx) == plain.step(idx)
    a, b = fused.state(), plain.state()
    assert all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert a.slots.keys() == b.slots.keys() and a.step == b.step == 1
    assert all(np.array_equal(a.slots[n][k], b.slots[n][k]) for n in a.slots for k in a.slots[n])


def test_torch_lockstep_reference_is_its_own_run_bit_for_bit(config):
    from shared import frameworks

    reference, record = lockstep.lockstep(config)
    alone = frameworks.load("torch", "train").run(config)
    assert reference.to_json() == alone.to_json()
    assert record.ok and record.steps == config.steps


def test_lockstep_replayed_from_reference_states_equals_stepping_alongside(config):
    """The worker's path (shared.worker): torch's run made first with its states kept, the
    Keras steps replayed from them, gives the same record bit for bit; a reference of
    another strategy or length is refused in one line."""
    alongside_run, alongside = lockstep.lockstep(config)
    made = lockstep.reference_run(config)
    assert len(made.states) == config.steps + 1
    first, last = made.states[0].tensors, made.states[-1].tensors
    assert not np.array_equal(first["head.fc.weight"], last["head.fc.weight"])  # it trained
    replayed_run, replayed = lockstep.lockstep(config, reference=made)
    assert replayed_run.to_json() == alongside_run.to_json()
    assert replayed.to_dict() == alongside.to_dict()
    other = dataclasses.replace(config, strategy="frozen")
    with pytest.raises(ValueError, match=r"^lockstep of frozen: the reference run given is "
                                         r"full's, 3 steps \(expected 3\)$"):
        lockstep.lockstep(other, reference=made)
    with pytest.raises(ValueError, match=r"^reference run of full: 5 states for 3 steps \(expected one more\)$"):
        lockstep.ReferenceRun(made.record, made.states + made.states[-1:])


def test_lockstep_check_outside_float32_bound_decided_in_float64(config, monkeypatch):
    """Bounds far below float32 rounding put every step outside in float32; float64 from the
    same states agrees, so every event is numerics (not a failure), with each framework's
    own float32 departure measured."""
    for name in ("LOCKSTEP_UPDATE_RTOL", "LOCKSTEP_SLOT_RTOL", "LOCKSTEP_BATCH_STATS_RTOL"):
        monkeypatch.setattr(tolerances, name, 1e-12)
    monkeypatch.setattr(tolerances, "LOCKSTEP_ULPS", 1e-6)
    _, record = lockstep.lockstep(dataclasses.replace(config, strategy="frozen"))
    assert len(record.events) == config.steps and record.ok
    for event in record.events:
        assert not event.semantic and event.ratio > 1 >= event.float64_ratio
        assert event.departs in ("tf", "torch", "both")
        assert event.tf_departure > 0 or event.torch_departure > 0


def _torch_sgd(**extra):
    def make(config, params):
        import torch

        from torch_impl.train import _keras_float
        return torch.optim.SGD(params, lr=_keras_float(config.learning_rate),
                               momentum=_keras_float(config.momentum), **extra)
    return make


def _torch_bn_momentum(factor):
    def norm_layer(config, cls=None):
        from torch import nn

        cls = cls or nn.BatchNorm2d
        return lambda n, name="bn": cls(n, eps=config.bn_epsilon, momentum=config.bn_momentum * factor)
    return norm_layer


def _keras_stock_bn():
    from tf_impl import train

    original = train.norm_layer_for
    return lambda arch, strategy, reconcile=True, synchronized=False: original(
        arch, strategy, False, synchronized)


# Each changes one side by a small amount; lockstep must fail the strategy at a named step
# and check, in float32 (compare's default).
SEEDED = {
    "sgd weight decay 1e-4 (torch)": (
        "full", lambda mp: mp.setattr("torch_impl.train.make_optimizer", _torch_sgd(weight_decay=1e-4)),
        "slot:momentum_buffer head.fc.weight"),
    "sgd dampening 1e-3 (torch)": (
        "frozen", lambda mp: mp.setattr("torch_impl.train.make_optimizer", _torch_sgd(dampening=1e-3)),
        "slot:momentum_buffer head.fc.weight"),
    "bn momentum 1e-3 off (torch)": (
        "bn_adapt", lambda mp: mp.setattr("torch_impl.model.default_norm_layer",
                                          _torch_bn_momentum(1 + 1e-3)), "running_"),
    "biased running variance (keras)": (
        "bn_adapt", lambda mp: mp.setattr("tf_impl.train.norm_layer_for", _keras_stock_bn()),
        "running_var"),
}


@pytest.mark.parametrize("seeded", list(SEEDED))
def test_compare_seeded_one_side_difference_exit_1_names_strategy_step_check(seeded, monkeypatch,
                                                                              tmp_path):
    strategy, seed, check = SEEDED[seeded]
    seed(monkeypatch)
    result = cli("compare", "--strategies", strategy, "--steps", "3", "--quiet",
                 "--out", tmp_path / "out")
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED:")]
    assert failed and failed[0].startswith(f"FAILED: {strategy}: lockstep step "), result.stdout
    assert check in failed[0] and "differ in float64 too" in failed[0]
