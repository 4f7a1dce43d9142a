"""Bare Keras baselines and probes for ``freeze-parity bench``. Mirrors ``torch_impl/bench.py``.

The baseline the project's ``train.run`` is measured against is written the
way a Keras user writes it: the same model (``build_model``, with Keras's
stock BatchNormalization), pretrained weights and batches, the base frozen
with ``base.trainable = False``, a stock ``compile`` (optimizer and loss
only, no metrics) and ``fit`` with no callbacks. The probes time one part of
the project's step in isolation (the per-step inference-mode loss through the
project's own ``StepRecorder``, one held-out evaluation, caching the
features), so the benchmark can say where the project's extra time per step
goes.

Every factory does its set-up when called and returns a callable that does
only the timed work. Nothing here runs on a GPU: eager TensorFlow ops on the
CPU have finished when they return, so :func:`synchronize` has nothing to
wait for.
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from shared.finetune import Prepared
from tf_impl import train
from tf_impl.freeze import apply_strategy
from tf_impl.model import build_model
from tf_impl.weights import import_weights

__all__ = [
    "BARE_STRATEGIES",
    "bare_train",
    "cache_probe",
    "heldout_probe",
    "info",
    "record_probe",
    "set_threads",
    "synchronize",
]

# Strategies with a one-line idiomatic equivalent: freeze the base, train the head.
BARE_STRATEGIES = ("frozen", "feature_extraction")
_CHUNK = 256  # images per inference forward when caching features (as train.run does)


def info() -> dict:
    """Versions and threading of this framework, for the benchmark's machine record."""
    return {"tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            # 0 = TensorFlow's default (one thread per core)
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "run_threads": train.RUN_THREADS, "device": "cpu"}


def set_threads(threads: int) -> None:
    """Use ``threads`` threads within and between ops; call before any TensorFlow work."""
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    train.RUN_THREADS = threads  # recorded; TensorFlow applies it process-wide


def synchronize() -> None:
    """Wait for queued work: nothing to wait for, eager CPU ops are synchronous."""


def _check(strategy: str) -> str:
    if strategy not in BARE_STRATEGIES:
        raise ValueError(f"bare loop: strategy {strategy!r} has no bare equivalent; "
                         f"expected one of: {', '.join(BARE_STRATEGIES)}")
    return strategy


def _images(prepared: Prepared) -> np.ndarray:
    return prepared.train.images.astype(prepared.config.dtype)


def _features(base, images: np.ndarray) -> np.ndarray:
    return np.concatenate([keras.ops.convert_to_numpy(base(images[i:i + _CHUNK], training=False))
                           for i in range(0, len(images), _CHUNK)])


def bare_train(prepared: Prepared, strategy: str) -> Callable[[int], float]:
    """``fit(steps)``: build, freeze and train ``steps`` steps the plain way; the last loss.

    Each call starts from a fresh model (as ``train.run`` does), so a call at
    N steps and one at 2N differ by exactly N training steps.
    """
    _check(strategy)
    config = prepared.config
    labels = prepared.train.labels

    def fit(steps: int) -> float:
        model = build_model(config.arch, prepared.num_classes)
        import_weights(model, prepared.initial, prepared.checkpoint)
        model.base.trainable = False  # a non-trainable BatchNormalization runs in inference mode
        images = _images(prepared)
        if strategy == "feature_extraction":
            inputs = _features(model.base, images)
            net = keras.Sequential([keras.Input((inputs.shape[1],)), model.head])
        else:
            inputs, net = images, model
        net.compile(optimizer=keras.optimizers.SGD(learning_rate=config.learning_rate,
                                                   momentum=config.momentum),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        order = np.concatenate(prepared.indices[:steps])
        history = net.fit(inputs[order], labels[order], batch_size=config.batch_size, epochs=1,
                          shuffle=False, verbose=0)
        return float(history.history["loss"][-1])

    return fit


def _project_model(prepared: Prepared, strategy: str):
    config = prepared.config
    model = build_model(config.arch, prepared.num_classes, head_dropout=config.head_dropout,
                        norm_layer=train.norm_layer_for(config.arch, strategy,
                                                        config.reconcile_bn_variance),
                        dtype=config.dtype)
    import_weights(model, prepared.initial, prepared.checkpoint)
    apply_strategy(model, strategy)
    return model


def record_probe(prepared: Prepared, strategy: str) -> Callable[[int], None]:
    """``probe(steps)``: the per-step recording ``train.run`` adds, over ``steps`` batches.

    That is :class:`tf_impl.train.StepRecorder`'s ``on_train_batch_begin``
    itself (the inference-mode loss on the step's batch at the pre-update
    weights), on the model ``train.run`` fits, with no held-out points.
    Traced once here, so calls time the steady state.
    """
    _check(strategy)
    stepper = train.Stepper(dataclasses.replace(prepared.config, strategy=strategy),
                            prepared=prepared)
    recorder = train.StepRecorder(stepper, points=set())
    recorder.set_model(stepper.trainee)

    def probe(steps: int) -> None:
        for batch in range(steps):
            recorder.on_train_batch_begin(batch)

    probe(1)
    return probe


def heldout_probe(prepared: Prepared, strategy: str) -> Callable[[], None]:
    """``probe()``: one held-out evaluation as ``train.run`` makes every ``eval_every`` steps.

    With one inference function traced once, as ``train.run`` keeps it for the run.
    """
    model = _project_model(prepared, strategy)
    infer = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def probe() -> None:
        train.evaluate(model, prepared.heldout, infer=infer, dtype=prepared.config.dtype)

    probe()
    return probe


def cache_probe(prepared: Prepared) -> Callable[[], None]:
    """``probe()``: caching the features once, the plain way (eager base calls, inference mode)."""
    model = build_model(prepared.config.arch, prepared.num_classes)
    import_weights(model, prepared.initial, prepared.checkpoint)
    images = _images(prepared)

    def probe() -> None:
        _features(model.base, images)

    return probe
