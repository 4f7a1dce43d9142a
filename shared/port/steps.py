"""The K training steps of the port check, judged lockstep: one step at a time from one state.

Each side trains as its user set it up (Keras: ``model(x, training=True)`` and
``trainable_variables``; torch: ``model.train()``, ``requires_grad``, the user's
optimizer groups). The torch model takes its K steps; before each of them its state
(every paired tensor, BatchNorm statistics included, and the optimizer's slots and step
count) goes through the pairing into the Keras model and optimizer, which takes the same
step on the same batch. The two one-step results are compared as ``shared.lockstep``
compares the project's own runs, with its one-step bounds (``LOCKSTEP_*``), whatever
the step number:

* training- and inference-mode losses of the same weights on the same batch
  (``PORT_STEP_LOSS``);
* which tensors moved at all, exactly (``PORT_MOVED_ONE_SIDE``);
* each BatchNorm statistic's change (``PORT_STATS_DIVERGE``): a batch mean's rounding
  over the layer's batch x H x W values, times the momentum; a Keras running variance
  updated with the biased variance is judged against what that convention gives from
  torch's step (``PORT_BN_VARIANCE_CONVENTION``, expected, is listed apart);
* each parameter's change and each optimizer slot (``PORT_STEP_UPDATE``): the gradient's
  rounding (coarser where it runs through BatchNorm on batch statistics, finer elsewhere;
  Adam's sensitivity where v is small).

No allowance grows with the number of steps: a 3x learning rate, a BatchNorm momentum
left unconverted or a weight decay on one side leaves its bound at the first step it acts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from shared import tolerances as tol
from shared.lockstep import (
    Check,
    StepBounds,
    adam_rounding,
    loss_check,
    moved_check,
    tensor_check,
)
from shared.port.divergence import make_batches
from shared.port.findings import EXPECTED_CODES, Finding, make_finding
from shared.port.records import Pair

__all__ = ["ADAM_EPSILON", "BOUNDS", "run_steps"]

# Adam's epsilon on both sides: Keras adds it before the bias correction, torch after, so
# parity needs one too small to matter (the project's RunConfig.adam_epsilon, FACTS.md).
ADAM_EPSILON = 1e-12

# float32 one-step bounds (shared/tolerances.py, LOCKSTEP_*); BatchNorm statistics get theirs
# per layer (_stats_rtol)
BOUNDS = StepBounds("LOCKSTEP", tol.LOCKSTEP_LOSS_ATOL, tol.LOCKSTEP_LOSS_RTOL,
                    tol.LOCKSTEP_ULPS, tol.LOCKSTEP_UPDATE_RTOL, tol.LOCKSTEP_SLOT_RTOL,
                    tol.LOCKSTEP_BATCH_STATS_RTOL, float(np.finfo(np.float32).eps), 0.0)

_STATISTICS = ("running_mean", "running_var")  # tensors a BatchNorm updates itself
# optimizer settings whose difference changes the step (compared before any step is taken)
_SETTINGS = ("learning_rate", "momentum", "dampening", "nesterov", "beta_1", "beta_2",
             "epsilon", "weight_decay", "decoupled_weight_decay")


def run_steps(kp, tp, keras_model, torch_model, pairs: Sequence[Pair], tensors, chw, *,
              steps: int, optimizer: str, learning_rate: float, batch_size: int, seed: int,
              names: tuple[str, str], keras_optimizer=None, torch_optimizer=None, guarded,
              training_judged: bool = True, forward_rtol: float = tol.FORWARD_RTOL,
              deep: bool = False):
    """Run ``steps`` lockstep steps; (step rows, moved rows, findings, expected, the steps'
    bounds, notes). ``training_judged`` False (a training-mode BatchNorm over too few
    values, PORT_BN_MIN_VALUES): only which tensors moved and the inference-mode loss."""
    out_shape = pairs[-1].torch.output_shape if pairs else ()
    classes = out_shape[0] if len(out_shape) == 1 else None
    batches = make_batches(chw, steps, batch_size, classes, seed + 2)
    setup = {"optimizer": optimizer, "learning_rate": learning_rate,
             "adam_epsilon": ADAM_EPSILON, "loss": "cross_entropy" if classes
             else "mean_square"}
    bounds = _bounds_dict()
    which = (f"{optimizer} (lr {learning_rate:g})" if keras_optimizer is None
             and torch_optimizer is None else "the given optimizers")
    notes = [(f"{steps} steps of {which}, lockstep: "
              f"before each, torch's tensors and optimizer slots are loaded into the Keras "
              f"model through the pairing; one-step bounds (LOCKSTEP), seeded batches of "
              f"{batch_size}, dropout off on both sides; {setup['loss']} loss")]
    with guarded(names[0], "the training steps", kp.Stepper, keras_model,
                 [p.keras for p in pairs], setup, keras_optimizer) as ks, \
            guarded(names[1], "the training steps", tp.Stepper, torch_model,
                    [p.torch for p in pairs], setup, torch_optimizer) as ts:
        refused = _optimizer_findings(ks, ts)
        if any(f.code == "PORT_OPTIMIZER_KIND" for f in refused):
            notes.append("no training steps: the optimizers' states cannot be carried from "
                         "one side to the other (PORT_OPTIMIZER_KIND)")
            return [], [], refused, [], bounds, notes
        if not training_judged:
            notes.append("training steps: only which tensors moved and the inference-mode "
                         "loss are judged (training mode is not, see the note above)")
        step_rows, moved, per_code, convention, rounding_steps = [], {}, {}, [], []
        for i, (x, y) in enumerate(batches):
            start = ts.state()
            ks.load(_to_keras(pairs, start))
            k_losses = guarded(names[0], f"training step {i}", ks.step, x, y)
            k_after = ks.state()
            t_losses = guarded(names[1], f"training step {i}", ts.step, x, y)
            t_after = ts.state()
            args = (pairs, start, k_after, t_after, k_losses, t_losses, ts, batch_size,
                    training_judged, forward_rtol, deep)
            seen: list = []  # this step's variance-convention pairs
            checks = _compare_step(*args, seen)
            if any(c.outside and c.check != "moved" for _, c in checks):
                # outside a one-step bound: how far torch's own float32 is from float64 on
                # this very step measures that tensor's rounding here (a deep net's
                # BatchNorm backward over few values amplifies it past the bounds)
                departure = _torch_departure(ts, start, x, y, t_losses, t_after)
                if departure is not None:
                    seen = []
                    checks = _compare_step(*args, seen, departure)
                    rounding_steps.append(i)
            convention += seen
            worst = max((c for _, c in checks), key=lambda c: c.ratio, default=None)
            step_rows.append({"step": i, "keras_train": k_losses[0], "keras_eval": k_losses[1],
                              "torch_train": t_losses[0], "torch_eval": t_losses[1],
                              "worst": worst.describe("keras") if worst else "",
                              "ratio": float(worst.ratio) if worst else 0.0})
            _tally(moved, pairs, start, k_after, t_after)
            for p, c in checks:
                if c.outside:
                    per_code.setdefault(_code(c), []).append((i, p, c))
    if rounding_steps:
        notes.append(f"steps {', '.join(map(str, rounding_steps))}: checks outside a one-step "
                     f"bound were judged again with ENVELOPE_MULTIPLE x torch's own float32 "
                     f"departure from the same step in float64")
    findings = refused + [_finding(code, hits) for code, hits in per_code.items()]
    expected = []
    if convention:
        p, kc, tc = convention[0]
        expected.append(make_finding(
            "PORT_BN_VARIANCE_CONVENTION", p,
            f"{p.keras.params['variance_update']} (running_var changed by {kc:.3g})",
            f"{p.torch.params['variance_update']} (running_var changed by {tc:.3g})",
            f"{len({q.label for q, _, _ in convention})} BatchNorm pairs, first shown; judged "
            f"against what the Keras convention gives from torch's step"))
    findings = [f for f in findings if f.code not in EXPECTED_CODES]
    rows = [dict(row, keras_moved=row["keras_change"] > 0, torch_moved=row["torch_change"] > 0)
            for row in moved.values()]
    return step_rows, rows, findings, expected, bounds, notes


def _bounds_dict() -> dict:
    return {"name": BOUNDS.name, "atol": BOUNDS.loss_atol, "rtol": BOUNDS.loss_rtol,
            "ulps": BOUNDS.ulps, "update_rtol": BOUNDS.update_rtol,
            "slot_rtol": BOUNDS.slot_rtol, "batch_stats_rtol": BOUNDS.batch_stats_rtol,
            "stats_sum_c": tol.LOCKSTEP_STATS_SUM_C}


def _optimizer_findings(ks, ts) -> list[Finding]:
    """A kind whose state cannot be carried over, or settings that differ: findings."""
    kinds = (ks.kind, ts.kind)
    if None in kinds or kinds[0] != kinds[1]:
        name = (type(ks.optimizer).__name__, type(ts.optimizer).__name__)
        return [make_finding("PORT_OPTIMIZER_KIND", None, f"{name[0]} ({kinds[0] or 'no canonical state'})",
                             f"{name[1]} ({kinds[1] or 'no canonical state'})",
                             keras_layer="(optimizer)", torch_layer="(optimizer)")]
    out = []
    for key in _SETTINGS:
        a, b = ks.hyper.get(key), ts.hyper.get(key)
        if a is None or b is None or (key == "decoupled_weight_decay"
                                       and not (ks.hyper["weight_decay"] or ts.hyper["weight_decay"])):
            continue
        same = a == b if isinstance(a, bool) else math.isclose(
            a, b, rel_tol=float(np.finfo(np.float32).eps), abs_tol=0.0)
        if not same:
            out.append(make_finding("PORT_OPTIMIZER_SETTINGS", None, f"{key} {a:g}",
                                    f"{key} {b:g}", keras_layer="(optimizer)",
                                    torch_layer="(optimizer)"))
    return out


def _to_keras(pairs: Sequence[Pair], state: dict) -> dict:
    """torch's state (by torch leaf) keyed by the Keras leaves it pairs with."""
    def by_keras(values: dict) -> dict:
        return {p.keras.name: values[p.torch.name] for p in pairs if p.torch.name in values}
    return {"tensors": by_keras(state["tensors"]),
            "slots": {name: by_keras(values) for name, values in state["slots"].items()},
            "step": state["step"]}


