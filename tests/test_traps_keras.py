"""Keras traps: surprising behaviours pinned as they are in Keras 3.15.1 on TensorFlow 2.21.0.

Each test asserts that the surprise still exists. Its failure message names the
docs/PORTING.md row and the number measured now, so a framework upgrade that changes
the behaviour fails loudly and says which row of the guide to update. The measured
number is also recorded with ``record_property`` (``pytest --junitxml``).

Models are tiny raw-Keras ones, independent of the project's model code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch  # noqa: F401  (torch before keras; tf_impl imports torch_impl before TensorFlow)

from shared.tolerances import SAME_FRAMEWORK_ATOL, TRAP_MIN_GAP
from tf_impl import keras

FEATURES = 4
DATA_MEAN = 2.0  # inputs far from BN's initial moving mean 0, so any stat update shows


def _row(name: str) -> str:
    return f"docs/PORTING.md row {name!r}"


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(0)  # Dense init, Dropout masks and fit's shuffle


def _data(n: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    x = rng.randn(n, FEATURES).astype(np.float32) + DATA_MEAN
    y = rng.randn(n, 1).astype(np.float32)
    return x, y


def _np(value) -> np.ndarray:
    """A copy of a Keras variable or eager tensor as a numpy array."""
    return np.array(value.numpy())


def _mse(model: keras.Model, x: np.ndarray, y: np.ndarray, training: bool) -> float:
    return float(np.mean((_np(model(x, training=training)) - y) ** 2))


def _fit_one_batch(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    history = model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return float(history.history["loss"][0])


def _base(*, bn: bool = True, dropout: bool = False) -> keras.Model:
    """A stand-in for a pretrained base: [BatchNormalization] -> [Dropout]."""
    inputs = keras.Input((FEATURES,))
    x = inputs
    if bn:
        x = keras.layers.BatchNormalization(name="bn")(x)
    if dropout:
        x = keras.layers.Dropout(0.5, name="drop")(x)
    return keras.Model(inputs, x, name="base")


def _functional(base: keras.Model, head: keras.layers.Layer) -> keras.Model:
    """The pattern in Keras's own transfer-learning guide: base(inputs, training=False)."""
    inputs = keras.Input((FEATURES,))
    return keras.Model(inputs, head(base(inputs, training=False)))


class InferenceWrapper(keras.layers.Layer):
    def __init__(self, inner: keras.Model, **kwargs) -> None:
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, inputs):
        return self.inner(inputs, training=False)


def _wrapped(base: keras.Model, head: keras.layers.Layer) -> keras.Model:
    inputs = keras.Input((FEATURES,))
    return keras.Model(inputs, head(InferenceWrapper(base)(inputs)))


class SubclassedOuter(keras.Model):
    def __init__(self, base: keras.Model, head: keras.layers.Layer) -> None:
        super().__init__()
        self.base = base
        self.head = head

    def call(self, inputs):
        return self.head(self.base(inputs, training=False))


def _head() -> keras.layers.Dense:
    # fixed averaging kernel, no bias: the loss only depends on what the base did to the inputs
    averaging = keras.initializers.Constant(1.0 / FEATURES)
    return keras.layers.Dense(1, use_bias=False, kernel_initializer=averaging, name="head")


def _compile(model: keras.Model, learning_rate: float = 0.01) -> keras.Model:
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="mse")
    return model


# --- BatchNormalization -------------------------------------------------------


def test_keras_bn_defaults_momentum_0_99_epsilon_1e_3(record_property):
    bn = keras.layers.BatchNormalization()
    record_property("measured", f"momentum={bn.momentum} epsilon={bn.epsilon}")
    assert (bn.momentum, bn.epsilon) == (0.99, 1e-3), (
        f"{_row('BN defaults')}: expected Keras momentum 0.99 epsilon 1e-3, "
        f"got momentum {bn.momentum} epsilon {bn.epsilon}"
    )


def test_keras_bn_trainable_false_runs_inference_mode_and_keeps_stats(record_property):
    bn = keras.layers.BatchNormalization()
    x, _ = _data()
    bn.build(x.shape)
    bn.trainable = False
    before = _np(bn.moving_mean)
    y_training = _np(bn(x, training=True))
    y_inference = _np(bn(x, training=False))
    gap = float(np.abs(y_training - y_inference).max())
    moved = float(np.abs(_np(bn.moving_mean) - before).max())
    record_property("measured", f"mode gap {gap}, moving_mean moved {moved}")
    assert gap == 0.0 and moved == 0.0, (
        f"{_row('freezing BN')}: expected trainable=False BN to ignore training=True; "
        f"training vs inference output gap {gap:.3g}, moving_mean moved {moved:.3g}"
    )


