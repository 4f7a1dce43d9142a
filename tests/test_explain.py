"""fit vs evaluate, decomposed: shared.explain arithmetic and {tf,torch}_impl.explain measurements.

The measured tests fit one short epoch (the first ``EXAMPLES`` target training
images, in batches of 32 and a last batch of 4, so batch-size weighting shows)
from the shipped pretrained checkpoint, as ``freeze-parity explain`` does; the
CLI test runs the command through ``shared.cli.main`` in this process.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_inprocess import cli

import shared.explain as ex
from shared import frameworks
from shared.record import RunConfig
from shared.tolerances import (
    LOCKSTEP_LOSS_ATOL,
    LOCKSTEP_LOSS_RTOL,
    SAME_FRAMEWORK_ATOL,
    TRAP_MIN_GAP,
)

EXAMPLES = 100  # 3 batches of 32 and one of 4


# --------------------------------------------------------------------------- #
# the arithmetic (no framework)
# --------------------------------------------------------------------------- #
def _measured(**overrides) -> ex.FitEvaluate:
    values = {"framework": "tf", "strategy": "naive", "batch_sizes": [32, 32, 4],
              "train_losses": [2.0, 1.5, 1.0], "eval_losses_before": [3.0, 2.5, 2.0],
              "eval_losses_after": [1.2, 1.1, 0.9], "fit_reported": 0.0, "evaluated": 1.0}
    values.update(overrides)
    return ex.FitEvaluate(**values)


def test_weighted_mean_weights_by_batch_size():
    assert ex.weighted_mean([2.0, 1.0], [3, 1]) == (2.0 * 3 + 1.0) / 4


def test_decompose_parts_worked_by_hand():
    # by hand, batch sizes 32, 32, 4 (68 examples):
    #   train  (2.0*32 + 1.5*32 + 1.0*4) / 68 = 116 / 68
    #   before (3.0*32 + 2.5*32 + 2.0*4) / 68 = 184 / 68
    #   after  (1.2*32 + 1.1*32 + 0.9*4) / 68 = 77.2 / 68
    d = ex.decompose(_measured(fit_reported=116 / 68, evaluated=1.0))
    assert abs(d.bn_mode - (116 - 184) / 68) <= SAME_FRAMEWORK_ATOL
    assert abs(d.weight_updates - (184 - 77.2) / 68) <= SAME_FRAMEWORK_ATOL
    assert abs(d.averaging - (77.2 / 68 - 1.0)) <= SAME_FRAMEWORK_ATOL
    assert abs(d.total - (116 / 68 - 1.0)) <= SAME_FRAMEWORK_ATOL
    assert (d.batches, d.examples) == (3, 68)


def test_decompose_rounding_is_fit_reported_minus_its_float64_mean():
    d = ex.decompose(_measured(fit_reported=5.0))
    assert abs(d.rounding - (5.0 - d.fit_mean)) <= SAME_FRAMEWORK_ATOL


@pytest.mark.parametrize("overrides, message", [
    ({"train_losses": [1.0]}, "one length"),
    ({"batch_sizes": [32, 0, 4]}, "batch sizes must be >= 1"),
    ({"framework": "jax"}, "unknown framework"),
    ({"strategy": "magic"}, "unknown strategy"),
])
def test_fit_evaluate_rejects_bad_measurements(overrides, message):
    with pytest.raises(ValueError, match=message):
        _measured(**overrides)


def test_decompose_rejects_non_finite_losses():
    with pytest.raises(ValueError, match="non-finite"):
        ex.decompose(_measured(evaluated=float("nan")))


def test_epoch_indices_is_the_runs_first_epoch_order():
    from shared import data

    batches = data.take_batch_indices(100, 32, 3, seed=0)
    order = ex.epoch_indices(100, seed=0)
    assert np.array_equal(order[:96], np.concatenate(batches))
    assert sorted(order.tolist()) == list(range(100))
    assert np.array_equal(ex.epoch_indices(100, 0, examples=10), order[:10])
    with pytest.raises(ValueError, match="examples must be in"):
        ex.epoch_indices(100, 0, examples=101)


def test_batch_slices_last_batch_smaller():
    assert [(s.start, s.stop) for s in ex.batch_slices(70, 32)] == [(0, 32), (32, 64), (64, 70)]


# --------------------------------------------------------------------------- #
# measured in both frameworks
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="session")
def checkpoint(tinyconv_checkpoint) -> str:
    return str(tinyconv_checkpoint)  # the shipped one: what `freeze-parity explain` uses


@pytest.fixture(scope="module")
def measure(checkpoint):
    """``measure(framework, strategy)``: its FitEvaluate, measured once per module."""
    cache: dict[tuple[str, str], ex.FitEvaluate] = {}

    def get(framework: str, strategy: str) -> ex.FitEvaluate:
        if (framework, strategy) not in cache:
            config = RunConfig(strategy=strategy, checkpoint=checkpoint)
            impl = frameworks.load(framework, "explain")
            cache[framework, strategy] = impl.measure_fit_evaluate(config, EXAMPLES)
        return cache[framework, strategy]
    return get


def _reference_frozen_epoch(framework: str, checkpoint: str) -> tuple[float, float]:
    """(fit-reported loss, evaluate loss) of ``frozen``, by a loop written here, not explain.py.

    Frozen by construction: the base runs once in inference mode and only the head's
    parameters are given to the optimizer (SGD with the run's learning rate and momentum),
    batches of 32 in the run's first-epoch order; fit's number is the batch-size-weighted
    mean of the pre-update batch losses, evaluate's the loss at the end over all examples.
    """
    from shared.finetune import prepare

    config = RunConfig(strategy="frozen", checkpoint=checkpoint)
    prepared = prepare(config)
    order = ex.epoch_indices(len(prepared.train), config.seed, EXAMPLES)
    images, labels = prepared.train.images[order], prepared.train.labels[order]
    losses, sizes = [], []
    if framework == "torch":
        import torch

        from torch_impl.model import build_model
        from torch_impl.weights import import_weights

        model = build_model("tinyconv", prepared.num_classes)
        import_weights(model, prepared.initial)
        model.eval()
        y = torch.from_numpy(labels)
        with torch.no_grad():
            features = model.base(torch.from_numpy(np.ascontiguousarray(
                images.transpose(0, 3, 1, 2))))
        opt = torch.optim.SGD(model.head.parameters(), lr=config.learning_rate,
                              momentum=config.momentum)
        for start in range(0, len(y), config.batch_size):
            f, t = features[start:start + config.batch_size], y[start:start + config.batch_size]
            loss = torch.nn.functional.cross_entropy(model.head(f), t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            sizes.append(len(t))
        with torch.no_grad():
            evaluated = float(torch.nn.functional.cross_entropy(model.head(features), y))
    else:
        import keras
        import tensorflow as tf

        from tf_impl.model import build_model
        from tf_impl.weights import import_weights

        model = build_model("tinyconv", prepared.num_classes)
        import_weights(model, prepared.initial)
        features = model.base(images, training=False)
        opt = keras.optimizers.SGD(learning_rate=config.learning_rate, momentum=config.momentum)
        variables = model.head.trainable_variables
        for start in range(0, len(labels), config.batch_size):
            f = features[start:start + config.batch_size]
            t = labels[start:start + config.batch_size]
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    t, model.head(f, training=True)))
            opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
            losses.append(float(loss))
            sizes.append(len(t))
        evaluated = float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels, model.head(features, training=False))))
    fit = float(np.dot(losses, sizes) / np.sum(sizes))
    return fit, evaluated


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_explain_frozen_gap_is_all_weight_updates_like_a_loop_written_here(measure, checkpoint,
                                                                        framework):
    d = ex.decompose(measure(framework, "frozen"))
    fit, evaluated = _reference_frozen_epoch(framework, checkpoint)
    assert fit - evaluated > TRAP_MIN_GAP  # there is a gap to explain
    assert abs(d.fit_reported - fit) <= LOCKSTEP_LOSS_ATOL, (d.fit_reported, fit)
    assert abs(d.evaluated - evaluated) <= LOCKSTEP_LOSS_ATOL, (d.evaluated, evaluated)
    assert d.bn_mode == 0.0
    assert abs(d.weight_updates - (fit - evaluated)) <= LOCKSTEP_LOSS_ATOL, (d.weight_updates,
                                                                           fit - evaluated)
    assert abs(d.averaging) <= LOCKSTEP_LOSS_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_frozen_bn_mode_part_is_exactly_zero(measure, framework):
    m = measure(framework, "frozen")
    assert m.train_losses == m.eval_losses_before  # batch by batch, bit for bit
    assert ex.decompose(m).bn_mode == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_naive_bn_mode_part_is_large(measure, framework):
    d = ex.decompose(measure(framework, "naive"))
    assert abs(d.bn_mode) > TRAP_MIN_GAP, (
        f"{framework} naive: BN-mode part {d.bn_mode:+.6f}, expected |part| > TRAP_MIN_GAP "
        f"{TRAP_MIN_GAP:g} (BatchNorm normalising with batch statistics in training)")


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_explain_averaging_part_is_rounding_only(measure, framework):
    # fit weights batches by size and inference-mode losses are per example
    d = ex.decompose(measure(framework, "naive"))
    assert abs(d.averaging) <= SAME_FRAMEWORK_ATOL


@pytest.mark.slow
def test_keras_fit_reports_batch_size_weighted_mean_of_pre_update_train_losses(measure):
    m = measure("tf", "frozen")
    assert m.batch_sizes == [32, 32, 32, 4]
    weighted = ex.weighted_mean(m.train_losses, m.batch_sizes)
    unweighted = float(np.mean(m.train_losses))
    assert abs(m.fit_reported - weighted) <= SAME_FRAMEWORK_ATOL, (
        f"model.fit reported {m.fit_reported:.7f}, batch-size-weighted mean of the per-batch "
        f"training-mode losses is {weighted:.7f}")
    # the weighting is visible: the plain mean of batch losses is 100x further from what fit
    # reports than the weighted mean may be (5.2e-4 on the shipped checkpoint)
    assert abs(m.fit_reported - unweighted) > 100 * SAME_FRAMEWORK_ATOL
    # pre-update: the first batch's loss is the loss at the initial weights, not after a step
    assert m.train_losses[0] == m.eval_losses_before[0]
    assert abs(m.fit_reported - m.evaluated) > TRAP_MIN_GAP  # the seed situation: they differ


@pytest.mark.slow
def test_cross_explain_frozen_agrees(measure):
    tf_d = ex.decompose(measure("tf", "frozen"))
    torch_d = ex.decompose(measure("torch", "frozen"))
    for attr in ("fit_reported", "evaluated", "weight_updates"):
        a, b = getattr(tf_d, attr), getattr(torch_d, attr)
        assert abs(a - b) <= LOCKSTEP_LOSS_ATOL + LOCKSTEP_LOSS_RTOL * abs(b), f"{attr}: tf {a} torch {b}"


@pytest.mark.slow
def test_decompose_function_matches_measurement(measure, checkpoint):
    config = RunConfig(strategy="frozen", checkpoint=checkpoint)
    d = frameworks.load("torch", "explain").decompose(config, EXAMPLES)
    assert d == ex.decompose(measure("torch", "frozen"))


@pytest.mark.slow
def test_explain_cli_json_torch():
    """Through shared.cli.main (tests/cli_inprocess.py), on the session's cache (tests/conftest.py):
    runs use the shipped checkpoint."""
    proc = cli("explain", "--framework", "torch", "--json", "--examples", str(EXAMPLES))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [(d["framework"], d["strategy"]) for d in result["decompositions"]] == [
        ("torch", "frozen"), ("torch", "naive")]
    frozen, naive = result["decompositions"]
    assert frozen["bn_mode"] == 0.0 and abs(naive["bn_mode"]) > TRAP_MIN_GAP


@pytest.mark.parametrize("argv, message", [
    (["--examples", "0"], "--examples must be in [1, "),
    (["--strategies", "frozen,nope"], "unknown strategy 'nope'"),
    (["--framework", "jax"], "invalid choice: 'jax'"),
])
def test_explain_cli_bad_input_exit_2_one_line(checkpoint, monkeypatch, capsys, argv, message):
    """In process (shared.cli.main, what the console script runs): the raw stderr line."""
    from shared import cli

    try:
        status = cli.main(["explain", *argv])
    except SystemExit as exit_:  # argparse's own errors exit from parse_args
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
