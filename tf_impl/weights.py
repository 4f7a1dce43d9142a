"""Keras <-> canonical tensors. The only module that knows Keras's layout.

Canonical layouts are torch's: a Keras Conv2D kernel (kh, kw, I, O) becomes
(O, I, kh, kw); a Dense kernel (in, out) becomes (out, in); BatchNorm's
gamma / beta / moving_mean / moving_variance become weight / bias /
running_mean / running_var; LayerNormalization's gamma / beta become weight /
bias. Keys follow the model tree given by each container layer's
``named_children()`` (see ``tf_impl/model.py``).

The ViT (``tf_impl/vit.py``) adds two *fused* keys, each the join of several
Keras variables: timm's ``attn.qkv.weight`` (3 * width, width) is the
MultiHeadAttention query, key and value kernels (width, heads, head_dim) as
rows ``[q; k; v]``, output feature ``h * head_dim + j`` in each; ``attn.qkv.bias``
(3 * width,) their biases (heads, head_dim). ``attn.proj.weight`` (width,
width) is the MHA output kernel (heads, head_dim, width), input feature
``h * head_dim + j``. Every split and join is a reshape or transpose: exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import keras
import numpy as np

from shared.checkpoint import FLOAT32_OR_64, check_holdable, check_tensors
from shared.training_state import (
    OPTIMIZER_SLOTS,
    TrainingState,
    is_training_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from tf_impl.model import named_leaves
from tf_impl.vit import Weight

__all__ = ["canonical_shapes", "export_weights", "import_weights", "export_bookkeeping",
           "export_training_state", "import_training_state", "training_variables",
           "training_state_values", "training_state_from_values", "save_training_file",
           "load_training_file", "read_training_file", "write_training_file",
           "is_training_file", "to_canonical", "from_canonical", "activation_to_canonical",
           "activation_from_canonical"]

# Keras layout -> canonical layout, and back (the one place transposes live).
_TO_CANONICAL = {"conv": (3, 2, 0, 1), "dense": (1, 0), "vector": None}
_FROM_CANONICAL = {"conv": (2, 3, 1, 0), "dense": (1, 0), "vector": None}
# Kinds whose canonical tensor joins a tuple of Keras variables (query, key, value).
_FUSED = ("qkv_kernel", "qkv_bias")


def _kernel(layer) -> keras.Variable:
    """The stored kernel variable: with LoRA enabled (tf_impl/lora.py) Keras's ``kernel``
    property returns kernel + (lora_alpha / rank) A @ B, a tensor, not the base weight."""
    return layer._kernel if getattr(layer, "lora_enabled", False) else layer.kernel


def _adapter_variables(prefix: str, layer, adapters: bool) -> dict[str, tuple]:
    """``layer``'s LoRA kernels (``adapters`` and LoRA enabled): ``<prefix>.lora_A`` (Keras
    A: kernel shape[:-1] + (r,), canonical (r, in)) and ``.lora_B`` ((r, out) -> (out, r))."""
    if not adapters or not getattr(layer, "lora_enabled", False):
        return {}
    return {f"{prefix}.lora_A": (layer.lora_kernel_a, "lora_a"),
            f"{prefix}.lora_B": (layer.lora_kernel_b, "dense")}


def _variables(model, adapters: bool = False) -> dict[str, tuple[keras.Variable, str]]:
    """Canonical key -> (Keras variable, layout kind) for every weighted leaf layer; for a
    fused kind (``_FUSED``) a tuple of variables. ``adapters``: LoRA's kernels too (a
    training state's; a checkpoint holds none)."""
    out: dict[str, tuple[keras.Variable, str]] = {}
    for path, layer in named_leaves(model):
        if isinstance(layer, Weight):
            out[path] = (layer.tensor, "vector")  # timm's bare parameters: same shape
        elif isinstance(layer, keras.layers.LayerNormalization):
            out[f"{path}.weight"] = (layer.gamma, "vector")
            out[f"{path}.bias"] = (layer.beta, "vector")
        elif isinstance(layer, keras.layers.MultiHeadAttention):
            parts = (layer.query_dense, layer.key_dense, layer.value_dense)
            out[f"{path}.qkv.weight"] = (tuple(_kernel(d) for d in parts), "qkv_kernel")
            out[f"{path}.qkv.bias"] = (tuple(d.bias for d in parts), "qkv_bias")
            out[f"{path}.proj.weight"] = (_kernel(layer.output_dense), "attn_out")
            out[f"{path}.proj.bias"] = (layer.output_dense.bias, "vector")
            if adapters and any(getattr(d, "lora_enabled", False) for d in parts):
                raise ValueError(f"training state: {path}: LoRA on MultiHeadAttention's "
                                 f"query/key/value is per head and has no canonical (rank-r "
                                 f"of the fused qkv) form; target the output projection")
            out.update(_adapter_variables(f"{path}.proj", layer.output_dense, adapters))
        elif isinstance(layer, keras.layers.BatchNormalization):
            out[f"{path}.weight"] = (layer.gamma, "vector")
            out[f"{path}.bias"] = (layer.beta, "vector")
            out[f"{path}.running_mean"] = (layer.moving_mean, "vector")
            out[f"{path}.running_var"] = (layer.moving_variance, "vector")
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            kind = "conv" if isinstance(layer, keras.layers.Conv2D) else "dense"
            out[f"{path}.weight"] = (_kernel(layer), kind)
            if layer.use_bias:
                out[f"{path}.bias"] = (layer.bias, "vector")
            out.update(_adapter_variables(path, layer, adapters))
        else:
            raise TypeError(f"weights: no canonical mapping for layer {path!r} "
                            f"of type {type(layer).__name__}")
    return out


