"""Freeze audit and freeze guard for a Keras 3 model (TensorFlow backend).

In Keras a layer's behaviour in a training step depends on the ``training``
value that reaches its ``call`` and on its own ``trainable`` flag:
BatchNormalization uses batch statistics and updates its moving statistics
only when ``training and self.trainable``; Dropout drops whenever
``training`` is True, frozen or not. ``fit`` calls ``model(x, training=True)``,
and a functional model hands that value to every node, overriding a
``training=False`` written in the graph. The audit therefore runs the model
once as ``fit`` does (``model(x, training=True)`` on a small random batch)
and records the ``training`` value each BatchNormalization and Dropout
receives; the probe passes ``training=False`` on to them, so it updates no
statistics and draws no random numbers, and every variable is restored
afterwards. Without an input shape (a subclassed model never called) the
rows assume ``training=True`` reaches every layer, and say so in the notes.

Keras internals relied on (3.15): ``Layer._flatten_layers`` (the layer
tree), ``Layer._trainable_variables`` (variables created trainable),
``Layer._build_shapes_dict`` (input shape of a subclassed model),
``Functional._nodes_by_depth`` and ``Node.arguments.kwargs`` (the call
arguments recorded in a functional graph), ``Optimizer._trainable_variables``
(the variables an optimizer was built for) and ``Model.train_function``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import keras
import numpy as np

from shared.audit import AuditReport, FrozenTensorChanged, LayerRow, make_hazard, snapshot_diff
from tf_impl.model import LegacyBatchNormalization

__all__ = ["audit", "freeze_guard", "train_eval_losses"]

_BATCH_NORM = keras.layers.BatchNormalization
_DROPOUT = (keras.layers.Dropout, keras.layers.GaussianDropout, keras.layers.AlphaDropout,
            keras.layers.GaussianNoise)
_PROBE_BATCH = 2
# parameter-free stochastic depth, known by name: the project's ViT DropPath (tf_impl/vit.py),
# keras.applications.convnext's StochasticDepth
_STOCHASTIC_DEPTH_NAMES = ("DropPath", "StochasticDepth")


def _is_stochastic_depth(layer) -> bool:
    return type(layer).__name__ in _STOCHASTIC_DEPTH_NAMES and not layer.weights


def _depth_rate(layer) -> float:
    return float(getattr(layer, "rate", getattr(layer, "drop_path_rate", 0.0)) or 0.0)


def _children(layer):
    """``(name, child)``: a project layer's ``named_children`` name, else the Keras name."""
    named = {id(child): name for name, child in
             (layer.named_children() if hasattr(layer, "named_children") else [])}
    for child in layer._flatten_layers(include_self=False, recursive=False):
        if not isinstance(child, keras.layers.InputLayer):
            yield named.get(id(child), child.name), child


def _tree(model) -> list[tuple[str, object, tuple]]:
    """``(dotted path, layer, ancestors outermost first)`` for every layer under ``model``."""
    out, seen = [], {id(model)}

    def walk(layer, prefix: str, ancestors: tuple):
        for name, child in _children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}.{name}" if prefix else name
            out.append((path, child, ancestors))
            walk(child, path, ancestors + (child,))

    walk(model, "", (model,))
    return out


def _is_leaf(layer) -> bool:
    return not layer._flatten_layers(include_self=False, recursive=False)


def _drop_rate(layer) -> float:
    return float(getattr(layer, "rate", getattr(layer, "stddev", 0.0)) or 0.0)


def _probe_input(model):
    """A small random batch the model accepts, or None when its input shape is unknown."""
    inputs = getattr(model, "inputs", None)
    if inputs:
        specs = [(tuple(t.shape), t.dtype) for t in inputs]
    else:
        shapes = getattr(model, "_build_shapes_dict", None) or {}
        if len(shapes) != 1:
            return None
        shape = next(iter(shapes.values()))
        if not isinstance(shape, (tuple, list)) or not all(d is None or isinstance(d, int)
                                                           for d in shape):
            return None
        specs = [(tuple(shape), "float32")]
    rng = np.random.default_rng(0)
    arrays = []
    for shape, dtype in specs:
        if not shape or any(d is None for d in shape[1:]):
            return None
        shape = (_PROBE_BATCH,) + shape[1:]
        if "int" in str(dtype):
            arrays.append(np.zeros(shape, dtype=str(dtype)))
        else:
            arrays.append(rng.standard_normal(shape).astype(str(dtype)))
    return arrays[0] if len(arrays) == 1 else arrays


