"""PyTorch <-> canonical tensors. The only module that knows torch's layout.

The canonical form *is* torch's layout (conv (O, I, kh, kw), linear
(out, in)) under the model's own state_dict keys, so this side is mostly an
identity map. ``num_batches_tracked`` is torch bookkeeping with no effect
when BatchNorm has a momentum (and Keras has no such variable): it is not
part of the canonical form; import keeps the model's own counter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.checkpoint import FLOAT32_OR_64, CheckpointError, check_holdable, check_tensors
from shared.io import atomic_path
from shared.training_state import OPTIMIZER_SLOTS, NotATrainingFile, TrainingState

__all__ = ["canonical_shapes", "export_weights", "import_weights", "export_bookkeeping",
           "export_training_state", "import_training_state", "save_training_file",
           "load_training_file", "read_training_file", "write_training_file",
           "is_training_file", "to_canonical", "from_canonical", "activation_to_canonical",
           "activation_from_canonical"]

_BOOKKEEPING = "num_batches_tracked"


# PEFT's key for the default adapter's LoRA tensors: ``<layer>.lora_A.default.weight``
_LORA_KEY = re.compile(r"\.(lora_[AB])\.default\.weight$")


def _canonical_name(key: str, adapters: bool = True) -> str | None:
    """The canonical key of a state_dict key; None for what the canonical form leaves out
    (``num_batches_tracked``; LoRA's tensors unless ``adapters``)."""
    if key.rsplit(".", 1)[-1] == _BOOKKEEPING:
        return None
    if ".lora_" in key:
        if not adapters:
            return None
        match = _LORA_KEY.search(key)
        if match is None:
            raise ValueError(f"weights: {key!r}: only the default adapter's lora_A and lora_B "
                             f"have a canonical form")
        return key[:match.start()] + "." + match.group(1)
    return key.replace(".base_layer.", ".")


def _peft_name(key: str, adapted: set[str]) -> str:
    """Inverse of :func:`_canonical_name` for a model whose layers ``adapted`` (canonical
    prefixes) carry PEFT's default adapter: their weights sit under ``base_layer``."""
    prefix, _, leaf = key.rpartition(".")
    if leaf in ("lora_A", "lora_B"):
        return f"{prefix}.{leaf}.default.weight"
    return f"{prefix}.base_layer.{leaf}" if prefix in adapted else key


def _canonical_items(model: nn.Module, adapters: bool = False):
    # A PEFT LoRA layer (torch_impl/lora.py) keeps the wrapped Linear as ``base_layer``: its
    # weight is still the canonical ``...attn.proj.weight``. The adapters are not canonical
    # model tensors (a checkpoint holds none; ``lora.lora_tensors`` reads them under their
    # own keys) but a training state's (``adapters``): ``<layer>.lora_A`` (r, in) and
    # ``.lora_B`` (out, r), PEFT's own layout.
    for key, value in model.state_dict(keep_vars=True).items():
        name = _canonical_name(key, adapters)
        if name is not None:
            yield name, value


def canonical_shapes(model: nn.Module, adapters: bool = False) -> dict[str, tuple[int, ...]]:
    """Canonical key -> shape for every tensor of ``model`` (``adapters``: LoRA's too)."""
    return {key: tuple(value.shape) for key, value in _canonical_items(model, adapters)}


def export_weights(model: nn.Module, dtype=np.float32, adapters: bool = False
                   ) -> dict[str, np.ndarray]:
    """Every parameter and BN statistic as numpy (float32 = the canonical form), canonical
    keys; ``adapters``: LoRA's tensors too (a training state's)."""
    return {key: value.detach().cpu().numpy().astype(dtype, copy=True)
            for key, value in _canonical_items(model, adapters)}


@torch.no_grad()
def import_weights(model: nn.Module, tensors: dict[str, np.ndarray], where: str = "tensors",
                   adapters: bool = False) -> None:
    """Load canonical tensors into ``model``; strict about keys, shapes, dtype, finiteness
    (``adapters``: LoRA's tensors too, a training state's).

    float32 or float64 arrays; float64 into a float32 model only where exact.
    """
    check_tensors(tensors, canonical_shapes(model, adapters), where, FLOAT32_OR_64)
    check_holdable(tensors, str(next(model.parameters()).dtype).removeprefix("torch."), where)
    for key, target in _canonical_items(model, adapters):
        target.copy_(torch.from_numpy(np.ascontiguousarray(tensors[key])))  # casts to the model's dtype


def export_bookkeeping(model: nn.Module) -> dict[str, np.ndarray]:
    """Framework-only state outside the canonical form: torch's ``num_batches_tracked``.

    Runs compare it too: a frozen BatchNorm whose counter moved was in training mode.
    """
    return {key: value.detach().cpu().numpy().astype(np.float64)
            for key, value in model.state_dict().items()
            if key.rsplit(".", 1)[-1] == _BOOKKEEPING}


# --- optimizer state: torch's own slot names are the canonical ones ------------------------
def _optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return "adam"
    raise TypeError(f"training state: no canonical form for {type(optimizer).__name__} "
                    f"(expected SGD, Adam or AdamW)")


def _optimized(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, nn.Parameter]]:
    """``(canonical key, parameter)`` for every parameter the optimizer updates."""
    names = {id(p): k for k, p in _canonical_items(model, adapters=True)}
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("training state: the optimizer updates a tensor that is not "
                                 "a parameter of the model")
            out.append((names[id(p)], p))
    return out