def _to_canonical(value, kind: str) -> np.ndarray:
    """A Keras value (a tuple of them for a fused kind) in the canonical layout."""
    if kind == "qkv_kernel":  # (width, heads, head_dim) each -> rows [q; k; v] of (out, in)
        return np.ascontiguousarray(np.concatenate(
            [part.reshape(part.shape[0], -1).T for part in value], axis=0))
    if kind == "qkv_bias":  # (heads, head_dim) each -> [q; k; v]
        return np.ascontiguousarray(np.concatenate([part.reshape(-1) for part in value]))
    if kind in ("attn_out", "lora_a"):  # (heads, head_dim, width) -> (width, heads * head_dim);
        # LoRA A (..., r) -> (r, in)
        return np.ascontiguousarray(value.reshape(-1, value.shape[-1]).T)
    axes = _TO_CANONICAL[kind]
    return np.ascontiguousarray(value if axes is None else np.transpose(value, axes))


def _from_canonical(value: np.ndarray, kind: str, shape) -> np.ndarray | tuple[np.ndarray, ...]:
    """Inverse of :func:`_to_canonical`; ``shape`` is the Keras variable's (a part's, fused)."""
    if kind == "qkv_kernel":
        rows = value.shape[0] // 3
        return tuple(value[i * rows:(i + 1) * rows].T.reshape(shape) for i in range(3))
    if kind == "qkv_bias":
        size = value.shape[0] // 3
        return tuple(value[i * size:(i + 1) * size].reshape(shape) for i in range(3))
    if kind in ("attn_out", "lora_a"):
        return value.T.reshape(shape)
    axes = _FROM_CANONICAL[kind]
    return value if axes is None else np.transpose(value, axes)


def _read(var, kind: str, dtype) -> np.ndarray:
    if kind in _FUSED:
        return _to_canonical(tuple(np.asarray(keras.ops.convert_to_numpy(v), dtype) for v in var),
                             kind)
    return _to_canonical(np.asarray(keras.ops.convert_to_numpy(var), dtype), kind)


def _shape(var, kind: str) -> tuple[int, ...]:
    parts = var if kind in _FUSED else (var,)
    zeros = tuple(np.zeros(v.shape, np.float32) for v in parts)
    return _to_canonical(zeros if kind in _FUSED else zeros[0], kind).shape


def canonical_shapes(model, adapters: bool = False) -> dict[str, tuple[int, ...]]:
    """Canonical key -> shape (torch layout) for every tensor of ``model`` (``adapters``:
    LoRA's too)."""
    return {key: _shape(var, kind) for key, (var, kind) in _variables(model, adapters).items()}


def export_weights(model, dtype=np.float32, adapters: bool = False) -> dict[str, np.ndarray]:
    """Every weight and BN statistic as numpy (float32 = the canonical form), canonical
    keys; ``adapters``: LoRA's tensors too (a training state's)."""
    return {key: _read(var, kind, dtype)
            for key, (var, kind) in _variables(model, adapters).items()}


