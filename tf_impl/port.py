"""Port check, Keras half: describe a Keras model's leaves, capture their outputs, train it.

The comparison itself lives in :mod:`shared.port`; this module only turns a
Keras model into neutral :class:`shared.port.Leaf` records (tensors in the
canonical layout through ``tf_impl/weights.py``) and runs it. The records come
from one probe forward pass traced into a TensorFlow graph, with each leaf
layer's ``call`` wrapped on the instance (the same spy the freeze audit uses):
the layers record their input and output tensors, and the graph's operations
between them say which record's output reaches which (``Leaf.sources``),
through anything that is not a layer (``inputs + x``, ``keras.ops`` calls in a
subclassed model); the activations, constant arithmetic and zero padding among
those operations become records too. A model that cannot be traced into a graph
is run eagerly and described in call order. Everything it runs restores the
model's variables afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import keras
import numpy as np
import tensorflow as tf

from shared.port import INPUT, Leaf, PortError
from tf_impl.audit import _tree  # the layer tree with dotted paths, shared with the audit
from tf_impl.model import TorchVarianceBatchNormalization
from tf_impl.weights import (
    activation_from_canonical,
    activation_to_canonical,
    from_canonical,
    to_canonical,
)

if TYPE_CHECKING:  # typing.Self is Python 3.11+; annotations are not evaluated
    from typing import Self

__all__ = [
    "capture",
    "check_model",
    "describe",
    "input_shape",
    "read_tensors",
    "Stepper",
    "write_tensors",
]

_DROPOUT = (keras.layers.Dropout, keras.layers.SpatialDropout2D)
_BN = keras.layers.BatchNormalization
# keras.applications.convnext's own layers, known by name (not exported by keras.layers)
_LAYER_SCALE, _STOCHASTIC_DEPTH = "LayerScale", "StochasticDepth"
# TensorFlow operations between layers that are an activation function
_ACTIVATION_OPS = {"Relu": "relu", "Relu6": "relu6", "Elu": "elu", "Selu": "selu",
                   "Softplus": "softplus", "Tanh": "tanh", "Sigmoid": "sigmoid",
                   "Softmax": "softmax", "LeakyRelu": "leaky_relu"}
_ARITHMETIC_OPS = {"AddV2": "add", "Add": "add", "Sub": "sub", "Mul": "mul", "RealDiv": "div"}
# GELU written out as operations (the project's ViT, tf.nn.gelu, keras.ops.gelu): the
# constants of 0.5 x (1 + erf(x / sqrt 2)) and of 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715
# x^3))), compared in float32 (as the graph holds them)
_GELU_CONSTANTS = {"half": 0.5, "one": 1.0, "sqrt_half": math.sqrt(0.5), "sqrt2": math.sqrt(2.0),
                   "tanh_scale": math.sqrt(2.0 / math.pi), "cubic": 0.044715, "three": 3.0}


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


def _activation_name(fn) -> tuple[str | None, dict]:
    """A Keras activation function's name and the parameters that change it."""
    params = {}
    if isinstance(fn, functools.partial):
        params = {k: v for k, v in fn.keywords.items() if k in ("approximate", "negative_slope")}
        fn = fn.func
    name = getattr(fn, "__name__", None)
    if name in (None, "linear"):
        return (None if name else "unknown"), params
    if name == "leaky_relu":
        params.setdefault("slope", params.pop("negative_slope", 0.2))
    return name, params


