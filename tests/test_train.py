"""Fine-tuning runs: what matches within a framework, what must not, and tf vs torch.

Records come from the session fixture ``run_record`` (tests/conftest.py), so
each (framework, strategy, config) runs once per session.
"""

import dataclasses

import numpy as np
import pytest

from shared import tolerances
from shared.compare import expectation_failures
from shared.record import RunConfig, RunRecord
from shared.strategies import STRATEGIES

FRAMEWORKS = ["tf", "torch"]
MATCHING = ["frozen", "feature_extraction", "partial"]
GAPPED = ["bn_adapt", "full", "naive"]
PARITY = ["frozen", "feature_extraction", "partial", "bn_adapt", "full"]
MIN_PARITY_STEPS = 30
# Variants of the demo run (Adam, float64, conventions off) run this many steps: enough for
# each effect they show, and the demo's own 100-step runs stay shared with the README check.
VARIANT_STEPS = 30


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("strategy", MATCHING)
def test_frozen_train_loss_equals_eval_loss(run_record, framework, strategy):
    record = run_record(framework, strategy)
    gaps = np.abs(np.array(record.train_losses) - np.array(record.eval_losses))
    assert gaps.max() <= tolerances.SAME_FRAMEWORK_ATOL, (
        f"{strategy}[{framework}]: train/eval loss gap {gaps.max():.3g} at step {gaps.argmax()}")
    assert record.frozen_unchanged, f"{strategy}[{framework}] changed {record.frozen_changes}"
    assert not record.bn_stats_changed


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("strategy", GAPPED)
def test_batch_statistics_train_eval_gap_is_real(run_record, framework, strategy):
    record = run_record(framework, strategy)
    # far above any rounding: BN batch statistics on the shifted target domain
    assert record.max_train_eval_gap > 100 * tolerances.TRAP_MIN_GAP, (
        f"{strategy}[{framework}]: gap only {record.max_train_eval_gap:.3g}")
    assert record.to_dict()["max_train_eval_gap"] == record.max_train_eval_gap


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_record_meets_declared_expectations(run_record, framework, strategy):
    record = run_record(framework, strategy)
    assert expectation_failures(record) == []


def test_naive_torch_running_stats_drift(run_record):
    record = run_record("torch", "naive")
    assert not record.frozen_unchanged
    assert any(k.endswith("running_mean") for k in record.frozen_changes)
    assert any(k.endswith("num_batches_tracked") for k in record.frozen_changes)
    assert record.bn_stats_max_change > tolerances.TRAP_MIN_GAP


