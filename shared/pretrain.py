"""Pretraining on the source domain and the checkpoint cache.

The pretrained checkpoint is what every fine-tuning run starts from: a base
whose BatchNorm statistics are the *source*-domain statistics. It is made
once per (arch, pretraining settings) and cached as a canonical safetensors
file under ``$FREEZE_PARITY_CACHE`` (default ``~/.cache/freeze-parity``).
Either framework can pretrain; each one's checkpoint loads into the other.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from shared import frameworks
from shared.archs import arch_config
from shared.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from shared.io import ensure_writable_dir

__all__ = ["PretrainConfig", "cache_dir", "checkpoint_path", "pretrain", "ensure_checkpoint",
           "MIN_SOURCE_ACCURACY"]

# The pretrained base must actually have learned the source task.
MIN_SOURCE_ACCURACY = 0.95


@dataclass(frozen=True)
class PretrainConfig:
    arch: str = "tinyconv"
    framework: str = "torch"  # torch pretrains faster here; tf gives an interchangeable file
    epochs: int = 8
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    seed: int = 0
    # The last `decay_epochs` run at learning_rate * decay_factor. Without the decay the
    # final weights (and BN statistics) depended on where the oscillation stopped:
    # held-out accuracy swung between 0.87 and 0.99 with the epoch count or thread count.
    decay_epochs: int = 2
    decay_factor: float = 0.1

    def decay_step(self, steps_per_epoch: int) -> int:
        """First optimizer step (0-based) that uses the decayed learning rate."""
        return max(0, self.epochs - self.decay_epochs) * steps_per_epoch

    def key(self) -> str:
        """Short hash of the settings that shape the weights (not the framework)."""
        settings = {k: v for k, v in asdict(self).items() if k != "framework"}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def cache_dir() -> Path:
    return Path(os.environ.get("FREEZE_PARITY_CACHE") or Path.home() / ".cache" / "freeze-parity")


def checkpoint_path(config: PretrainConfig, cache: Path | None = None) -> Path:
    return Path(cache or cache_dir()) / f"{config.arch}-source-{config.key()}.safetensors"


def pretrain(config: PretrainConfig, out: str | Path) -> dict:
    """Pretrain in ``config.framework``, write the canonical checkpoint to ``out``; metrics."""
    arch_config(config.arch)
    ensure_writable_dir(Path(out).parent, "checkpoint directory")  # before minutes of training
    train = frameworks.load(config.framework, "train")
    tensors, metrics = train.pretrain(config)
    meta = {
        "arch": config.arch,
        "made_by": f"freeze-parity pretrain --framework {config.framework}",
        "domain": "source (digits 0-4, grey)",
        "bn_epsilon": repr(arch_config(config.arch).bn_epsilon),
        "bn_momentum": repr(arch_config(config.arch).bn_momentum),
        "pretrain_config": json.dumps(asdict(config), sort_keys=True),
        "source_test_accuracy": f"{metrics['accuracy']:.6f}",
    }
    save_checkpoint(out, tensors, meta)
    return metrics


def ensure_checkpoint(arch: str = "tinyconv", cache: Path | None = None) -> Path:
    """The cached pretrained checkpoint for ``arch``, pretraining it when absent or unreadable."""
    config = PretrainConfig(arch=arch)
    path = checkpoint_path(config, cache)
    if path.exists():
        try:
            _, meta = load_checkpoint(path)
            if meta.get("arch") == arch:
                return path
        except CheckpointError:
            pass  # a damaged cache entry is remade, never trusted
    pretrain(config, path)
    return path
