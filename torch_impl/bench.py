"""Bare PyTorch baselines and probes for ``freeze-parity bench``. Mirrors ``tf_impl/bench.py``.

The baseline the project's ``train.run`` is measured against is written the
way a PyTorch user writes it: the same model (``build_model``), pretrained
weights and batches, the base frozen with ``requires_grad_(False)`` plus
``base.eval()``, an optimizer over the head only, and a plain
zero_grad / forward / backward / step loop with nothing recorded. The probes
time one part of the project's step in isolation (the per-step inference-mode
loss, one held-out evaluation, caching the features), so the benchmark can
say where the project's extra time per step goes.

Every factory does its set-up when called and returns a callable that does
only the timed work. Nothing here runs on a GPU: CPU ops have finished when
they return, so :func:`synchronize` has nothing to wait for.
"""

from __future__ import annotations

import platform
from collections.abc import Callable

import numpy as np
import torch
import torchvision
from torch import nn

from shared.finetune import Prepared
from torch_impl import train
from torch_impl.freeze import apply_strategy
from torch_impl.model import build_model
from torch_impl.weights import import_weights

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
    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "intra_op_threads": torch.get_num_threads(),
            "inter_op_threads": torch.get_num_interop_threads(),
            # intra-op threads every timed task runs with (train.run's setting)
            "run_threads": train.RUN_THREADS, "device": "cpu"}


def set_threads(threads: int) -> None:
    """Use ``threads`` threads within and between ops; call before any torch work."""
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)
    train.RUN_THREADS = threads  # train.run's own thread setting: the same for both paths


def synchronize() -> None:
    """Wait for queued work: nothing to wait for, every tensor here lives on the CPU."""


def _check(strategy: str) -> str:
    if strategy not in BARE_STRATEGIES:
        raise ValueError(f"bare loop: strategy {strategy!r} has no bare equivalent; "
                         f"expected one of: {', '.join(BARE_STRATEGIES)}")
    return strategy


def _images(prepared: Prepared) -> torch.Tensor:
    # The whole split as one NCHW tensor, as a TensorDataset would hold it.
    return torch.from_numpy(prepared.train.images).permute(0, 3, 1, 2).contiguous()


def _features(base: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([base(images[i:i + _CHUNK]) for i in range(0, len(images), _CHUNK)])


def bare_train(prepared: Prepared, strategy: str) -> Callable[[int], float]:
    """``fit(steps)``: build, freeze and train ``steps`` steps the plain way; the last loss.

    Each call starts from a fresh model (as ``train.run`` does), so a call at
    N steps and one at 2N differ by exactly N training steps.
    """
    _check(strategy)
    config = prepared.config
    labels = torch.from_numpy(prepared.train.labels)

    def fit(steps: int) -> float:
        model = build_model(config.arch, prepared.num_classes)
        import_weights(model, prepared.initial, prepared.checkpoint)
        model.base.requires_grad_(False)
        model.base.eval()  # stored BatchNorm statistics; the loop never calls model.train()
        images = _images(prepared)
        if strategy == "feature_extraction":
            inputs, net = _features(model.base, images), model.head
        else:
            inputs, net = images, model
        optimizer = torch.optim.SGD(model.head.parameters(), lr=config.learning_rate,
                                    momentum=config.momentum)
        loss = torch.zeros(())
        for idx in prepared.indices[:steps]:
            idx = torch.from_numpy(idx)
            loss = nn.functional.cross_entropy(net(inputs[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return loss.item()

    return fit


def _project_model(prepared: Prepared, strategy: str):
    config = prepared.config
    model = build_model(config.arch, prepared.num_classes, head_dropout=config.head_dropout,
                        dtype=config.dtype)
    import_weights(model, prepared.initial, prepared.checkpoint)
    apply_strategy(model, strategy)
    return model


def record_probe(prepared: Prepared, strategy: str) -> Callable[[int], None]:
    """``probe(steps)``: the per-step recording ``train.run`` adds, over ``steps`` batches.

    That is the inference-mode loss on the step's batch at the pre-update
    weights: the head switched to eval, a no-grad forward, the loss read back
    as a float, the head switched back (as in ``torch_impl.train.run``).
    Run once here, so calls time the steady state.
    """
    _check(strategy)
    config = prepared.config
    model = _project_model(prepared, strategy)
    if strategy == "feature_extraction":
        model.eval()
        features = _features(model.base, _images(prepared).to(getattr(torch, config.dtype)))
        forward = head = model.head
        inputs = [features[torch.from_numpy(idx)] for idx in prepared.indices]
    else:
        forward = head = model
        inputs = [torch.from_numpy(prepared.train.images[idx]).permute(0, 3, 1, 2).contiguous()
                  for idx in prepared.indices]
    labels = [torch.from_numpy(prepared.train.labels[idx]) for idx in prepared.indices]
    model.train()
    loss_fn = nn.CrossEntropyLoss()

    def probe(steps: int) -> None:
        for x, y in zip(inputs[:steps], labels[:steps]):
            head.eval()
            with torch.no_grad():
                float(loss_fn(forward(x), y))
            head.train()

    probe(1)
    return probe


def heldout_probe(prepared: Prepared, strategy: str) -> Callable[[], None]:
    """``probe()``: one held-out evaluation as ``train.run`` makes every ``eval_every`` steps.

    Run once here, so calls time the steady state.
    """
    model = _project_model(prepared, strategy)
    model.train()

    def probe() -> None:
        train.evaluate(model, prepared.heldout)

    probe()
    return probe


def cache_probe(prepared: Prepared) -> Callable[[], None]:
    """``probe()``: caching the features once, the plain way (base in eval mode, no grad)."""
    model = build_model(prepared.config.arch, prepared.num_classes)
    import_weights(model, prepared.initial, prepared.checkpoint)
    model.base.eval()

    def probe() -> None:
        _features(model.base, _images(prepared))

    return probe