def test_naive_keras_legacy_bn_keeps_statistics_but_uses_batch_statistics(run_record):
    record = run_record("tf", "naive")
    assert record.frozen_unchanged and not record.bn_stats_changed
    assert record.max_train_eval_gap > tolerances.TRAP_MIN_GAP


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_feature_extraction_and_frozen_give_same_head_trajectory(run_record, framework):
    frozen = run_record(framework, "frozen")
    cached = run_record(framework, "feature_extraction")
    for a, b in zip(frozen.steps, cached.steps):
        assert abs(a.train_loss - b.train_loss) <= tolerances.SAME_FRAMEWORK_ATOL, a.step
    for a, b in zip(frozen.heldout, cached.heldout):
        assert abs(a.loss - b.loss) <= tolerances.SAME_FRAMEWORK_ATOL, a.step


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("strategy", PARITY)
def test_cross_lockstep_agrees_every_step(strategy_result, strategy, optimizer):
    """Both frameworks take every step from the same state: losses, every tensor's change,
    every optimizer slot and which tensors move agree within the one-step bounds, or (a
    rounding outlier) agree in float64 from that state."""
    steps = {} if optimizer == "sgd" else {"optimizer": optimizer, "steps": VARIANT_STEPS}
    result = strategy_result(strategy, **steps)
    lock = result.lockstep
    assert lock.steps == len(result.torch.steps) >= MIN_PARITY_STEPS
    assert lock.bounds == "LOCKSTEP" and lock.expected_to_match
    assert lock.ok and not lock.semantic_events, lock.failures
    for event in lock.numerics_events:  # decided in float64, never absorbed in float32
        assert event.ratio > 1 >= event.float64_ratio, event


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("strategy", PARITY)
def test_cross_free_run_within_rounding_envelope(strategy_result, strategy, optimizer):
    """Each framework on its own: the two float32 runs stay within ENVELOPE_MULTIPLE times
    what rounding alone does to torch's run (reruns from one-ulp starts, batches reordered),
    or one framework's float32 left float64 beyond it (named, not a failure)."""
    steps = {} if optimizer == "sgd" else {"optimizer": optimizer, "steps": VARIANT_STEPS}
    result = strategy_result(strategy, **steps)
    free, envelope = result.free, result.envelope
    assert list(envelope.seeds[:len(tolerances.ENVELOPE_SEEDS)]) == list(tolerances.ENVELOPE_SEEDS)
    assert free.multiple == tolerances.ENVELOPE_MULTIPLE
    assert free.ok, free.failures
    assert free.within or free.departs in ("tf", "torch"), (free.max_ratio_at, free.departs)
    assert result.exact is not None and result.exact.config["dtype"] == "float64"


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cross_naive_frameworks_differ(strategy_result, optimizer):
    """Each framework's classic mistake is another mistake: lockstep finds torch's frozen
    BatchNorm statistics moving at every step (Keras's legacy BN keeps them), and the free
    runs part far beyond the rounding envelope."""
    steps = {} if optimizer == "sgd" else {"optimizer": optimizer, "steps": VARIANT_STEPS}
    result = strategy_result("naive", **steps)
    lock = result.lockstep
    assert not lock.expected_to_match and lock.ok and result.ok
    assert len(lock.semantic_events) == lock.steps
    first = lock.semantic_events[0]
    assert first.step == 0 and first.check.startswith("moved base.") and "running_" in first.check
    assert result.free.max_ratio > 1 and result.free.max_diff > 100 * tolerances.TRAP_MIN_GAP


FLOAT64_CASES = [*((s, "sgd") for s in PARITY), ("bn_adapt", "adam"), ("full", "adam")]


@pytest.mark.parametrize("strategy, optimizer", FLOAT64_CASES)
def test_cross_float64_runs_agree_within_float64_run_atol(strategy_result, strategy, optimizer):
    """float64 is the exactness proof: the same run in both frameworks agrees within
    FLOAT64_RUN_ATOL (at most 1e-10) at every step, and lockstep within its float64 bounds."""
    result = strategy_result(strategy, dtype="float64", optimizer=optimizer, steps=VARIANT_STEPS)
    assert tolerances.FLOAT64_RUN_ATOL <= 1e-10
    assert result.tf.config["dtype"] == result.torch.config["dtype"] == "float64"
    assert result.ok, result.failures
    assert result.free.max_diff <= tolerances.FLOAT64_RUN_ATOL
    assert result.lockstep.bounds == "LOCKSTEP_FLOAT64" and not result.lockstep.events


def test_cross_naive_differs_in_float64_too(strategy_result):
    result = strategy_result("naive", dtype="float64", steps=VARIANT_STEPS)
    assert result.ok and len(result.lockstep.semantic_events) == VARIANT_STEPS
    assert result.free.max_diff > 100 * tolerances.TRAP_MIN_GAP