def _reduction(p: Pair, batch_size: int) -> int:
    """Values one channel's batch mean is over: batch x the spatial size of the output."""
    return batch_size * int(np.prod(p.torch.output_shape[1:], dtype=np.int64))


def _stats_rtol(p: Pair, batch_size: int) -> float:
    """LOCKSTEP_STATS_SUM_C x m x sqrt(n) x eps of the statistic's largest |value|."""
    momentum = float(p.torch.params.get("momentum") or 0.1)
    return (tol.LOCKSTEP_STATS_SUM_C * momentum * math.sqrt(_reduction(p, batch_size))
            * BOUNDS.eps)


def _torch_departure(ts, start, x, y, losses32, after32) -> dict | None:
    """(pair-free) torch float32 vs float64 of the same step: ``{"losses": (train, eval),
    ("tensors", leaf, key): array, (slot, leaf, key): array}``; None where the model
    cannot run in float64."""
    try:
        losses64, after64 = ts.float64_step(start, x, y)
    except Exception:  # noqa: BLE001  (a user model that cannot run in float64)
        ts.load(after32)
        return None
    ts.load(after32)
    out = {"losses": tuple(abs(a - b) for a, b in zip(losses32, losses64))}
    for leaf, tensors in after32["tensors"].items():
        for key, value in tensors.items():
            out[("tensors", leaf, key)] = np.abs(np.asarray(value, np.float64)
                                                 - after64["tensors"][leaf][key])
    for name, leaves in after32["slots"].items():
        for leaf, tensors in leaves.items():
            for key, value in tensors.items():
                exact = after64["slots"].get(name, {}).get(leaf, {}).get(key)
                if exact is not None:
                    out[(name, leaf, key)] = np.abs(np.asarray(value, np.float64) - exact)
    return out