def _pair2(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _same_pad(in_hw, kernel, stride, dilation) -> tuple[int, int, int, int]:
    """TensorFlow's 'same' padding: the extra row/column goes to the bottom/right."""
    pads = []
    for size, k, s, d in zip(in_hw, kernel, stride, dilation):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    return (pads[0][0], pads[0][1], pads[1][0], pads[1][1])


def _canonical_shape(shape) -> tuple:
    shape = tuple(None if d is None else int(d) for d in tuple(shape)[1:])
    return (shape[2], shape[0], shape[1]) if len(shape) == 3 else shape


def _conv_record(path, layer, in_shape, out_shape) -> Leaf:
    depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
    kernel = tuple(layer.kernel.shape)
    kh, kw = kernel[:2]
    groups = kernel[2] if depthwise else getattr(layer, "groups", 1)
    in_hw = tuple(in_shape[1:3])
    stride, dilation = _pair2(layer.strides), _pair2(layer.dilation_rate)
    same = layer.padding == "same"
    pad = _same_pad(in_hw, (kh, kw), stride, dilation) if same else (0, 0, 0, 0)
    kind = "depthwise" if depthwise else "conv"
    shapes = {"weight": to_canonical(np.zeros(kernel, np.float32), kind).shape}
    if layer.use_bias:
        shapes["bias"] = tuple(layer.bias.shape)
    fused, fused_params = _activation_name(layer.activation)
    params = {"layout": kind, "in_channels": int(in_shape[-1]),
              "out_channels": shapes["weight"][0], "kernel": (kh, kw), "stride": stride,
              "dilation": dilation, "groups": groups, "bias": bool(layer.use_bias), "pad": pad,
              "same": same, "in_hw": in_hw, "fused_activation": fused,
              "fused_activation_params": fused_params}
    return Leaf(path, "conv", type(layer).__name__, params, shapes,
                _canonical_shape(out_shape), layer)


def _dropout_mode(layer) -> str:
    """Which units one draw drops: element, channel, row (a sample's path) or batch."""
    if isinstance(layer, keras.layers.SpatialDropout2D):
        return "channel"
    noise = getattr(layer, "noise_shape", None)
    if noise is None or all(d is None for d in noise[1:]):
        return "element"
    if all(d == 1 for d in noise[1:]):
        return "batch" if noise[0] == 1 else "row"
    return "channel" if noise[-1] is None else "element"


def _vector(value) -> list[float]:
    return [float(v) for v in np.ravel(keras.ops.convert_to_numpy(value))]


def _record(path, layer, in_shape, out_shape) -> Leaf | None:
    cls = type(layer).__name__
    out = _canonical_shape(out_shape)
    if isinstance(layer, _MHA):
        return _attention_record(path, layer, in_shape, out_shape)
    if _is_token_layer(layer):
        shape = tuple(int(d) for d in layer.tensor.shape)
        return Leaf(path, "token", cls, {"features": shape[-1]}, {"weight": shape}, shape[1:],
                    layer)
    if cls == _DROP_PATH and hasattr(layer, "rate"):
        return Leaf(path, "dropout", cls, {"rate": float(layer.rate), "mode": "row"}, {}, out,
                    layer)
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)) and not isinstance(
            layer, (keras.layers.Conv2DTranspose, keras.layers.SeparableConv2D)):
        return _conv_record(path, layer, in_shape, out_shape)
    if isinstance(layer, keras.layers.Dense):
        shapes = {"weight": tuple(reversed(layer.kernel.shape))}
        if layer.use_bias:
            shapes["bias"] = tuple(layer.bias.shape)
        fused, fused_params = _activation_name(layer.activation)
        params = {"bias": bool(layer.use_bias), "flatten_from": None,
                  "fused_activation": fused, "fused_activation_params": fused_params}
        if getattr(layer, "lora_enabled", False):  # the base kernel and the adapter, apart
            rank = int(layer.lora_rank)
            shapes.update(lora_A=(rank, shapes["weight"][1]), lora_B=(shapes["weight"][0], rank))
            params.update(lora_rank=rank, lora_scale=float(layer.lora_alpha) / rank,
                          lora_dropout=0.0)
        return Leaf(path, "dense", cls, params, shapes, out, layer)
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
    if cls == _LAYER_SCALE and getattr(layer, "gamma", None) is not None and len(
            layer.gamma.shape) == 1:
        n = int(layer.gamma.shape[0])
        return Leaf(path, "scale", cls, {"features": n}, {"weight": (n,)}, out, layer)
    if isinstance(layer, keras.layers.Rescaling):
        return Leaf(path, "preprocess", cls, {"op": "rescale", "scale": _vector(layer.scale),
                                              "offset": _vector(layer.offset),
                                              "channels": int(in_shape[-1])}, {}, out, layer)
    if isinstance(layer, keras.layers.Normalization):
        mean, variance = _vector(layer.mean), _vector(layer.variance)
        if layer.invert:  # x * sqrt(variance) + mean
            return Leaf(path, "preprocess", cls, {
                "op": "rescale", "scale": list(np.sqrt(variance)), "offset": mean,
                "channels": int(in_shape[-1])}, {}, out, layer)
        return Leaf(path, "preprocess", cls, {"op": "normalize", "mean": mean,
                                              "variance": variance,
                                              "epsilon": float(keras.config.epsilon()),
                                              "channels": int(in_shape[-1])}, {}, out, layer)
    if isinstance(layer, _DROPOUT):
        return Leaf(path, "dropout", cls, {"rate": float(layer.rate),
                                           "mode": _dropout_mode(layer)}, {}, out, layer)
    if cls == _STOCHASTIC_DEPTH and hasattr(layer, "drop_path_rate"):
        return Leaf(path, "dropout", cls, {"rate": float(layer.drop_path_rate), "mode": "row"},
                    {}, out, layer)
    if isinstance(layer, keras.layers.Flatten):
        return Leaf(path, "flatten", cls, {"in_shape": tuple(int(d) for d in in_shape[1:])},
                    {}, out, layer)
    if isinstance(layer, keras.layers.ZeroPadding2D):
        (t, b), (left, r) = layer.padding
        return Leaf(path, "pad", cls, {"pad": (t, b, left, r), "in_hw": tuple(in_shape[1:3])},
                    {}, out, layer)
    if isinstance(layer, keras.layers.ReLU):
        slope = float(layer.negative_slope or 0.0)
        relu6 = layer.max_value is not None and float(layer.max_value) == 6.0
        name = ("unknown" if float(layer.threshold or 0.0) or (
            layer.max_value is not None and not relu6) else "relu6" if relu6 and not slope
            else "leaky_relu" if slope and layer.max_value is None else "relu")
        return Leaf(path, "activation", cls, {"name": name, "slope": slope}, {}, out, layer)
    if isinstance(layer, keras.layers.LeakyReLU):
        return Leaf(path, "activation", cls, {"name": "leaky_relu",
                                              "slope": float(layer.negative_slope)}, {}, out,
                    layer)
    if isinstance(layer, keras.layers.Activation):
        name, params = _activation_name(layer.activation)
        if name is None:
            return None  # linear: the identity
        return Leaf(path, "activation", cls, {"name": name, **params}, {}, out, layer)
    if isinstance(layer, keras.layers.Softmax):
        return Leaf(path, "activation", cls, {"name": "softmax"}, {}, out, layer)
    if layer.weights:
        raise PortError(f"keras layer {path!r} ({cls}) has weights but no port mapping "
                        "(supported: Conv2D, DepthwiseConv2D, Dense (LoRA too), "
                        "BatchNormalization, LayerNormalization, MultiHeadAttention, LayerScale, "
                        "Rescaling, Normalization, a (1, T, E) token)")
    return None


