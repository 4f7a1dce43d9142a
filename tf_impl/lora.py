"""LoRA adapters on the ViT's attention projections, through Keras's ``enable_lora``.

``EinsumDense.enable_lora(rank, lora_alpha)`` adds ``lora_kernel_a`` (kernel shape[:-1]
+ (r,)) and ``lora_kernel_b`` (r, kernel shape[-1]) and computes
``kernel + (lora_alpha / rank) * A @ B``. On MultiHeadAttention's query/key/value
(kernel (width, heads, head_dim)) that is A (width, heads, r) and one B (r, head_dim)
shared by every head: a rank-r adapter of the width -> width map only when heads == 1
(tests/test_lora.py pins the shapes); the output projection (kernel (heads, head_dim,
width)) gets a true rank-r adapter. This module is the one place that converts them to
the canonical (torch/PEFT) layout: ``lora_A`` (r, in), ``lora_B`` (out, r).
Keras has no LoRA dropout: ``dropout > 0`` is refused. Keras creates the LoRA kernels
in float32 whatever the layer's dtype; :func:`add_lora` gives a float64 layer float64 ones.
"""

from __future__ import annotations

import keras
import numpy as np

from tf_impl.model import named_leaves

__all__ = ["SplitAttention", "split_qkv", "add_lora", "lora_tensors", "set_lora_tensors",
           "merge"]

TARGETS = ("q", "k", "v", "proj", "fc1", "fc2")
# canonical target -> MultiHeadAttention sublayer
_SUBLAYER = {"q": "query_dense", "k": "key_dense", "v": "value_dense", "proj": "output_dense"}
# targets in each block's MLP (Dense: kernel (in, out), A (in, r), B (r, out))
_MLP = ("fc1", "fc2")

# Keras's MultiHeadAttention already has separate query/key/value layers.
SplitAttention = keras.layers.MultiHeadAttention


def split_qkv(base):
    """The identity: Keras's attention is split already (torch's splits timm's fused qkv)."""
    return base


def _parts(model_or_base):
    if hasattr(model_or_base, "base") and hasattr(model_or_base, "head"):
        return model_or_base.base, model_or_base.head
    return model_or_base, None


def _attentions(base):
    """(canonical path under ``base.``, MultiHeadAttention) for every block."""
    return [(f"base.{path}", layer) for path, layer in named_leaves(base)
            if isinstance(layer, keras.layers.MultiHeadAttention)]


def _targets(base, targets=TARGETS) -> list[tuple[str, keras.layers.Layer, str]]:
    """(canonical prefix, layer, target) of every ``targets`` layer, block by block."""
    out = []
    for path, layer in named_leaves(base):
        if isinstance(layer, keras.layers.MultiHeadAttention):
            out += [(f"base.{path}.{t}", getattr(layer, _SUBLAYER[t]), t) for t in targets
                    if t in _SUBLAYER]
        elif path.rsplit(".", 2)[-2:] in ([["mlp", t] for t in _MLP if t in targets]):
            out.append((f"base.{path}", layer, path.rsplit(".", 1)[-1]))
    return out