def _loss_within(name: str, keras: float, torch: float, rounding: float) -> Check:
    """:func:`loss_check`, its bound widened by ENVELOPE_MULTIPLE x ``rounding``."""
    c = loss_check(name, keras, torch, BOUNDS)
    bound = c.bound + tol.ENVELOPE_MULTIPLE * rounding
    return Check(c.check, c.key, c.diff, bound, c.diff / bound if bound > 0 else 0.0, c.tf,
                 c.torch)


def _compare_step(pairs, start, k_after, t_after, k_losses, t_losses, ts, batch_size,
                  training_judged, forward_rtol, deep, convention,
                  departure=None) -> list[tuple[Pair | None, Check]]:
    """Every check of one step (``departure``: torch's own float32 rounding of the step,
    elementwise, added ENVELOPE_MULTIPLE times); ``convention`` collects the pairs judged
    with the Keras variance convention."""
    b = BOUNDS
    batch_rtol = tol.PORT_DEEP_BATCH_STATS_UPDATE_RTOL if deep else b.batch_stats_rtol
    dep = departure or {}
    rounding = dep.get("losses", (0.0, 0.0))
    checks: list[tuple[Pair | None, Check]] = [
        (None, _loss_within("eval_loss", k_losses[1], t_losses[1], rounding[1]))]
    if training_judged:
        checks.insert(0, (None, _loss_within("train_loss", k_losses[0], t_losses[0],
                                             rounding[0])))
    trained_bn = [i for i, p in enumerate(pairs) if p.keras.kind == "bn" and any(
        not np.array_equal(after["tensors"][name].get("running_mean"),
                           start["tensors"][p.torch.name].get("running_mean"))
        for after, name in ((k_after, p.keras.name), (t_after, p.torch.name))
        if "running_mean" in after["tensors"][name])]
    last_batch_bn = max(trained_bn, default=-1)
    for i, p in enumerate(pairs):
        s, k, t = (start["tensors"][p.torch.name], k_after["tensors"][p.keras.name],
                   t_after["tensors"][p.torch.name])
        batchy = i <= last_batch_bn  # its gradient runs through BatchNorm on batch statistics
        # the pair's largest parameter change: a gradient that cancels to about 0 (a bias
        # before a training-mode BatchNorm, which normalises it away) is rounding of the
        # layer's gradient terms, whose scale its other tensors show
        layer_change = max((float(np.abs(np.asarray(t[key], np.float64) - s[key]).max(
            initial=0.0)) for key in set(s) & set(t) if key not in _STATISTICS), default=0.0)
        for key in sorted(set(s) & set(k)):
            if np.shape(s[key]) != np.shape(k[key]):
                continue  # another LoRA rank on the other side: the lint names it
            s_v, k_v, t_v = s[key], k[key], t[key]
            envelope = tol.ENVELOPE_MULTIPLE * dep.get(("tensors", p.torch.name, key), 0.0)
            moved = moved_check(f"{p.label} {key}", s_v, k_v, t_v, b, b.update_rtol)
            if moved is not None:
                checks.append((p, moved))
                continue
            if not training_judged:
                continue
            if key in _STATISTICS:
                if key == "running_var" and _biased_on_keras(p) and not np.array_equal(k_v, s_v):
                    t_v = _biased_from_unbiased(p, s_v, t_v, batch_size)
                    convention.append((p, float(np.abs(k_v - s_v).max()),
                                       float(np.abs(t[key] - s_v).max())))
                # the batch statistic m x (batch - old) is made of may differ as the layer
                # output it is taken over may (forward_rtol of its size, |change + m old|)
                m = float(p.torch.params.get("momentum") or 0.1)
                extra = forward_rtol * float(np.abs(np.asarray(t_v, np.float64) - s_v
                                                    + m * s_v).max(initial=0.0))
                if key == "running_mean" and "running_var" in t:
                    # a batch mean rounds (and may differ) as the values it averages, whose
                    # spread is the batch's standard deviation: torch's step gives it
                    v_batch = (np.asarray(t["running_var"], np.float64)
                               - (1 - m) * s["running_var"]) / m
                    spread = np.sqrt(np.maximum(v_batch, 0.0))
                    extra = extra + m * (forward_rtol + _stats_rtol(p, batch_size) / m) * spread
                extra = extra + envelope
                c = tensor_check("stats", f"{p.label} {key}", s_v, k_v, t_v,
                                 _stats_rtol(p, batch_size), b, of_value=True, extra=extra)
            else:
                rtol = batch_rtol if batchy else b.update_rtol
                extra = _adam_extra(ts, start, t_after, p.torch.name, key, rtol)
                if batchy:
                    extra = extra + rtol * layer_change
                extra = extra + envelope
                c = tensor_check("update", f"{p.label} {key}", s_v, k_v, t_v, rtol, b,
                                 extra=extra)
            checks.append((p, c))
        if not training_judged:
            continue
        for name, values in t_after["slots"].items():
            k_slots = k_after["slots"].get(name, {}).get(p.keras.name, {})
            for key, t_v in values.get(p.torch.name, {}).items():
                if key not in k_slots:
                    continue  # trained on one side only: the moved check says so
                s_v = start["slots"].get(name, {}).get(p.torch.name, {}).get(key)
                s_v = np.zeros_like(t_v) if s_v is None else s_v
                rtol = batch_rtol if batchy else b.slot_rtol
                envelope = tol.ENVELOPE_MULTIPLE * dep.get((name, p.torch.name, key), 0.0)
                checks.append((p, tensor_check(f"slot:{name}", f"{p.label} {key}", s_v,
                                               k_slots[key], t_v, rtol, b, of_value=True,
                                               extra=envelope)))
    return checks