def _numpy(variable) -> np.ndarray:
    # Variable.numpy(): np.array(variable) warns under numpy 2 (no `copy` keyword in __array__).
    return np.array(variable.numpy(), copy=True)


@contextlib.contextmanager
def _variables_kept(model) -> Iterator[None]:
    """Assign every variable (weights, statistics, random seeds) its value from entry, on exit."""
    saved = [(v, _numpy(v)) for v in model.variables]
    try:
        yield
    finally:
        for v, value in saved:
            v.assign(value)


def _training_seen(model, layers) -> tuple[dict[int, bool] | None, str]:
    """The ``training`` value each of ``layers`` receives in ``model(x, training=True)``.

    ``(None, why)`` when the model cannot be run on a probe batch.
    """
    x = _probe_input(model)
    if x is None:
        return None, "no input shape to run the model on"
    if not layers:
        return {}, ""
    seen: dict[int, bool] = {}

    def spy(layer, original):
        def call(*args, **kwargs):
            seen[id(layer)] = bool(kwargs.get("training"))
            if "training" in kwargs:
                kwargs["training"] = False  # no statistics update, no random draw
            return original(*args, **kwargs)
        return call

    for layer in layers:
        object.__setattr__(layer, "call", spy(layer, layer.call))
    try:
        with _variables_kept(model):
            model(x, training=True)
    except Exception as exc:  # noqa: BLE001  (a model the probe cannot run: static rows)
        first = (str(exc).splitlines() or [""])[0][:120]
        return None, f"the probe call failed ({type(exc).__name__}: {first})"
    finally:
        for layer in layers:
            object.__delattr__(layer, "call")
    return seen, ""


def _params_state(layer, effective: set[int]) -> str:
    params = list(getattr(layer, "_trainable_variables", layer.trainable_weights))
    if not params:
        return "-"
    trainable = sum(id(v) in effective for v in params)
    return "all" if trainable == len(params) else "none" if trainable == 0 else "some"


def _frozen_part(layer, ancestors: tuple, effective: set[int]) -> bool:
    """The nearest layer at or above ``layer`` that has weights has none that train."""
    for candidate in (layer,) + tuple(reversed(ancestors)):
        if candidate.weights:
            return not any(id(v) in effective for v in candidate.weights)
    return False


def _rows(model, tree, effective: set[int]):
    """Rows, plus the notes that say how the training values were obtained."""
    leaves = [(p, layer, a) for p, layer, a in tree if _is_leaf(layer)
              and (isinstance(layer, (_BATCH_NORM,) + _DROPOUT) or layer.weights
                   or _is_stochastic_depth(layer))]
    modal = [layer for _, layer, _ in leaves if isinstance(layer, (_BATCH_NORM,) + _DROPOUT)
             or _is_stochastic_depth(layer)]
    seen, why = _training_seen(model, modal)
    notes = []
    if seen is None:
        notes.append(f"{why}: rows assume fit's training=True reaches every layer "
                     "(a call() that passes training=False is not seen)")
        seen = {}
    rows = []
    for path, layer, _ in leaves:
        training = seen.get(id(layer), True)
        params = _params_state(layer, effective)
        kind = type(layer).__name__
        if isinstance(layer, _BATCH_NORM):
            # Keras's rule: `training and self.trainable`; the legacy layer uses batch
            # statistics whenever training (tf_impl.model.LegacyBatchNormalization).
            updates = training and layer.trainable
            batch = training if isinstance(layer, LegacyBatchNormalization) else updates
            rows.append(LayerRow(path, kind, params, "batch" if batch else "stored", updates, None))
        elif isinstance(layer, _DROPOUT):
            rows.append(LayerRow(path, kind, params, "-", None, training and _drop_rate(layer) > 0))
        elif _is_stochastic_depth(layer):
            rows.append(LayerRow(path, kind, params, "-", None,
                                 training and _depth_rate(layer) > 0))
        else:
            rows.append(LayerRow(path, kind, params, "-", None, None))
    return leaves, rows, notes