@contextlib.contextmanager
def _spied(layers, on_call, dropout_off: bool = False,
           pre_activation: frozenset = frozenset()) -> Iterator[None]:
    """Wrap each layer's ``call``; ``on_call(layer, inputs, output)`` sees every call.

    ``pre_activation``: ids of layers whose fused ``activation=`` is left out of what
    ``on_call`` sees (the output before it, as torch's module returns it) and applied after.
    """
    def spy(layer, original):
        def call(*args, **kwargs):
            if dropout_off and _is_dropout(layer):
                kwargs["training"] = False
            activation = None
            if id(layer) in pre_activation:
                activation = layer.activation
                object.__setattr__(layer, "activation", keras.activations.linear)
            try:
                output = original(*args, **kwargs)
            finally:
                if activation is not None:
                    object.__setattr__(layer, "activation", activation)
            on_call(layer, args[0] if args else next(iter(kwargs.values()), None), output)
            return output if activation is None else activation(output)
        return call

    for layer in layers:
        object.__setattr__(layer, "call", spy(layer, layer.call))
    try:
        yield
    finally:
        for layer in layers:
            object.__delattr__(layer, "call")


def _is_dropout(layer) -> bool:
    """Dropout, SpatialDropout2D, keras.applications.convnext's StochasticDepth, or the ViT's
    DropPath (a MultiHeadAttention's own Dropout included: every layer is looked at)."""
    return isinstance(layer, _DROPOUT) or type(layer).__name__ in (_STOCHASTIC_DEPTH,
                                                                   _DROP_PATH)


def _dropout_layers(model) -> list:
    return [layer for _, layer, _ in _tree(model) if _is_dropout(layer)]


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


_MHA = keras.layers.MultiHeadAttention
# the project's ViT stochastic depth (tf_impl/vit.py), known by name like keras.applications'
_DROP_PATH = "DropPath"


def _leaf_layers(model):
    """Leaf layers, with a MultiHeadAttention as one leaf (its sublayers left out)."""
    return [(path, layer) for path, layer, ancestors in _tree(model)
            if not any(isinstance(a, _MHA) for a in ancestors)
            and (isinstance(layer, _MHA)
                 or not layer._flatten_layers(include_self=False, recursive=False))]


def _kernel(layer):
    """The stored kernel: with LoRA on, Keras's ``kernel`` is kernel + (alpha / rank) A @ B."""
    return layer._kernel if getattr(layer, "lora_enabled", False) else layer.kernel