def _hyper(param_groups: list[dict], kind: str) -> dict[str, float]:
    """The canonical hyperparameters of ``param_groups`` (an optimizer's or a state_dict's)."""
    group = param_groups[0]
    names = ("lr", "momentum") if kind == "sgd" else ("lr", "betas", "eps")
    for other in param_groups[1:]:
        if any(other[n] != group[n] for n in names):
            raise ValueError("training state: parameter groups with different hyperparameters "
                             "have no one canonical form")
    if kind == "sgd":
        return {"learning_rate": float(group["lr"]), "momentum": float(group["momentum"])}
    return {"learning_rate": float(group["lr"]), "beta_1": float(group["betas"][0]),
            "beta_2": float(group["betas"][1]), "epsilon": float(group["eps"])}


def export_training_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                          dtype=np.float64) -> TrainingState:
    """Model tensors and optimizer slots in canonical form (float64 unless told: exact)."""
    kind = _optimizer_kind(optimizer)
    slots: dict[str, dict[str, np.ndarray]] = {name: {} for name in OPTIMIZER_SLOTS[kind]}
    optimized = _optimized(model, optimizer)
    for key, p in optimized:
        state = optimizer.state.get(p, {})
        for name in OPTIMIZER_SLOTS[kind]:
            if state.get(name) is not None:
                slots[name][key] = state[name].detach().cpu().numpy().astype(dtype, copy=True)
    return TrainingState(export_weights(model, dtype, adapters=True), kind,
                         {name: values for name, values in slots.items() if values},
                         _step(optimizer, optimized), _hyper(optimizer.param_groups, kind),
                         [key for key, _ in optimized])


def _step(optimizer: torch.optim.Optimizer, optimized) -> int:
    """Adam's step count (one per parameter, all equal); SGD keeps none: 0."""
    steps = {int(float(optimizer.state[p]["step"])) for _, p in optimized
             if "step" in optimizer.state.get(p, {})}
    if len(steps) > 1:
        raise ValueError(f"training state: parameters took different numbers of steps "
                         f"({sorted(steps)}); the canonical form has one step count")
    return steps.pop() if steps else 0


