"""Port check, torch half: describe an ``nn.Module``'s leaves, capture their outputs, train it.

The comparison itself lives in :mod:`shared.port`; this module only turns a
torch model into neutral :class:`shared.port.Leaf` records (tensors in the
canonical layout through ``torch_impl/weights.py``) and runs it. Call order is
seen with forward hooks on every leaf module during one probe forward pass;
functional calls (``F.relu``, ``x.flatten(1)``) have no module and are not
seen. Everything it runs restores parameters, buffers, modes and the random
state afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from shared.port import Leaf, PortError
from torch_impl.weights import (
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

_DROPOUT = nn.modules.dropout._DropoutNd
_BN = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)
_ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu",
                nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.GELU: "gelu", nn.SiLU: "silu",
                nn.Softmax: "softmax", nn.Hardswish: "hard_swish"}


def check_model(model, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise PortError(f"{what}: expected a torch.nn.Module, got "
                        f"{type(model).__module__}.{type(model).__name__}")


def input_shape(model, what: str) -> tuple[int, int, int]:
    """A torch module declares no input shape: the Keras model's (or the caller's) is used."""
    raise PortError(f"{what}: a torch module has no declared input shape: pass input_shape "
                    "(H, W, C) / --input-shape H,W,C")


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
              "same": module.padding == "same", "in_hw": tuple(in_shape[2:]),
              "activation": None}
    return Leaf(name, "conv", type(module).__name__, params, shapes,
                tuple(int(d) for d in out_shape[1:]), module)


def _record(name, module, in_shape, out_shape, previous) -> Leaf | None:
    cls = type(module).__name__
    out = tuple(int(d) for d in out_shape[1:])
    if isinstance(module, nn.Conv2d):
        return _conv_record(name, module, in_shape, out_shape)
    if isinstance(module, nn.Linear):
        shapes = {"weight": tuple(module.weight.shape)}
        if module.bias is not None:
            shapes["bias"] = tuple(module.bias.shape)
        return Leaf(name, "dense", cls, {"bias": module.bias is not None, "flatten_from": None,
                                         "activation": None}, shapes, out, module)
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
        return Leaf(name, "layernorm", cls, {"features": n, "eps": float(module.eps),
                                             "center": affine and module.bias is not None,
                                             "scale": affine}, shapes, out, module)
    if isinstance(module, _DROPOUT):
        return Leaf(name, "dropout", cls, {"rate": float(module.p)}, {}, out, module)
    if isinstance(module, nn.Flatten):
        return Leaf(name, "flatten", cls, {}, {}, out, module)
    if isinstance(module, nn.ZeroPad2d):
        left, r, t, b = module.padding
        return Leaf(name, "pad", cls, {"pad": (t, b, left, r), "in_hw": tuple(in_shape[2:])},
                    {}, out, module)
    for kind, act in _ACTIVATIONS.items():
        if type(module) is kind:
            return Leaf(name, "activation", cls, {"name": act}, {}, out, module)
    if next(module.parameters(recurse=False), None) is not None:
        raise PortError(f"torch module {name!r} ({cls}) has weights but no port mapping "
                        "(supported: Conv2d, Linear, BatchNorm2d, FrozenBatchNorm2d, LayerNorm)")
    return None


def _leaf_modules(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if next(m.children(), None) is None]


@contextlib.contextmanager
def _hooked(modules, on_call) -> Iterator[None]:
    handles = [m.register_forward_hook(
        lambda m, inputs, output: on_call(m, inputs[0] if inputs else None, output))
               for m in modules]
    try:
        yield
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
    """Every leaf module the forward pass on ``probe`` (canonical NCHW) calls, in call order."""
    leaves = _leaf_modules(model)
    names = {id(m): name for name, m in leaves}
    events = []

    def seen(module, inputs, output):
        events.append((module, _shape(inputs), _shape(output)))

    with _hooked([m for _, m in leaves], seen), _state_kept(model, False), torch.no_grad():
        model.eval()
        try:
            model(_tensor(probe, model))
        except Exception as exc:  # noqa: BLE001  (a model that rejects the input: bad input)
            raise PortError(f"{what}: the forward pass on input (C, H, W) "
                            f"{tuple(probe.shape[1:])} failed ({_first_error_line(exc)})") from None
    records, done, previous = [], set(), None
    for module, in_shape, out_shape in events:
        if id(module) in done:
            continue
        done.add(id(module))
        record = _record(names[id(module)], module, in_shape, out_shape, previous)
        previous = (record.kind if record else None, in_shape)
        if record is not None:
            records.append(record)
    return records


def _variables(leaf: Leaf) -> dict[str, tuple[torch.Tensor, str]]:
    module = leaf.ref
    keys = [k for k in ("weight", "bias", "running_mean", "running_var") if k in leaf.shapes]
    return {k: (getattr(module, k), leaf.params.get("layout", "vector")
                if k == "weight" else "vector") for k in keys}


def read_tensors(model: nn.Module, leaves: list[Leaf]) -> dict[str, dict[str, np.ndarray]]:
    """Canonical float32 tensors of each leaf."""
    out = {}
    for leaf in leaves:
        out[leaf.name] = {key: to_canonical(t.detach().cpu().numpy().astype(np.float32), kind)
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
        if isinstance(m, _DROPOUT):
            m.eval()


def capture(model: nn.Module, leaves: list[Leaf], x: np.ndarray,
            training: bool) -> dict[str, np.ndarray]:
    """Each leaf's output (first call, canonical layout) for ``x`` in one mode.

    Training mode is what a loop's ``model.train()`` leaves (a ``train()``
    override counts), with every Dropout in eval mode; nothing keeps a change.
    """
    wanted = {id(leaf.ref): leaf.name for leaf in leaves}
    out: dict[str, np.ndarray] = {}

    def seen(module, inputs, output):
        name = wanted.get(id(module))
        if name is not None and name not in out:
            out[name] = activation_to_canonical(output.detach().cpu().numpy().copy())

    with _hooked([leaf.ref for leaf in leaves], seen), _state_kept(model, False), torch.no_grad():
        model.train(training)
        _dropout_off(model)
        model(_tensor(x, model))
    return out


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


def train_steps(model: nn.Module, leaves: list[Leaf], batches, setup: dict, optimizer=None):
    """K steps as a loop runs them: ``model.train()``, forward, backward, ``optimizer.step()``
    (``optimizer`` or a new SGD/Adam over the ``requires_grad`` parameters). Per step
    ``(training-mode loss, inference-mode loss)`` at the pre-update weights, and each
    leaf's tensors after the last step. Dropout is off; everything is restored.
    """
    losses = []
    with _state_kept(model):
        optimizer = optimizer or _optimizer(setup, model)
        for x, y in batches:
            xt, yt = _tensor(x, model), torch.from_numpy(y)
            model.eval()
            with torch.no_grad():
                evaluation = float(_loss(setup, yt, model(xt)))
            model.train()
            _dropout_off(model)
            loss = _loss(setup, yt, model(xt))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append((float(loss.detach()), evaluation))
        after = read_tensors(model, leaves)
    return losses, after
