"""The whole port check: describe, pair, transfer, lint, compare per layer, train K steps."""

from __future__ import annotations

from collections.abc import Mapping

from shared.port.divergence import (
    choose_tolerance,
    divergence,
    first_out,
    make_batches,
    training_cutoff,
)
from shared.port.findings import make_finding
from shared.port.graph import fold_context
from shared.port.lint import lint
from shared.port.pairing import pair
from shared.port.records import PortError
from shared.port.report import PortReport
from shared.port.steps import run_steps
from shared.port.transfer import read_pairs, transfer

__all__ = ["check_port", "pair_models"]


def _hwc_to_chw(input_shape) -> tuple[int, int, int]:
    if input_shape is None:
        return None
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise PortError(f"input shape must be H,W,C (three positive integers), got {input_shape}")
    h, w, c = shape
    return (c, h, w)


def _halves():
    from shared import frameworks

    return frameworks.load("tf", "port"), frameworks.load("torch", "port")


def pair_models(keras_model, torch_model, *, input_shape=None, batch_size: int = 4,
                name_map: Mapping[str, str] | None = None, seed: int = 0,
                names: tuple[str, str] = ("keras model", "torch model")):
    """Describe both models on one probe batch and pair them (no transfer, no passes):
    ``(canonical (C, H, W), keras leaves, torch leaves, pairs)``."""
    kp, tp = _halves()
    kp.check_model(keras_model, names[0])
    tp.check_model(torch_model, names[1])
    chw = _hwc_to_chw(input_shape) or kp.input_shape(keras_model, names[0])
    if batch_size < 2:
        raise PortError(f"need batch_size >= 2, got {batch_size}")
    probe = make_batches(chw, 1, batch_size, None, seed)[0][0]
    keras_leaves = fold_context(kp.describe(keras_model, probe, names[0]))
    torch_leaves = fold_context(tp.describe(torch_model, probe, names[1]))
    return chw, keras_leaves, torch_leaves, pair(keras_leaves, torch_leaves, name_map)