def add_lora(model_or_base, rank: int, alpha: float, targets=("q", "k", "v"),
             dropout: float = 0.0):
    """``enable_lora(rank, lora_alpha=alpha)`` on each block's attention (``q``, ``k``,
    ``v``, ``proj``) and MLP (``fc1``, ``fc2``) ``targets``; every other variable frozen but
    the head's (if a model with a head is given). In place."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"add_lora: targets {tuple(targets)!r}: expected some of {TARGETS}")
    if dropout:
        raise ValueError(f"add_lora: dropout {dropout}: Keras's enable_lora has no LoRA "
                         f"dropout (only 0.0 is possible here)")
    if rank < 1:
        raise ValueError(f"add_lora: rank must be >= 1, got {rank}")
    base, head = _parts(model_or_base)
    attentions = _attentions(base)
    if not attentions:
        raise ValueError(f"add_lora: no MultiHeadAttention in {base.name!r} (built?)")
    layers = [layer for _, layer, _ in _targets(base, targets)]
    for layer in layers:
        layer.enable_lora(rank, lora_alpha=alpha)
        _lora_in_layer_dtype(layer)
    lora = {id(v) for layer in layers for v in (layer.lora_kernel_a, layer.lora_kernel_b)}
    for variable in base.weights:
        variable.trainable = id(variable) in lora
    if head is not None:
        for variable in head.weights:
            variable.trainable = True
    return model_or_base


def _lora_in_layer_dtype(layer) -> None:
    """Keras creates lora_kernel_a/b as float32 whatever the layer's dtype; a float64 layer
    gets float64 ones here (same shapes, same values), or its A @ B is a float32 product."""
    if layer.variable_dtype == "float32":
        return
    for name in ("lora_kernel_a", "lora_kernel_b"):
        old = getattr(layer, name)
        layer._untrack_variable(old)
        layer._tracker.unlock()
        new = layer.add_weight(name=name, shape=old.shape, initializer="zeros",
                               dtype=layer.variable_dtype)
        new.assign(keras.ops.cast(old.value, layer.variable_dtype))
        setattr(layer, name, new)
        layer._tracker.lock()


def _adapters(model_or_base) -> dict[str, tuple[keras.layers.Layer, str]]:
    base, _ = _parts(model_or_base)
    return {prefix: (layer, target) for prefix, layer, target in _targets(base)
            if layer.lora_enabled}


def _to_canonical(a: np.ndarray, b: np.ndarray, target: str, key: str):
    """Keras (A, B) -> canonical (lora_A (r, in), lora_B (out, r))."""
    rank = b.shape[0]
    # proj: A (heads, head_dim, r), input feature h * head_dim + j; fc1/fc2: A (in, r)
    if target in ("proj",) + _MLP:
        return np.ascontiguousarray(a.reshape(-1, rank).T), np.ascontiguousarray(b.T)
    if a.shape[1] != 1:  # A (width, heads, r), B (r, head_dim) shared by the heads
        raise ValueError(f"lora tensors: key {key!r}: Keras's per-head adapter (A {a.shape}, "
                         f"B {b.shape}) has no rank-r canonical form unless heads == 1")
    return np.ascontiguousarray(a[:, 0, :].T), np.ascontiguousarray(b.T)


def _from_canonical(a: np.ndarray, b: np.ndarray, target: str, shape_a: tuple):
    return np.ascontiguousarray(a.T.reshape(shape_a)), np.ascontiguousarray(b.T)


def lora_tensors(model_or_base) -> dict[str, np.ndarray]:
    """Canonical key -> numpy for every adapter: ``<prefix>.lora_A`` (r, in), ``.lora_B``
    (out, r)."""
    out = {}
    for prefix, (layer, target) in _adapters(model_or_base).items():
        a, b = _to_canonical(keras.ops.convert_to_numpy(layer.lora_kernel_a),
                             keras.ops.convert_to_numpy(layer.lora_kernel_b), target, prefix)
        out[f"{prefix}.lora_A"], out[f"{prefix}.lora_B"] = a, b
    return out


def set_lora_tensors(model_or_base, tensors: dict[str, np.ndarray],
                     where: str = "lora tensors") -> None:
    """Load :func:`lora_tensors`' form; strict about keys and shapes."""
    adapters = _adapters(model_or_base)
    want = {f"{p}.{s}" for p in adapters for s in ("lora_A", "lora_B")}
    if set(tensors) != want:
        extra, missing = sorted(set(tensors) - want), sorted(want - set(tensors))
        raise ValueError(f"{where}: keys differ from the model's adapters: unexpected "
                         f"{extra[:3]}, missing {missing[:3]}")
    for prefix, (layer, target) in adapters.items():
        shape_a, shape_b = tuple(layer.lora_kernel_a.shape), tuple(layer.lora_kernel_b.shape)
        rank = shape_b[0]
        in_dim = int(np.prod(shape_a[:-1])) if target in ("proj",) + _MLP else shape_a[0]
        if target in _SUBLAYER and target != "proj" and shape_a[1] != 1:
            raise ValueError(f"{where}: key {prefix!r}: Keras's per-head adapter (A {shape_a}) "
                             f"has no rank-r canonical form unless heads == 1")
        expected = {"lora_A": (rank, in_dim), "lora_B": (shape_b[1], rank)}
        for suffix, shape in expected.items():
            got = np.shape(tensors[f"{prefix}.{suffix}"])
            if got != shape:
                raise ValueError(f"{where}: key {prefix}.{suffix!r}: shape expected {shape}, "
                                 f"got {got}")
        a, b = _from_canonical(np.asarray(tensors[f"{prefix}.lora_A"]),
                               np.asarray(tensors[f"{prefix}.lora_B"]), target, shape_a)
        layer.lora_kernel_a.assign(a.astype(layer.lora_kernel_a.dtype))
        layer.lora_kernel_b.assign(b.astype(layer.lora_kernel_b.dtype))


def merge(model_or_base):
    """Fold every adapter into its kernel and switch LoRA off: Keras offers the merged value
    (``EinsumDense.kernel`` = kernel + (lora_alpha / rank) A @ B while LoRA is on) but no
    merge call, so it is assigned here. In place; returns it."""
    for layer, _ in _adapters(model_or_base).values():
        merged = keras.ops.convert_to_numpy(layer.kernel)
        layer.lora_enabled = False
        layer._kernel.assign(merged.astype(layer._kernel.dtype))
    return model_or_base