def _attention_record(path, layer, in_shape, out_shape) -> Leaf:
    """MultiHeadAttention (self-attention on (N, T, E)) as one record."""
    cls = type(layer).__name__
    parts = (layer.query_dense, layer.key_dense, layer.value_dense, layer.output_dense)
    if len(in_shape) != 3 or layer._attention_axes not in (None, (1,), [1]):
        raise PortError(f"keras layer {path!r} ({cls}): only attention over the tokens of an "
                        f"(N, T, E) input has a port mapping (input {tuple(in_shape)})")
    if layer.key_dim != layer.value_dim:
        raise PortError(f"keras layer {path!r} ({cls}): key_dim {layer.key_dim} != value_dim "
                        f"{layer.value_dim} has no fused (3E, E) in_proj")
    lora = [d.name for d in parts if getattr(d, "lora_enabled", False)]
    if lora:
        raise PortError(f"keras layer {path!r} ({cls}): LoRA on {', '.join(lora)} has no port "
                        "mapping (Keras's per-head adapter on query/key/value is no rank-r "
                        "adapter of the E -> E map unless heads == 1; tests/test_lora.py)")
    shapes = {"weight": to_canonical(tuple(np.zeros(tuple(_kernel(d).shape), np.float32)
                                           for d in parts[:3]), "qkv_kernel").shape,
              "out_weight": to_canonical(np.zeros(tuple(_kernel(parts[3]).shape), np.float32),
                                         "attn_out").shape}
    if layer._use_bias:
        shapes["bias"] = (shapes["weight"][0],)
        shapes["out_bias"] = (shapes["out_weight"][0],)
    return Leaf(path, "attention", cls, {
        "heads": int(layer.num_heads), "head_dim": int(layer.key_dim),
        "bias": bool(layer._use_bias), "out_bias": bool(layer._use_bias),
        "dropout": float(layer._dropout)}, shapes, _canonical_shape(out_shape), layer)


def _is_token_layer(layer) -> bool:
    """A layer holding one (1, T, E) weight and called without an input (tf_impl.vit.Weight:
    timm's cls_token, pos_embed)."""
    weights = layer.weights
    return (len(weights) == 1 and len(weights[0].shape) == 3 and weights[0].shape[0] == 1
            and hasattr(layer, "tensor"))


def _shape(value) -> tuple:
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None else ()


def _first_error_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {text}"


def _first_tensor(value):
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value


def _constant(tensor) -> float | None:
    value = tf.get_static_value(tensor)
    return float(np.ravel(value)[0]) if value is not None and np.size(value) == 1 else None


def _by_constant(op, types: tuple[str, ...], constant: str):
    """The data tensor of ``op`` when it is one of ``types`` with the named
    :data:`_GELU_CONSTANTS` constant as its other operand (float32-equal), else None."""
    if op.type not in types:
        return None
    data = [t for t in op.inputs if t.dtype != tf.resource]
    if len(data) != 2:
        return None
    want = np.float32(_GELU_CONSTANTS[constant])
    for value, tensor in ((data[0], data[1]), (data[1], data[0])):
        c = _constant(value)
        if c is not None and np.float32(c) == want and _constant(tensor) is None:
            return tensor
    return None


def _is_cube_of(op, x) -> bool:
    """``op`` is ``x ** 3`` (Pow with the constant 3 as its exponent)."""
    return (op.type == "Pow" and _same(op.inputs[0], x)
            and _constant(op.inputs[1]) is not None
            and np.float32(_constant(op.inputs[1])) == np.float32(_GELU_CONSTANTS["three"]))


def _same(a, b) -> bool:
    return a is not None and b is not None and a.name == b.name


def _gelu(op):
    """``(approximate, x)`` when ``op`` is the last multiplication of a GELU written out,
    ``(0.5 x) * (1 + erf(x / sqrt 2))`` (exact) or ``(0.5 x) * (1 + tanh(sqrt(2 / pi) (x +
    0.044715 x^3)))`` (the tanh approximation); None otherwise."""
    data = [t for t in op.inputs if t.dtype != tf.resource]
    if op.type != "Mul" or len(data) != 2:
        return None
    for half, rest in ((data[0], data[1]), (data[1], data[0])):
        x = _by_constant(half.op, ("Mul",), "half")
        inner = _by_constant(rest.op, ("AddV2", "Add"), "one")
        if x is None or inner is None:
            continue
        if inner.op.type == "Erf":
            arg = inner.op.inputs[0].op
            if _same(_by_constant(arg, ("Mul",), "sqrt_half"), x) or _same(
                    _by_constant(arg, ("RealDiv",), "sqrt2"), x):
                return False, x
        if inner.op.type == "Tanh":
            total = _by_constant(inner.op.inputs[0].op, ("Mul",), "tanh_scale")
            terms = list(total.op.inputs) if total is not None and total.op.type in (
                "AddV2", "Add") else []
            for linear, cubic in ((terms[0], terms[1]), (terms[1], terms[0])) if len(terms) == 2 else ():
                power = _by_constant(cubic.op, ("Mul",), "cubic")
                if _same(linear, x) and power is not None and _is_cube_of(power.op, x):
                    return True, x
    return None