def check_port(keras_model, torch_model, *, input_shape=None, steps: int = 3,
               optimizer: str = "sgd", learning_rate: float = 0.01, batch_size: int = 4,
               transfer_from: str | None = None, name_map: Mapping[str, str] | None = None,
               keras_optimizer=None, torch_optimizer=None, seed: int = 0,
               names: tuple[str, str] = ("keras model", "torch model")) -> PortReport:
    """Compare ``keras_model`` with ``torch_model`` layer by layer; a :class:`PortReport`.

    ``input_shape``: ``(H, W, C)`` (Keras order; default: the Keras model's input).
    ``transfer_from``: None compares the weights as given (a difference is a
    finding); "torch" or "keras" first copies that side's weights to the other
    through the pairing. ``name_map``: keras layer -> torch module, for pairs the
    dataflow graph cannot decide. ``steps``: K optimizer steps (``optimizer`` "sgd"
    or "adam", epsilon 1e-12 on both sides) on the same batches, each side frozen
    as the user set it up (or with the user's own optimizers); dropout is off
    on both sides in the training-mode pass and the steps (the lint covers
    it). Both models are left with the weights, statistics and modes they had after
    the transfer; optimizers you pass keep the state the steps gave them.
    """
    kp, tp = _halves()
    if optimizer not in ("sgd", "adam"):
        raise PortError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if steps < 0 or batch_size < 2:
        raise PortError(f"need steps >= 0 and batch_size >= 2, got {steps}, {batch_size}")
    chw, keras_leaves, torch_leaves, pairs = pair_models(
        keras_model, torch_model, input_shape=input_shape, batch_size=batch_size,
        name_map=name_map, seed=seed, names=names)
    notes = [f"the {side} model's dataflow could not be traced: weighted layers paired in call "
             "order" for side, leaves in (("keras", keras_leaves), ("torch", torch_leaves))
             if any(leaf.sources is None for leaf in leaves)]
    tensors = read_pairs(kp, tp, keras_model, torch_model, pairs)
    if transfer_from is not None:
        moved = transfer(pairs, transfer_from, tensors)
        dst, model, side = ((kp, keras_model, [p.keras for p in pairs]) if transfer_from == "torch"
                            else (tp, torch_model, [p.torch for p in pairs]))
        dst.write_tensors(model, side, moved)
        tensors = read_pairs(kp, tp, keras_model, torch_model, pairs)
        notes.append(f"weights transferred from the {transfer_from} model through the pairing")
    findings = lint(pairs, keras_leaves, torch_leaves, None if transfer_from else tensors)
    tolerance = choose_tolerance(pairs)
    atol, rtol = tolerance["atol"], tolerance["rtol"]
    x = make_batches(chw, 1, batch_size, None, seed + 1)[0][0]
    cutoff = training_cutoff(pairs, batch_size)
    if cutoff is not None:
        notes.append(cutoff[1])
    rows = {}
    for mode in ("inference", "training"):
        k_out = _guarded(names[0], f"the {mode}-mode pass", kp.capture, keras_model,
                         [p.keras for p in pairs], x, mode == "training")
        t_out = _guarded(names[1], f"the {mode}-mode pass", tp.capture, torch_model,
                         [p.torch for p in pairs], x, mode == "training")
        rows[mode] = divergence(pairs, k_out, t_out, atol, rtol,
                                tolerance.get("scale_rtol", {}).get(mode),
                                cutoff[0] if cutoff and mode == "training" else None)
    first_inf, first_tr = first_out(rows["inference"]), first_out(rows["training"])
    by_name = {p.keras.name: p for p in pairs}

    def where(row, mode):
        fraction = tolerance.get("scale_rtol", {}).get(mode)
        scale = f" (or {fraction:g} of the layer's largest output)" if fraction else ""
        return f"{row.describe()} over {tolerance['name']} atol {atol:g} rtol {rtol:g}{scale}"

    if first_inf:
        findings.append(make_finding("PORT_DIVERGES_INFERENCE", by_name[first_inf.keras_layer],
                                     None, None, where(first_inf, "inference")))
    if first_tr and (not first_inf or rows["training"].index(first_tr)
                     < rows["inference"].index(first_inf)):
        findings.append(make_finding("PORT_DIVERGES_TRAINING", by_name[first_tr.keras_layer],
                                     None, None, where(first_tr, "training")))
    step_rows, moved_rows, expected = [], [], []
    if steps:
        step_rows, moved_rows, step_findings, expected, step_tol, step_notes = run_steps(
            kp, tp, keras_model, torch_model, pairs, tensors, chw, steps=steps,
            optimizer=optimizer, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
            names=names, keras_optimizer=keras_optimizer, torch_optimizer=torch_optimizer,
            guarded=_guarded, training_judged=cutoff is None,
            forward_rtol=tolerance.get("scale_rtol", {}).get("training", rtol),
            deep="scale_rtol" in tolerance)
        findings += step_findings
        tolerance["steps"] = step_tol
        notes += step_notes
    return PortReport(
        keras_model=names[0], torch_model=names[1], input_shape=chw,
        pairs=[(p.keras.name, p.torch.name, p.keras.kind) for p in pairs],
        findings=findings, inference=rows["inference"], training=rows["training"],
        tolerance=tolerance, steps=step_rows, moved=moved_rows,
        settings={"steps": steps, "optimizer": optimizer, "learning_rate": learning_rate,
                  "batch_size": batch_size, "transfer_from": transfer_from, "seed": seed},
        notes=notes, expected=expected)


def _guarded(what: str, stage: str, fn, *args):
    """``fn(*args)``; a failure inside the user's model becomes a one-line PortError."""
    try:
        return fn(*args)
    except PortError:
        raise
    except Exception as exc:  # noqa: BLE001  (the user's model: any error is bad input)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise PortError(f"{what}: {stage} failed ({type(exc).__name__}: {first})") from None