def test_cross_keras_adam_usual_betas_differ_by_float32_bias_correction(tinyconv_checkpoint):
    """Trap: Keras takes the bias correction's beta ** t of float32 betas, torch of the betas
    themselves. With the usual 0.9 / 0.999 (not float32 numbers) every Adam update differs
    by a factor written out here, found in float64 (where nothing else separates them)."""
    from shared import frameworks
    from shared.record import RunConfig

    config = RunConfig(strategy="frozen", optimizer="adam", dtype="float64", steps=1,
                       adam_beta_1=0.9, adam_beta_2=0.999, checkpoint=str(tinyconv_checkpoint))
    steppers = {fw: frameworks.load(fw, "train").Stepper(config) for fw in FRAMEWORKS}
    start = steppers["torch"].state()
    steppers["tf"].load(start)
    idx = steppers["torch"].prepared.indices[0]
    updates = {}
    for fw, stepper in steppers.items():
        stepper.step(idx)
        updates[fw] = stepper.state().tensors["head.fc.weight"] - start.tensors["head.fc.weight"]
    b1, b2 = 0.9, 0.999
    f1, f2 = float(np.float32(b1)), float(np.float32(b2))
    expected = (np.sqrt(1 - f2) / (1 - f1)) / (np.sqrt(1 - b2) / (1 - b1))  # step 1
    ratio = updates["tf"] / updates["torch"]
    big = np.abs(updates["torch"]) > 0.5 * np.abs(updates["torch"]).max()  # |g| >> epsilon
    assert np.max(np.abs(ratio[big] / expected - 1)) <= tolerances.LOCKSTEP_FLOAT64_RTOL
    assert abs(expected - 1) > 100 * tolerances.LOCKSTEP_FLOAT64_RTOL  # 6.7e-6: real, not rounding


def test_keras_moving_variance_convention_is_n_over_n_minus_1():
    import keras

    from tf_impl.model import TorchVarianceBatchNormalization

    x = np.random.default_rng(0).normal(2.0, 3.0, (32, 4)).astype(np.float32)
    stock = keras.layers.BatchNormalization(momentum=0.0, epsilon=1e-5)
    torchlike = TorchVarianceBatchNormalization(momentum=0.0, epsilon=1e-5)
    stock(x, training=True)
    torchlike(x, training=True)
    ratio = np.asarray(torchlike.moving_variance) / np.asarray(stock.moving_variance)
    assert np.allclose(ratio, 32 / 31, rtol=tolerances.FORWARD_RTOL)
    assert np.allclose(np.asarray(torchlike.moving_variance), x.var(0, ddof=1),
                       rtol=tolerances.FORWARD_RTOL)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_same_run_twice_is_bit_identical(run_record, tinyconv_checkpoint, framework):
    from shared import frameworks

    # the 30-step variant (also used by the float32-rounding test): batch statistics, updates
    first = run_record(framework, "bn_adapt", steps=VARIANT_STEPS)
    config = RunConfig(strategy="bn_adapt", steps=VARIANT_STEPS, checkpoint=str(tinyconv_checkpoint))
    again = frameworks.load(framework, "train").run(config)
    assert again.to_json() == first.to_json()


def test_run_record_json_roundtrip(run_record):
    record = run_record("torch", "naive")
    assert RunRecord.from_json(record.to_json()).to_json() == record.to_json()
    with pytest.raises(ValueError, match="missing field 'steps'"):
        data = record.to_dict()
        del data["steps"]
        RunRecord.from_dict(data)
    with pytest.raises(ValueError, match="not JSON"):
        RunRecord.from_json("{", "x.json")


def test_heldout_points_every_k_steps(run_record):
    record = run_record("torch", "frozen")
    assert [h.step for h in record.heldout] == list(range(0, RunConfig().steps + 1, 10))
    assert all(0.0 <= h.accuracy <= 1.0 for h in record.heldout)


def test_run_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown strategy 'freeze'"):
        RunConfig(strategy="freeze")
    with pytest.raises(ValueError, match="unknown optimizer"):
        RunConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        RunConfig(batch_size=1)
    assert RunConfig(optimizer="adam").learning_rate == 0.001