def _biased_on_keras(p: Pair) -> bool:
    return (p.keras.params.get("variance_update") == "biased"
            and p.torch.params.get("variance_update") == "unbiased")


def _biased_from_unbiased(p: Pair, start, unbiased_after, batch_size: int):
    """The running variance torch's step would give with the biased batch variance:
    torch's ``new = (1 - m) old + m v_u`` gives ``v_u``; the biased one is ``v_u (n-1)/n``."""
    m = float(p.torch.params.get("momentum") or 0.1)
    n = _reduction(p, batch_size)
    s, t = np.asarray(start, np.float64), np.asarray(unbiased_after, np.float64)
    v_u = (t - (1 - m) * s) / m
    return ((1 - m) * s + m * v_u * (n - 1) / n).astype(np.float32)


def _adam_extra(ts, start, t_after, leaf: str, key: str, rtol: float):
    """Adam's sensitivity to the gradient's rounding where v is small (shared.lockstep)."""
    if ts.kind != "adam":
        return 0.0
    m_new = t_after["slots"]["exp_avg"].get(leaf, {}).get(key)
    if m_new is None:
        return 0.0
    m_old = start["slots"].get("exp_avg", {}).get(leaf, {}).get(key, 0.0)
    return adam_rounding(np.asarray(m_old, np.float64), np.asarray(m_new, np.float64),
                         np.asarray(t_after["slots"]["exp_avg_sq"][leaf][key], np.float64),
                         t_after["step"], ts.hyper, rtol)