class _Dataflow:
    """Which record's output reaches which, read off the traced graph's operations."""

    def __init__(self, input_name: str, producers: dict[str, list[tuple[int, str]]]):
        self.input_name = input_name
        self.producers = producers  # tensor name -> [(event index, record name)]
        self.walked: dict[str, frozenset[str]] = {}
        self.raw: dict[str, Leaf] = {}  # operations that became records, by op name

    def sources(self, tensor, before: float = math.inf) -> tuple[frozenset[str], bool]:
        """The records whose outputs reach ``tensor`` (produced before event ``before``),
        and whether any operation lies between."""
        name = tensor.name
        if name == self.input_name:
            return frozenset([INPUT]), False
        earlier = [r for i, r in self.producers.get(name, ()) if i < before]
        if earlier:
            return frozenset([earlier[-1]]), False
        raw = self._raw_record(tensor.op)
        if raw is not None:
            return frozenset([raw.name]), False
        if name not in self.walked:
            self.walked[name] = frozenset()  # a cycle cannot occur; guards re-entry
            found: set[str] = set()
            for inp in tensor.op.inputs:
                if inp.dtype != tf.resource:
                    found |= self.sources(inp)[0]
            self.walked[name] = frozenset(found)
        return self.walked[name], True

    def _raw_record(self, op) -> Leaf | None:
        """An activation, constant arithmetic or zero padding between layers, as a record."""
        if op.name in self.raw:
            return self.raw[op.name]
        data = [t for t in op.inputs if t.dtype != tf.resource]
        found = None  # (kind, params, the data tensor it reads)
        gelu = _gelu(op)
        if gelu is not None:
            found = ("activation", {"name": "gelu", "approximate": gelu[0]}, gelu[1])
        elif op.type in _ACTIVATION_OPS and data:
            params = {"name": _ACTIVATION_OPS[op.type]}
            if op.type == "LeakyRelu":
                params["slope"] = float(op.get_attr("alpha"))
            found = ("activation", params, data[0])
        elif op.type in _ARITHMETIC_OPS and len(data) == 2:
            first, second = (_constant(t) for t in data)
            if second is not None and first is None:
                found = ("op", {"op": _ARITHMETIC_OPS[op.type], "value": second}, data[0])
            elif first is not None and second is None and op.type in ("AddV2", "Add", "Mul"):
                found = ("op", {"op": _ARITHMETIC_OPS[op.type], "value": first}, data[1])
        elif op.type in ("Pad", "PadV2") and len(data) >= 2:
            pads = tf.get_static_value(data[1])
            value = _constant(data[2]) if len(data) > 2 else 0.0
            if (pads is not None and np.shape(pads) == (4, 2) and value == 0.0
                    and not np.any(pads[[0, 3]])):
                (t, b), (left, r) = pads[1], pads[2]
                found = ("pad", {"pad": (int(t), int(b), int(left), int(r)),
                                 "in_hw": tuple(int(d) for d in data[0].shape[1:3])}, data[0])
        if found is None:
            return None
        kind, params, tensor = found
        record = Leaf(op.name, kind, op.type, params, {}, _canonical_shape(op.outputs[0].shape),
                      op)
        self.raw[op.name] = record
        record.sources, record.via_ops = self.sources(tensor)
        return record


def _events(model, x, what: str) -> tuple[list, object]:
    """Every leaf layer call on ``x`` (NHWC): ``(layer, input, output)`` in call order, and
    the traced graph's input tensor (None when the model ran eagerly)."""
    leaves = _leaf_layers(model)
    events = []

    def seen(layer, inputs, output):
        events.append((layer, inputs, output))

    def forward(t):
        return model(t, training=False)

    with _spied([layer for _, layer in leaves], seen), _variables_kept(model, False):
        try:
            graph = tf.function(forward, autograph=False).get_concrete_function(
                tf.TensorSpec(x.shape, tf.float32)).graph
            return events, graph.inputs[0]
        except Exception:  # noqa: BLE001  (not traceable: described eagerly, in call order)
            events.clear()
        try:
            forward(x)
        except Exception as exc:  # noqa: BLE001  (a model that rejects the input: bad input)
            raise PortError(f"{what}: the forward pass on input (H, W, C) "
                            f"{tuple(x.shape[1:])} failed ({_first_error_line(exc)})") from None
    return events, None