def import_weights(model, tensors: dict[str, np.ndarray], where: str = "tensors",
                   adapters: bool = False) -> None:
    """Load canonical tensors into ``model``; strict about keys, shapes, dtype, finiteness
    (``adapters``: LoRA's tensors too, a training state's).

    float32 or float64 arrays; float64 into a float32 model only where exact.
    """
    variables = _variables(model, adapters)
    check_tensors(tensors, canonical_shapes(model, adapters), where, FLOAT32_OR_64)
    check_holdable(tensors, next(iter(variables.values()))[0].dtype, where)
    for key, (var, kind) in variables.items():
        _assign(var, tensors[key], kind)


def _assign(var, value: np.ndarray, kind: str) -> None:
    if kind in _FUSED:
        for part, part_value in zip(var, _from_canonical(value, kind, var[0].shape)):
            part.assign(np.ascontiguousarray(part_value, dtype=part.dtype))
        return
    var.assign(_keras_layout(value, kind, var.dtype, var.shape))


def export_bookkeeping(model) -> dict[str, np.ndarray]:
    """Framework-only state outside the canonical form: none in Keras (no BN counter)."""
    return {}


# --- optimizer state ------------------------------------------------------------------------
# Keras SGD keeps the velocity v = -lr * b of torch's momentum buffer b
# (shared/training_state.py); Adam's momentums and velocities are torch's exp_avg and
# exp_avg_sq. The slot lists, per optimizer, in canonical slot order.
def _optimizer_kind(optimizer) -> str:
    if isinstance(optimizer, keras.optimizers.SGD):
        return "sgd"
    if isinstance(optimizer, keras.optimizers.Adam | keras.optimizers.AdamW):
        return "adam"
    raise TypeError(f"training state: no canonical form for {type(optimizer).__name__} "
                    f"(expected SGD, Adam or AdamW)")


def _slot_variables(optimizer, kind: str) -> list[list]:
    if kind == "sgd":
        return [optimizer.momentums] if optimizer.momentum != 0 else []
    return [optimizer._momentums, optimizer._velocities]


def _parts(var, kind: str) -> tuple:
    """The Keras variables of one canonical key: three for a fused kind (query, key, value),
    else one."""
    return tuple(var) if kind in _FUSED else (var,)


def _keras_layout(value: np.ndarray, layout: str, dtype, shape=None) -> np.ndarray:
    return np.ascontiguousarray(_from_canonical(value, layout, shape), dtype=dtype)


def _keras_values(value: np.ndarray, parts: tuple, kind: str) -> list[np.ndarray]:
    """A canonical value as the values of the key's Keras variables ``parts``
    (:func:`_parts`), in their layouts and dtypes; a fused key's split as its weights are."""
    split = _from_canonical(np.asarray(value), kind, parts[0].shape)
    split = split if kind in _FUSED else (split,)
    return [np.ascontiguousarray(v, dtype=part.dtype) for v, part in zip(split, parts)]


def _canonical_value(values: list, kind: str, dtype) -> np.ndarray:
    """Inverse of :func:`_keras_values`: the Keras values of one key, fused when they are
    several."""
    values = [np.asarray(v, dtype) for v in values]
    return _to_canonical(tuple(values) if kind in _FUSED else values[0], kind)


def _updated_whole(key: str, parts: int, updated: int) -> bool:
    """Whether the optimizer updates ``key`` (``updated`` of its ``parts`` Keras variables):
    all or none, else one line naming it."""
    if updated and updated != parts:
        raise ValueError(f"training state: key {key!r} joins {parts} Keras variables "
                         f"(MultiHeadAttention query/key/value), of which the optimizer "
                         f"updates {updated}: freeze them together")
    return bool(updated)


def _optimized(model, optimizer) -> list[tuple[str, tuple, str, tuple[int, ...]]]:
    """``(canonical key, its variables, layout kind, their optimizer indices)`` of every
    updated key. A fused key (``attn.qkv``: query, key, value) is updated whole or not at
    all: one canonical slot cannot hold a part trained and a part frozen."""
    out = []
    for key, (var, layout) in _variables(model, adapters=True).items():
        parts = _parts(var, layout)
        indices = []
        for part in parts:
            try:
                indices.append(optimizer._get_variable_index(part))
            except KeyError:
                continue  # not one the optimizer updates (frozen, or a BN statistic)
        if _updated_whole(key, len(parts), len(indices)):
            out.append((key, parts, layout, tuple(indices)))
    if sum(len(parts) for _, parts, *_ in out) != len(optimizer._trainable_variables):
        raise ValueError("training state: the optimizer updates variables that are not "
                         "weights of the model")
    return out


