"""Pretraining and fine-tuning runs in PyTorch: a plain eager loop.

Per step the loop records the inference-mode loss on the batch at the
pre-update weights (``eval_loss``), then the training-mode loss whose
gradients make the update (``train_loss``). Mirrors ``tf_impl/train.py``,
which trains through ``model.fit``.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from torch import nn

from shared import data
from shared.archs import arch_config, model_config
from shared.finetune import eval_points, finish, prepare
from shared.init import canonical_init
from shared.record import HeldOut, RunConfig, RunRecord, StepRecord
from shared.strategies import get_strategy
from shared.training_state import TrainingState
from torch_impl.freeze import apply_strategy, trainable_parameters
from torch_impl.model import build_model
from torch_impl.weights import (
    canonical_shapes,
    export_bookkeeping,
    export_training_state,
    export_weights,
    import_training_state,
    import_weights,
)

__all__ = ["make_optimizer", "evaluate", "pretrain", "Stepper", "run", "run_threads",
           "limit_threads", "RUN_THREADS"]

_LOSS = nn.CrossEntropyLoss()  # mean over the batch, like Keras's sum_over_batch_size

# Intra-op threads of runs and pretraining. These nets and batches are too small for
# intra-op parallelism: on 2 busy cores, two torch threads contending with TensorFlow's
# made runs ~8x slower. One thread also makes timings and results independent of the
# machine's core count. bench's --threads sets it (torch_impl.bench.set_threads), so the
# project path and the bare loop it is compared with run under the same setting;
# FREEZE_PARITY_TORCH_THREADS sets it for a process (the CPU matrix: another thread
# count sums in another order).
RUN_THREADS = int(os.environ.get("FREEZE_PARITY_TORCH_THREADS", "1") or 1)


@contextlib.contextmanager
def run_threads():
    """Run the block with :data:`RUN_THREADS` intra-op threads (what run and pretrain use)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(RUN_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def limit_threads(threads: int) -> bool:
    """Runs of this process use ``threads`` intra-op threads (:data:`RUN_THREADS`); always
    True: torch sets its threads per run. Mirrors ``tf_impl.train.limit_threads``."""
    global RUN_THREADS
    RUN_THREADS = threads
    return True


def _tensor(x: np.ndarray, dtype: str = "float32") -> torch.Tensor:
    return torch.from_numpy(data.nhwc_to_nchw(x)).to(getattr(torch, dtype))


def make_optimizer(config, params) -> torch.optim.Optimizer:
    """SGD (optionally with momentum) or Adam, set up to update exactly as Keras's do.

    SGD: same formula in both frameworks (no dampening, no Nesterov). Adam: same
    betas (``RunConfig.adam_beta_*``: float32 numbers, since Keras takes the bias
    correction's powers of float32 betas); epsilon placement differs (Keras adds it before
    bias correction), so parity runs use an epsilon too small to matter. No weight decay: Keras's is
    decoupled (AdamW), torch Adam's is L2. Keras keeps the learning rate and momentum in
    float32 variables, so torch gets the same float32 values (lr 0.02 is 0.0199999996 there):
    without that a float64 `full` run ends 2.4e-2 apart from Keras's, with it 2e-13.
    """
    lr, momentum = _keras_float(config.learning_rate), _keras_float(config.momentum)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return torch.optim.Adam(params, lr=lr, betas=(config.adam_beta_1, config.adam_beta_2),
                            eps=config.adam_epsilon)


def _keras_float(value: float) -> float:
    """``value`` as Keras stores an optimizer hyperparameter: a float32."""
    return float(np.float32(value))


@torch.no_grad()
def _scores(module: nn.Module, pairs) -> tuple[float, float]:
    """Inference-mode mean loss and accuracy of ``module`` over ``(x, y)`` pairs."""
    was_training = module.training
    module.eval()
    total, correct, count = 0.0, 0, 0
    for x, y in pairs:
        logits = module(x)
        total += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    module.train(was_training)
    return total / count, correct / count


def evaluate(model: nn.Module, split: data.Split, batch_size: int = 256) -> tuple[float, float]:
    """Inference-mode mean loss and accuracy on ``split``; restores the model's mode."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return _scores(model, ((_tensor(split.images[i:i + batch_size], dtype),
                            torch.from_numpy(split.labels[i:i + batch_size]))
                           for i in range(0, len(split), batch_size)))


@torch.no_grad()
def _features(model: nn.Module, images: np.ndarray, dtype: str, batch_size: int = 256):
    """Base features in inference mode (the cache of ``feature_extraction``)."""
    was_training = model.training
    model.eval()
    out = torch.cat([model.features(_tensor(images[i:i + batch_size], dtype))
                     for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out


@run_threads()
def pretrain(config) -> tuple[dict[str, np.ndarray], dict]:
    """Train ``config.arch`` + a source head on the source domain; canonical tensors, metrics."""
    torch.manual_seed(config.seed)  # nothing random should depend on it; belt and braces
    domains = data.load_domains(size=arch_config(config.arch).image_size)
    model = build_model(config.arch, domains.source_train.num_classes)
    import_weights(model, canonical_init(canonical_shapes(model), config.seed), "canonical init")
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate,
                                momentum=config.momentum)
    model.train()
    decay_step = config.decay_step(len(domains.source_train) // config.batch_size)
    for step, (x, y) in enumerate(data.batches(domains.source_train, config.batch_size,
                                               seed=config.seed, epochs=config.epochs)):
        if step == decay_step:
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * config.decay_factor
        optimizer.zero_grad()
        _LOSS(model(_tensor(x)), torch.from_numpy(y)).backward()
        optimizer.step()
    loss, accuracy = evaluate(model, domains.source_test)
    return export_weights(model), {"loss": loss, "accuracy": accuracy}


class _OneProcess:
    """The replica context of a single-process run: the whole batch, no wrapper, no reduction.

    ``torch_impl.distributed.Replica`` has the same methods for a DDP rank.
    """

    def shard(self, idx: np.ndarray) -> np.ndarray:
        return idx

    def wrap(self, trainee: nn.Module, model: nn.Module) -> nn.Module:
        return trainee

    def mean(self, value: float) -> float:
        return value

    def on_step(self, step: int) -> None:
        pass


def _state(model: nn.Module) -> dict[str, np.ndarray]:
    # float64 so that a float64 run's snapshot loses nothing; LoRA adapters (``lora``) under
    # their canonical keys (``base.blocks.0.attn.proj.lora_A``)
    adapters = {}
    if model.arch == "vit":
        from torch_impl.lora import lora_tensors

        adapters = {k: v.astype(np.float64) for k, v in lora_tensors(model).items()}
    return {**export_weights(model, np.float64), **export_bookkeeping(model), **adapters}


class Stepper:
    """A fine-tuning run one optimizer step at a time, from a state that can be read and set.

    ``run`` is a loop over :meth:`step`; the lockstep comparison (``shared.lockstep``)
    moves a :class:`~shared.training_state.TrainingState` in with :meth:`load` before a
    step and reads the result with :meth:`state`. Mirrors ``tf_impl.train.Stepper``.
    """

    def __init__(self, config: RunConfig, replica=None, prepared=None):
        self.config = config
        self.replica = replica or _OneProcess()
        self.prepared = prepared or prepare(config)
        self.strategy = get_strategy(config.strategy)
        with run_threads():
            self.model = build_model(config.arch, self.prepared.num_classes,
                                     head_dropout=config.head_dropout, dtype=config.dtype,
                                     config=model_config(config.arch, config.base_dropout))
            import_weights(self.model, self.prepared.initial, self.prepared.checkpoint)
            apply_strategy(self.model, self.strategy, adapter_seed=config.seed)
            self.optimizer = make_optimizer(config, trainable_parameters(self.model))
            if self.strategy.cached_features:
                # Split the model: the base runs once, in inference mode, over the training and
                # held-out splits; from then on only the head runs.
                self._features = _features(self.model, self.prepared.train.images, config.dtype)
                self._held_features = _features(self.model, self.prepared.heldout.images,
                                                config.dtype)
                self._forward = self._head = self.model.head
            else:
                self._forward = self._head = self.model
            self._trainee = self.replica.wrap(self._forward, self.model)
            self.model.train()

    def _inputs(self, idx: np.ndarray) -> torch.Tensor:
        if self.strategy.cached_features:
            return self._features[torch.from_numpy(idx)]
        return _tensor(self.prepared.train.images[idx], self.config.dtype)

    @run_threads()
    def step(self, idx: np.ndarray) -> tuple[float, float]:
        """One update on the samples ``idx``: (training-mode loss, inference-mode loss at the
        pre-update weights), this process's own (a DDP rank's shard)."""
        x, y = self._inputs(idx), torch.from_numpy(self.prepared.train.labels[idx])
        self._head.eval()
        with torch.no_grad():
            eval_loss = float(_LOSS(self._forward(x), y))
        self._head.train()
        loss = _LOSS(self._trainee(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach()), eval_loss

    @run_threads()
    def heldout(self) -> tuple[float, float]:
        """Inference-mode loss and accuracy on the held-out target split."""
        if self.strategy.cached_features:
            labels = torch.from_numpy(self.prepared.heldout.labels)
            return _scores(self.model.head, [(self._held_features, labels)])
        return evaluate(self.model, self.prepared.heldout)

    def state(self, dtype=np.float64) -> TrainingState:
        """Model tensors and optimizer slots now (float64: exact for any run)."""
        return export_training_state(self.model, self.optimizer, dtype)

    def load(self, state: TrainingState, where: str = "training state") -> None:
        """Continue from ``state`` (model tensors, optimizer slots and step count)."""
        import_training_state(self.model, self.optimizer, state, where)


def run(config: RunConfig, replica=None, observer=None, stepper: Stepper | None = None) -> RunRecord:
    """Fine-tune on the target domain with ``config.strategy``; the per-step record.

    ``replica`` (``torch_impl.distributed.Replica``) makes this one DDP rank: it trains
    on its shard of each global batch through the DDP-wrapped model, and the recorded
    losses are the mean over ranks (the global batch's loss when shards are equal).
    ``observer`` (``shared.lockstep``) is told about every step: ``before_step(step, idx,
    stepper)`` and ``after_step(step, idx, stepper, record)``. ``stepper``: a fresh
    :class:`Stepper` of ``config`` to run with (the lockstep reuses it afterwards).
    """
    stepper = stepper or Stepper(config, replica)
    replica = stepper.replica
    before = _state(stepper.model)
    points = set(eval_points(config))
    steps, heldout = [], []
    for step, idx in enumerate(stepper.prepared.indices):
        replica.on_step(step)
        if step in points:
            heldout.append(HeldOut(step, *stepper.heldout()))
        if observer is not None:
            observer.before_step(step, idx, stepper)
        train_loss, eval_loss = stepper.step(replica.shard(idx))
        steps.append(StepRecord(step, replica.mean(train_loss), replica.mean(eval_loss)))
        if observer is not None:
            observer.after_step(step, idx, stepper, steps[-1])
    heldout.append(HeldOut(config.steps, *stepper.heldout()))
    return finish("torch", config, steps, heldout, before, _state(stepper.model))