def test_run_config_base_dropout_only_where_the_base_has_dropout():
    """base_dropout=False (the verdict runs' model) exists for vit only; a rerun whose
    rounding differs needs it there (reordering a batch moves dropout's masks)."""
    assert RunConfig(arch="vit", strategy="frozen", base_dropout=False).base_dropout is False
    with pytest.raises(ValueError, match="base_dropout=False: tinyconv's base has no dropout "
                                         "to switch off \\(only vit\\)"):
        RunConfig(base_dropout=False)
    with pytest.raises(ValueError, match="base_dropout must be true or false, got 'no'"):
        RunConfig(arch="vit", strategy="frozen", base_dropout="no")
    with pytest.raises(ValueError, match="rounding_seed needs base_dropout=False on vit"):
        RunConfig(arch="vit", strategy="frozen", rounding_seed=1)
    assert RunConfig(arch="vit", strategy="frozen", rounding_seed=1, base_dropout=False)


# --- the project's optimizers against a separately written Adam ----------------------------------

# Gradients of this size make an epsilon of 1e-8 (torch's default) change every update by ~1%,
# while the parity epsilon (1e-16) changes it by ~1e-10 of itself.
TINY_GRADIENT = 1e-6
ADAM_STEPS = 20
ADAM_LR = 0.02  # 20 steps move each weight about 0.4: float32 rounding stays near 1e-7


def _reference_adam(w0, grads, lr: float, eps: float, keras_form: bool, b1: float, b2: float):
    """float64 Adam written out. ``keras_form``: epsilon before the bias correction, whose
    beta powers Keras takes of float32 betas (for 0.999 that alone moves 1 - beta2**t by
    1.3e-5 of itself at step 1; the parity betas are float32 numbers); else torch's form."""
    p1, p2 = (float(np.float32(b)) for b in (b1, b2)) if keras_form else (b1, b2)
    w, m, v = w0.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        c1, c2 = 1 - p1**t, 1 - p2**t
        if keras_form:
            w = w - lr * np.sqrt(c2) / c1 * m / (np.sqrt(v) + eps)
        else:
            w = w - lr / c1 * m / (np.sqrt(v) / np.sqrt(c2) + eps)
    return w


def _project_adam(framework: str, config: RunConfig, w0, grads) -> np.ndarray:
    """``w0`` after ``grads`` through the framework's own ``train.make_optimizer(config)``."""
    if framework == "torch":
        import torch

        from torch_impl.train import make_optimizer
        param = torch.nn.Parameter(torch.from_numpy(w0.copy()))
        optimizer = make_optimizer(config, [param])
        for g in grads:
            param.grad = torch.from_numpy(g)
            optimizer.step()
        return param.detach().numpy().astype(np.float64)
    from tf_impl import keras
    from tf_impl.train import make_optimizer
    variable = keras.Variable(w0)
    optimizer = make_optimizer(config)
    for g in grads:
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(g), variable)])
    return keras.ops.convert_to_numpy(variable).astype(np.float64)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_cross_make_optimizer_adam_uses_parity_epsilon_matches_reference(framework):
    """Each framework's run optimizer for ``optimizer="adam"`` is Adam with the parity epsilon
    and betas (1e-16, 7/8 and 1 - 2**-10, written here by hand) in that framework's placement,
    not a framework default."""
    config = RunConfig(optimizer="adam", learning_rate=ADAM_LR)
    rng = np.random.default_rng(0)
    w0 = (0.1 * rng.standard_normal(16)).astype(np.float32)
    grads = [((1 + 0.5 * rng.standard_normal(16)) * TINY_GRADIENT).astype(np.float32)
             for _ in range(ADAM_STEPS)]
    keras_form = framework == "tf"
    got = _project_adam(framework, config, w0, grads)
    parity = _reference_adam(w0, grads, ADAM_LR, 1e-16, keras_form, 0.875, 1 - 2.0**-10)
    torch_default = _reference_adam(w0, grads, ADAM_LR, 1e-8, keras_form, 0.9, 0.999)
    assert np.abs(got - parity).max() <= tolerances.OPTIMIZER_STEP_ATOL  # must match
    assert np.abs(got - torch_default).max() > tolerances.TRAP_MIN_GAP  # must differ
    assert np.abs(got - w0).max() > tolerances.TRAP_MIN_GAP  # the steps moved the weights


# --- the feature cache itself, head dropout, held-out-only differences -------------------------

