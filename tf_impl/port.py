"""Port check, Keras half: describe a Keras model's leaves, capture their outputs, train it.

The comparison itself lives in :mod:`shared.port`; this module only turns a
Keras model into neutral :class:`shared.port.Leaf` records (tensors in the
canonical layout through ``tf_impl/weights.py``) and runs it. Call order is
seen by wrapping each leaf layer's ``call`` on the instance for one probe
forward pass (the same spy the freeze audit uses); a functional model's graph
and a subclassed model's ``call`` are both seen as they run. Everything it
runs restores the model's variables afterwards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import keras
import numpy as np
import tensorflow as tf

from shared.port import Leaf, PortError
from tf_impl.audit import _tree  # the layer tree with dotted paths, shared with the audit
from tf_impl.model import TorchVarianceBatchNormalization
from tf_impl.weights import (
    activation_from_canonical,
    activation_to_canonical,
    from_canonical,
    to_canonical,
)

__all__ = [
    "capture",
    "check_model",
    "describe",
    "input_shape",
    "read_tensors",
    "train_steps",
    "write_tensors",
]

_DROPOUT = (keras.layers.Dropout, keras.layers.SpatialDropout2D)
_BN = keras.layers.BatchNormalization


def check_model(model, what: str) -> None:
    if not isinstance(model, keras.Model):
        raise PortError(f"{what}: expected a keras.Model, got "
                        f"{type(model).__module__}.{type(model).__name__}")


def input_shape(model, what: str) -> tuple[int, int, int]:
    """The canonical (C, H, W) input of a model that declares one (functional, or built:
    a subclassed model keeps its build shape in ``_build_shapes_dict``, as the audit reads)."""
    inputs = getattr(model, "inputs", None)
    shape = tuple(inputs[0].shape) if inputs and len(inputs) == 1 else None
    built = getattr(model, "_build_shapes_dict", None) or {}
    if shape is None and len(built) == 1:
        found = next(iter(built.values()))
        shape = tuple(found) if isinstance(found, (tuple, list)) else None
    if shape is None or len(shape) != 4 or any(d is None for d in shape[1:]):
        raise PortError(f"{what}: no fixed 4-D input shape (got {shape}): pass input_shape "
                        "(H, W, C) / --input-shape H,W,C")
    _, h, w, c = shape
    return (int(c), int(h), int(w))


def _activation_name(fn) -> str | None:
    name = getattr(fn, "__name__", None)
    if name in (None, "linear"):
        return None
    return {"swish": "silu"}.get(name, name)


def _pair2(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _same_pad(in_hw, kernel, stride, dilation) -> tuple[int, int, int, int]:
    """TensorFlow's 'same' padding: the extra row/column goes to the bottom/right."""
    pads = []
    for size, k, s, d in zip(in_hw, kernel, stride, dilation):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    return (pads[0][0], pads[0][1], pads[1][0], pads[1][1])


def _conv_record(path, layer, in_shape, out_shape) -> Leaf:
    depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
    kernel = tuple(layer.kernel.shape)
    kh, kw = kernel[:2]
    in_ch = kernel[2]
    groups = in_ch if depthwise else getattr(layer, "groups", 1)
    in_hw = tuple(in_shape[1:3])
    stride, dilation = _pair2(layer.strides), _pair2(layer.dilation_rate)
    same = layer.padding == "same"
    pad = _same_pad(in_hw, (kh, kw), stride, dilation) if same else (0, 0, 0, 0)
    kind = "depthwise" if depthwise else "conv"
    shapes = {"weight": to_canonical(np.zeros(kernel, np.float32), kind).shape}
    if layer.use_bias:
        shapes["bias"] = tuple(layer.bias.shape)
    params = {"layout": kind, "in_channels": in_ch,
              "out_channels": shapes["weight"][0], "kernel": (kh, kw), "stride": stride,
              "dilation": dilation, "groups": groups, "bias": bool(layer.use_bias), "pad": pad,
              "same": same, "in_hw": in_hw, "activation": _activation_name(layer.activation)}
    return Leaf(path, "conv", type(layer).__name__, params, shapes,
                _canonical_shape(out_shape), layer)