@torch.no_grad()
def import_training_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                          state: TrainingState, where: str = "training state") -> None:
    """Load ``state`` into ``model`` and ``optimizer`` (slots, step); exact for its dtype.

    A parameter the state has no slot for starts without one, as before its first step.
    """
    kind = _optimizer_kind(optimizer)
    if state.optimizer != kind:
        raise ValueError(f"{where}: holds {state.optimizer} state, the optimizer is {kind}")
    optimized = _optimized(model, optimizer)
    keys = {key for key, _ in optimized}
    stray = sorted(set(state.trainable_keys()) - keys)
    if stray:
        raise ValueError(f"{where}: slot for {stray[0]!r}, which the optimizer does not update "
                         f"(frozen here, trained where the state comes from?)")
    pending = []  # every check before anything is set: a refused state changes nothing
    for key, p in optimized:
        held = {name: state.slots[name][key] for name in OPTIMIZER_SLOTS[kind]
                if key in state.slots.get(name, {})}
        if kind == "adam" and state.step > 0 and not held:
            raise ValueError(f"{where}: key {key!r}: no adam slots at step {state.step} "
                             f"(Adam's bias correction needs the moments of every parameter)")
        if held and len(held) != len(OPTIMIZER_SLOTS[kind]):
            raise ValueError(f"{where}: key {key!r}: has {sorted(held)} but not every "
                             f"{kind} slot ({', '.join(OPTIMIZER_SLOTS[kind])})")
        for name, value in held.items():
            if value.shape != tuple(p.shape):
                raise ValueError(f"{where}: slot {name!r} key {key!r}: shape expected "
                                 f"{tuple(p.shape)}, got {value.shape}")
        new = {name: torch.from_numpy(np.array(value)).to(p.dtype) for name, value in held.items()}
        if kind == "adam" and new:
            new["step"] = torch.tensor(float(state.step), dtype=torch.float32)
        pending.append((p, new))
    import_weights(model, state.tensors, where, adapters=True)
    for p, new in pending:
        optimizer.state[p] = new


# --- training files: each framework's own file for a training state -------------------------
# torch's is a ``.pt`` that ``torch.save`` writes and ``torch.load(weights_only=True)`` reads:
# {"format": _FILE_FORMAT, "format_version": "1", "arch": str, "optimizer_kind": "sgd" |
# "adam", "step": int, "parameters": canonical keys in the optimizer's order (its state_dict
# numbers them 0, 1, ...), "model": model.state_dict() (a PEFT model's under PEFT's names,
# read back canonical), "optimizer": optimizer.state_dict(),
# "meta": {str: str}}. ``model.load_state_dict(f["model"])`` and
# ``optimizer.load_state_dict(f["optimizer"])`` resume it in plain torch.
_FILE_FORMAT = "freeze-parity training (torch)"
_FILE_VERSION = "1"


def save_training_file(path, model: nn.Module, optimizer: torch.optim.Optimizer,
                       meta: Mapping[str, str] | None = None) -> Path:
    """``model`` and ``optimizer`` as torch's training file (``.pt``), written atomically.

    ``meta`` (str -> str) needs ``arch`` unless the model has one (the project's do).
    """
    optimized = _optimized(model, optimizer)
    contents = _file(path, _optimizer_kind(optimizer), _step(optimizer, optimized),
                     [key for key, _ in optimized], model.state_dict(), optimizer.state_dict(),
                     {"arch": getattr(model, "arch", ""), **(meta or {})})
    return _save_file(path, contents)


def load_training_file(path, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainingState:
    """Read torch's training file into ``model`` and ``optimizer``; the state it held.

    Parameters are matched by canonical key, not by position; ``num_batches_tracked``
    comes back too.
    """
    where = f"training file {path}"
    contents = _read_file(path)
    state, _ = _state_from_file(contents, where, canonical_shapes(model, adapters=True))
    import_training_state(model, optimizer, state, where)
    saved = contents["model"]
    with torch.no_grad():
        for key, counter in model.state_dict().items():
            if key.rsplit(".", 1)[-1] == _BOOKKEEPING and isinstance(saved.get(key), torch.Tensor):
                counter.copy_(saved[key])
    return state


def read_training_file(path, *, expected: Mapping[str, tuple[int, ...]] | None = None
                       ) -> tuple[TrainingState, dict[str, str]]:
    """Torch's training file as a canonical state and its meta (``arch`` included), no model
    needed; ``expected`` (key -> shape) checks the model tensors."""
    return _state_from_file(_read_file(path), f"training file {path}", expected)


def write_training_file(path, state: TrainingState, meta: Mapping[str, str]) -> Path:
    """Write a canonical state as torch's training file, atomically (arrays as they are;
    ``num_batches_tracked`` 0); ``meta`` needs ``arch``."""
    where = f"training file {path}"
    names = state.parameters or [k for k in state.tensors if k in set(state.trainable_keys())]
    if not names:
        raise CheckpointError(f"{where}: the state names no parameter the optimizer updates")
    params = [nn.Parameter(torch.from_numpy(np.array(state.tensors[k]))) for k in names]
    try:
        if state.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=state.hyper["learning_rate"],
                                        momentum=state.hyper["momentum"])
        else:
            optimizer = torch.optim.Adam(params, lr=state.hyper["learning_rate"],
                                         betas=(state.hyper["beta_1"], state.hyper["beta_2"]),
                                         eps=state.hyper["epsilon"])
    except KeyError as exc:
        raise CheckpointError(f"{where}: hyperparameter {exc.args[0]!r} missing "
                              f"({state.optimizer})") from None
    for key, p in zip(names, params):
        held = {name: torch.from_numpy(np.array(state.slots[name][key]))
                for name in OPTIMIZER_SLOTS[state.optimizer] if key in state.slots.get(name, {})}
        if state.optimizer == "adam" and held:
            held["step"] = torch.tensor(float(state.step), dtype=torch.float32)
        if held:
            optimizer.state[p] = held
    model = {}
    adapted = {k.removesuffix(".lora_A") for k in state.tensors if k.endswith(".lora_A")}
    for key, value in state.tensors.items():  # under the model's own (PEFT's) names
        model[_peft_name(key, adapted)] = torch.from_numpy(np.array(value))
        if key.endswith(".running_var"):  # torch's place for the BN counter: after running_var
            model[key.removesuffix("running_var") + _BOOKKEEPING] = torch.zeros((), dtype=torch.long)
    return _save_file(path, _file(path, state.optimizer, state.step, names, model,
                                  optimizer.state_dict(), meta))