# --- the training flag inside fit ---------------------------------------------


def test_keras_functional_training_false_overridden_by_fit_bn_stats_move(record_property):
    base = _base(bn=True)
    model = _compile(_functional(base, _head()))
    bn = base.get_layer("bn")
    before = _np(bn.moving_mean)
    _fit_one_batch(model, *_data())
    moved = float(np.abs(_np(bn.moving_mean) - before).max())
    record_property("measured", moved)
    assert moved > TRAP_MIN_GAP, (
        f"{_row('base(x, training=False) in a functional model')}: expected fit to run the "
        f"trainable base BN in training mode anyway; moving_mean moved {moved:.3g}"
    )


def test_keras_functional_training_false_overridden_by_fit_dropout_stays_on(record_property):
    model = _compile(_functional(_base(bn=False, dropout=True), _head()), learning_rate=0.0)
    x, y = _data()
    inference_loss = _mse(model, x, y, training=False)
    fit_loss = _fit_one_batch(model, x, y)  # one batch: the pre-update training-mode loss
    gap = abs(fit_loss - inference_loss)
    record_property("measured", f"fit {fit_loss:.6g} vs inference {inference_loss:.6g}")
    assert gap > TRAP_MIN_GAP, (
        f"{_row('base(x, training=False) in a functional model')}: expected Dropout inside "
        f"the base to stay on in fit; fit loss {fit_loss:.6g} vs inference {inference_loss:.6g}"
    )


@pytest.mark.parametrize("build", [_wrapped, SubclassedOuter], ids=["wrapper_layer", "subclassed"])
def test_keras_training_false_in_layer_call_honoured_by_fit(build, record_property):
    base = _base(bn=True, dropout=True)
    model = _compile(build(base, _head()), learning_rate=0.0)
    x, y = _data()
    inference_loss = _mse(model, x, y, training=False)
    bn = base.get_layer("bn")
    before = _np(bn.moving_mean)
    fit_loss = _fit_one_batch(model, x, y)
    moved = float(np.abs(_np(bn.moving_mean) - before).max())
    gap = abs(fit_loss - inference_loss)
    record_property("measured", f"moving_mean moved {moved}, fit-inference loss gap {gap}")
    assert moved == 0.0 and gap <= SAME_FRAMEWORK_ATOL, (
        f"{_row('training=False inside a layer call')}: expected BN and Dropout in inference "
        f"mode; moving_mean moved {moved:.3g}, fit vs inference loss gap {gap:.3g}"
    )


def test_keras_trainable_false_does_not_disable_dropout(record_property):
    drop = keras.layers.Dropout(0.5)
    drop.trainable = False
    zeroed = float(np.mean(_np(drop(np.ones((4, 64), np.float32), training=True)) == 0))
    record_property("measured", zeroed)
    assert zeroed > 0.25, (
        f"{_row('Dropout in a frozen base')}: expected trainable=False Dropout to still drop "
        f"with training=True; zeroed fraction {zeroed:.3g}"
    )


# --- compile / fit lifecycle ----------------------------------------------------


def _dense_pair() -> tuple[keras.Model, keras.layers.Dense]:
    """Input -> base Dense -> head Dense; returns the model and its base layer."""
    inputs = keras.Input((FEATURES,))
    base = keras.layers.Dense(FEATURES, name="base")
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(base(inputs))), base


def _base_change(model: keras.Model, base: keras.layers.Dense) -> float:
    before = _np(base.kernel)
    model.fit(*_data(8), batch_size=8, epochs=1, shuffle=False, verbose=0)
    return float(np.abs(_np(base.kernel) - before).max())


def test_keras_trainable_change_after_compile_before_fit_takes_effect(record_property):
    model, base = _dense_pair()
    _compile(model)
    base.trainable = False  # after compile, but nothing traced yet
    moved = _base_change(model, base)
    record_property("measured", moved)
    assert moved == 0.0, (
        f"{_row('trainable changed after compile')}: expected the freeze to apply at the first "
        f"fit; base kernel moved {moved:.3g}"
    )


