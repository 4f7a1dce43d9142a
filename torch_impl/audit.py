"""Freeze audit and freeze guard for a PyTorch ``nn.Module``.

In torch a module's behaviour in a training step is in its flags: BatchNorm
normalises with batch statistics and updates its running statistics when
``module.training`` is True, whatever ``requires_grad`` says, and Dropout
drops when ``training`` is True. The audit reads those flags as the next
``model.train()`` will leave them: it calls ``model.train()`` (so a wrapper's
``train()`` override that pins a frozen base to eval mode counts) and then
puts every module's ``training`` flag back as it found it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d, StochasticDepth

from shared.audit import AuditReport, FrozenTensorChanged, LayerRow, make_hazard, snapshot_diff

__all__ = ["audit", "freeze_guard", "train_eval_losses"]

_BATCH_NORM = nn.modules.batchnorm._BatchNorm
_DROPOUT = nn.modules.dropout._DropoutNd
_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
# Stochastic depth drops whole residual branches in training mode like Dropout, but is no
# nn.Dropout and has no parameters or buffers. Known by type (torchvision) or class name
# (timm's DropPath, so timm is not imported), any other by behaviour (_mode_dependent).
_STOCHASTIC_DEPTH = (StochasticDepth,)
_STOCHASTIC_DEPTH_NAMES = ("DropPath",)
_PROBE_SHAPE = (8, 4, 4, 4)


@contextlib.contextmanager
def _flags_kept(model: nn.Module) -> Iterator[None]:
    """Restore every module's ``training`` flag on exit (without calling any train())."""
    flags = {module: module.training for module in model.modules()}
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training


def _modes_after_train(model: nn.Module) -> dict[str, bool]:
    """``training`` flag of every module as the next ``model.train()`` leaves it."""
    with _flags_kept(model):
        model.train()
        return {name: module.training for name, module in model.named_modules()}


def _params_state(params: list[nn.Parameter]) -> str:
    if not params:
        return "-"
    trainable = sum(p.requires_grad for p in params)
    return "all" if trainable == len(params) else "none" if trainable == 0 else "some"


def _frozen_part(modules: dict[str, nn.Module], name: str) -> bool:
    """The nearest module at or above ``name`` that has parameters has none trainable."""
    path = name.split(".") if name else []
    for depth in range(len(path), -1, -1):
        params = list(modules[".".join(path[:depth])].parameters())
        if params:
            return not any(p.requires_grad for p in params)
    return False


def _drop_probability(module: nn.Module) -> float | None:
    """Stochastic depth's drop probability for a known type, else None."""
    if isinstance(module, _STOCHASTIC_DEPTH):
        return float(module.p)
    if type(module).__name__ in _STOCHASTIC_DEPTH_NAMES and hasattr(module, "drop_prob"):
        return float(module.drop_prob or 0.0)
    return None


@torch.no_grad()
def _mode_dependent(module: nn.Module) -> bool:
    """A parameter-free module whose output on a probe differs between train and eval mode.

    The probe runs under a forked, seeded random state and restores the flag; a
    module that does not accept the probe counts as mode-independent.
    """
    training = module.training
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            x = torch.randn(_PROBE_SHAPE)
            module.train()
            train = module(x)
            module.eval()
            evaluation = module(x)
        return (isinstance(train, torch.Tensor) and isinstance(evaluation, torch.Tensor)
                and (train.shape != evaluation.shape or not torch.equal(train, evaluation)))
    except Exception:  # noqa: BLE001  (a module the probe cannot run: mode-independent)
        return False
    finally:
        module.training = training


def _stochastic(module: nn.Module) -> bool:
    """Drops in training mode without being an nn.Dropout (stochastic depth and the like)."""
    if isinstance(module, (_BATCH_NORM, FrozenBatchNorm2d, _DROPOUT)):
        return False
    if _drop_probability(module) is not None:
        return True
    return (next(module.parameters(recurse=False), None) is None
            and next(module.buffers(recurse=False), None) is None and _mode_dependent(module))


def _leaves(model: nn.Module):
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue
        if (isinstance(module, (_BATCH_NORM, FrozenBatchNorm2d, _DROPOUT))
                or next(module.parameters(recurse=False), None) is not None
                or next(module.buffers(recurse=False), None) is not None
                or _stochastic(module)):
            yield name, module


def _row(name: str, module: nn.Module, training: bool) -> LayerRow:
    params = _params_state(list(module.parameters(recurse=False)))
    label = name or "(model)"
    if isinstance(module, FrozenBatchNorm2d):
        return LayerRow(label, type(module).__name__, params, "stored", False, None)
    if isinstance(module, _BATCH_NORM):
        # torch uses batch statistics in training mode, or always when it keeps none.
        batch = training or module.running_mean is None
        updates = training and module.running_mean is not None
        return LayerRow(label, type(module).__name__, params, "batch" if batch else "stored",
                        updates, None)
    if isinstance(module, _DROPOUT):
        return LayerRow(label, type(module).__name__, params, "-", None, training and module.p > 0)
    if _stochastic(module):  # a known drop probability, or seen to depend on the mode
        p = _drop_probability(module)
        return LayerRow(label, type(module).__name__, params, "-", None,
                        training and (p is None or p > 0))
    return LayerRow(label, type(module).__name__, params, "-", None, None)


