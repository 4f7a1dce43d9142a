"""Measure one "fit" epoch and the "evaluate" after it in PyTorch, batch by batch.

PyTorch has no ``fit``: the equivalent is the loop users write, which reports
the running batch-size-weighted mean of the training-mode losses, as Keras's
``fit`` does, and an evaluation in ``eval()`` mode afterwards. Each batch is
also scored in inference mode at the pre-update state, and every batch again
at the final state, so :func:`shared.explain.decompose` can split the gap.
Mirrors ``tf_impl/explain.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from shared import data
from shared.explain import Decomposition, FitEvaluate, batch_slices, epoch_indices
from shared.explain import decompose as decompose_measured
from shared.finetune import prepare
from shared.record import RunConfig
from shared.strategies import get_strategy
from torch_impl.freeze import apply_strategy, trainable_parameters
from torch_impl.model import build_model
from torch_impl.train import make_optimizer
from torch_impl.weights import import_weights

__all__ = ["decompose", "measure_fit_evaluate"]

_LOSS = nn.CrossEntropyLoss()  # mean over the batch = Keras's sum_over_batch_size


@torch.no_grad()
def _loss_sum(forward, x: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> float:
    return sum(float(nn.functional.cross_entropy(forward(x[i:i + chunk]), y[i:i + chunk],
                                                 reduction="sum"))
               for i in range(0, len(y), chunk))


def measure_fit_evaluate(config: RunConfig, examples: int | None = None) -> FitEvaluate:
    """One epoch over the target training split (its first ``examples`` items in the run's
    shuffled order; ``config.steps`` is not used), then evaluate on the same items."""
    prepared = prepare(config)
    strategy = get_strategy(config.strategy)
    order = epoch_indices(len(prepared.train), config.seed, examples)
    images = torch.from_numpy(data.nhwc_to_nchw(prepared.train.images[order])).to(
        getattr(torch, config.dtype))
    y = torch.from_numpy(prepared.train.labels[order])
    model = build_model(config.arch, prepared.num_classes, head_dropout=config.head_dropout,
                        dtype=config.dtype)
    import_weights(model, prepared.initial, prepared.checkpoint)
    apply_strategy(model, strategy)
    optimizer = make_optimizer(config, trainable_parameters(model))

    if strategy.cached_features:
        # the head trains on features the base computed once, in inference mode
        model.eval()
        with torch.no_grad():
            inputs = torch.cat([model.features(images[i:i + 256]) for i in range(0, len(y), 256)])
        trainee = model.head
    else:
        inputs, trainee = images, model

    slices = batch_slices(len(y), config.batch_size)
    sizes, train_losses, before = [], [], []
    running, seen = 0.0, 0
    for sl in slices:
        x, t = inputs[sl], y[sl]
        trainee.eval()
        with torch.no_grad():
            before.append(float(_LOSS(trainee(x), t)))
        trainee.train()
        loss = _LOSS(trainee(x), t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # what a training loop prints: the running mean, each batch weighted by its size
        train_losses.append(float(loss.detach()))
        running += train_losses[-1] * len(t)
        seen += len(t)
        sizes.append(len(t))

    trainee.eval()
    with torch.no_grad():
        after = [float(_LOSS(trainee(inputs[sl]), y[sl])) for sl in slices]
    evaluated = _loss_sum(trainee, inputs, y) / len(y)
    return FitEvaluate("torch", strategy.name, sizes, train_losses, before, after,
                       fit_reported=running / seen, evaluated=evaluated,
                       config={**config.__dict__, "examples": len(y)})


def decompose(config: RunConfig, examples: int | None = None) -> Decomposition:
    """The fit-vs-evaluate gap of ``config``'s strategy split into BN mode, weights, averaging."""
    return decompose_measured(measure_fit_evaluate(config, examples))

