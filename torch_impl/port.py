"""Port check, torch half: describe an ``nn.Module``'s leaves, capture their outputs, train it.

The comparison itself lives in :mod:`shared.port`; this module only turns a
torch model into neutral :class:`shared.port.Leaf` records (tensors in the
canonical layout through ``torch_impl/weights.py``) and runs it. The records come
from one probe forward pass with forward hooks on every leaf module, under a
``TorchFunctionMode`` that sees every torch function called between them: each
tensor carries the records its value came from, so each record knows whose
outputs reach its input (``Leaf.sources``), through ``torch.cat``, ``out +=
identity`` or a reshape; the activations (``F.relu``), constant arithmetic and
zero padding (``F.pad``) among those functions become records too, and so does a
parameter of a non-leaf module (ConvNeXt's ``layer_scale``) where a function
uses it. Everything it runs restores parameters, buffers, modes and the random
state afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision.ops import FrozenBatchNorm2d, StochasticDepth
from torchvision.transforms import Normalize

from shared.port import INPUT, Leaf, PortError
from torch_impl.weights import (
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

_DROPOUT = (nn.modules.dropout._DropoutNd, StochasticDepth)


def _is_drop_path(module) -> bool:
    """timm's ``DropPath`` (stochastic depth), known by name: timm is not imported here."""
    return type(module).__name__ == "DropPath" and hasattr(module, "drop_prob")
_BN = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)
_ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu",
                nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.GELU: "gelu", nn.SiLU: "silu",
                nn.Softmax: "softmax", nn.Hardswish: "hard_swish",
                nn.Hardsigmoid: "hard_sigmoid", nn.ELU: "elu", nn.SELU: "selu",
                nn.Mish: "mish", nn.Softplus: "softplus"}
# torch functions between modules that are an activation function
_ACTIVATION_FUNCTIONS = {"relu": "relu", "relu_": "relu", "relu6": "relu6",
                         "leaky_relu": "leaky_relu", "leaky_relu_": "leaky_relu",
                         "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh",
                         "tanh_": "tanh", "gelu": "gelu", "silu": "silu", "hardswish": "hardswish",
                         "hardsigmoid": "hardsigmoid", "softmax": "softmax", "elu": "elu",
                         "selu": "selu", "mish": "mish", "softplus": "softplus"}
_ARITHMETIC_FUNCTIONS = {"add": "add", "add_": "add", "__add__": "add", "__radd__": "add",
                         "__iadd__": "add", "sub": "sub", "sub_": "sub", "__sub__": "sub",
                         "mul": "mul", "mul_": "mul", "__mul__": "mul", "__rmul__": "mul",
                         "__imul__": "mul", "div": "div", "div_": "div", "__truediv__": "div",
                         "true_divide": "div"}
_DROPOUT_FUNCTIONS = {"dropout": "element", "dropout1d": "channel", "dropout2d": "channel",
                      "dropout3d": "channel"}