def _lora_base_trainable(module: nn.Module) -> bool:
    """PEFT's LoRA wrapper (a base layer and lora_A / lora_B, known by its parts: PEFT is not
    imported here) whose base weight still trains."""
    if not (hasattr(module, "get_base_layer") and isinstance(getattr(module, "lora_A", None),
                                                             nn.ModuleDict)):
        return False
    weight = getattr(module.get_base_layer(), "weight", None)
    return bool(len(module.lora_A)) and weight is not None and weight.requires_grad


def _optimizer_hazards(model: nn.Module, optimizer) -> list:
    names = {id(p): n for n, p in model.named_parameters()}
    held: set[int] = set()
    frozen_moving: list[str] = []
    for group in optimizer.param_groups:
        stateful = (group.get("weight_decay", 0) != 0 or group.get("momentum", 0) != 0
                    or "betas" in group)
        for p in group["params"]:
            held.add(id(p))
            if not p.requires_grad and (stateful or optimizer.state.get(p)):
                frozen_moving.append(names.get(id(p), f"(parameter not in the model, shape "
                                                      f"{tuple(p.shape)})"))
    hazards = []
    name = type(optimizer).__name__
    if frozen_moving:
        hazards.append(make_hazard("TORCH_OPTIMIZER_FROZEN_PARAMS", _owners(frozen_moving),
                                   f"optimizer {name} holds {len(frozen_moving)} such parameters"))
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        hazards.append(make_hazard("TORCH_OPTIMIZER_MISSING_TRAINABLE", _owners(missing),
                                   f"optimizer {name} lacks {len(missing)} trainable parameters"))
    return hazards


def _owners(parameter_names: list[str]) -> list[str]:
    """The modules owning ``parameter_names`` (``base.conv.weight`` -> ``base.conv``), in order."""
    return list(dict.fromkeys(n.rpartition(".")[0] or n for n in parameter_names))


def _replica_hazards(model: nn.Module, leaves, rows, modules) -> list:
    from torch.nn.parallel import DistributedDataParallel

    from torch_impl.distributed import BUFFER_SYNC_FLAG

    # whichever flag built it: torch 2.14 stores broadcast_buffers= as forward_sync_buffers
    if not (isinstance(model, DistributedDataParallel) and getattr(model, BUFFER_SYNC_FLAG)):
        return []
    frozen_batch = [row.name for (name, module), row in zip(leaves, rows)
                    if isinstance(module, _BATCH_NORM) and row.norm_mode == "batch"
                    and _frozen_part(modules, name)]
    return [make_hazard("TORCH_DDP_BROADCAST_FROZEN_BATCH_STATS", frozen_batch)] if frozen_batch else []


def _sync_conversion_hazards(model: nn.Module, reference: nn.Module, training) -> list:
    """SyncBatchNorm modules whose same-named BatchNorm in ``reference`` was frozen and is not now."""
    before = dict(reference.named_modules())
    reference_training = _modes_after_train(reference)
    lost = []
    for name, module in model.named_modules():
        # a DDP wrapper adds "module." in front of the wrapped model's names
        old_name = name if name in before else name.removeprefix("module.")
        old = before.get(old_name)
        if not isinstance(module, nn.SyncBatchNorm) or not isinstance(old, _BATCH_NORM):
            continue
        grads_lost = (any(p.requires_grad for p in module.parameters(recurse=False))
                      and not any(p.requires_grad for p in old.parameters(recurse=False)))
        eval_lost = training[name] and not reference_training[old_name]
        if grads_lost or eval_lost:
            lost.append(name)
    return [make_hazard("TORCH_SYNC_BN_CONVERSION_LOST_FREEZE", lost)] if lost else []