def _canonical_shape(shape) -> tuple:
    shape = tuple(int(d) for d in shape[1:])
    return (shape[2], shape[0], shape[1]) if len(shape) == 3 else shape


def _record(path, layer, in_shape, out_shape, previous) -> Leaf | None:
    cls = type(layer).__name__
    out = _canonical_shape(out_shape)
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)) and not isinstance(
            layer, (keras.layers.Conv2DTranspose, keras.layers.SeparableConv2D)):
        return _conv_record(path, layer, in_shape, out_shape)
    if isinstance(layer, keras.layers.Dense):
        flatten_from = None
        if (previous is not None and previous[0] == "flatten" and len(previous[1]) == 4
                and previous[1][1] * previous[1][2] > 1):
            flatten_from = tuple(int(d) for d in previous[1][1:])
        shapes = {"weight": tuple(reversed(layer.kernel.shape))}
        if layer.use_bias:
            shapes["bias"] = tuple(layer.bias.shape)
        return Leaf(path, "dense", cls, {"bias": bool(layer.use_bias),
                                         "flatten_from": flatten_from,
                                         "activation": _activation_name(layer.activation)},
                    shapes, out, layer)
    if isinstance(layer, _BN):
        axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
        if axis not in (-1, len(in_shape) - 1):
            raise PortError(f"keras layer {path!r} (BatchNormalization): axis {layer.axis} is "
                            "not the channel axis (-1) of an NHWC model")
        n = int(in_shape[-1])
        shapes = {key: (n,) for key in ("weight", "bias", "running_mean", "running_var")}
        return Leaf(path, "bn", cls, {"features": n, "eps": float(layer.epsilon),
                                      "keras_momentum": float(layer.momentum),
                                      "momentum": 1.0 - float(layer.momentum),
                                      "center": bool(layer.center), "scale": bool(layer.scale),
                                      "stats": True,
                                      "variance_update": "unbiased" if isinstance(
                                          layer, TorchVarianceBatchNormalization) else "biased"},
                    shapes, out, layer)
    if isinstance(layer, keras.layers.LayerNormalization):
        n = int(in_shape[-1])
        shapes = {"weight": (n,), "bias": (n,)}
        return Leaf(path, "layernorm", cls, {"features": n, "eps": float(layer.epsilon),
                                             "center": bool(layer.center),
                                             "scale": bool(layer.scale)}, shapes, out, layer)
    if isinstance(layer, _DROPOUT):
        return Leaf(path, "dropout", cls, {"rate": float(layer.rate)}, {}, out, layer)
    if isinstance(layer, keras.layers.Flatten):
        return Leaf(path, "flatten", cls, {}, {}, out, layer)
    if isinstance(layer, keras.layers.ZeroPadding2D):
        (t, b), (left, r) = layer.padding
        return Leaf(path, "pad", cls, {"pad": (t, b, left, r), "in_hw": tuple(in_shape[1:3])},
                    {}, out, layer)
    if isinstance(layer, keras.layers.ReLU):
        slope = float(layer.negative_slope or 0.0)
        name = ("relu6" if layer.max_value is not None and float(layer.max_value) == 6.0
                and slope == 0 else "leaky_relu" if slope else "relu")
        return Leaf(path, "activation", cls, {"name": name}, {}, out, layer)
    if isinstance(layer, keras.layers.Activation):
        return Leaf(path, "activation", cls, {"name": _activation_name(layer.activation)},
                    {}, out, layer)
    if isinstance(layer, keras.layers.Softmax):
        return Leaf(path, "activation", cls, {"name": "softmax"}, {}, out, layer)
    if layer.weights:
        raise PortError(f"keras layer {path!r} ({cls}) has weights but no port mapping "
                        "(supported: Conv2D, DepthwiseConv2D, Dense, BatchNormalization, "
                        "LayerNormalization)")
    return None