def check_model(model, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise PortError(f"{what}: expected a torch.nn.Module, got "
                        f"{type(model).__module__}.{type(model).__name__}")


def input_shape(model, what: str) -> tuple[int, int, int]:
    """A torch module declares no input shape: the Keras model's (or the caller's) is used."""
    raise PortError(f"{what}: a torch module has no declared input shape: pass input_shape "
                    "(H, W, C) / --input-shape H,W,C")


def _activation_name(module) -> tuple[str | None, dict]:
    """A torch activation module's name and the parameters that change it."""
    name = next((act for kind, act in _ACTIVATIONS.items() if type(module) is kind), None)
    params = {}
    if isinstance(module, nn.LeakyReLU):
        params["slope"] = float(module.negative_slope)
    if isinstance(module, nn.GELU):
        params["approximate"] = module.approximate
    return name, params


def _pair2(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _conv_record(name, module: nn.Conv2d, in_shape, out_shape) -> Leaf:
    if isinstance(module.padding, str):  # 'same' (stride 1 only) or 'valid'
        if module.padding == "same":
            pads = []
            for k, d in zip(module.kernel_size, module.dilation):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            pad = (pads[0][0], pads[0][1], pads[1][0], pads[1][1])
        else:
            pad = (0, 0, 0, 0)
    else:
        ph, pw = _pair2(module.padding)
        pad = (ph, ph, pw, pw)
    if module.padding_mode != "zeros":
        raise PortError(f"torch module {name!r} (Conv2d): padding_mode {module.padding_mode!r} "
                        "has no Keras twin (only zero padding is compared)")
    shapes = {"weight": tuple(module.weight.shape)}
    if module.bias is not None:
        shapes["bias"] = tuple(module.bias.shape)
    params = {"layout": "conv", "in_channels": module.in_channels,
              "out_channels": module.out_channels, "kernel": tuple(module.kernel_size),
              "stride": tuple(module.stride), "dilation": tuple(module.dilation),
              "groups": module.groups, "bias": module.bias is not None, "pad": pad,
              "same": module.padding == "same", "in_hw": tuple(in_shape[2:])}
    return Leaf(name, "conv", type(module).__name__, params, shapes,
                tuple(int(d) for d in out_shape[1:]), module)


def _features_last(out_shape, n: int) -> bool:
    """A Linear or LayerNorm on a channels-last map (ConvNeXt's blocks permute to NHWC)."""
    return len(out_shape) == 4 and int(out_shape[-1]) == n


def _canonical_shape(out_shape, features_last: bool = False) -> tuple:
    shape = tuple(int(d) for d in out_shape[1:])
    return (shape[2], shape[0], shape[1]) if features_last else shape


def _attention_record(name, module, in_shape, out_shape) -> Leaf:
    """timm's ``Attention`` or ``nn.MultiheadAttention`` (self-attention) as one record."""
    cls = type(module).__name__
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            raise PortError(f"torch module {name!r} (MultiheadAttention): kdim/vdim other than "
                            "embed_dim, add_bias_kv or add_zero_attn have no port mapping")
        in_w, in_b = module.in_proj_weight, module.in_proj_bias
        out_w, out_b = module.out_proj.weight, module.out_proj.bias
        heads, dropout, seq_first = module.num_heads, float(module.dropout), not module.batch_first
    else:
        for part in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(module, part, nn.Identity()), nn.Identity):
                raise PortError(f"torch module {name!r} (Attention): {part} "
                                f"({type(getattr(module, part)).__name__}) has no port mapping")
        in_w, in_b = module.qkv.weight, module.qkv.bias
        out_w, out_b = module.proj.weight, module.proj.bias
        heads, dropout, seq_first = module.num_heads, float(module.attn_drop.p), False
    shapes = {"weight": tuple(in_w.shape), "out_weight": tuple(out_w.shape)}
    if in_b is not None:
        shapes["bias"] = tuple(in_b.shape)
    if out_b is not None:
        shapes["out_bias"] = tuple(out_b.shape)
    out = tuple(int(d) for d in out_shape)
    out = (out[0],) + out[2:] if seq_first else out[1:]
    return Leaf(name, "attention", cls, {
        "heads": int(heads), "head_dim": int(in_w.shape[0]) // 3 // int(heads),
        "bias": in_b is not None, "out_bias": out_b is not None, "dropout": dropout,
        "seq_first": seq_first}, shapes, out, module)


def _lora_record(name, module, in_shape, out_shape) -> Leaf:
    """PEFT's ``lora.Linear``: the base Linear's tensors and the active adapter's, apart."""
    base = module.get_base_layer()
    active = list(module.active_adapters)
    if not isinstance(base, nn.Linear) or len(active) != 1 or active[0] not in module.lora_A:
        raise PortError(f"torch module {name!r} ({type(module).__name__}): only a LoRA-wrapped "
                        f"Linear with one active adapter has a port mapping (got base "
                        f"{type(base).__name__}, active adapters {active})")
    adapter = active[0]
    if module.use_dora.get(adapter) or module.merged:
        raise PortError(f"torch module {name!r}: a DoRA or merged LoRA adapter has no port "
                        "mapping (unmerge it, or compare the merged Linear alone)")
    record = _record(name, base, in_shape, out_shape)
    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    dropout = module.lora_dropout[adapter]
    record.cls = f"lora.{type(module).__name__}"
    record.shapes.update(lora_A=tuple(a.shape), lora_B=tuple(b.shape))
    record.params.update(lora_rank=int(module.r[adapter]),
                         lora_scale=float(module.scaling[adapter]),
                         lora_dropout=float(getattr(dropout, "p", 0.0)), adapter=adapter)
    record.ref = module
    return record


def _record(name, module, in_shape, out_shape) -> Leaf | None:
    cls = type(module).__name__
    out = _canonical_shape(out_shape)
    if isinstance(module, nn.MultiheadAttention) or _is_timm_attention(module):
        return _attention_record(name, module, in_shape, out_shape)
    if _is_lora(module):
        return _lora_record(name, module, in_shape, out_shape)
    if isinstance(module, nn.Conv2d):
        return _conv_record(name, module, in_shape, out_shape)
    if isinstance(module, nn.Linear):
        shapes = {"weight": tuple(module.weight.shape)}
        if module.bias is not None:
            shapes["bias"] = tuple(module.bias.shape)
        last = _features_last(out_shape, module.out_features)
        return Leaf(name, "dense", cls, {"bias": module.bias is not None, "flatten_from": None,
                                         "features_last": last}, shapes,
                    _canonical_shape(out_shape, last), module)
    if isinstance(module, _BN):
        n = module.num_features if hasattr(module, "num_features") else module.weight.shape[0]
        frozen = isinstance(module, FrozenBatchNorm2d)
        affine = frozen or module.affine
        stats = frozen or module.track_running_stats
        shapes = {}
        if affine:
            shapes.update(weight=(n,), bias=(n,))
        if stats:
            shapes.update(running_mean=(n,), running_var=(n,))
        # FrozenBatchNorm2d's statistics never move: no momentum to compare.
        momentum = None if frozen else module.momentum
        return Leaf(name, "bn", cls, {"features": n, "eps": float(module.eps),
                                      "momentum": momentum, "center": affine, "scale": affine,
                                      "stats": stats, "variance_update": "unbiased"},
                    shapes, out, module)
    if isinstance(module, nn.LayerNorm):
        n = module.normalized_shape[-1]
        affine = module.elementwise_affine
        shapes = {"weight": (n,)} if affine else {}
        if affine and module.bias is not None:
            shapes["bias"] = (n,)
        # torchvision's LayerNorm2d permutes to channels-last and back inside its forward
        last = _features_last(out_shape, n) and type(module).forward is nn.LayerNorm.forward
        return Leaf(name, "layernorm", cls, {"features": n, "eps": float(module.eps),
                                             "center": affine and module.bias is not None,
                                             "scale": affine, "features_last": last}, shapes,
                    _canonical_shape(out_shape, last), module)
    if isinstance(module, Normalize):
        std = np.broadcast_to(np.asarray(module.std, np.float64), int(in_shape[1]))
        return Leaf(name, "preprocess", cls, {
            "op": "normalize", "mean": [float(v) for v in np.ravel(module.mean)],
            "variance": [float(v) ** 2 for v in std], "channels": int(in_shape[1])},
            {}, out, module)
    if isinstance(module, StochasticDepth):
        return Leaf(name, "dropout", cls, {"rate": float(module.p), "mode": module.mode},
                    {}, out, module)
    if _is_drop_path(module):  # timm's DropPath: a whole sample's residual branch
        return Leaf(name, "dropout", cls, {"rate": float(module.drop_prob or 0.0),
                                           "mode": "row"}, {}, out, module)
    if isinstance(module, _DROPOUT):
        mode = "channel" if isinstance(module, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)) \
            else "element"
        return Leaf(name, "dropout", cls, {"rate": float(module.p), "mode": mode}, {}, out,
                    module)
    if isinstance(module, nn.Flatten):
        return Leaf(name, "flatten", cls, {"in_shape": tuple(int(d) for d in in_shape[1:])},
                    {}, out, module)
    if isinstance(module, nn.ZeroPad2d):
        left, r, t, b = module.padding
        return Leaf(name, "pad", cls, {"pad": (t, b, left, r), "in_hw": tuple(in_shape[2:])},
                    {}, out, module)
    activation, params = _activation_name(module)
    if activation is not None:
        return Leaf(name, "activation", cls, {"name": activation, **params}, {}, out, module)
    if next(module.parameters(recurse=False), None) is not None:
        raise PortError(f"torch module {name!r} ({cls}) has weights but no port mapping "
                        "(supported: Conv2d, Linear, BatchNorm2d, FrozenBatchNorm2d, LayerNorm, "
                        "MultiheadAttention, timm Attention, PEFT lora.Linear, a non-leaf "
                        "module's per-channel scale or (1, T, E) token)")
    return None


