"""Measure one real ``model.fit`` epoch and the ``model.evaluate`` after it, batch by batch.

``fit`` reports the running batch-size-weighted mean of its training-mode
losses; the per-batch loss is read from :class:`tf_impl.train.BatchLoss`
(computed from the same forward pass that made the gradients). A callback
scores each batch in inference mode at the pre-update state; after ``fit``
every batch is scored again at the final state, and ``evaluate`` runs on the
same data, so :func:`shared.explain.decompose` can split the gap. Mirrors
``torch_impl/explain.py``.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from shared.explain import Decomposition, FitEvaluate, batch_slices, epoch_indices
from shared.explain import decompose as decompose_measured
from shared.finetune import prepare
from shared.record import RunConfig
from shared.strategies import get_strategy
from tf_impl.freeze import apply_strategy
from tf_impl.model import build_model
from tf_impl.train import BatchLoss, HeadModel, make_optimizer, norm_layer_for
from tf_impl.weights import import_weights

__all__ = ["decompose", "measure_fit_evaluate"]


def _batch_loss(infer, x, y) -> float:
    loss = keras.losses.sparse_categorical_crossentropy(y, infer(x), from_logits=True)
    return float(ops.mean(loss))


class _PreUpdate(keras.callbacks.Callback):
    """Per batch: inference-mode loss before the update, training-mode loss of the update."""

    def __init__(self, inputs, labels, slices, infer):
        super().__init__()
        self.inputs, self.labels, self.slices, self.infer = inputs, labels, slices, infer
        self.before: list[float] = []
        self.train: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        sl = self.slices[batch]
        self.before.append(_batch_loss(self.infer, self.inputs[sl], self.labels[sl]))

    def on_train_batch_end(self, batch, logs=None):
        self.train.append(float(logs["batch_loss"]))


def measure_fit_evaluate(config: RunConfig, examples: int | None = None) -> FitEvaluate:
    """One epoch over the target training split (its first ``examples`` items in the run's
    shuffled order; ``config.steps`` is not used), then evaluate on the same items."""
    keras.utils.set_random_seed(config.seed)
    prepared = prepare(config)
    strategy = get_strategy(config.strategy)
    order = epoch_indices(len(prepared.train), config.seed, examples)
    images = prepared.train.images[order].astype(config.dtype)
    y = prepared.train.labels[order]
    model = build_model(config.arch, prepared.num_classes, head_dropout=config.head_dropout,
                        norm_layer=norm_layer_for(config.arch, strategy.name,
                                                  config.reconcile_bn_variance),
                        dtype=config.dtype)
    import_weights(model, prepared.initial, prepared.checkpoint)
    apply_strategy(model, strategy)

    if strategy.cached_features:
        # the head trains on features the base computed once, in inference mode
        base_infer = tf.function(lambda x: model.base(x, training=False), reduce_retracing=True)
        inputs = ops.convert_to_numpy(ops.concatenate(
            [base_infer(images[i:i + 256]) for i in range(0, len(y), 256)], axis=0))
        trainee = HeadModel(model.head)
    else:
        inputs, trainee = images, model

    slices = batch_slices(len(y), config.batch_size)
    infer = tf.function(lambda x: trainee(x, training=False), reduce_retracing=True)
    recorder = _PreUpdate(inputs, y, slices, infer)
    trainee.compile(optimizer=make_optimizer(config),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                                    dtype=config.dtype),
                    metrics=[BatchLoss(dtype=config.dtype)])
    history = trainee.fit(inputs, y, batch_size=config.batch_size, epochs=1, shuffle=False,
                          verbose=0, callbacks=[recorder])
    after = [_batch_loss(infer, inputs[sl], y[sl]) for sl in slices]
    evaluated = trainee.evaluate(inputs, y, batch_size=config.batch_size, verbose=0,
                                 return_dict=True)["loss"]
    return FitEvaluate("tf", strategy.name, [sl.stop - sl.start for sl in slices], recorder.train,
                       recorder.before, after, fit_reported=float(history.history["loss"][-1]),
                       evaluated=float(evaluated), config={**config.__dict__, "examples": len(y)})


def decompose(config: RunConfig, examples: int | None = None) -> Decomposition:
    """The fit-vs-evaluate gap of ``config``'s strategy split into BN mode, weights, averaging."""
    return decompose_measured(measure_fit_evaluate(config, examples))