def _learning_rate(optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def _hyper(optimizer, kind: str) -> dict[str, float]:
    if kind == "sgd":
        return {"learning_rate": _learning_rate(optimizer), "momentum": float(optimizer.momentum)}
    return {"learning_rate": _learning_rate(optimizer), "beta_1": float(optimizer.beta_1),
            "beta_2": float(optimizer.beta_2), "epsilon": float(optimizer.epsilon)}


def training_variables(model, optimizer=None) -> list:
    """Every Keras variable a training state sets, in :func:`training_state_values` order:
    the model's weights (a fused key's query, key, value in turn), the optimizer's slot
    variables (per updated key, per slot, per part), ``iterations``.

    Builds the optimizer (``None``: ``model.optimizer``) on ``model.trainable_variables``
    if it is not built yet.
    """
    optimizer = optimizer if optimizer is not None else model.optimizer
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    lists = _slot_variables(optimizer, _optimizer_kind(optimizer))
    slots = [variables[index] for *_, indices in _optimized(model, optimizer)
             for variables in lists for index in indices]
    weights = [part for var, layout in _variables(model, adapters=True).values() for part in _parts(var, layout)]
    return weights + slots + [optimizer.iterations]


def training_state_values(model, optimizer, state: TrainingState,
                          where: str = "training state") -> list[np.ndarray]:
    """``state`` as the values of :func:`training_variables`, in Keras layouts and dtypes;
    checked like :func:`import_training_state`."""
    optimizer = optimizer if optimizer is not None else model.optimizer
    kind = _optimizer_kind(optimizer)
    if state.optimizer != kind:
        raise ValueError(f"{where}: holds {state.optimizer} state, the optimizer is {kind}")
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    optimized = _optimized(model, optimizer)
    stray = sorted(set(state.trainable_keys()) - {key for key, *_ in optimized})
    if stray:
        raise ValueError(f"{where}: slot for {stray[0]!r}, which the optimizer does not update "
                         f"(frozen here, trained where the state comes from?)")
    variables = _variables(model, adapters=True)
    check_tensors(state.tensors, canonical_shapes(model, adapters=True), where, FLOAT32_OR_64)
    check_holdable(state.tensors, _parts(*next(iter(variables.values())))[0].dtype, where)
    values = [value for key, (var, layout) in variables.items()
              for value in _keras_values(state.tensors[key], _parts(var, layout), layout)]
    lists = _slot_variables(optimizer, kind)
    # SGD: v = -lr * b, one float64 rounding (b came from v / -lr: v exactly again)
    scale = -_learning_rate(optimizer) if kind == "sgd" else 1.0
    for key, parts, layout, _ in optimized:
        held = {name: state.slots[name][key] for name in OPTIMIZER_SLOTS[kind]
                if key in state.slots.get(name, {})}
        if kind == "adam" and state.step > 0 and not held:
            raise ValueError(f"{where}: key {key!r}: no adam slots at step {state.step} "
                             f"(Adam's bias correction needs the moments of every parameter)")
        if held and len(held) != len(OPTIMIZER_SLOTS[kind]):
            raise ValueError(f"{where}: key {key!r}: has {sorted(held)} but not every "
                             f"{kind} slot ({', '.join(OPTIMIZER_SLOTS[kind])})")
        shape = _shape(parts if layout in _FUSED else parts[0], layout)
        for name in OPTIMIZER_SLOTS[kind][:len(lists)]:
            value = held.get(name)
            if value is None:  # no state yet: Keras's own start, zeros
                values.extend(np.zeros(part.shape, part.dtype) for part in parts)
                continue
            if value.shape != shape:
                raise ValueError(f"{where}: slot {name!r} key {key!r}: shape expected "
                                 f"{shape}, got {value.shape}")
            values.extend(_keras_values(np.asarray(value, np.float64) * scale, parts, layout))
    values.append(np.asarray(state.step, "int64"))
    return values


def training_state_from_values(model, optimizer, values: list[np.ndarray],
                               dtype=np.float64) -> TrainingState:
    """Inverse of :func:`training_state_values`: the canonical state these values hold."""
    optimizer = optimizer if optimizer is not None else model.optimizer
    kind = _optimizer_kind(optimizer)
    rest = iter(values)
    tensors = {}
    for key, (var, layout) in _variables(model, adapters=True).items():
        parts = [next(rest) for _ in _parts(var, layout)]
        tensors[key] = _canonical_value(parts, layout, dtype)
    lists = _slot_variables(optimizer, kind)
    names = OPTIMIZER_SLOTS[kind][:len(lists)]
    slots = {name: {} for name in names}
    # SGD: b = v / -lr, one float64 rounding: v -> b -> v is exact for float32 variables
    # (float64 ones come back within one unit in the last place: a float64 b cannot hold
    # every float64 v divided by a float32 learning rate)
    divisor = -_learning_rate(optimizer) if kind == "sgd" else 1.0
    optimized = _optimized(model, optimizer)
    for key, parts, layout, _ in optimized:
        for name in names:
            held = [np.asarray(next(rest), np.float64) / divisor for _ in parts]
            slots[name][key] = _canonical_value(held, layout, np.float64).astype(dtype)
    step = int(next(rest))
    return TrainingState(tensors, kind, {n: v for n, v in slots.items() if v}, step,
                         _hyper(optimizer, kind),
                         [key for key, *_ in sorted(optimized, key=lambda item: min(item[3]))])


def export_training_state(model, optimizer=None, dtype=np.float64) -> TrainingState:
    """Model tensors and optimizer slots in canonical form (float64 unless told: exact).

    ``optimizer`` None: ``model.optimizer``. An optimizer not built yet has no slots
    (step 0), as a torch optimizer before its first step.
    """
    optimizer = optimizer if optimizer is not None else model.optimizer
    if not optimizer.built:  # what it will be built on: the model's trainable variables
        kind = _optimizer_kind(optimizer)
        trainable = {id(var) for var in model.trainable_variables}
        return TrainingState(export_weights(model, dtype, adapters=True), kind, {}, 0,
                             _hyper(optimizer, kind),
                             [key for key, (var, layout) in _variables(model, adapters=True).items()
                              if _updated_whole(key, len(_parts(var, layout)),
                                                sum(id(p) in trainable for p in _parts(var, layout)))])
    values = [keras.ops.convert_to_numpy(v) for v in training_variables(model, optimizer)]
    return training_state_from_values(model, optimizer, values, dtype)


def import_training_state(model, optimizer, state: TrainingState,
                          where: str = "training state") -> None:
    """Load ``state`` into ``model`` and ``optimizer`` (None: ``model.optimizer``): slots,
    ``iterations``; exact for its dtype. Every check comes before anything is set: a
    refused state changes nothing.

    Builds the optimizer on ``model.trainable_variables`` if it is not built yet. A
    variable the state has no slot for starts from zeros (torch: no buffer yet).
    """
    values = training_state_values(model, optimizer, state, where)
    for var, value in zip(training_variables(model, optimizer), values):
        var.assign(value)


# --- training files: each framework's own file for a training state -------------------------
# Keras's is the canonical training checkpoint itself (``shared.training_state``: a
# ``.safetensors`` with meta ``kind`` "training"), written from a compiled model and read
# into one. Model tensors and Adam's moments are stored in the model's dtype (its own
# values, exact); SGD's momentum buffers in float64 (b = v / -lr, see above).
def save_training_file(path, model, optimizer=None, meta: Mapping[str, str] | None = None) -> Path:
    """``model`` and ``optimizer`` (None: ``model.optimizer``) as Keras's training file
    (a canonical training checkpoint), written atomically.

    ``meta`` (str -> str) needs ``arch`` unless the model has one (the project's do).
    """
    state = export_training_state(model, optimizer, np.float64)
    dtype = next(iter(_variables(model).values()))[0].dtype
    held = {name: values if name == "momentum_buffer" else
            {k: v.astype(dtype) for k, v in values.items()} for name, values in state.slots.items()}
    state = TrainingState({k: v.astype(dtype) for k, v in state.tensors.items()}, state.optimizer,
                          held, state.step, state.hyper, state.parameters)
    return write_training_file(path, state, {"arch": getattr(model, "arch", ""), **(meta or {})})


def load_training_file(path, model, optimizer=None) -> TrainingState:
    """Read Keras's training file into ``model`` and ``optimizer`` (None: ``model.optimizer``);
    the state it held.

    Parameters are matched by canonical key, not by position.
    """
    where = f"training file {path}"
    state, _ = read_training_file(path, expected=canonical_shapes(model, adapters=True))
    import_training_state(model, optimizer, state, where)
    return state


def read_training_file(path, *, expected: Mapping[str, tuple[int, ...]] | None = None
                       ) -> tuple[TrainingState, dict[str, str]]:
    """Keras's training file as a canonical state and its meta (``arch`` included), no model
    needed; ``expected`` (key -> shape) checks the model tensors."""
    return load_training_checkpoint(path, expected=expected)


def write_training_file(path, state: TrainingState, meta: Mapping[str, str]) -> Path:
    """Write a canonical state as Keras's training file, atomically (arrays as they are);
    ``meta`` needs ``arch``."""
    return save_training_checkpoint(path, state, meta)


def is_training_file(path) -> bool:
    """True for a file :func:`read_training_file` takes (its header says so; no tensors read)."""
    return is_training_checkpoint(path)

# --- single tensors, for layers outside the project's own trees (``tf_impl/port.py``) ---
def to_canonical(value: np.ndarray, kind: str, flatten_from: tuple | None = None) -> np.ndarray:
    """One Keras tensor in the canonical layout.

    ``kind``: "conv" (kh, kw, I, O) -> (O, I, kh, kw); "depthwise" (kh, kw, C, M) ->
    (C * M, 1, kh, kw) (torch groups=C, output channel c * M + m, as TensorFlow orders them);
    "qkv_kernel" / "qkv_bias" (a tuple of MultiHeadAttention's query, key and value
    parts) -> fused rows [q; k; v]; "attn_out" (heads, head_dim, E) -> (E, heads * head_dim);
    "dense" (in, out) -> (out, in), with ``flatten_from`` (H, W, C) when the Dense reads a
    Flatten of an NHWC map: its rows are (h, w, c) and become torch's (c, h, w) columns;
    "vector" unchanged.
    """
    if kind in _FUSED:
        return _to_canonical(tuple(np.asarray(v) for v in value), kind)
    value = np.asarray(value)
    if kind == "depthwise":
        kh, kw, c, m = value.shape
        return np.ascontiguousarray(value.reshape(kh, kw, c * m).transpose(2, 0, 1)[:, None])
    if kind == "dense" and flatten_from is not None:
        h, w, c = flatten_from
        out = value.shape[1]
        return np.ascontiguousarray(value.reshape(h, w, c, out).transpose(3, 2, 0, 1)
                                    .reshape(out, c * h * w))
    return _to_canonical(value, kind)


def from_canonical(value: np.ndarray, kind: str, shape: tuple,
                   flatten_from: tuple | None = None) -> np.ndarray:
    """Inverse of :func:`to_canonical` for a Keras variable of ``shape`` (for a fused kind,
    ``qkv_kernel`` / ``qkv_bias``: a tuple of the query, key and value parts, each ``shape``)."""
    if kind in _FUSED or kind == "attn_out":
        return _from_canonical(np.asarray(value), kind, shape)
    value = np.asarray(value)
    if kind == "depthwise":
        kh, kw, c, m = shape
        return np.ascontiguousarray(value[:, 0].transpose(1, 2, 0).reshape(kh, kw, c, m))
    if kind == "dense" and flatten_from is not None:
        h, w, c = flatten_from
        out = value.shape[0]
        return np.ascontiguousarray(value.reshape(out, c, h, w).transpose(2, 3, 1, 0)
                                    .reshape(h * w * c, out))
    axes = _FROM_CANONICAL[kind]
    return np.ascontiguousarray(value if axes is None else np.transpose(value, axes))


def activation_to_canonical(value: np.ndarray) -> np.ndarray:
    """A Keras activation (NHWC maps) in the canonical layout (NCHW); others unchanged."""
    value = np.asarray(value)
    return np.ascontiguousarray(value.transpose(0, 3, 1, 2)) if value.ndim == 4 else value


def activation_from_canonical(value: np.ndarray) -> np.ndarray:
    """Inverse of :func:`activation_to_canonical` (NCHW -> NHWC)."""
    value = np.asarray(value)
    return np.ascontiguousarray(value.transpose(0, 2, 3, 1)) if value.ndim == 4 else value
