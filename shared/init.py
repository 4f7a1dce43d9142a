"""Canonical initialisation, drawn with numpy so both frameworks start equal.

Keras (glorot-uniform, zero bias) and torch (kaiming-uniform, non-zero bias)
initialise differently; cross-framework parity needs one set of starting
tensors, so every run loads these instead of trusting either default.
"""

from __future__ import annotations

import numpy as np


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], limit: float) -> np.ndarray:
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


def init_tensor(key: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """One canonical tensor (torch layouts), chosen by its key suffix."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "running_mean" or leaf == "bias":
        return np.zeros(shape, np.float32)
    if leaf == "running_var":
        return np.ones(shape, np.float32)
    if leaf in ("cls_token", "pos_embed"):  # ViT embeddings: timm's trunc_normal std 0.02, untruncated
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    if leaf == "weight" and len(shape) == 1:  # BatchNorm or LayerNorm gamma
        return np.ones(shape, np.float32)
    if leaf == "weight" and len(shape) == 4:  # conv (O, I, kh, kw): He-uniform for ReLU nets
        fan_in = shape[1] * shape[2] * shape[3]
        return _uniform(rng, shape, float(np.sqrt(6.0 / fan_in)))
    if leaf == "weight" and len(shape) == 2:  # linear (out, in): Glorot-uniform
        return _uniform(rng, shape, float(np.sqrt(6.0 / (shape[0] + shape[1]))))
    raise ValueError(f"no canonical initialiser for key {key!r} with shape {shape}")


def canonical_init(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Fresh tensors for every key in ``shapes`` (sorted-key order, so reproducible)."""
    rng = np.random.default_rng(seed)
    return {key: init_tensor(key, tuple(shapes[key]), rng) for key in sorted(shapes)}


def head_init(feature_dim: int, num_classes: int, seed: int) -> dict[str, np.ndarray]:
    """The new classification head both frameworks start fine-tuning from."""
    shapes = {"head.fc.weight": (num_classes, feature_dim), "head.fc.bias": (num_classes,)}
    return canonical_init(shapes, seed)


def lora_init(adapters: dict, seed: int) -> dict[str, np.ndarray]:
    """Starting LoRA adapters for both frameworks (canonical keys ``<prefix>.lora_A`` (r, in),
    ``.lora_B`` (out, r); ``adapters`` maps them to arrays or shapes): A as PEFT's
    ``kaiming_uniform_(a=sqrt(5))``, uniform in +-1 / sqrt(in); B zero, so the adapted
    model starts as the base (PEFT's and Keras's rule; their A initialisers differ)."""
    rng = np.random.default_rng([seed, 0x10AA])
    out = {}
    for key in sorted(adapters):
        shape = tuple(np.shape(adapters[key])) if not isinstance(adapters[key], tuple) else adapters[key]
        if key.endswith(".lora_A"):
            out[key] = _uniform(rng, shape, float(1.0 / np.sqrt(shape[1])))
        elif key.endswith(".lora_B"):
            out[key] = np.zeros(shape, np.float32)
        else:
            raise ValueError(f"lora_init: key {key!r}: expected a .lora_A or .lora_B key")
    return out