@contextlib.contextmanager
def _spied(layers, on_call, dropout_off: bool = False) -> Iterator[None]:
    """Wrap each layer's ``call``; ``on_call(layer, inputs, output)`` sees every call."""
    def spy(layer, original):
        def call(*args, **kwargs):
            if dropout_off and isinstance(layer, _DROPOUT):
                kwargs["training"] = False
            output = original(*args, **kwargs)
            on_call(layer, args[0] if args else next(iter(kwargs.values())), output)
            return output
        return call

    for layer in layers:
        object.__setattr__(layer, "call", spy(layer, layer.call))
    try:
        yield
    finally:
        for layer in layers:
            object.__delattr__(layer, "call")


def _numpy(variable) -> np.ndarray:
    return np.array(variable.numpy(), copy=True)


@contextlib.contextmanager
def _variables_kept(model, trainable_too: bool = True) -> Iterator[None]:
    """Assign every variable (or, without gradients, only the non-trainable ones: statistics
    and random seeds) its value from entry, on exit."""
    variables = model.variables if trainable_too else model.non_trainable_variables
    saved = [(v, _numpy(v)) for v in variables]
    try:
        yield
    finally:
        for v, value in saved:
            v.assign(value)


def _leaf_layers(model):
    return [(path, layer) for path, layer, _ in _tree(model)
            if not layer._flatten_layers(include_self=False, recursive=False)]


def _shape(value) -> tuple:
    return tuple(getattr(value, "shape", ()) or ())


def _first_error_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {text}"


def describe(model, probe: np.ndarray, what: str = "keras model") -> list[Leaf]:
    """Every leaf layer the forward pass on ``probe`` (canonical NCHW) calls, in call order."""
    leaves = _leaf_layers(model)
    paths = {id(layer): path for path, layer in leaves}
    events = []

    def seen(layer, inputs, output):
        events.append((layer, _shape(inputs), _shape(output)))

    with _spied([layer for _, layer in leaves], seen), _variables_kept(model, False):
        try:
            model(activation_from_canonical(probe), training=False)
        except Exception as exc:  # noqa: BLE001  (a model that rejects the input: bad input)
            raise PortError(f"{what}: the forward pass on input (H, W, C) "
                            f"{tuple(probe.shape[2:]) + (probe.shape[1],)} failed "
                            f"({_first_error_line(exc)})") from None
    records, done, previous = [], set(), None
    for layer, in_shape, out_shape in events:
        if id(layer) in done:
            continue
        done.add(id(layer))
        record = _record(paths[id(layer)], layer, in_shape, out_shape, previous)
        previous = (record.kind if record else None, in_shape)
        if record is not None:
            records.append(record)
    return records


def _variables(leaf: Leaf) -> dict[str, tuple[object, str]]:
    layer = leaf.ref
    if leaf.kind == "conv":
        out = {"weight": (layer.kernel, leaf.params["layout"])}
    elif leaf.kind == "dense":
        out = {"weight": (layer.kernel, "dense")}
    elif leaf.kind == "bn":
        out = {key: (var, "vector") for key, var in
               (("weight", layer.gamma), ("bias", layer.beta),
                ("running_mean", layer.moving_mean), ("running_var", layer.moving_variance))
               if var is not None}
        return out
    else:  # layernorm
        return {key: (var, "vector") for key, var in (("weight", layer.gamma),
                                                      ("bias", layer.beta)) if var is not None}
    if getattr(layer, "bias", None) is not None:
        out["bias"] = (layer.bias, "vector")
    return out