def audit(model: nn.Module, optimizer=None, reference: nn.Module | None = None) -> AuditReport:
    """Rows and hazards of ``model`` (and ``optimizer``) for the next training step.

    ``reference``: the model before a SyncBatchNorm conversion, to check that the
    conversion kept every frozen BatchNorm frozen. Leaves every flag, parameter and
    buffer of ``model`` (and ``reference``) as it found them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"audit needs a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    training = _modes_after_train(model)
    leaves = list(_leaves(model))
    rows = [_row(name, module, training[name]) for name, module in leaves]
    # Eval mode that only an earlier .eval() gave, while the model trains: train() undoes it.
    undone = [row.name for (name, module), row in zip(leaves, rows)
              if model.training and not module.training and training[name]
              and (row.norm_mode == "batch" or row.dropout_active)]
    bn_batch = [row.name for (name, module), row in zip(leaves, rows)
                if isinstance(module, _BATCH_NORM) and row.norm_mode == "batch"
                and _frozen_part(modules, name) and row.name not in undone]
    dropping = [(name, module, row) for (name, module), row in zip(leaves, rows)
                if row.dropout_active and _frozen_part(modules, name) and row.name not in undone]
    dropout = [row.name for _, module, row in dropping if isinstance(module, _DROPOUT)]
    depth = [row.name for _, module, row in dropping if not isinstance(module, _DROPOUT)]
    hazards = []
    if bn_batch:
        hazards.append(make_hazard("TORCH_BN_FROZEN_PARAMS_BATCH_STATS", bn_batch))
    if undone:
        hazards.append(make_hazard("TORCH_EVAL_UNDONE_BY_TRAIN", undone))
    if dropout:
        hazards.append(make_hazard("TORCH_DROPOUT_ACTIVE_IN_FROZEN", dropout))
    if depth:
        hazards.append(make_hazard("TORCH_STOCHASTIC_DEPTH_ACTIVE_IN_FROZEN", depth))
    lora = [name for name, module in modules.items() if _lora_base_trainable(module)]
    if lora:
        hazards.append(make_hazard("TORCH_LORA_BASE_TRAINABLE", lora))
    if optimizer is not None:
        hazards.extend(_optimizer_hazards(model, optimizer))
    hazards.extend(_replica_hazards(model, leaves, rows, modules))
    if reference is not None:
        hazards.extend(_sync_conversion_hazards(model, reference, training))
    return AuditReport("torch", rows, hazards)


def _guarded(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` that a training step must leave bit-identical."""
    modules = dict(model.named_modules())
    training = _modes_after_train(model)
    tensors = {name: p for name, p in model.named_parameters() if not p.requires_grad}
    for name, module in modules.items():
        prefix = f"{name}." if name else ""
        if isinstance(module, FrozenBatchNorm2d):
            tensors.update({prefix + b: t for b, t in module.named_buffers(recurse=False)})
        elif isinstance(module, _BATCH_NORM) and (not training[name]
                                                  or _frozen_part(modules, name)):
            tensors.update({prefix + b: t for b, t in module.named_buffers(recurse=False)
                            if b in _BN_STATS and t is not None})
    return tensors


def _snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: t.detach().cpu().numpy().copy() for name, t in tensors.items()}


def _by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` under its name, as the model holds them now."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


@contextlib.contextmanager
def freeze_guard(model: nn.Module) -> Iterator[list[str]]:
    """Raise :class:`FrozenTensorChanged` if the block changes a tensor that must stay fixed.

    Guarded: parameters with ``requires_grad=False``; the running statistics
    and ``num_batches_tracked`` of every BatchNorm that is frozen or that
    ``model.train()`` leaves in eval mode; FrozenBatchNorm2d buffers. Decided
    on entry; on exit the model's tensors are read again *by name* (so a
    buffer rebound with ``bn.running_mean = ...``, a ``model.to(...)`` or a
    ``load_state_dict(..., assign=True)`` is seen, not the stale objects of
    entry) and compared bit for bit, dtype included; a guarded name that
    vanished or changed shape is named as such. Yields the guarded names.
    """
    tensors = _guarded(model)
    before = _snapshot(tensors)
    dtypes = {name: t.dtype for name, t in tensors.items()}
    yield list(tensors)
    now = _by_name(model)
    after = _snapshot({name: now[name] for name in before if name in now})
    reasons = {name: "vanished" for name in before if name not in now}
    reasons.update({name: f"shape {tuple(before[name].shape)} -> {tuple(after[name].shape)}"
                    for name in after if after[name].shape != before[name].shape})
    changes = snapshot_diff(before, after)
    for name in after:
        if name not in reasons and now[name].dtype != dtypes[name]:
            reasons[name] = f"dtype {dtypes[name]} -> {now[name].dtype}"
            if name not in dict(changes):
                changes.append((name, 0.0))
    if changes:
        raise FrozenTensorChanged(changes, "torch", reasons)


def train_eval_losses(model: nn.Module, batch, loss_fn) -> tuple[float, float]:
    """``loss_fn(model(x), y)`` after ``model.train()`` and after ``model.eval()``, same weights.

    Nothing is updated: no gradients, every buffer (BatchNorm statistics), every
    module's mode and the CPU random state are restored afterwards.
    """
    x, y = batch
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    devices = [x.device] if x.device.type == "cuda" else []

    def restore():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])

    with _flags_kept(model), torch.no_grad(), torch.random.fork_rng(devices=devices):
        try:
            model.train()
            train = float(loss_fn(model(x), y))
            restore()
            model.eval()
            evaluation = float(loss_fn(model(x), y))
        finally:
            restore()
    return train, evaluation