def _is_timm_attention(module) -> bool:
    """timm's ``Attention`` (fused ``qkv`` Linear, ``proj``), known by its parts (timm is not
    imported here)."""
    return (type(module).__name__ == "Attention" and isinstance(getattr(module, "qkv", None),
                                                                nn.Linear)
            and isinstance(getattr(module, "proj", None), nn.Linear)
            and hasattr(module, "num_heads"))


def _is_lora(module) -> bool:
    """PEFT's LoRA wrapper of a layer (``lora.Linear``): a base layer and ``lora_A``/``lora_B``."""
    return (hasattr(module, "get_base_layer") and isinstance(getattr(module, "lora_A", None),
                                                             nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict))


def _is_unit(module) -> bool:
    """A module with children described as one record: an attention, a LoRA-wrapped layer."""
    return (isinstance(module, nn.MultiheadAttention) or _is_timm_attention(module)
            or _is_lora(module))


def _leaf_modules(model: nn.Module):
    """Leaf modules, with attention and LoRA units as leaves (their children left out)."""
    out, inside = [], []
    for name, m in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if _is_unit(m):
            out.append((name, m))
            inside.append(f"{name}." if name else "")
        elif next(m.children(), None) is None:
            out.append((name, m))
    return out


def _owned_parameters(model: nn.Module) -> dict[int, tuple[str, nn.Module, str]]:
    """Parameters of modules that have children (ConvNeXt's ``CNBlock.layer_scale``, timm's
    ``cls_token``) outside the units: id -> (dotted name, owner, attribute)."""
    out = {}
    units = [f"{name}." for name, m in model.named_modules() if _is_unit(m)]
    for name, module in model.named_modules():
        if next(module.children(), None) is None or _is_unit(module) or any(
                f"{name}.".startswith(u) for u in units):
            continue
        for attr, param in module.named_parameters(recurse=False):
            out[id(param)] = (f"{name}.{attr}" if name else attr, module, attr)
    return out


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class _Dataflow(TorchFunctionMode):
    """Hooks on the leaf modules and a function mode between them: every tensor carries the
    records its value came from. ``wanted``: the names whose outputs to keep (capture)."""

    def __init__(self, model: nn.Module, describing: bool, wanted: frozenset = frozenset()):
        super().__init__()
        self.model, self.describing, self.wanted = model, describing, wanted
        self.leaves = _leaf_modules(model)
        self.names = {id(m): name for name, m in self.leaves}
        self.owned = _owned_parameters(model)
        self.origin: dict[int, tuple[frozenset, bool]] = {}  # tensor id -> (records, via ops)
        self.kept: list[torch.Tensor] = []  # keeps ids unique while the pass runs
        self.records: list[Leaf] = []
        self.outputs: dict[str, np.ndarray] = {}
        self.done: set[str] = set()
        self.inside = 0  # > 0 while a leaf module runs: its own functions are not recorded
        self.pending: list[tuple[frozenset, bool]] = []  # each running leaf's input sources
        self.counts: dict[str, int] = {}

    def mark(self, tensor, records: frozenset, via: bool) -> None:
        if isinstance(tensor, torch.Tensor):
            self.origin[id(tensor)] = (records, via)
            self.kept.append(tensor)

    def source_of(self, values) -> tuple[frozenset, bool]:
        found, via = set(), False
        for t in _tensors(values):
            records, through = self.origin.get(id(t), (frozenset(), True))
            found |= records
            via = via or through
        return frozenset(found), via or len(found) > 1

    def mark_all(self, output, records, via) -> None:
        for t in _tensors(output):
            self.mark(t, records, via)

    # -- leaf modules ------------------------------------------------------------------
    def before(self, module, inputs):
        self.pending.append(self.source_of(inputs))
        self.inside += 1

    def after(self, module, inputs, output):
        try:
            self._after(module, inputs, output)
        finally:
            self.inside -= 1

    def _after(self, module, inputs, output):
        sources = self.pending.pop()
        name = self.names[id(module)]
        shapes = (_shape(_tensors(inputs)[0]) if _tensors(inputs) else (),
                  _shape(_tensors(output)[0]) if _tensors(output) else ())
        record = _record(name, module, *shapes) if self.describing or name in self.wanted \
            else None
        if record is None:  # parameter-free and not named: its output comes from its inputs
            self.mark_all(output, sources[0], True)
            return
        if name in self.done and not record.weighted:  # a reused ReLU: one record per call
            record.name = name = self._name(name)
        if self.describing and name not in self.done:
            record.sources, record.via_ops = sources
            self.records.append(record)
            self.done.add(name)
        if name in self.wanted and name not in self.outputs:
            self._keep(record, output)
        self.mark_all(output, frozenset([name]), False)
        drop = getattr(module, "proj_drop", None) if record.kind == "attention" else None
        if isinstance(drop, _DROPOUT):
            # timm's attention ends in its own proj_drop (Keras: a Dropout after the layer)
            inner = f"{name}.proj_drop"
            if self.describing and inner not in self.done:
                self.records.append(Leaf(inner, "dropout", type(drop).__name__,
                                         {"rate": float(drop.p), "mode": "element"}, {},
                                         record.output_shape, drop, (name,), False))
                self.done.add(inner)
            self.mark_all(output, frozenset([inner]), False)

    def _keep(self, record: Leaf, output) -> None:
        value = _tensors(output)[0].detach().cpu().numpy().copy()
        if record.params.get("seq_first"):  # nn.MultiheadAttention(batch_first=False)
            value = np.ascontiguousarray(value.swapaxes(0, 1))
        self.outputs[record.name] = activation_to_canonical(
            value, record.params.get("features_last", False))

    # -- functions between them --------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if self.inside:
            return output
        record = self._function_record(func, args, kwargs, output)
        if record is None:
            self.mark_all(output, *self.source_of((args, kwargs)))
            return output
        inputs = [a for a in _tensors((args, kwargs)) if id(a) not in self.owned]
        if record.kind == "token":
            if self.describing and record.name not in self.done:
                record.sources, record.via_ops = (), False
                self.records.append(record)
                self.done.add(record.name)
            if record.name in self.wanted and record.name not in self.outputs:
                owner, attr = record.ref
                self.outputs[record.name] = getattr(owner, attr).detach().cpu().numpy().copy()
            self.mark_all(output, *self.source_of(inputs))
            return output
        if self.describing and record.name not in self.done:
            record.sources, record.via_ops = self.source_of(inputs)
            self.records.append(record)
            self.done.add(record.name)
        if record.name in self.wanted and record.name not in self.outputs:
            self.inside += 1  # the copy's own functions are not the model's
            try:
                self._keep(record, output)
            finally:
                self.inside -= 1
        self.mark_all(output, frozenset([record.name]), False)
        return output

    def _name(self, base: str) -> str:
        """``base``, then ``base#2``, ``base#3`` ... for the next records of that name."""
        self.counts[base] = self.counts.get(base, 1 if base in self.done else 0) + 1
        return base if self.counts[base] == 1 else f"{base}#{self.counts[base]}"

    def _function_record(self, func, args, kwargs, output) -> Leaf | None:
        fname = getattr(func, "__name__", "")
        tensors = _tensors((args, kwargs))
        owned = [self.owned[id(t)] for t in tensors if id(t) in self.owned]
        out = _tensors(output)
        if owned and self._is_token(owned[0]):
            return self._token_record(owned[0])
        if owned:
            return self._owned_record(fname, owned[0], tensors, out)
        if not out or not tensors:
            return None
        shape = _canonical_shape(_shape(out[0]))
        if fname in _ACTIVATION_FUNCTIONS:
            params = {"name": _ACTIVATION_FUNCTIONS[fname]}
            if fname.startswith("leaky_relu"):
                params["slope"] = float(_number(args[1]) if len(args) > 1 else kwargs.get(
                    "negative_slope", 0.01))
            if fname == "gelu":
                params["approximate"] = kwargs.get("approximate", "none")
            return Leaf(self._name(f"F.{params['name']}"), "activation", fname, params, {},
                        shape)
        if fname in _ARITHMETIC_FUNCTIONS and len(args) >= 2 and len(tensors) == 1:
            value = _number(args[1]) if isinstance(args[0], torch.Tensor) else _number(args[0])
            if value is not None and "alpha" not in kwargs:
                return Leaf(self._name(f"F.{_ARITHMETIC_FUNCTIONS[fname]}"), "op", fname,
                            {"op": _ARITHMETIC_FUNCTIONS[fname], "value": value}, {}, shape)
        if fname == "pad" and len(args) >= 2 and len(args[1]) == 4 and kwargs.get(
                "mode", "constant") == "constant" and not kwargs.get("value"):
            left, r, t, b = (int(v) for v in args[1])
            return Leaf(self._name("F.pad"), "pad", fname, {
                "pad": (t, b, left, r), "in_hw": tuple(_shape(tensors[0])[2:])}, {}, shape)
        if fname in _DROPOUT_FUNCTIONS:
            p = _number(args[1]) if len(args) > 1 else kwargs.get("p", 0.5)
            return Leaf(self._name(f"F.{fname}"), "dropout", fname,
                        {"rate": float(p), "mode": _DROPOUT_FUNCTIONS[fname]}, {}, shape)
        return None

    @staticmethod
    def _is_token(owned) -> bool:
        """A (1, T, E) parameter of a non-leaf module: timm's ``cls_token``, ``pos_embed``."""
        _, owner, attr = owned
        param = getattr(owner, attr)
        return param.dim() == 3 and param.shape[0] == 1

    def _token_record(self, owned) -> Leaf:
        """A bare model tensor as its own record: it reads no input, and what it joins keeps
        the sources of the data it joins (Keras's graph reads such a weight as a variable)."""
        name, owner, attr = owned
        param = getattr(owner, attr)
        return Leaf(name, "token", f"{type(owner).__name__}.{attr}",
                    {"features": int(param.shape[-1])}, {"weight": tuple(param.shape)},
                    tuple(int(d) for d in param.shape[1:]), (owner, attr))

    def _owned_record(self, fname: str, owned, tensors, out) -> Leaf:
        """A non-leaf module's parameter used by a function: a per-channel scale, or an
        error naming it."""
        name, owner, attr = owned
        param = getattr(owner, attr)
        data = [t for t in tensors if id(t) not in self.owned]
        n = param.numel()
        shape = tuple(param.shape)
        per_channel = (fname in ("mul", "__mul__", "__rmul__") and len(data) == 1 and out
                       and data[0].dim() == 4
                       and (shape == (n,) and data[0].shape[-1] == n
                            or shape in ((n, 1, 1), (1, n, 1, 1)) and data[0].shape[1] == n))
        if not per_channel:
            where = name[:-len(attr) - 1] or "(model)"
            raise PortError(f"torch module {where!r} ({type(owner).__name__}): parameter "
                            f"{attr!r} {shape} is used by "
                            f"{fname} and has no port mapping (supported: a per-channel scale "
                            "x * p)")
        last = shape == (n,)
        return Leaf(name, "scale", f"{type(owner).__name__}.{attr}",
                    {"features": n, "features_last": last}, {"weight": (n,)},
                    _canonical_shape(_shape(out[0]), last), (owner, attr))