def describe(model, probe: np.ndarray, what: str = "keras model") -> list[Leaf]:
    """Every leaf layer the forward pass on ``probe`` (canonical NCHW) calls, in call order,
    with the records its input comes from (and the operations between layers it can name)."""
    paths = {id(layer): path for path, layer in _leaf_layers(model)}
    events, graph_input = _events(model, activation_from_canonical(probe), what)
    records, order, producers, calls = [], [], {}, {}
    for index, (layer, inputs, output) in enumerate(events):
        tensor, out = _first_tensor(inputs), _first_tensor(output)
        calls[id(layer)] = calls.get(id(layer), 0) + 1
        record = _record(paths[id(layer)], layer, _shape(tensor), _shape(out))
        if record is None or (calls[id(layer)] > 1 and (record.weighted or graph_input is None)):
            continue  # a weighted layer's second call is not another pair
        if calls[id(layer)] > 1:  # a reused ReLU: one record per call
            record.name = f"{record.name}#{calls[id(layer)]}"
        record.ref = layer
        records.append(record)
        order.append((index, tensor, out))
        if graph_input is not None and tensor is not None:
            producers.setdefault(out.name, []).append((index, record.name))
    if graph_input is None:  # eager: call order only
        for record, previous in zip(records[1:], records):
            if record.kind == "dense" and previous.kind == "flatten":
                record.params["flatten_from"] = _flatten_from(previous)
        return records
    flow = _Dataflow(graph_input.name, producers)
    for record, (index, tensor, out) in zip(records, order):
        # a layer called without an input (a token) reads nothing
        record.sources, record.via_ops = ((), False) if tensor is None else flow.sources(
            tensor, before=index)
    # one order for layers and the operations that became records: graph creation order
    # (a token's output is its variable: it comes where it was called)
    keyed = [((getattr(getattr(out, "op", None), "_id", -1), index), r)
             for r, (index, _, out) in zip(records, order)]
    keyed += [((op_record.ref._id, -1), op_record) for op_record in flow.raw.values()]
    records = [r for _, r in sorted(keyed, key=lambda item: item[0])]
    by_name = {r.name: r for r in records}
    position = {r.name: i for i, r in enumerate(records)}
    for record in records:
        record.sources = tuple(sorted(record.sources, key=lambda n: position.get(n, -1)))
        if record.kind == "dense" and not record.via_ops and len(record.sources) == 1:
            source = by_name.get(record.sources[0])
            if source is not None and source.kind == "flatten":
                record.params["flatten_from"] = _flatten_from(source)
    return records


def _flatten_from(flatten: Leaf) -> tuple | None:
    """The (H, W, C) map a Flatten reads, when it is a map (a Dense after it needs its rows
    permuted)."""
    shape = flatten.params["in_shape"]
    return shape if len(shape) == 3 and shape[0] * shape[1] > 1 else None


def _variables(leaf: Leaf) -> dict[str, tuple[object, str]]:
    """Canonical key -> (variable, layout kind); for a fused kind a tuple of variables."""
    layer = leaf.ref
    if leaf.kind == "attention":
        parts = (layer.query_dense, layer.key_dense, layer.value_dense)
        out = {"weight": (tuple(_kernel(d) for d in parts), "qkv_kernel"),
               "out_weight": (_kernel(layer.output_dense), "attn_out")}
        if "bias" in leaf.shapes:
            out["bias"] = (tuple(d.bias for d in parts), "qkv_bias")
            out["out_bias"] = (layer.output_dense.bias, "vector")
        return out
    if leaf.kind == "token":
        return {"weight": (layer.tensor, "vector")}
    if leaf.kind == "conv":
        out = {"weight": (layer.kernel, leaf.params["layout"])}
    elif leaf.kind == "dense":
        out = {"weight": (_kernel(layer), "dense")}
        if "lora_A" in leaf.shapes:  # A (in, r) -> (r, in), B (r, out) -> (out, r)
            out["lora_A"] = (layer.lora_kernel_a, "dense")
            out["lora_B"] = (layer.lora_kernel_b, "dense")
    elif leaf.kind == "bn":
        out = {key: (var, "vector") for key, var in
               (("weight", layer.gamma), ("bias", layer.beta),
                ("running_mean", layer.moving_mean), ("running_var", layer.moving_variance))
               if var is not None}
        return out
    elif leaf.kind == "scale":
        return {"weight": (layer.gamma, "vector")}
    else:  # layernorm
        return {key: (var, "vector") for key, var in (("weight", layer.gamma),
                                                      ("bias", layer.beta)) if var is not None}
    if getattr(layer, "bias", None) is not None:
        out["bias"] = (layer.bias, "vector")
    return out