def _subtree(layer, tree) -> list[tuple[str, object]]:
    """``(path, layer)`` for ``layer`` and everything under it."""
    return [(p, child) for p, child, ancestors in tree if child is layer or layer in ancestors]


def _functional_hazards(model, tree) -> list:
    hazards = []
    for container in [model] + [layer for _, layer, _ in tree]:
        nodes_by_depth = getattr(container, "_nodes_by_depth", None)
        if not isinstance(nodes_by_depth, dict):
            continue
        for nodes in nodes_by_depth.values():
            for node in nodes:
                op = node.operation
                if node.arguments.kwargs.get("training") is not False:
                    continue
                # Keras records a call's default training value too: only a default other
                # than False makes a recorded False something the user wrote.
                default = inspect.signature(op.call).parameters.get("training")
                if default is not None and default.default is False:
                    continue
                affected = [p for p, layer in _subtree(op, tree)
                            if (isinstance(layer, _BATCH_NORM) and layer.trainable)
                            or (isinstance(layer, _DROPOUT) and _drop_rate(layer) > 0)]
                if affected:
                    where = next((p for p, layer, _ in tree if layer is op), op.name)
                    hazards.append(make_hazard("KERAS_FUNCTIONAL_TRAINING_FALSE_IGNORED", affected,
                                               f"{where!r} is called with training=False in "
                                               f"functional model {container.name!r}"))
    return hazards


def _variable_owners(tree) -> dict[int, str]:
    owners = {}
    for path, layer, _ in tree:  # pre-order: the deepest owner is written last
        for v in layer.weights:
            owners[id(v)] = path
    return owners


def _optimizer_hazards(model, optimizer, tree) -> list:
    own = optimizer is None
    optimizer = getattr(model, "optimizer", None) if own else optimizer
    tracked = getattr(optimizer, "_trainable_variables", None)
    if optimizer is None or not getattr(optimizer, "built", False) or tracked is None:
        return []
    tracked_ids = {id(v) for v in tracked}
    current = model.trainable_variables
    current_ids = {id(v) for v in current}
    if tracked_ids == current_ids:
        return []
    owners = _variable_owners(tree)
    frozen_since = [v for v in tracked if id(v) not in current_ids]
    unfrozen_since = [v for v in current if id(v) not in tracked_ids]
    layers = sorted({owners.get(id(v), v.path) for v in frozen_since + unfrozen_since})
    detail = (f"optimizer {type(optimizer).__name__} was built for {len(tracked)} variables; "
              f"{len(frozen_since)} of them are frozen now, {len(unfrozen_since)} trainable "
              f"variables are new to it")
    traced = own and getattr(model, "train_function", None) is not None
    if traced:  # the traced step ignores the change in either direction
        return [make_hazard("KERAS_TRAINABLE_CHANGED_AFTER_FIT", layers, detail)]
    if not unfrozen_since:
        # Frozen since the optimizer was built, then recompiled (or stepped) with it: it
        # updates the subset it is given and keeps the extra slots, which is harmless.
        return []
    layers = sorted({owners.get(id(v), v.path) for v in unfrozen_since})
    return [make_hazard("KERAS_OPTIMIZER_BUILT_FOR_OTHER_VARIABLES", layers, detail)]


def _replica_hazards(model, leaves, rows) -> list:
    """BN layers that update per-replica statistics under a multi-replica strategy."""
    drifting = [row.name for (_, layer, _), row in zip(leaves, rows)
                if row.stats_updated and not getattr(layer, "synchronized", False)
                and len(getattr(layer.moving_mean.value, "values", ())) > 1]
    return [make_hazard("KERAS_MIRRORED_BN_REPLICA_STATS", drifting)] if drifting else []