@contextlib.contextmanager
def _traced(model: nn.Module, describing: bool, wanted=frozenset()) -> Iterator[_Dataflow]:
    """A :class:`_Dataflow` active on ``model``: hooks on every leaf module and its mode."""
    flow = _Dataflow(model, describing, frozenset(wanted))
    modules = [m for _, m in flow.leaves]
    handles = [m.register_forward_pre_hook(flow.before) for m in modules]
    handles += [m.register_forward_hook(flow.after) for m in modules]
    try:
        with flow:
            yield flow
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _state_kept(model: nn.Module, parameters_too: bool = True) -> Iterator[None]:
    """Restore every parameter (without gradients: only buffers), buffer, module mode and
    the CPU random state on exit.

    Runs on one intra-op thread, as ``torch_impl.train`` does: beside TensorFlow's
    threads on a small machine, two torch threads contend and run several times slower.
    """
    tensors = dict(model.named_parameters()) if parameters_too else {}
    tensors.update(model.named_buffers())
    state = {k: v.detach().clone() for k, v in tensors.items()}
    flags = {m: m.training for m in model.modules()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)
        with torch.no_grad():
            for k, v in tensors.items():
                v.copy_(state[k])
        for m, training in flags.items():
            m.training = training


def _shape(value) -> tuple:
    return tuple(getattr(value, "shape", ()) or ())


