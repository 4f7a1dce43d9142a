"""The K training steps of the port check: both sides trained on the same batches, then judged.

Each side trains as its user set it up (Keras: ``model(x, training=True)`` and
``trainable_variables``; torch: ``model.train()``, ``requires_grad``, the user's
optimizer groups). What is compared afterwards: per-step training- and
inference-mode losses (``PORT_STEP_LOSS``) and, per paired tensor, whether and how
far it moved on each side (``PORT_MOVED_ONE_SIDE``, ``PORT_STATS_DIVERGE``; the
BatchNorm running-variance convention is listed as expected).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from shared import tolerances as tol
from shared.port.divergence import make_batches
from shared.port.findings import EXPECTED_CODES, Finding, make_finding
from shared.port.records import Pair

__all__ = ["ADAM_EPSILON", "run_steps"]

# Adam's epsilon on both sides: Keras adds it before the bias correction, torch after, so
# parity needs one too small to matter (the project's RunConfig.adam_epsilon, FACTS.md).
ADAM_EPSILON = 1e-12


def run_steps(kp, tp, keras_model, torch_model, pairs: Sequence[Pair], tensors, chw, *,
              steps: int, optimizer: str, learning_rate: float, batch_size: int, seed: int,
              names: tuple[str, str], keras_optimizer=None, torch_optimizer=None, guarded):
    """Run ``steps`` optimizer steps on both sides; (step rows, moved rows, findings,
    expected, the steps' tolerance, notes)."""
    out_shape = pairs[-1].torch.output_shape if pairs else ()
    classes = out_shape[0] if len(out_shape) == 1 else None
    batches = make_batches(chw, steps, batch_size, classes, seed + 2)
    setup = {"optimizer": optimizer, "learning_rate": learning_rate,
             "adam_epsilon": ADAM_EPSILON, "loss": "cross_entropy" if classes
             else "mean_square"}
    k_losses, k_after = guarded(names[0], "the training steps", kp.train_steps,
                                keras_model, [p.keras for p in pairs], batches, setup,
                                keras_optimizer)
    t_losses, t_after = guarded(names[1], "the training steps", tp.train_steps,
                                torch_model, [p.torch for p in pairs], batches, setup,
                                torch_optimizer)
    after = {p.label: (k_after[p.keras.name], t_after[p.torch.name]) for p in pairs}
    step_tol = _step_tolerance(pairs, tensors, after)
    if keras_optimizer is None and torch_optimizer is None:  # the built-in optimizers
        step_tol["param_atol"] = _adam_tensor_atol(optimizer, learning_rate, steps)
    moved_rows, freeze_findings = _moved(pairs, tensors, after, step_tol,
                                         step_tol.get("param_atol", 0.0))
    step_rows = []
    for i, (kl, tl) in enumerate(zip(k_losses, t_losses)):
        step_rows.append({"step": i, "keras_train": kl[0], "keras_eval": kl[1],
                          "torch_train": tl[0], "torch_eval": tl[1]})
    bad = [r for r in step_rows for a, b in (("keras_train", "torch_train"),
                                             ("keras_eval", "torch_eval"))
           if not math.isclose(r[a], r[b], rel_tol=step_tol["rtol"],
                               abs_tol=step_tol["atol"])]
    expected = [f for f in freeze_findings if f.code in EXPECTED_CODES]
    findings = [f for f in freeze_findings if f.code not in EXPECTED_CODES]
    if bad:
        r = bad[0]
        findings.append(make_finding("PORT_STEP_LOSS", None,
                                     f"train {r['keras_train']:.6g} eval {r['keras_eval']:.6g}",
                                     f"train {r['torch_train']:.6g} eval {r['torch_eval']:.6g}",
                                     f"first at step {r['step']} ({step_tol['name']} atol "
                                     f"{step_tol['atol']:g})",
                                     keras_layer="(model)", torch_layer="(model)"))
    notes = [(f"{steps} {optimizer} steps (lr {learning_rate:g}) on seeded batches of "
              f"{batch_size}, dropout off on both sides; {setup['loss']} loss")]
    if step_tol.get("param_atol"):
        notes.append(f"Adam: optimizer-updated tensors compared with atol "
                     f"{step_tol['atol']:g} + {step_tol['param_atol']:g} "
                     f"(PORT_ADAM_TENSOR_LR_STEPS x lr x steps: near-zero gradients step "
                     f"by about lr either way); BatchNorm statistics without it")
    return step_rows, moved_rows, findings, expected, step_tol, notes


def _step_tolerance(pairs: Sequence[Pair], before, after) -> dict:
    """STEP_LOSS_*, or the named float32 exception when BatchNorm trained on batch
    statistics on both sides (its backward amplifies rounding: FULL_FLOAT32_STEP_*'s reason).
    """
    for p in pairs:
        kb, tb = before[p.label]
        ka, ta = after[p.label]
        if p.keras.kind == "bn" and "running_mean" in kb and "running_mean" in tb and (
                not np.array_equal(kb["running_mean"], ka["running_mean"])
                and not np.array_equal(tb["running_mean"], ta["running_mean"])):
            return {"name": "FULL_FLOAT32_STEP", "atol": tol.FULL_FLOAT32_STEP_ATOL,
                    "rtol": tol.FULL_FLOAT32_STEP_RTOL}
    return {"name": "STEP_LOSS", "atol": tol.STEP_LOSS_ATOL, "rtol": tol.STEP_LOSS_RTOL}


# tensors a BatchNorm updates itself; every other paired tensor is moved by the optimizer
_STATISTICS = ("running_mean", "running_var")


def _adam_tensor_atol(optimizer: str, learning_rate: float, steps: int) -> float:
    """Extra atol for optimizer-updated tensors after the built-in Adam's steps (0 for SGD).

    Adam's step is elementwise m / sqrt(v): an element whose gradient rounds to about 0
    moves by up to lr in a direction the rounding decides (PORT_ADAM_TENSOR_LR_STEPS).
    """
    return tol.PORT_ADAM_TENSOR_LR_STEPS * learning_rate * steps if optimizer == "adam" else 0.0


def _moved(pairs: Sequence[Pair], before, after, step_tol: dict,
           param_atol: float = 0.0) -> tuple[list[dict], list]:
    """Per paired tensor: largest change on each side, and the freezing findings.

    ``param_atol`` is added to the step tolerance for the tensors the optimizer moves
    (``_adam_tensor_atol``); BatchNorm statistics keep the step tolerance.
    """
    rows, findings, convention = [], [], []
    for p in pairs:
        kb, tb = before[p.label]
        ka, ta = after[p.label]
        for key in kb:
            if key not in tb:
                continue
            kc = float(np.max(np.abs(ka[key].astype(np.float64) - kb[key]), initial=0.0))
            tc = float(np.max(np.abs(ta[key].astype(np.float64) - tb[key]), initial=0.0))
            gap = float(np.max(np.abs(ka[key].astype(np.float64) - ta[key]), initial=0.0))
            rows.append({"keras_layer": p.keras.name, "torch_layer": p.torch.name,
                         "tensor": key, "keras_change": kc, "torch_change": tc,
                         "keras_moved": kc > 0, "torch_moved": tc > 0, "after_gap": gap})
            if (kc > 0) != (tc > 0):
                findings.append(make_finding("PORT_MOVED_ONE_SIDE", p,
                                             f"{key} changed by {kc:.3g}",
                                             f"{key} changed by {tc:.3g}"))
            elif kc > 0 and not np.allclose(
                    ka[key], ta[key], rtol=step_tol["rtol"],
                    atol=step_tol["atol"] + (0.0 if key in _STATISTICS else param_atol)):
                findings.append(make_finding("PORT_STATS_DIVERGE", p,
                                             f"{key} changed by {kc:.3g}",
                                             f"{key} changed by {tc:.3g}",
                                             f"after the steps they are {gap:.3g} apart"))
            if (key == "running_var" and kc > 0 and tc > 0
                    and p.keras.params.get("variance_update") != p.torch.params.get(
                        "variance_update")):
                convention.append((p, kc, tc))
    kept = _first_of_each_code(findings)
    if convention:
        p, kc, tc = convention[0]
        kept.append(make_finding("PORT_BN_VARIANCE_CONVENTION", p,
                                 f"{p.keras.params['variance_update']}"
                                 f" (running_var changed by {kc:.3g})",
                                 f"{p.torch.params['variance_update']} (running_var changed by "
                                 f"{tc:.3g})", f"{len(convention)} BatchNorm pairs, first shown"))
    return rows, kept


def _first_of_each_code(findings: list[Finding]) -> list[Finding]:
    """One finding per code (the first in call order), with the count of tensors it stands for."""
    kept = []
    for f in findings:
        if any(g.code == f.code for g in kept):
            continue
        count = sum(g.code == f.code for g in findings)
        if count > 1:
            f = Finding(f.code, f.keras_layer, f.torch_layer, f.keras_value, f.torch_value,
                        f"{f.message}; {count} tensors, first in call order shown", f.fix)
        kept.append(f)
    return kept