def audit(model, optimizer=None) -> AuditReport:
    """Rows and hazards of ``model`` (and its or the given optimizer) for the next ``fit`` step.

    Leaves every variable and flag of ``model`` as it found them.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"audit needs a keras.Model, got {type(model).__name__}")
    tree = _tree(model)
    effective = {id(v) for v in model.trainable_variables}
    leaves, rows, notes = _rows(model, tree, effective)
    hazards = _functional_hazards(model, tree)
    explained = {p for h in hazards for p in h.layers}
    bn_batch = [row.name for row in rows
                if row.norm_mode == "batch" and row.params_trainable == "none"]
    dropping = [(layer, row) for (_, layer, ancestors), row in zip(leaves, rows)
                if row.dropout_active and row.name not in explained
                and _frozen_part(layer, ancestors, effective)]
    dropout = [row.name for layer, row in dropping if not _is_stochastic_depth(layer)]
    depth = [row.name for layer, row in dropping if _is_stochastic_depth(layer)]
    lora = [path for path, layer, _ in tree if getattr(layer, "lora_enabled", False)
            and id(layer._kernel) in effective]
    if bn_batch:
        hazards.append(make_hazard("KERAS_BN_FROZEN_BATCH_STATS", bn_batch))
    if dropout:
        hazards.append(make_hazard("KERAS_DROPOUT_ACTIVE_IN_FROZEN", dropout))
    if depth:
        hazards.append(make_hazard("KERAS_STOCHASTIC_DEPTH_ACTIVE_IN_FROZEN", depth))
    if lora:
        hazards.append(make_hazard("KERAS_LORA_BASE_TRAINABLE", lora))
    hazards.extend(_optimizer_hazards(model, optimizer, tree))
    hazards.extend(_replica_hazards(model, leaves, rows))
    return AuditReport("tf", rows, hazards, notes)


def _guarded(model) -> dict[str, object]:
    """Every variable of ``model`` that a training step must leave bit-identical."""
    tree = _tree(model)
    effective = {id(v) for v in model.trainable_variables}
    leaves, rows, _ = _rows(model, tree, effective)
    updating = {id(v) for (_, layer, _), row in zip(leaves, rows) if row.stats_updated
                for v in (layer.moving_mean, layer.moving_variance)}
    owners = _variable_owners(tree)
    return {f"{owners.get(id(v), model.name)}.{v.name}": v for v in model.weights
            if id(v) not in effective and id(v) not in updating}


def _snapshot(variables: dict[str, object]) -> dict[str, np.ndarray]:
    return {name: _numpy(v) for name, v in variables.items()}


@contextlib.contextmanager
def freeze_guard(model) -> Iterator[list[str]]:
    """Raise :class:`FrozenTensorChanged` if the block changes a variable that must stay fixed.

    Guarded: every weight outside ``model.trainable_variables`` (frozen
    kernels, biases, BatchNorm gamma/beta) and the moving statistics of every
    BatchNormalization that a ``fit`` step runs in inference mode. Decided on
    entry, compared bit for bit on exit. Yields the guarded names.
    """
    variables = _guarded(model)
    before = _snapshot(variables)
    yield list(variables)
    changes = snapshot_diff(before, _snapshot(variables))
    if changes:
        raise FrozenTensorChanged(changes, "tf")


def train_eval_losses(model, batch, loss_fn) -> tuple[float, float]:
    """``loss_fn(y, model(x, training=True))`` and with ``training=False``, same weights.

    Nothing is updated: every variable (BatchNorm statistics, random seed
    states) is restored afterwards. ``loss_fn`` takes ``(y_true, y_pred)``,
    the Keras convention.
    """
    x, y = batch
    with _variables_kept(model):
        train = float(keras.ops.convert_to_numpy(loss_fn(y, model(x, training=True))))
    with _variables_kept(model):
        evaluation = float(keras.ops.convert_to_numpy(loss_fn(y, model(x, training=False))))
    return train, evaluation