def _first_error_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {text}"


def _tensor(x: np.ndarray, model: nn.Module) -> torch.Tensor:
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    return torch.from_numpy(activation_from_canonical(x)).to(dtype)


def describe(model: nn.Module, probe: np.ndarray, what: str = "torch model") -> list[Leaf]:
    """Every leaf module (and recorded function) the forward pass on ``probe`` (canonical
    NCHW) calls, in call order, with the records its input comes from."""
    x = _tensor(probe, model)
    with _state_kept(model, False), torch.no_grad(), _traced(model, True) as flow:
        model.eval()
        flow.mark(x, frozenset([INPUT]), False)
        try:
            model(x)
        except PortError as exc:
            raise PortError(f"{what}: {exc}") from None
        except Exception as exc:  # noqa: BLE001  (a model that rejects the input: bad input)
            raise PortError(f"{what}: the forward pass on input (C, H, W) "
                            f"{tuple(probe.shape[1:])} failed ({_first_error_line(exc)})") from None
    position = {r.name: i for i, r in enumerate(flow.records)}
    for record in flow.records:
        record.sources = tuple(sorted(record.sources, key=lambda n: position.get(n, -1)))
    return flow.records


def _variables(leaf: Leaf) -> dict[str, tuple[torch.Tensor, str]]:
    if leaf.kind in ("scale", "token"):
        owner, attr = leaf.ref
        return {"weight": (getattr(owner, attr), leaf.kind)}
    module = leaf.ref
    if leaf.kind == "attention":
        if isinstance(module, nn.MultiheadAttention):
            found = {"weight": module.in_proj_weight, "bias": module.in_proj_bias,
                     "out_weight": module.out_proj.weight, "out_bias": module.out_proj.bias}
        else:  # timm's Attention: qkv rows [q; k; v] are in_proj's
            found = {"weight": module.qkv.weight, "bias": module.qkv.bias,
                     "out_weight": module.proj.weight, "out_bias": module.proj.bias}
        return {k: (t, "vector") for k, t in found.items() if k in leaf.shapes}
    if "lora_A" in leaf.shapes:  # PEFT: the base Linear's tensors, then the adapter's
        base, adapter = module.get_base_layer(), leaf.params["adapter"]
        found = {"weight": base.weight, "bias": base.bias,
                 "lora_A": module.lora_A[adapter].weight, "lora_B": module.lora_B[adapter].weight}
        return {k: (t, "vector") for k, t in found.items() if k in leaf.shapes}
    keys = [k for k in ("weight", "bias", "running_mean", "running_var") if k in leaf.shapes]
    return {k: (getattr(module, k), leaf.params.get("layout", "vector")
                if k == "weight" else "vector") for k in keys}


