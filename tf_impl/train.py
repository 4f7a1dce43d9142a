"""Pretraining and fine-tuning runs in Keras, through ``model.fit`` (what users run).

``fit`` reports a running mean of batch losses, so the per-step training-mode
loss is read from :class:`BatchLoss`, a metric holding only the current
batch's loss (computed from the same training-mode forward pass that made the
gradients). The inference-mode loss at the pre-update weights is taken by
:class:`StepRecorder` at the start of each batch. Mirrors ``torch_impl/train.py``.
"""

from __future__ import annotations

import contextlib
import functools

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from shared import data
from shared.archs import arch_config, model_config
from shared.finetune import eval_points, finish, prepare
from shared.init import canonical_init
from shared.record import HeldOut, RunConfig, RunRecord, StepRecord
from shared.strategies import get_strategy
from shared.training_state import TrainingState
from tf_impl.freeze import apply_strategy
from tf_impl.model import (
    LegacyBatchNormalization,
    TorchVarianceBatchNormalization,
    build_model,
    default_norm_layer,
)
from tf_impl.weights import (
    canonical_shapes,
    export_bookkeeping,
    export_training_state,
    export_weights,
    import_weights,
    training_state_from_values,
    training_state_values,
    training_variables,
)

__all__ = ["make_optimizer", "evaluate", "pretrain", "Stepper", "run", "run_threads",
           "limit_threads", "RUN_THREADS", "BatchLoss", "StepRecorder", "HeadModel"]

# TensorFlow's thread pools are fixed when it initialises: runs use whatever the process
# has (its default, or bench's --threads through tf_impl.bench.set_threads).
RUN_THREADS = None


@contextlib.contextmanager
def run_threads():
    """The thread setting runs use; TensorFlow's pools are per process, so nothing to change."""
    yield


def limit_threads(threads: int) -> bool:
    """Runs of this process use ``threads`` threads within and between ops; False (nothing
    changed) once TensorFlow has initialised, when its pools are fixed.

    ``compare`` sets one when a torch worker process shares the cores: TensorFlow's default
    pools (one thread per core, each op split over them) then wait on the busy core; the
    demo's matrix took 73-80 s with them and 62-65 s with one thread (2-core AMD EPYC).
    """
    global RUN_THREADS
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # "... cannot be modified after initialization"
        return False
    RUN_THREADS = threads
    return True


def _loss(dtype: str = "float32"):
    # = torch CrossEntropyLoss (mean over the batch); a Loss computes in its own dtype
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype)


def make_optimizer(config) -> keras.optimizers.Optimizer:
    """SGD (optionally with momentum) or Adam, set up to update exactly as torch's do.

    See ``torch_impl.train.make_optimizer``: same formulas for SGD; for Adam the
    epsilon placement differs, so parity runs use a negligible epsilon; no weight decay.
    """
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=config.learning_rate, momentum=config.momentum)
    return keras.optimizers.Adam(learning_rate=config.learning_rate, beta_1=config.adam_beta_1,
                                 beta_2=config.adam_beta_2, epsilon=config.adam_epsilon)


def norm_layer_for(arch: str, strategy: str, reconcile_bn_variance: bool = True,
                   synchronized: bool = False):
    """BatchNorm factory: the legacy layer for ``naive``, torch's variance convention for parity.

    ``synchronized=True``: Keras's ``BatchNormalization(synchronized=True)``, batch
    moments over every replica of a distribution strategy. None for vit (no BatchNorm).
    """
    if arch == "vit":
        return None
    if strategy == "naive":
        cls = LegacyBatchNormalization
    elif reconcile_bn_variance:
        cls = TorchVarianceBatchNormalization
    else:
        cls = keras.layers.BatchNormalization
    if synchronized:
        cls = functools.partial(cls, synchronized=True)
    return default_norm_layer(arch_config(arch), cls)