def read_tensors(model, leaves: list[Leaf]) -> dict[str, dict[str, np.ndarray]]:
    """Canonical float32 tensors of each leaf (a Dense after Flatten also gets its rows
    as a plain transpose, ``weight_unpermuted``, so the lint can spot an unpermuted copy)."""
    out = {}
    for leaf in leaves:
        flatten_from = leaf.params.get("flatten_from")
        tensors = {}
        for key, (var, kind) in _variables(leaf).items():
            value = _numpy(var).astype(np.float32)
            tensors[key] = to_canonical(value, kind, flatten_from if key == "weight" else None)
            if key == "weight" and flatten_from is not None:
                tensors["weight_unpermuted"] = to_canonical(value, kind)
        out[leaf.name] = tensors
    return out


def write_tensors(model, leaves: list[Leaf], tensors: dict[str, dict[str, np.ndarray]]) -> None:
    """Assign canonical tensors to each leaf's variables (layout changed back)."""
    for leaf in leaves:
        flatten_from = leaf.params.get("flatten_from")
        for key, (var, kind) in _variables(leaf).items():
            if key in tensors.get(leaf.name, {}):
                value = from_canonical(tensors[leaf.name][key], kind, tuple(var.shape),
                                       flatten_from if key == "weight" else None)
                var.assign(value.astype(var.dtype))


def capture(model, leaves: list[Leaf], x: np.ndarray, training: bool) -> dict[str, np.ndarray]:
    """Each leaf's output (first call, canonical layout) for ``x`` (NCHW) in one mode.

    Training mode is ``model(x, training=True)`` as ``fit`` calls it, with every
    Dropout called with ``training=False``; no variable keeps a change.
    """
    wanted = {id(leaf.ref): leaf.name for leaf in leaves}
    dropouts = [layer for _, layer in _leaf_layers(model) if isinstance(layer, _DROPOUT)]
    out: dict[str, np.ndarray] = {}

    def seen(layer, inputs, output):
        name = wanted.get(id(layer))
        if name is not None and name not in out:
            out[name] = activation_to_canonical(keras.ops.convert_to_numpy(output))

    layers = [leaf.ref for leaf in leaves] + [d for d in dropouts if id(d) not in wanted]
    with _spied(layers, seen, dropout_off=True), _variables_kept(model, False):
        model(activation_from_canonical(x), training=training)
    return out


def _optimizer(setup: dict):
    if setup["optimizer"] == "adam":
        return keras.optimizers.Adam(learning_rate=setup["learning_rate"], beta_1=0.9,
                                     beta_2=0.999, epsilon=setup["adam_epsilon"])
    return keras.optimizers.SGD(learning_rate=setup["learning_rate"])


def _loss(setup: dict, y, output):
    if setup["loss"] == "cross_entropy":
        return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(
            y, output, from_logits=True))
    return keras.ops.mean(keras.ops.square(output))


def train_steps(model, leaves: list[Leaf], batches, setup: dict, optimizer=None):
    """K steps as ``fit`` runs them: ``model(x, training=True)``, gradients for
    ``model.trainable_variables``, the optimizer (``optimizer`` or a new SGD/Adam) applies
    them. Per step ``(training-mode loss, inference-mode loss)`` at the pre-update weights,
    and each leaf's tensors after the last step. Dropout is off; variables are restored.
    """
    optimizer = optimizer or _optimizer(setup)
    dropouts = [layer for _, layer in _leaf_layers(model) if isinstance(layer, _DROPOUT)]
    variables = model.trainable_variables

    def step(x, y):  # eager: for 5 ResNet-18 steps, tracing a tf.function costs more

        evaluation = _loss(setup, y, model(x, training=False))
        with tf.GradientTape() as tape:
            loss = _loss(setup, y, model(x, training=True))
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
        return loss, evaluation

    losses = []
    with _spied(dropouts, lambda *a: None, dropout_off=True), _variables_kept(model):
        for x, y in batches:
            loss, evaluation = step(activation_from_canonical(x), y)
            losses.append((float(loss), float(evaluation)))
        after = read_tensors(model, leaves)
    return losses, after