def _tally(moved: dict, pairs, start, k_after, t_after) -> None:
    """Per paired tensor: the largest one-step change on each side and the largest gap."""
    for p in pairs:
        s, k, t = (start["tensors"][p.torch.name], k_after["tensors"][p.keras.name],
                   t_after["tensors"][p.torch.name])
        for key in sorted(key for key in set(s) & set(k)
                          if np.shape(s[key]) == np.shape(k[key])):
            dk = np.asarray(k[key], np.float64) - s[key]
            dt = np.asarray(t[key], np.float64) - s[key]
            row = moved.setdefault((p.label, key), {
                "keras_layer": p.keras.name, "torch_layer": p.torch.name, "tensor": key,
                "keras_change": 0.0, "torch_change": 0.0, "step_gap": 0.0})
            row["keras_change"] = max(row["keras_change"], float(np.abs(dk).max(initial=0.0)))
            row["torch_change"] = max(row["torch_change"], float(np.abs(dt).max(initial=0.0)))
            row["step_gap"] = max(row["step_gap"], float(np.abs(dk - dt).max(initial=0.0)))


def _code(c: Check) -> str:
    if c.check == "moved":
        return "PORT_MOVED_ONE_SIDE"
    if c.check.endswith("loss"):
        return "PORT_STEP_LOSS"
    return "PORT_STATS_DIVERGE" if c.check == "stats" else "PORT_STEP_UPDATE"


def _finding(code: str, hits: list[tuple[int, Pair | None, Check]]) -> Finding:
    """The first check outside its bound (lowest step, then call order), with how many
    tensors and steps the code stands for."""
    step, p, c = hits[0]
    tensors = {h[2].key for h in hits}
    steps = sorted({h[0] for h in hits})
    if c.check.endswith("loss"):
        more = f"; in {len(steps)} steps (first shown)" if len(steps) > 1 else ""
    else:
        more = (f"; {len(tensors)} tensors in {len(steps)} steps (first shown)"
                if len(tensors) > 1 or len(steps) > 1 else "")
    detail = f"at step {step}, from the same state: {c.describe('keras')}{more}"
    if c.check.endswith("loss"):
        return make_finding(code, None, f"{c.check} {c.tf:.7g}", f"{c.check} {c.torch:.7g}",
                            detail, keras_layer="(model)", torch_layer="(model)")
    key = c.key.rsplit(" ", 1)[-1]
    return make_finding(code, p, f"{key} changed by {c.tf:.3g}",
                        f"{key} changed by {c.torch:.3g}", detail)