CACHE_IMAGES = 300  # more than one of the cache's 256-image chunks


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_feature_cache_is_the_base_in_inference_mode_not_training_mode(tinyconv_checkpoint,
                                                                       framework):
    """What feature_extraction trains on: the base's inference-mode features of the target
    images (computed here at once, on a model no strategy touched); BN on batch statistics
    would give other features, so a cache made in training mode fails."""
    from shared import data, frameworks
    from shared.checkpoint import load_checkpoint
    from shared.init import head_init

    tensors, _ = load_checkpoint(tinyconv_checkpoint)
    initial = {**{k: v for k, v in tensors.items() if k.startswith("base.")}, **head_init(32, 5, 0)}
    images = data.load_domains(size=32).target_train.images[:CACHE_IMAGES]
    model_module, train, freeze, weights = (frameworks.load(framework, name) for name in
                                            ("model", "train", "freeze", "weights"))

    def fresh():
        model = model_module.build_model("tinyconv", 5)
        weights.import_weights(model, initial)
        return model

    if framework == "torch":
        import torch

        cached = train._features(freeze.apply_strategy(fresh(), "feature_extraction"), images,
                                 "float32").numpy()
        reference = fresh()
        x = torch.from_numpy(data.nhwc_to_nchw(images))
        with torch.no_grad():
            inference = reference.eval().base(x).numpy()
            training = reference.train().base(x).numpy()
    else:
        cached = train._features(freeze.apply_strategy(fresh(), "feature_extraction"), images)
        reference = fresh()
        inference = np.asarray(reference.base(images, training=False))
        training = np.asarray(reference.base(images, training=True))
    assert cached.shape == (CACHE_IMAGES, 32)
    assert np.allclose(cached, inference, atol=tolerances.FORWARD_ATOL, rtol=tolerances.FORWARD_RTOL)
    assert np.abs(cached - training).max() > tolerances.TRAP_MIN_GAP


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_head_dropout_gaps_train_eval_only_through_the_head(run_record, framework):
    from strategy_oracle import HEAD

    dropped = run_record(framework, "frozen", head_dropout=0.5, steps=VARIANT_STEPS)
    plain = run_record(framework, "frozen")  # the demo's run (same start, 100 steps)
    assert dropped.max_train_eval_gap > tolerances.TRAP_MIN_GAP  # dropout on in training
    assert plain.max_train_eval_gap <= tolerances.SAME_FRAMEWORK_ATOL
    # the base is untouched: only the head moved, no statistic changed
    assert set(dropped.moved) == set(HEAD) and dropped.frozen_unchanged
    assert not dropped.bn_stats_changed
    # same pre-update weights at step 0: inference-mode losses agree, dropout or not
    assert abs(dropped.steps[0].eval_loss - plain.steps[0].eval_loss) <= tolerances.SAME_FRAMEWORK_ATOL
    assert dropped.heldout[-1].loss < dropped.heldout[0].loss


def test_cross_free_run_differing_only_in_heldout_losses_fails(strategy_result):
    """A free run whose held-out loss alone leaves the envelope fails, naming the point."""
    from shared.envelope import judge_free_run

    result = strategy_result("frozen")
    free = judge_free_run(result.tf, result.torch, result.envelope, result.exact)
    assert free.ok and free.within
    shift = 100 * (tolerances.LOCKSTEP_LOSS_ATOL + tolerances.LOCKSTEP_LOSS_RTOL
                   * max(h.loss for h in result.torch.heldout))
    shifted = [dataclasses.replace(h, loss=h.loss + shift) if h.step == 20 else h
               for h in result.torch.heldout]
    broken = judge_free_run(result.tf, dataclasses.replace(result.torch, heldout=shifted),
                            result.envelope)  # no float64 run: nothing to attribute it to
    assert not broken.ok and len(broken.failures) == 1
    assert broken.max_ratio_at == "heldout_loss at step 20" and broken.max_ratio > 1
    assert broken.failures[0].startswith("frozen: free run: tf vs torch ")