def read_tensors(model: nn.Module, leaves: list[Leaf],
                 dtype=np.float32) -> dict[str, dict[str, np.ndarray]]:
    """Canonical tensors of each leaf (float32 unless told)."""
    out = {}
    for leaf in leaves:
        out[leaf.name] = {key: to_canonical(t.detach().cpu().numpy().astype(dtype), kind)
                          for key, (t, kind) in _variables(leaf).items()}
    return out


@torch.no_grad()
def write_tensors(model: nn.Module, leaves: list[Leaf],
                  tensors: dict[str, dict[str, np.ndarray]]) -> None:
    """Copy canonical tensors into each leaf's parameters and buffers."""
    for leaf in leaves:
        for key, (t, kind) in _variables(leaf).items():
            if key in tensors.get(leaf.name, {}):
                value = from_canonical(tensors[leaf.name][key], kind, tuple(t.shape))
                t.copy_(torch.from_numpy(value))


def _dropout_off(model: nn.Module) -> None:
    for m in model.modules():
        # an attention unit drops its probabilities by its own mode (timm's fused path and
        # nn.MultiheadAttention pass dropout_p only when self.training): it has no other
        if isinstance(m, _DROPOUT) or _is_drop_path(m) or isinstance(
                m, nn.MultiheadAttention) or _is_timm_attention(m):
            m.eval()