def is_training_file(path) -> bool:
    """True for a file :func:`read_training_file` takes (its 'format' entry; tensors mapped,
    not read)."""
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  (unreadable, or not a zip-format torch file: not one)
        return False
    return isinstance(contents, Mapping) and contents.get("format") == _FILE_FORMAT


def _file(path, kind: str, step: int, names: list[str], model, optimizer, meta) -> dict:
    where = f"training file {path}"
    meta = dict(meta)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{where}: meta must map str to str")
    if not meta.get("arch"):
        raise CheckpointError(f"{where}: meta key 'arch': required, got {meta.get('arch')!r}")
    return {"format": _FILE_FORMAT, "format_version": _FILE_VERSION, "arch": meta.pop("arch"),
            "optimizer_kind": kind, "step": int(step), "parameters": list(names),
            "model": model, "optimizer": optimizer, "meta": meta}


def _save_file(path, contents: dict) -> Path:
    with atomic_path(path) as tmp:
        torch.save(contents, tmp)
    return Path(path)


def _read_file(path):
    path = Path(path)
    where = f"training file {path}"
    if not path.is_file():
        raise CheckpointError(f"{where}: " + ("not a file" if path.exists() else "file not found"))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (torch.load's unpickler raises any type)
        message = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{where}: could not be read (torch.load, weights_only): "
                              f"{type(exc).__name__}: {message}") from None


def _array(value, where: str) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{where}: expected a tensor, got {type(value).__name__}")
    if value.dtype not in (torch.float32, torch.float64):
        raise CheckpointError(f"{where}: dtype expected float32 or float64, got {value.dtype}")
    return value.detach().cpu().numpy().copy()


def _entry(contents: Mapping, key: str, kind, where: str):
    value = contents.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CheckpointError(f"{where}: entry {key!r}: expected {kind.__name__}, got "
                              f"{type(value).__name__}")
    return value