def _value(var, dtype=np.float32):
    """A variable's value (a tuple of values for a fused tuple of variables)."""
    if isinstance(var, tuple):
        return tuple(_numpy(v).astype(dtype) for v in var)
    return _numpy(var).astype(dtype)


def _var_shape(var) -> tuple:
    """A variable's shape (a fused tuple's part shape: the parts have one shape)."""
    return tuple((var[0] if isinstance(var, tuple) else var).shape)


def _assign(var, value) -> None:
    for v, x in (zip(var, value) if isinstance(var, tuple) else ((var, value),)):
        v.assign(np.asarray(x).astype(v.dtype))


def read_tensors(model, leaves: list[Leaf]) -> dict[str, dict[str, np.ndarray]]:
    """Canonical float32 tensors of each leaf (a Dense after Flatten also gets its rows
    as a plain transpose, ``weight_unpermuted``, so the lint can spot an unpermuted copy)."""
    out = {}
    for leaf in leaves:
        flatten_from = leaf.params.get("flatten_from")
        tensors = {}
        for key, (var, kind) in _variables(leaf).items():
            value = _value(var)
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
            # a tensor of another shape (the other side's LoRA rank) is left as it is
            if key in tensors.get(leaf.name, {}) and np.shape(
                    tensors[leaf.name][key]) == tuple(leaf.shapes.get(key, ())):
                value = from_canonical(tensors[leaf.name][key], kind, _var_shape(var),
                                       flatten_from if key == "weight" else None)
                _assign(var, value)


def capture(model, leaves: list[Leaf], x: np.ndarray, training: bool) -> dict[str, np.ndarray]:
    """Each leaf's output (first call, canonical layout) for ``x`` (NCHW) in one mode.

    A layer with a fused ``activation=`` gives its output before the activation, as
    torch's module does (the lint compares the activations). Training mode is
    ``model(x, training=True)`` as ``fit`` calls it, with every Dropout called with
    ``training=False``; no variable keeps a change.
    """
    wanted = {id(leaf.ref): leaf.name for leaf in leaves}
    fused = frozenset(id(leaf.ref) for leaf in leaves if leaf.params.get("fused_activation"))
    dropouts = _dropout_layers(model)
    out: dict[str, np.ndarray] = {}

    def seen(layer, inputs, output):
        name = wanted.get(id(layer))
        if name is not None and name not in out:
            out[name] = activation_to_canonical(keras.ops.convert_to_numpy(output))

    layers = [leaf.ref for leaf in leaves] + [d for d in dropouts if id(d) not in wanted]
    with _spied(layers, seen, dropout_off=True, pre_activation=fused), \
            _variables_kept(model, False):
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


def _optimizer_kind(optimizer) -> str | None:
    if isinstance(optimizer, keras.optimizers.SGD):
        return "sgd"
    if isinstance(optimizer, keras.optimizers.Adam | keras.optimizers.AdamW) and not getattr(
            optimizer, "amsgrad", False):
        return "adam"
    return None


def _hyper(optimizer, kind: str | None) -> dict:
    lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    decay = float(optimizer.weight_decay or 0.0)
    if kind == "sgd":
        return {"learning_rate": lr, "momentum": float(optimizer.momentum), "dampening": 0.0,
                "nesterov": bool(optimizer.nesterov), "weight_decay": decay}
    if kind == "adam":
        return {"learning_rate": lr, "beta_1": float(optimizer.beta_1),
                "beta_2": float(optimizer.beta_2), "epsilon": float(optimizer.epsilon),
                "weight_decay": decay, "decoupled_weight_decay": True}
    return {}


def _pick(variables: list, index):
    """The optimizer slot at ``index`` (a tuple of them for a fused tuple of indexes)."""
    return tuple(variables[i] for i in index) if isinstance(index, tuple) else variables[index]


