"""Framework-free parts of a fine-tuning run, shared by both ``train.run``.

:func:`prepare` gives both frameworks the same starting tensors (pretrained
base + canonical head), the same batches in the same order and the same
held-out split; :func:`finish` turns the tensors before and after the run
into the record's frozen-tensor and BatchNorm verdicts and the list of
tensors that moved.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from shared import data
from shared.archs import arch_config
from shared.checkpoint import CheckpointError, load_checkpoint
from shared.init import head_init
from shared.record import HeldOut, RunConfig, RunRecord, StepRecord
from shared.shipped import default_checkpoint
from shared.strategies import bn_prefixes, frozen_keys, get_strategy

__all__ = ["Prepared", "eval_points", "finish", "prepare", "tensor_changes", "ulp_perturbed"]


@dataclass
class Prepared:
    config: RunConfig
    train: data.Split          # target-domain training split
    heldout: data.Split        # target-domain held-out split
    indices: list[np.ndarray]  # one index array per step, into `train`
    initial: dict[str, np.ndarray]  # pretrained base + canonical new head
    num_classes: int
    checkpoint: str

    def batches(self):
        for idx in self.indices:
            yield self.train.images[idx], self.train.labels[idx]


def prepare(config: RunConfig) -> Prepared:
    path = default_checkpoint(config.arch, config.checkpoint)
    tensors, meta = load_checkpoint(path)
    if meta.get("arch") != config.arch:
        raise CheckpointError(f"checkpoint {path}: made for arch {meta.get('arch')!r}, "
                              f"not {config.arch!r}")
    domains = data.load_domains(size=arch_config(config.arch).image_size)
    train, heldout = domains.target_train, domains.target_test
    base = {k: v for k, v in tensors.items() if k.startswith("base.")}
    if not base:
        raise CheckpointError(f"checkpoint {path}: no 'base.' tensors")
    initial = {**base, **head_init(arch_config(config.arch).feature_dim, train.num_classes, config.seed)}
    indices = data.take_batch_indices(len(train), config.batch_size, config.steps, seed=config.seed)
    if config.rounding_seed is not None:
        initial = ulp_perturbed(initial, config.rounding_seed)
        order = np.random.default_rng([config.rounding_seed, 0x0DE2])
        indices = [order.permutation(idx) for idx in indices]
    return Prepared(config, train, heldout, indices, initial, train.num_classes, str(path))


def ulp_perturbed(tensors: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Every element one float32 unit in the last place up or down (direction from ``seed``).

    A start that differs from the original by rounding alone: two runs from such starts
    differ as far as float32 rounding carries the training, no further.
    """
    rng = np.random.default_rng([seed, 0x5EED])  # its own stream, not the batch orders'

    out = {}
    for key in sorted(tensors):
        value = np.asarray(tensors[key], np.float32)
        up = rng.random(value.shape) < 0.5
        toward = np.where(up, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32)
        out[key] = np.nextafter(value, toward).astype(np.float32)
    return out


def eval_points(config: RunConfig) -> list[int]:
    """Update counts after which the held-out split is evaluated: 0, k, 2k, ..., steps."""
    return sorted(set(range(0, config.steps, config.eval_every)) | {config.steps})


def tensor_changes(before: dict[str, np.ndarray], after: dict[str, np.ndarray],
                   keys) -> dict[str, float]:
    """Key -> largest absolute change, for the keys whose values are not bit-identical."""
    changes = {}
    for key in keys:
        a, b = np.asarray(before[key]), np.asarray(after[key])
        if a.shape != b.shape or not np.array_equal(a, b):
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64)) if a.shape == b.shape else np.inf
            changes[key] = float(np.max(diff))
    return changes


def finish(framework: str, config: RunConfig, steps: list[StepRecord], heldout: list[HeldOut],
           before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> RunRecord:
    strategy = get_strategy(config.strategy)
    declared = frozen_keys(strategy, before, config.arch)
    frozen_changes = tensor_changes(before, after, declared)
    stats = [k for p in bn_prefixes(before) for k in (f"{p}.running_mean", f"{p}.running_var")]
    stat_changes = tensor_changes(before, after, stats)
    return RunRecord(
        framework=framework, strategy=strategy.name, arch=config.arch,
        config=asdict(config), steps=steps, heldout=heldout,
        frozen_unchanged=not frozen_changes, bn_stats_changed=bool(stat_changes),
        frozen_changes=frozen_changes,
        bn_stats_max_change=max(stat_changes.values(), default=0.0),
        moved=tensor_changes(before, after, sorted(before)),
    )