def _state_from_file(contents, where: str, expected) -> tuple[TrainingState, dict[str, str]]:
    if not isinstance(contents, Mapping) or contents.get("format") != _FILE_FORMAT:
        raise NotATrainingFile(f"{where}: not a freeze-parity training file (no 'format': "
                               f"{_FILE_FORMAT!r} entry; a state_dict?)")
    if contents.get("format_version") != _FILE_VERSION:
        raise CheckpointError(f"{where}: entry 'format_version': expected {_FILE_VERSION!r}, "
                              f"got {contents.get('format_version')!r}")
    arch = _entry(contents, "arch", str, where)
    kind = _entry(contents, "optimizer_kind", str, where)
    if kind not in OPTIMIZER_SLOTS:
        raise CheckpointError(f"{where}: entry 'optimizer_kind': expected one of "
                              f"{', '.join(OPTIMIZER_SLOTS)}, got {kind!r}")
    step = _entry(contents, "step", int, where)
    names = _entry(contents, "parameters", list, where)
    meta = _entry(contents, "meta", Mapping, where)
    model = _entry(contents, "model", Mapping, where)
    saved = _entry(contents, "optimizer", Mapping, where)
    if not all(isinstance(k, str) for k in names):
        raise CheckpointError(f"{where}: entry 'parameters': expected canonical keys (str)")
    tensors = {}
    for key, value in model.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{where}: model key {key!r}: keys must be strings")
        try:
            name = _canonical_name(key)
        except ValueError as exc:
            raise CheckpointError(f"{where}: model key {key!r}: {exc}") from None
        if name is not None:
            tensors[name] = _array(value, f"{where}: model key {key!r}")
    check_tensors(tensors, expected if expected is not None
                  else {k: v.shape for k, v in tensors.items()}, where, FLOAT32_OR_64)
    groups, by_index = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not groups or not isinstance(by_index, Mapping):
        raise CheckpointError(f"{where}: entry 'optimizer': not an optimizer state_dict "
                              f"(needs 'state' and 'param_groups')")
    numbered = [i for group in groups for i in group.get("params", [])]
    if numbered != list(range(len(names))):
        raise CheckpointError(f"{where}: optimizer param_groups number {len(numbered)} "
                              f"parameters, entry 'parameters' names {len(names)}")
    try:
        hyper = _hyper(groups, kind)
    except KeyError as exc:
        raise CheckpointError(f"{where}: optimizer param_groups have no {exc.args[0]!r} "
                              f"(entry 'optimizer_kind' says {kind!r}: another optimizer's "
                              f"state_dict?)") from None
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    slots: dict[str, dict[str, np.ndarray]] = {}
    steps = set()
    for index, held in by_index.items():
        if not (isinstance(index, int) and 0 <= index < len(names)) or not isinstance(held, Mapping):
            raise CheckpointError(f"{where}: optimizer state {index!r}: not one of the "
                                  f"{len(names)} parameters")
        key = names[index]
        for name, value in held.items():
            if name == "step" and kind == "adam":
                steps.add(int(float(value)))
            elif name not in OPTIMIZER_SLOTS[kind]:
                raise CheckpointError(f"{where}: optimizer state of {key!r}: unexpected entry "
                                      f"{name!r} (a {kind} state has "
                                      f"{', '.join(OPTIMIZER_SLOTS[kind])})")
            elif value is not None:  # SGD without momentum keeps None
                slots.setdefault(name, {})[key] = _array(value, f"{where}: slot {name!r} key {key!r}")
    if steps - {step}:
        raise CheckpointError(f"{where}: optimizer state took {sorted(steps)} steps, entry "
                              f"'step' says {step}")
    try:
        state = TrainingState(tensors, kind, slots, step, hyper, names)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    for name, values in slots.items():
        check_tensors(values, {k: v.shape for k, v in values.items()}, f"{where}: slot {name!r}",
                      FLOAT32_OR_64)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{where}: entry 'meta': must map str to str")
    return state, {**meta, "arch": arch}

# --- single tensors, for modules outside the project's own trees (``torch_impl/port.py``) ---
def to_canonical(value: np.ndarray, kind: str, flatten_from: tuple | None = None) -> np.ndarray:
    """One torch tensor in the canonical layout: torch's own for every kind but "scale", a
    per-channel scale stored broadcastable (ConvNeXt's ``layer_scale`` (C, 1, 1)): (C,)."""
    if kind == "scale":
        return np.ascontiguousarray(np.reshape(value, -1))
    return np.ascontiguousarray(value)


def from_canonical(value: np.ndarray, kind: str, shape: tuple,
                   flatten_from: tuple | None = None) -> np.ndarray:
    """Inverse of :func:`to_canonical` for a tensor of ``shape``."""
    if kind == "scale":
        return np.ascontiguousarray(np.reshape(value, shape))
    return np.ascontiguousarray(value)


def activation_to_canonical(value: np.ndarray, features_last: bool = False) -> np.ndarray:
    """A torch activation in the canonical layout: NCHW already, except the channels-last
    maps a Linear or LayerNorm returns inside a block that permuted to (N, H, W, C)."""
    value = np.asarray(value)
    if features_last and value.ndim == 4:
        return np.ascontiguousarray(value.transpose(0, 3, 1, 2))
    return value


def activation_from_canonical(value: np.ndarray) -> np.ndarray:
    """Inverse of :func:`activation_to_canonical` for the model's input: the identity."""
    return np.asarray(value)