def test_keras_trainable_change_after_fit_keeps_traced_step_base_still_trains(record_property):
    model, base = _dense_pair()
    _compile(model)
    _base_change(model, base)  # traces the train step with the base trainable
    base.trainable = False  # no recompile
    moved = _base_change(model, base)
    record_property("measured", moved)
    assert moved > TRAP_MIN_GAP, (
        f"{_row('trainable changed after fit')}: expected the already-traced train step to keep "
        f"training the 'frozen' base; base kernel moved {moved:.3g}"
    )


# Keras formats that error with np.array(variable), which numpy 2 warns about.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_keras_recompile_same_optimizer_after_unfreeze_raises_unknown_variable(record_property):
    model, base = _dense_pair()
    optimizer = keras.optimizers.SGD(0.01)
    base.trainable = False
    model.compile(optimizer=optimizer, loss="mse")
    _base_change(model, base)  # builds the optimizer for the head variables only
    base.trainable = True
    model.compile(optimizer=optimizer, loss="mse")  # accepted: the error comes at fit
    with pytest.raises(ValueError, match="Unknown variable") as raised:
        _base_change(model, base)
    record_property("measured", str(raised.value).split(".")[0])


def test_keras_recompile_same_optimizer_after_freeze_is_accepted(record_property):
    model, base = _dense_pair()
    optimizer = keras.optimizers.SGD(0.01)
    model.compile(optimizer=optimizer, loss="mse")
    _base_change(model, base)
    base.trainable = False  # fewer variables than the optimizer was built with: no error
    model.compile(optimizer=optimizer, loss="mse")
    moved = _base_change(model, base)
    record_property("measured", moved)
    assert moved == 0.0, (
        f"{_row('recompile with the same optimizer')}: expected freeze + recompile to apply, "
        f"base kernel moved {moved:.3g}"
    )


def test_keras_recompile_new_optimizer_after_unfreeze_trains_base(record_property):
    model, base = _dense_pair()
    base.trainable = False
    _compile(model)
    frozen_moved = _base_change(model, base)
    base.trainable = True
    _compile(model)  # a new optimizer instance
    moved = _base_change(model, base)
    record_property("measured", moved)
    assert frozen_moved == 0.0 and moved > TRAP_MIN_GAP, (
        f"{_row('recompile with a new optimizer')}: expected frozen stage to keep the base and "
        f"the recompiled stage to train it; moved {frozen_moved:.3g} then {moved:.3g}"
    )


# --- what fit and evaluate report -------------------------------------------------


def _numpy_linear_sgd(w, b, x, y, batch_size, learning_rate):
    """Reference: the same linear model and SGD, written out in numpy, batch by batch."""
    losses, sizes = [], []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        residual = xb @ w + b - yb
        losses.append(float(np.mean(residual**2)))  # pre-update loss of this batch
        sizes.append(len(xb))
        w = w - learning_rate * 2.0 * xb.T @ residual / residual.size
        b = b - learning_rate * 2.0 * residual.sum(axis=0) / residual.size
    return np.array(losses), np.array(sizes), w, b


def test_keras_fit_loss_is_batch_size_weighted_mean_of_pre_update_losses(record_property):
    x, y = _data(10)  # batches of 4, 4 and 2: an unequal last batch
    inputs = keras.Input((FEATURES,))
    dense = keras.layers.Dense(1)
    model = _compile(keras.Model(inputs, dense(inputs)), learning_rate=0.05)
    w0, b0 = _np(dense.kernel), _np(dense.bias)
    fit_loss = float(
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0).history["loss"][0]
    )
    losses, sizes, _, _ = _numpy_linear_sgd(w0, b0, x, y, 4, 0.05)
    weighted, unweighted = float(np.average(losses, weights=sizes)), float(losses.mean())
    record_property(
        "measured", f"fit {fit_loss:.6g} weighted {weighted:.6g} unweighted {unweighted:.6g}"
    )
    assert (
        abs(fit_loss - weighted) <= SAME_FRAMEWORK_ATOL < TRAP_MIN_GAP < abs(fit_loss - unweighted)
    ), (
        f"{_row('loss reported by fit')}: expected the batch-size-weighted mean of pre-update "
        f"batch losses {weighted:.6g} (unweighted {unweighted:.6g}), fit said {fit_loss:.6g}"
    )


def _bn_dense_model() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    inputs = keras.Input((FEATURES,))
    outputs = keras.layers.Dense(1)(keras.layers.BatchNormalization()(inputs))
    return _compile(keras.Model(inputs, outputs)), *_data()