def capture(model: nn.Module, leaves: list[Leaf], x: np.ndarray,
            training: bool) -> dict[str, np.ndarray]:
    """Each leaf's output (first call, canonical layout) for ``x`` in one mode.

    Training mode is what a loop's ``model.train()`` leaves (a ``train()``
    override counts), with every Dropout and StochasticDepth in eval mode; nothing keeps
    a change.
    """
    wanted = frozenset(leaf.name for leaf in leaves)
    with _state_kept(model, False), torch.no_grad(), _traced(model, False, wanted) as flow:
        model.train(training)
        _dropout_off(model)
        model(_tensor(x, model))
    return flow.outputs


def _optimizer(setup: dict, model: nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    if setup["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=setup["learning_rate"], betas=(0.9, 0.999),
                                eps=setup["adam_epsilon"])
    return torch.optim.SGD(params, lr=setup["learning_rate"])


def _loss(setup: dict, y, output):
    if setup["loss"] == "cross_entropy":
        return nn.functional.cross_entropy(output, y)
    return output.square().mean()


# optimizer slots in torch's names (the canonical ones, shared/training_state.py)
_SLOTS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq")}


def _optimizer_kind(optimizer) -> str | None:
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return "adam"
    return None


def _hyper(optimizer, kind: str | None) -> dict:
    group = optimizer.param_groups[0]
    if kind == "sgd":
        return {"learning_rate": float(group["lr"]), "momentum": float(group["momentum"]),
                "dampening": float(group["dampening"]), "nesterov": bool(group["nesterov"]),
                "weight_decay": float(group["weight_decay"])}
    if kind == "adam":
        decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay")
        return {"learning_rate": float(group["lr"]), "beta_1": float(group["betas"][0]),
                "beta_2": float(group["betas"][1]), "epsilon": float(group["eps"]),
                "weight_decay": float(group["weight_decay"]),
                "decoupled_weight_decay": bool(decoupled)}
    return {}


class Stepper:
    """One training step at a time, as a loop runs it: ``model.train()`` (a ``train()``
    override counts), forward, backward, ``optimizer.step()`` (``optimizer`` or a new
    SGD/Adam over the ``requires_grad`` parameters), with every Dropout in eval mode.

    A context manager: on exit every parameter, buffer, mode and the random state are
    restored (an optimizer passed in keeps the state its steps gave it). ``state()``
    reads, ``load()`` sets the leaves' canonical tensors and the optimizer's slots
    (torch's own names: ``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``) and step count.
    """

    def __init__(self, model: nn.Module, leaves: list[Leaf], setup: dict, optimizer=None):
        self.model, self.leaves, self.setup = model, leaves, setup
        self._given = optimizer
        self._kept = None

    def __enter__(self) -> Self:
        self._kept = _state_kept(self.model)
        self._kept.__enter__()
        self.optimizer = self._given or _optimizer(self.setup, self.model)
        self.kind = _optimizer_kind(self.optimizer)
        self.hyper = _hyper(self.optimizer, self.kind)
        return self

    def __exit__(self, *exc) -> None:
        self._kept.__exit__(*exc)

    def _slotted(self) -> Iterator[tuple[str, str, torch.Tensor, str]]:
        """(leaf, key, tensor, layout kind) of every leaf tensor the optimizer updates."""
        updated = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        for leaf in self.leaves:
            for key, (t, kind) in _variables(leaf).items():
                if id(t) in updated:
                    yield leaf.name, key, t, kind

    def state(self, dtype=np.float32) -> dict:
        """``{"tensors": {leaf: {key: array}}, "slots": {slot: {leaf: {key: array}}},
        "step": int}``, canonical, float32 unless told."""
        slots: dict[str, dict] = {name: {} for name in _SLOTS.get(self.kind, ())}
        steps = set()
        for leaf, key, t, kind in self._slotted():
            held = self.optimizer.state.get(t, {})
            for name, values in slots.items():
                if held.get(name) is not None:
                    value = held[name].detach().cpu().numpy().astype(dtype)
                    values.setdefault(leaf, {})[key] = to_canonical(value, kind)
            if "step" in held:
                steps.add(int(float(held["step"])))
        return {"tensors": read_tensors(self.model, self.leaves, dtype), "slots": slots,
                "step": max(steps, default=0)}

    @torch.no_grad()
    def load(self, state: dict) -> None:
        """Set the tensors and slots ``state`` holds (a slot it lacks: none yet)."""
        write_tensors(self.model, self.leaves, state["tensors"])
        for leaf, key, t, kind in self._slotted():
            held = {name: values[leaf][key] for name, values in state["slots"].items()
                    if key in values.get(leaf, {})}
            if not held:
                self.optimizer.state.pop(t, None)
                continue
            new = {name: torch.from_numpy(from_canonical(value, kind, tuple(t.shape))).to(t.dtype)
                   for name, value in held.items()}
            if self.kind == "adam":
                new["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
            self.optimizer.state[t] = new

    def float64_step(self, state: dict, x: np.ndarray, y: np.ndarray):
        """The step from ``state`` in float64 (the model cast in place and back):
        ((losses), the float64 state after it); the model is left holding ``state``'s
        step no more: load a state afterwards. What one float32 step's rounding is, here."""
        self.model.double()
        try:
            self.load(state)
            losses = self.step(x, y)
            return losses, self.state(np.float64)
        finally:
            self.model.float()
            for held in self.optimizer.state.values():
                for name, value in held.items():
                    if torch.is_tensor(value) and value.is_floating_point() and name != "step":
                        held[name] = value.float()

    def step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """One step on the batch; (training-mode loss, inference-mode loss) at the
        pre-update weights."""
        model = self.model
        xt, yt = _tensor(x, model), torch.from_numpy(y)
        model.eval()
        with torch.no_grad():
            evaluation = float(_loss(self.setup, yt, model(xt)))
        model.train()
        _dropout_off(model)
        loss = _loss(self.setup, yt, model(xt))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach()), evaluation