class BatchLoss(keras.metrics.Metric):
    """The current batch's loss, not a running mean (what ``fit``'s ``loss`` log is)."""

    def __init__(self, name: str = "batch_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        # "mean": under a distribution strategy each replica holds its shard's mean loss;
        # a read averages them (the global batch's loss, for equal shards). Keras's
        # default for metric variables, "sum", would report replicas x the loss.
        self.value = self.add_variable(shape=(), initializer="zeros", name="value",
                                       dtype=self.dtype, aggregation="mean")

    def update_state(self, y_true, y_pred, sample_weight=None):
        loss = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        self.value.assign(ops.mean(loss))

    def result(self):
        return self.value

    def reset_state(self):
        self.value.assign(0.0)


class HeadModel(keras.Model):
    """The head alone, trained on cached features (``feature_extraction``)."""

    def __init__(self, head, **kwargs):
        super().__init__(**kwargs)
        self.head = head

    def call(self, x, training=None):
        return self.head(x, training=training)


@contextlib.contextmanager
def _floatx(dtype: str):
    """``fit`` casts float NumPy inputs to ``keras.config.floatx()`` (float32 by default), a
    float64 model's too: a float64 run sets floatx for its ``fit`` (docs/PORTING.md)."""
    previous = keras.config.floatx()
    keras.config.set_floatx(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(previous)


def _inference(model):
    return tf.function(lambda x: model(x, training=False), reduce_retracing=True)


def _inference_loss(model):
    # The per-step eval loss, traced once: forward and loss in one graph call.
    def loss(x, y):
        logits = model(x, training=False)
        return ops.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
    return tf.function(loss, reduce_retracing=True)


def _features(model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Base features in inference mode (the cache of ``feature_extraction``)."""
    base_infer = tf.function(lambda x: model.base(x, training=False), reduce_retracing=True)
    return ops.convert_to_numpy(ops.concatenate(
        [base_infer(images[i:i + batch_size]) for i in range(0, len(images), batch_size)], axis=0))


def _mean_loss(y: np.ndarray, logits) -> tuple[float, float]:
    loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    accuracy = np.mean(np.argmax(ops.convert_to_numpy(logits), axis=1) == y)
    return float(ops.mean(loss)), float(accuracy)


def evaluate(model, split: data.Split | None, batch_size: int = 256, infer=None,
             dtype: str | None = None, images=None, labels=None) -> tuple[float, float]:
    """Inference-mode mean loss and accuracy on ``split`` (or on ``images``, ``labels``:
    the model's own inputs, e.g. cached features)."""
    infer = infer or _inference(model)
    if split is not None:
        images, labels = split.images.astype(dtype or "float32"), split.labels
    logits = ops.concatenate([infer(images[i:i + batch_size])
                              for i in range(0, len(images), batch_size)], axis=0)
    return _mean_loss(labels, logits)


class StepRecorder(keras.callbacks.Callback):
    """Per-step eval loss (pre-update weights), train loss (BatchLoss) and held-out points.

    ``observer`` (``shared.lockstep``) is told about every step, as in ``torch_impl.train.run``.
    """

    def __init__(self, stepper, points, observer=None):
        super().__init__()
        self.stepper, self.points, self.observer = stepper, points, observer
        self.steps: list[StepRecord] = []
        self.heldout: list[HeldOut] = []
        self._eval_loss = None

    def on_train_batch_begin(self, batch, logs=None):
        if batch in self.points:
            self.heldout.append(HeldOut(batch, *self.stepper.heldout()))
        idx = self.stepper.prepared.indices[batch]
        self._eval_loss = self.stepper.eval_loss(idx)
        if self.observer is not None:
            self.observer.before_step(batch, idx, self.stepper)

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append(StepRecord(batch, float(logs["batch_loss"]), float(self._eval_loss)))
        if self.observer is not None:
            self.observer.after_step(batch, self.stepper.prepared.indices[batch], self.stepper,
                                     self.steps[-1])


def pretrain(config) -> tuple[dict[str, np.ndarray], dict]:
    """Train ``config.arch`` + a source head on the source domain; canonical tensors, metrics."""
    keras.utils.set_random_seed(config.seed)
    domains = data.load_domains(size=arch_config(config.arch).image_size)
    model = build_model(config.arch, domains.source_train.num_classes,
                        norm_layer=norm_layer_for(config.arch, "full"))
    import_weights(model, canonical_init(canonical_shapes(model), config.seed), "canonical init")
    decay_step = config.decay_step(len(domains.source_train) // config.batch_size)
    # Keras's schedule uses values[0] while iterations <= boundary: boundary decay_step - 1
    # switches at the same update as torch_impl.train.pretrain.
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [max(decay_step - 1, 0)], [config.learning_rate, config.learning_rate * config.decay_factor])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=schedule, momentum=config.momentum),
                  loss=_loss())
    pairs = list(data.batches(domains.source_train, config.batch_size, seed=config.seed,
                              epochs=config.epochs))
    x = np.concatenate([p[0] for p in pairs])
    y = np.concatenate([p[1] for p in pairs])
    model.fit(x, y, batch_size=config.batch_size, epochs=1, shuffle=False, verbose=0)
    loss, accuracy = evaluate(model, domains.source_test)
    return export_weights(model), {"loss": loss, "accuracy": accuracy}


class _OneProcess:
    """The replica context of a single-process run: no strategy, no extra callbacks.

    ``tf_impl.distributed.Replica`` has the same methods for MirroredStrategy.
    """

    synchronized_bn = False

    def scope(self):
        return contextlib.nullcontext()

    def callbacks(self) -> list:
        return []

    def attach(self, model) -> None:
        pass


def _state(model) -> dict[str, np.ndarray]:
    # float64 so that a float64 run's snapshot loses nothing; LoRA adapters (``lora``) under
    # their canonical keys (``base.blocks.0.attn.proj.lora_A``)
    adapters = {}
    if model.arch == "vit":
        from tf_impl.lora import lora_tensors

        adapters = {k: v.astype(np.float64) for k, v in lora_tensors(model).items()}
    return {**export_weights(model, np.float64), **export_bookkeeping(model), **adapters}


class Stepper:
    """A fine-tuning run one optimizer step at a time, from a state that can be read and set.

    Builds, freezes and compiles the model as ``run`` does; :meth:`step` takes one
    ``train_on_batch`` (the same ``train_step`` that ``fit`` runs). The lockstep
    comparison (``shared.lockstep``) moves a :class:`~shared.training_state.TrainingState`
    in with :meth:`load` and reads the result with :meth:`state`. Mirrors
    ``torch_impl.train.Stepper``.
    """

    def __init__(self, config: RunConfig, replica=None, prepared=None):
        self.config = config
        self.replica = replica or _OneProcess()
        with self.replica.scope():
            self._build(prepared)

    def _build(self, prepared) -> None:
        config = self.config
        keras.utils.set_random_seed(config.seed)
        self.prepared = prepared or prepare(config)
        self.strategy = get_strategy(config.strategy)
        self.model = build_model(config.arch, self.prepared.num_classes,
                                 head_dropout=config.head_dropout,
                                 norm_layer=norm_layer_for(config.arch, self.strategy.name,
                                                           config.reconcile_bn_variance,
                                                           self.replica.synchronized_bn),
                                 dtype=config.dtype,
                                 config=model_config(config.arch, config.base_dropout))
        self.replica.attach(self.model)
        import_weights(self.model, self.prepared.initial, self.prepared.checkpoint)
        apply_strategy(self.model, self.strategy, adapter_seed=config.seed)
        images = self.prepared.train.images.astype(config.dtype)
        if self.strategy.cached_features:
            # Split the model: the base runs once, in inference mode, over the training and
            # held-out splits; from then on only the head runs.
            self.inputs = _features(self.model, images)
            self._held_inputs = _features(self.model,
                                          self.prepared.heldout.images.astype(config.dtype))
            self.trainee = HeadModel(self.model.head, dtype=config.dtype)  # no float32 autocast
        else:
            self.inputs, self.trainee = images, self.model
            self._held_inputs = self.prepared.heldout.images.astype(config.dtype)
        self._infer = _inference(self.trainee)
        self._loss = _inference_loss(self.trainee)
        self.trainee.compile(optimizer=make_optimizer(config), loss=_loss(config.dtype),
                             metrics=[BatchLoss(dtype=config.dtype)])
        self._traced = None  # the traced load / step / read of a lockstep run (first load)

    def eval_loss(self, idx: np.ndarray) -> float:
        """Inference-mode loss of the samples ``idx`` at the current weights."""
        return float(self._loss(self.inputs[idx], self.prepared.train.labels[idx]))

    def step(self, idx: np.ndarray) -> tuple[float, float]:
        """One update on the samples ``idx``: (training-mode loss, inference-mode loss at the
        pre-update weights)."""
        x, y = self.inputs[idx], self.prepared.train.labels[idx]
        if self._traced is not None:  # a lockstep run: one traced call, not two
            eval_loss, train_loss = self._traced.step(x, y)
            return float(train_loss), float(eval_loss)
        eval_loss = self.eval_loss(idx)
        logs = self.trainee.train_on_batch(x, y, return_dict=True)
        return float(logs["batch_loss"]), eval_loss

    def heldout(self) -> tuple[float, float]:
        """Inference-mode loss and accuracy on the held-out target split."""
        return evaluate(self.trainee, None, infer=self._infer, images=self._held_inputs,
                        labels=self.prepared.heldout.labels)

    def state(self, dtype=np.float64) -> TrainingState:
        """Model tensors and optimizer slots now (float64: exact for any run)."""
        if self._traced is not None:
            return training_state_from_values(self.model, self.trainee.optimizer,
                                              self._traced.read(), dtype)
        return export_training_state(self.model, self.trainee.optimizer, dtype)

    def load(self, state: TrainingState, where: str = "training state") -> None:
        """Continue from ``state`` (model tensors, optimizer slots and step count).

        A lockstep run loads a state before every step; variable by variable that costs
        more than the step, so the first load traces three functions (set every variable
        from one flat buffer, take the step, read them back) and every later one is a
        single call. The step is Keras's own ``train_step``, as ``fit`` runs it.
        """
        values = training_state_values(self.model, self.trainee.optimizer, state, where)
        if self._traced is None:
            self._traced = _TracedState(self)
        self._traced.write(values)


class _TracedState:
    """A Stepper's variables set and read as one flat buffer, and its step, traced once."""

    def __init__(self, stepper: Stepper):
        trainee = stepper.trainee
        self.variables = training_variables(stepper.model, trainee.optimizer)
        # Keras builds its compiled metrics on the first train_step: not inside a traced
        # function that then runs again. One step here (the load that follows sets every
        # variable again).
        first = stepper.prepared.indices[0]
        trainee.train_on_batch(stepper.inputs[first], stepper.prepared.train.labels[first])
        floats, iterations = self.variables[:-1], self.variables[-1]
        self.shapes = [tuple(v.shape) for v in floats]
        self.sizes = [int(np.prod(shape)) for shape in self.shapes]
        self.dtype = stepper.config.dtype
        sizes = self.sizes

        @tf.function(reduce_retracing=True)
        def write(flat, step):
            for var, part in zip(floats, tf.split(flat, sizes)):
                var.assign(tf.reshape(part, var.shape))
            iterations.assign(step)

        @tf.function(reduce_retracing=True)
        def step(x, y):
            logits = trainee(x, training=False)
            eval_loss = ops.mean(keras.losses.sparse_categorical_crossentropy(
                y, logits, from_logits=True))
            return eval_loss, trainee.train_step((x, y))["batch_loss"]

        @tf.function
        def read():
            return (tf.concat([tf.reshape(var.value, [-1]) for var in floats], axis=0),
                    iterations.value)

        self._write, self.step, self._read = write, step, read

    def write(self, values: list[np.ndarray]) -> None:
        flat = np.concatenate([np.ravel(v) for v in values[:-1]]).astype(self.dtype)
        self._write(flat, values[-1])

    def read(self) -> list[np.ndarray]:
        flat, step = self._read()
        parts = np.split(np.asarray(flat), np.cumsum(self.sizes[:-1]))
        return [part.reshape(shape) for part, shape in zip(parts, self.shapes)] + [np.asarray(step)]


def run(config: RunConfig, replica=None, observer=None, stepper: Stepper | None = None) -> RunRecord:
    """Fine-tune on the target domain with ``config.strategy``; the per-step record.

    ``replica`` (``tf_impl.distributed.Replica``) runs it under a MirroredStrategy:
    model, optimizer and ``fit`` in the strategy's scope; ``fit`` splits each global
    batch over the replicas; the record reads replica 0's variables. ``observer``
    (``shared.lockstep``) is told about every step: ``before_step(step, idx, stepper)``
    and ``after_step(step, idx, stepper, record)``. ``stepper``: a fresh :class:`Stepper`
    of ``config`` to run with (the lockstep reuses it afterwards).
    """
    stepper = stepper or Stepper(config, replica)
    with stepper.replica.scope():
        return _run(stepper, observer)


def _run(stepper: Stepper, observer) -> RunRecord:
    config, prepared = stepper.config, stepper.prepared
    before = _state(stepper.model)
    recorder = StepRecorder(stepper, set(eval_points(config)), observer)
    order = np.concatenate(prepared.indices)
    with _floatx(config.dtype):
        stepper.trainee.fit(stepper.inputs[order], prepared.train.labels[order],
                            batch_size=config.batch_size, epochs=1, shuffle=False, verbose=0,
                            callbacks=[*stepper.replica.callbacks(), recorder])
    heldout = recorder.heldout + [HeldOut(config.steps, *stepper.heldout())]
    return finish("tf", config, recorder.steps, heldout, before, _state(stepper.model))