def test_keras_fit_one_batch_loss_equals_pre_update_training_loss(record_property):
    model, x, y = _bn_dense_model()
    snapshot = model.get_weights()
    pre_update_training = _mse(model, x, y, training=True)  # also moves BN stats...
    model.set_weights(snapshot)  # ...so restore them before fitting
    fit_loss = _fit_one_batch(model, x, y)
    record_property("measured", f"fit {fit_loss:.6g} pre-update training {pre_update_training:.6g}")
    assert abs(fit_loss - pre_update_training) <= SAME_FRAMEWORK_ATOL, (
        f"{_row('loss reported by fit')}: expected one-batch fit loss == pre-update "
        f"training-mode loss {pre_update_training:.6g}, fit said {fit_loss:.6g}"
    )


def test_keras_evaluate_uses_post_update_weights_in_inference_mode(record_property):
    model, x, y = _bn_dense_model()
    fit_loss = _fit_one_batch(model, x, y)
    evaluate_loss = float(model.evaluate(x, y, batch_size=len(x), verbose=0))
    post_update_inference = _mse(model, x, y, training=False)
    record_property("measured", f"evaluate {evaluate_loss:.6g} fit {fit_loss:.6g}")
    assert (
        abs(evaluate_loss - post_update_inference) <= SAME_FRAMEWORK_ATOL
        and abs(evaluate_loss - fit_loss) > TRAP_MIN_GAP
    ), (
        f"{_row('loss reported by evaluate')}: expected evaluate == post-update inference loss "
        f"{post_update_inference:.6g} != fit loss {fit_loss:.6g}; evaluate said {evaluate_loss:.6g}"
    )


def test_keras_fit_shuffles_by_default(record_property):
    x, y = _data(32)
    finals = {}
    for shuffle in (True, False):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((FEATURES,))
        model = _compile(keras.Model(inputs, keras.layers.Dense(1)(inputs)), learning_rate=0.01)
        fit_kwargs = {} if shuffle else {"shuffle": False}  # default vs explicit
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, **fit_kwargs)
        finals[shuffle] = _np(model.layers[-1].kernel)
    gap = float(np.abs(finals[True] - finals[False]).max())
    record_property("measured", gap)
    assert gap > TRAP_MIN_GAP, (
        f"{_row('fit shuffles by default')}: expected default fit to visit batches in another "
        f"order than shuffle=False; final kernels differ by {gap:.3g}"
    )


# --- losses -------------------------------------------------------------------------


def test_keras_sparse_categorical_crossentropy_rejects_label_smoothing(record_property):
    with pytest.raises(TypeError, match="label_smoothing") as raised:
        keras.losses.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    record_property("measured", str(raised.value))


def test_keras_fit_casts_float64_numpy_inputs_to_floatx(record_property):
    """Trap: ``fit`` casts float NumPy inputs to ``keras.config.floatx()`` (float32 unless
    set), even for a model whose every layer is float64: one SGD step of fit is the step
    on the float32-rounded inputs (written out here in float64). With floatx set to float64
    it is the step on the inputs themselves."""
    from shared.tolerances import FLOAT64_NOISE

    rng = np.random.default_rng(0)
    x = 1.0 + rng.uniform(2.0**-27, 2.0**-25, size=(8, 4))  # below float32's half ulp at 1
    y = np.zeros((8, 1))
    rounded = x.astype(np.float32).astype(np.float64)  # all ones
    lr = 2.0**-4

    def step(inputs):  # d/dw mean((x w)^2) for w = ones, then one SGD step
        return np.ones(4) - lr * 2 * np.mean((inputs @ np.ones(4))[:, None] * inputs, axis=0)

    def fit_step(floatx: str) -> np.ndarray:
        previous = keras.config.floatx()
        model = keras.Sequential([keras.Input((4,), dtype="float64"),
                                  keras.layers.Dense(1, use_bias=False, dtype="float64",
                                                     kernel_initializer="ones")])
        model.compile(optimizer=keras.optimizers.SGD(lr),
                      loss=keras.losses.MeanSquaredError(dtype="float64"))
        keras.config.set_floatx(floatx)
        try:
            model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        finally:
            keras.config.set_floatx(previous)
        return np.asarray(model.layers[0].kernel)[:, 0]

    exact, cast = step(x), step(rounded)
    record_property("exact_vs_cast_step", float(np.abs(exact - cast).max()))
    assert np.abs(exact - cast).max() > 1e3 * FLOAT64_NOISE  # the rounding shows in one step
    assert np.abs(fit_step("float32") - cast).max() <= FLOAT64_NOISE  # fit saw float32 inputs
    assert np.abs(fit_step("float64") - exact).max() <= FLOAT64_NOISE