class Stepper:
    """One training step at a time, as ``fit`` runs it: ``model(x, training=True)``,
    gradients for ``model.trainable_variables``, the optimizer (``optimizer`` or a new
    SGD/Adam) applies them, with every Dropout called with ``training=False``.

    A context manager: on exit every variable of the model is restored (an optimizer
    passed in keeps the state its steps gave it). ``state()`` reads, ``load()`` sets the
    leaves' canonical tensors and the optimizer's slots in torch's names and conventions
    (Keras SGD's velocity v is -lr x torch's momentum buffer; Adam's momentums and
    velocities are torch's ``exp_avg`` and ``exp_avg_sq``) and ``iterations``.
    """

    def __init__(self, model, leaves: list[Leaf], setup: dict, optimizer=None):
        self.model, self.leaves, self.setup = model, leaves, setup
        self._given = optimizer
        self._contexts = contextlib.ExitStack()

    def __enter__(self) -> Self:
        dropouts = _dropout_layers(self.model)
        self._contexts.enter_context(_variables_kept(self.model))
        self._contexts.enter_context(_spied(dropouts, lambda *a: None, dropout_off=True))
        self.optimizer = self._given or _optimizer(self.setup)
        self.kind = _optimizer_kind(self.optimizer)
        self.hyper = _hyper(self.optimizer, self.kind)
        if not self.optimizer.built:
            self.optimizer.build(self.model.trainable_variables)
        return self

    def __exit__(self, *exc) -> None:
        self._contexts.__exit__(*exc)

    def _slot_lists(self) -> dict[str, list]:
        if self.kind == "sgd":
            return {"momentum_buffer": self.optimizer.momentums} if self.optimizer.momentum else {}
        if self.kind == "adam":
            return {"exp_avg": self.optimizer._momentums,
                    "exp_avg_sq": self.optimizer._velocities}
        return {}

    def _slotted(self) -> Iterator[tuple[Leaf, str, object, str, int]]:
        """(leaf, key, variable, layout kind, optimizer index) of every leaf variable the
        optimizer updates."""
        for leaf in self.leaves:
            for key, (var, kind) in _variables(leaf).items():
                try:
                    index = (tuple(self.optimizer._get_variable_index(v) for v in var)
                             if isinstance(var, tuple)
                             else self.optimizer._get_variable_index(var))
                except (KeyError, ValueError):
                    continue  # frozen, or a BatchNorm statistic
                yield leaf, key, var, kind, index

    def _scale(self, name: str) -> float:
        # SGD: v = -lr x b
        return -self.hyper["learning_rate"] if name == "momentum_buffer" else 1.0

    def state(self) -> dict:
        """``{"tensors": {leaf: {key: array}}, "slots": {slot: {leaf: {key: array}}},
        "step": int}``, canonical float32."""
        lists = self._slot_lists()
        slots: dict[str, dict] = {name: {} for name in lists}
        for leaf, key, _, kind, index in self._slotted():
            flatten_from = leaf.params.get("flatten_from") if key == "weight" else None
            for name, variables in lists.items():
                value = _value(_pick(variables, index), np.float64)
                value = (tuple((v / self._scale(name)).astype(np.float32) for v in value)
                         if isinstance(value, tuple)
                         else (value / self._scale(name)).astype(np.float32))
                slots[name].setdefault(leaf.name, {})[key] = to_canonical(
                    value, kind, flatten_from)
        return {"tensors": read_tensors(self.model, self.leaves), "slots": slots,
                "step": int(_numpy(self.optimizer.iterations))}

    def load(self, state: dict) -> None:
        """Set the tensors and slots ``state`` holds (a slot it lacks: zeros, Keras's start)."""
        write_tensors(self.model, self.leaves, state["tensors"])
        for leaf, key, var, kind, index in self._slotted():
            flatten_from = leaf.params.get("flatten_from") if key == "weight" else None
            for name, variables in self._slot_lists().items():
                value = state["slots"].get(name, {}).get(leaf.name, {}).get(key)
                slot = _pick(variables, index)
                if value is None or np.shape(value) != tuple(leaf.shapes.get(key, ())):
                    _assign(slot, tuple(np.zeros(v.shape) for v in slot)
                            if isinstance(slot, tuple) else np.zeros(slot.shape))
                    continue
                value = from_canonical(value, kind, _var_shape(var), flatten_from)
                scale = self._scale(name)
                _assign(slot, tuple(np.asarray(v, np.float64) * scale for v in value)
                        if isinstance(slot, tuple) else np.asarray(value, np.float64) * scale)
        self.optimizer.iterations.assign(state["step"])

    def step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """One step on the batch (eager: for a few ResNet-18 steps, tracing a tf.function
        costs more); (training-mode loss, inference-mode loss) at the pre-update weights."""
        model, variables = self.model, self.model.trainable_variables
        x = activation_from_canonical(x)
        evaluation = _loss(self.setup, y, model(x, training=False))
        with tf.GradientTape() as tape:
            loss = _loss(self.setup, y, model(x, training=True))
        grads = tape.gradient(loss, variables)
        self.optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables)
                                        if g is not None])
        return float(loss), float(evaluation)
