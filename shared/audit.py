"""Freeze audit: what a model will do to its "frozen" part in a training step.

Framework-free half of ``tf_impl/audit.py`` and ``torch_impl/audit.py``: the
report (one :class:`LayerRow` per interesting layer, a list of
:class:`Hazard`), the hazard catalogue with its plain-language fixes, the
error :func:`freeze_guard` raises, and the numpy snapshot diff it uses.

A hazard is a freezing mistake that fails silently: the code runs, the loss
goes down, and a tensor you meant to keep fixed moves (or the training-mode
loss stops being the inference-mode loss). Each code names one mechanism;
:data:`HAZARDS` says what triggers it and how to fix it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "HAZARDS",
    "AuditReport",
    "FrozenTensorChanged",
    "Hazard",
    "HazardKind",
    "LayerRow",
    "framework_of",
    "make_hazard",
    "snapshot_diff",
]


@dataclass(frozen=True)
class LayerRow:
    """One layer as a training step will run it."""

    name: str
    kind: str
    # its parameters that receive updates: "all", "none", "some", or "-" (it has none)
    params_trainable: str
    # normalisation in a training step: "batch" statistics, "stored" statistics, "-" (not a norm)
    norm_mode: str
    # a training step updates its running/moving statistics (None: not a norm layer)
    stats_updated: bool | None
    # dropout drops in a training step (None: not a dropout layer)
    dropout_active: bool | None


@dataclass(frozen=True)
class HazardKind:
    framework: str  # "torch", "tf" or "both"
    trigger: str
    fix: str


# The catalogue: a code never changes meaning; new mechanisms get new codes.
HAZARDS: dict[str, HazardKind] = {
    "TORCH_BN_FROZEN_PARAMS_BATCH_STATS": HazardKind(
        "torch",
        "BatchNorm with requires_grad=False parameters that model.train() leaves in training "
        "mode: it normalises with batch statistics and updates running_mean/running_var",
        "keep it in eval mode through every model.train() (override train() to re-apply "
        "base.eval(), as torch_impl.model.FineTuneModel.pin_inference does) or build the base "
        "with norm_layer=torchvision.ops.FrozenBatchNorm2d"),
    "TORCH_EVAL_UNDONE_BY_TRAIN": HazardKind(
        "torch",
        "a submodule is in eval mode only because of an earlier .eval() call while the model is "
        "in training mode; the next model.train() puts it back into training mode",
        "override the wrapper's train() to re-apply .eval() on that part after super().train() "
        "(or swap BatchNorm for torchvision.ops.FrozenBatchNorm2d)"),
    "TORCH_DROPOUT_ACTIVE_IN_FROZEN": HazardKind(
        "torch",
        "Dropout inside a part whose parameters are all frozen still drops in model.train(): "
        "requires_grad=False does not change a module's mode",
        "pin that part to eval mode in an overridden train(), or set the dropout probability "
        "to 0 there"),
    "TORCH_STOCHASTIC_DEPTH_ACTIVE_IN_FROZEN": HazardKind(
        "torch",
        "stochastic depth (torchvision.ops.StochasticDepth, timm's DropPath, or any "
        "parameter-free module whose output differs between train and eval mode) inside a "
        "frozen part still drops residual branches in model.train(): two passes of the same "
        "input differ",
        "pin that part to eval mode in an overridden train(), or build it with a stochastic "
        "depth probability of 0"),
    "TORCH_OPTIMIZER_FROZEN_PARAMS": HazardKind(
        "torch",
        "the optimizer holds requires_grad=False parameters in a param group with weight decay "
        "or momentum/Adam moments: any leftover gradient or state still moves them",
        "give the optimizer only the trainable parameters "
        "([p for p in model.parameters() if p.requires_grad]) and rebuild it after each freeze"),
    "TORCH_OPTIMIZER_MISSING_TRAINABLE": HazardKind(
        "torch",
        "trainable (requires_grad=True) parameters are in no param group of the optimizer: "
        "they get gradients but never change",
        "rebuild the optimizer from the current trainable parameters after unfreezing"),
    "TORCH_DDP_BROADCAST_FROZEN_BATCH_STATS": HazardKind(
        "torch",
        "a DistributedDataParallel model that copies rank 0's buffers at every forward "
        "(forward_sync_buffers=True, DDP's default, or the deprecated broadcast_buffers=True) "
        "whose frozen BatchNorm runs on batch statistics in training: each rank normalises with "
        "its own shard's statistics and updates its running statistics from it, and every "
        "forward then overwrites all ranks' statistics with rank 0's, so what is saved was "
        "learned from rank 0's shards only",
        "keep the frozen part in eval mode through every train() (pin it, as "
        "torch_impl.model.FineTuneModel.pin_inference does) or use "
        "torchvision.ops.FrozenBatchNorm2d: then there are no batch statistics to broadcast"),
    "TORCH_SYNC_BN_CONVERSION_LOST_FREEZE": HazardKind(
        "torch",
        "nn.SyncBatchNorm.convert_sync_batchnorm (or a hand-written conversion) produced a "
        "SyncBatchNorm whose BatchNorm before the conversion was frozen (requires_grad=False, or "
        "eval mode at the next train()) and now trains or runs on batch statistics",
        "re-apply the freeze after converting (requires_grad_(False) and the eval() pin), or "
        "convert only the part that trains (e.g. convert_sync_batchnorm(model.head))"),
    "TORCH_LORA_BASE_TRAINABLE": HazardKind(
        "torch",
        "a LoRA-wrapped layer (PEFT) whose base weight still has requires_grad=True: the "
        "optimizer updates the full weight beside the adapter, which is full fine-tuning, not "
        "LoRA",
        "freeze the base: base_layer.weight.requires_grad_(False) (PEFT's get_peft_model does "
        "it; after inject_adapter_in_model or a later requires_grad_(True) on the model, "
        "re-freeze every parameter but lora_A / lora_B)"),
    "KERAS_STOCHASTIC_DEPTH_ACTIVE_IN_FROZEN": HazardKind(
        "tf",
        "stochastic depth (a DropPath / StochasticDepth layer, parameter-free) inside a "
        "trainable=False part still drops residual branches under fit: trainable does not "
        "switch it off",
        "call the frozen part with training=False from a wrapper Layer or a subclassed "
        "model's call(), or build it with a drop-path rate of 0"),
    "KERAS_LORA_BASE_TRAINABLE": HazardKind(
        "tf",
        "a layer with enable_lora whose base kernel is trainable again (enable_lora sets "
        "kernel.trainable = False once; a later per-variable unfreeze, v.trainable = True for "
        "every weight, undoes it): fit updates the full kernel beside the adapter",
        "set layer._kernel.trainable = False again after any trainable change (enable_lora "
        "freezes it once), or set trainable per variable"),
    "KERAS_BN_FROZEN_BATCH_STATS": HazardKind(
        "tf",
        "a BatchNormalization with trainable=False still normalises with batch statistics in "
        "training (the pre-TF-2.0 behaviour): training-mode and inference-mode outputs differ",
        "use keras.layers.BatchNormalization, which runs in inference mode when "
        "trainable=False"),
    "KERAS_DROPOUT_ACTIVE_IN_FROZEN": HazardKind(
        "tf",
        "Dropout inside a trainable=False part still drops under fit: trainable does not "
        "switch Dropout off",
        "call the frozen part with training=False from a wrapper Layer or a subclassed "
        "model's call(), or set its dropout rate to 0"),
    "KERAS_FUNCTIONAL_TRAINING_FALSE_IGNORED": HazardKind(
        "tf",
        "a layer called with training=False inside a functional model contains trainable "
        "BatchNormalization or Dropout: fit passes training=True to every node of a functional "
        "graph and overrides the recorded training=False, so statistics update and Dropout drops",
        "call it from a wrapper Layer whose call() does inner(x, training=False), or make the "
        "outer model subclassed (tf_impl.model.FineTuneModel is)"),
    "KERAS_TRAINABLE_CHANGED_AFTER_FIT": HazardKind(
        "tf",
        "trainable was changed after fit without recompiling: the already traced train step "
        "still updates the variables it was traced for (frozen layers keep training, unfrozen "
        "ones do not train)",
        "recompile after every trainable change, with a NEW optimizer "
        "(model.compile(optimizer=type(opt).from_config(opt.get_config()), ...))"),
    "KERAS_MIRRORED_BN_REPLICA_STATS": HazardKind(
        "tf",
        "a BatchNormalization that updates its statistics in training, in a model built under a "
        "distribution strategy with more than one replica, without synchronized=True: each "
        "replica normalises with its own slice of the batch and keeps its own copy of the moving "
        "statistics; the copies drift apart and a read (get_weights, save) returns replica 0's",
        "build it with BatchNormalization(synchronized=True) (the batch moments are all-reduced "
        "over replicas), or freeze it (trainable=False runs it on stored statistics)"),
    "KERAS_OPTIMIZER_BUILT_FOR_OTHER_VARIABLES": HazardKind(
        "tf",
        "trainable variables the optimizer was not built for (unfrozen, then recompiled with "
        "the same optimizer instance): the next fit or apply_gradients fails with 'Unknown "
        "variable' (freezing, then reusing the optimizer, is harmless)",
        "compile with a NEW optimizer instance after changing trainable"),
}


@dataclass(frozen=True)
class Hazard:
    code: str
    # the layer (or common prefix of the layers) it concerns; "(model)" for the whole model
    layer: str
    message: str
    fix: str
    layers: tuple[str, ...] = ()


def _common_prefix(names: Sequence[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix: list[str] = []
    for segment in zip(*parts):
        if len(set(segment)) != 1:
            break
        prefix.append(segment[0])
    return ".".join(prefix) or "(model)"


def _listing(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def make_hazard(code: str, layers: Iterable[str], detail: str = "") -> Hazard:
    """One hazard of catalogue ``code`` covering ``layers`` (grouped under their common prefix)."""
    kind = HAZARDS[code]
    layers = tuple(layers)
    where = _common_prefix(layers) if layers else "(model)"
    count = ""
    if layers:
        count = f"{len(layers)} layer{'s' if len(layers) != 1 else ''} ({_listing(layers)}): "
    message = f"{count}{kind.trigger}" + (f"; {detail}" if detail else "")
    return Hazard(code, where, message, kind.fix, layers)


@dataclass
class AuditReport:
    framework: str
    rows: list[LayerRow]
    hazards: list[Hazard]
    # how the rows were obtained, when that limits what they show
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.hazards

    def codes(self) -> list[str]:
        return [h.code for h in self.hazards]

    def to_dict(self) -> dict:
        return {"framework": self.framework, "ok": self.ok,
                "rows": [asdict(r) for r in self.rows],
                "hazards": [{**asdict(h), "layers": list(h.layers)} for h in self.hazards],
                "notes": list(self.notes)}

    def render(self):
        """The rows as a rich Table; layers named by a hazard are red."""
        from rich.markup import escape
        from rich.table import Table

        flagged = {name for h in self.hazards for name in h.layers}
        n = len(self.hazards)
        verdict = f"{n} hazard{'s' if n != 1 else ''}" if n else "no hazards"
        table = Table(title=escape(f"freeze audit [{self.framework}]: {verdict}"))
        for column in ("layer", "kind", "params trainable", "norm in training",
                       "stats updated", "dropout active"):
            table.add_column(column)
        for row in self.rows:
            cells = (row.name, row.kind, row.params_trainable, row.norm_mode,
                     _cell(row.stats_updated), _cell(row.dropout_active))
            table.add_row(*map(escape, cells), style="red" if row.name in flagged else None)
        return table

    def hazard_lines(self) -> list[str]:
        """Plain text, two lines per hazard: what and where, then the fix."""
        lines = []
        for h in self.hazards:
            lines.append(f"{h.code} at {h.layer}: {h.message}")
            lines.append(f"  fix: {h.fix}")
        return lines


def _cell(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


class FrozenTensorChanged(AssertionError):
    """Tensors that had to stay fixed changed inside ``freeze_guard``."""

    def __init__(self, changes: Sequence[tuple[str, float]], framework: str = "",
                 reasons: Mapping[str, str] | None = None):
        self.changes = list(changes)
        # name -> why it counts as changed when not by value ("vanished", "shape ... -> ...")
        self.reasons = dict(reasons or {})
        where = f" [{framework}]" if framework else ""
        listing = "; ".join(f"{name} ({self.reasons.get(name) or f'max abs change {change:.6g}'})"
                            for name, change in self.changes)
        super().__init__(f"freeze_guard{where}: {len(self.changes)} frozen tensor"
                         f"{'s' if len(self.changes) != 1 else ''} changed: {listing}")


def snapshot_diff(before: Mapping[str, np.ndarray],
                  after: Mapping[str, np.ndarray]) -> list[tuple[str, float]]:
    """``(name, largest absolute change)`` for every tensor of ``before`` not bit-identical after.

    Frozen means bit-identical: no tolerance. A tensor missing from ``after``
    or with a new shape counts as changed by ``inf``; NaN compares equal to NaN.
    """
    changed = []
    for name, old in before.items():
        new = after.get(name)
        if new is None or np.shape(new) != np.shape(old):
            changed.append((name, float("inf")))
            continue
        old64 = np.asarray(old, dtype=np.float64)
        new64 = np.asarray(new, dtype=np.float64)
        if not np.array_equal(old64, new64, equal_nan=True):
            diff = np.abs(new64 - old64)
            finite = diff[~np.isnan(diff)]
            changed.append((name, float(finite.max()) if finite.size else float("nan")))
    return changed


def framework_of(model) -> str | None:
    """"torch" for an ``nn.Module``, "tf" for a Keras layer/model, else None; imports nothing.

    Walks the class hierarchy (a user's model class lives in the user's own
    module) and looks at where each base class was defined.
    """
    for cls in type(model).__mro__:
        root = (cls.__module__ or "").split(".")[0]
        if root == "torch":
            return "torch"
        if root == "keras":  # Keras 3 (tf_impl runs it on the TensorFlow backend)
            return "tf"
    return None
