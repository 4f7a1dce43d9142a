"""Port check: a user's Keras model against their PyTorch model, layer by layer.

Framework-free half of ``tf_impl/port.py`` and ``torch_impl/port.py``. Each
framework half only *describes* its model (every leaf layer in the order a
forward pass calls it, as a neutral :class:`Leaf` record whose tensors are in
the canonical layout, torch's) and *runs* it (per-layer outputs in both
modes, K training steps). Everything that compares lives here, once:

- :func:`pair`: weighted leaves paired by call order, kind and canonical shapes
  (or an explicit name map); anything unpairable is a :class:`PortError`;
- :data:`FINDINGS` and :func:`lint`: every hyperparameter that changes the
  function or the training step, compared pair by pair, each finding with a
  stable code, both layer names, both values and the fix;
- :func:`divergence`: per-layer max abs / relative differences against a
  named tolerance and the first layer that leaves it;
- :func:`check_port`: the whole check, returning a :class:`PortReport`
  (``to_dict()``, ``render()``, ``finding_lines()``, :func:`render_figure`).

Canonical activations are NCHW (the Keras half transposes); canonical
tensors are torch's (conv OIHW, linear (out, in)) under the keys ``weight``,
``bias``, ``running_mean``, ``running_var``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from shared import tolerances as tol
from shared.errors import UsageError

__all__ = [
    "EXPECTED_CODES",
    "FINDINGS",
    "PORT_FILES",
    "WEIGHTED_KINDS",
    "Finding",
    "FindingKind",
    "LayerDiff",
    "Leaf",
    "Pair",
    "PortError",
    "PortReport",
    "check_port",
    "divergence",
    "fold_context",
    "lint",
    "make_batches",
    "pair",
    "render_figure",
    "transfer",
    "write_port_report",
]

# Kinds whose layers carry tensors and are paired one to one; the others
# (dropout, flatten, pad, activation) are context the lint reads.
WEIGHTED_KINDS = ("conv", "dense", "bn", "layernorm")
REPORT_VERSION = 1
# More paired layers than this: the deep-net forward tolerance (summation-order
# noise compounds with depth, see RESNET_FORWARD_ATOL's reason).
DEEP_PAIR_COUNT = 24
# Adam's epsilon on both sides: Keras adds it before the bias correction, torch after, so
# parity needs one too small to matter (the project's RunConfig.adam_epsilon, FACTS.md).
ADAM_EPSILON = 1e-12


class PortError(UsageError):
    """The two models cannot be compared (not a model, unpairable, wrong input): one line."""


@dataclass
class Leaf:
    """One leaf layer as a forward pass called it, framework-neutral."""

    name: str
    kind: str  # conv, dense, bn, layernorm, dropout, flatten, pad, activation
    cls: str  # the framework's class name
    params: dict
    # canonical tensor key -> shape (torch layout); empty for context leaves
    shapes: dict = field(default_factory=dict)
    # canonical output shape without the batch dimension
    output_shape: tuple = ()
    # the framework layer/module itself (not part of the record)
    ref: object = field(default=None, repr=False, compare=False)

    @property
    def weighted(self) -> bool:
        return self.kind in WEIGHTED_KINDS


@dataclass(frozen=True)
class Pair:
    keras: Leaf
    torch: Leaf

    @property
    def label(self) -> str:
        return f"{self.keras.name} <-> {self.torch.name}"


@dataclass(frozen=True)
class FindingKind:
    what: str
    fix: str


# The catalogue: a code never changes meaning; new mechanisms get new codes.
FINDINGS: dict[str, FindingKind] = {
    "PORT_BN_EPSILON": FindingKind(
        "BatchNorm epsilon differs (Keras default 1e-3, torch 1e-5)",
        "pass the same epsilon on both sides (keras epsilon=1e-5 or torch eps=1e-3)"),
    "PORT_BN_MOMENTUM": FindingKind(
        "BatchNorm momentum differs in torch's convention (Keras momentum must be "
        "1 - torch momentum): moving statistics diverge after a training step",
        "set Keras momentum = 1 - torch momentum (torch 0.1 <-> Keras 0.9)"),
    "PORT_BN_AFFINE": FindingKind(
        "BatchNorm affine parameters differ (Keras center/scale vs torch affine)",
        "use center=True, scale=True in Keras with affine=True in torch, or turn both off"),
    "PORT_BN_STATS": FindingKind(
        "one BatchNorm keeps running statistics and the other does not "
        "(torch track_running_stats=False normalises with batch statistics even in eval mode)",
        "keep running statistics on both sides (torch track_running_stats=True)"),
    "PORT_LN_EPSILON": FindingKind(
        "LayerNorm epsilon differs (Keras default 1e-3, torch 1e-5)",
        "pass the same epsilon on both sides"),
    "PORT_CONV_STRIDE": FindingKind("convolution stride differs", "use the same stride"),
    "PORT_CONV_DILATION": FindingKind("convolution dilation differs", "use the same dilation"),
    "PORT_CONV_GROUPS": FindingKind(
        "convolution groups differ (a Keras DepthwiseConv2D is torch groups=channels)",
        "use the same groups (DepthwiseConv2D <-> Conv2d(groups=in_channels))"),
    "PORT_CONV_BIAS": FindingKind(
        "one convolution has a bias and the other has none",
        "use use_bias / bias the same way on both sides"),
    "PORT_DENSE_BIAS": FindingKind(
        "one dense layer has a bias and the other has none",
        "use use_bias / bias the same way on both sides"),
    "PORT_CONV_PADDING": FindingKind(
        "convolution zero padding (top, bottom, left, right) differs",
        "pad explicitly with the same amounts: keras ZeroPadding2D(((t, b), (l, r))) + "
        "padding='valid' against torch padding= (symmetric) or F.pad"),
    "PORT_SAME_PADDING_STRIDE2_EVEN": FindingKind(
        "Keras padding='same' at stride 2 on an even input pads 0 top/left and 1 bottom/right; "
        "torch's symmetric padding pads both sides",
        "replace padding='same' with ZeroPadding2D(k // 2) + padding='valid' in Keras "
        "(or F.pad(x, (0, 1, 0, 1)) + padding=0 in torch)"),
    "PORT_FLATTEN_DENSE_ORDER": FindingKind(
        "Dense after Flatten: Keras flattens (H, W, C), torch (C, H, W); the weights were "
        "copied with a transpose only, so the rows are in the wrong order",
        "permute the rows when copying: torch_w = keras_k.reshape(H, W, C, out)"
        ".transpose(3, 2, 0, 1).reshape(out, -1) (freeze-parity's transfer does it)"),
    "PORT_WEIGHTS_DIFFER": FindingKind(
        "paired layers hold different weights (the models were not given the same weights)",
        "copy the weights through the pairing (check_port(..., transfer='torch') or "
        "--transfer torch), or fix the conversion that produced them"),
    "PORT_DROPOUT_RATE": FindingKind(
        "dropout rates differ (checked statically: the frameworks' random masks cannot match)",
        "use the same rate (Keras rate == torch p)"),
    "PORT_DROPOUT_MISSING": FindingKind(
        "one model has more dropout layers than the other",
        "add the missing Dropout (or remove the extra one) so both drop in the same places"),
    "PORT_ACTIVATION": FindingKind(
        "the activation after this layer differs",
        "use the same activation (e.g. ReLU6 <-> ReLU(max_value=6), no softmax inside a "
        "model whose torch twin returns logits)"),
    "PORT_DIVERGES_INFERENCE": FindingKind(
        "inference-mode outputs leave the tolerance first at this layer",
        "look at the lint findings for this layer and the ones before it"),
    "PORT_DIVERGES_TRAINING": FindingKind(
        "training-mode outputs (BatchNorm on batch statistics, dropout off on both sides) "
        "leave the tolerance first at this layer, while inference mode agrees there",
        "a layer that one side runs in inference mode during training: check base.eval() "
        "against model.train() in torch and trainable/training=False in Keras"),
    "PORT_MOVED_ONE_SIDE": FindingKind(
        "this tensor moved in the training steps on one side only (frozen on the other)",
        "freeze the same tensors: torch requires_grad and eval() kept through model.train() "
        "(override train()), Keras trainable and training=False from a wrapper layer or a "
        "subclassed model (a functional graph ignores training=False under fit)"),
    "PORT_STATS_DIVERGE": FindingKind(
        "after the training steps, this tensor moved on both sides but by different amounts",
        "check momentum and learning-rate settings of the pair (lint findings name them)"),
    "PORT_BN_VARIANCE_CONVENTION": FindingKind(
        "BatchNorm updated its running variance on both sides in the steps: torch with the "
        "unbiased batch variance (times N/(N-1)), Keras with the biased one",
        "expected between the frameworks; reconcile with a Keras BatchNormalization that "
        "updates with the unbiased variance (tf_impl.model.TorchVarianceBatchNormalization) "
        "or accept it (it shrinks as 1/N)"),
    "PORT_STEP_LOSS": FindingKind(
        "per-step training-mode or inference-mode losses differ beyond the tolerance",
        "the first divergent layer and the freezing findings say why"),
}


# Codes for a difference between the frameworks themselves, not a porting mistake.
EXPECTED_CODES = ("PORT_BN_VARIANCE_CONVENTION",)


@dataclass(frozen=True)
class Finding:
    code: str
    keras_layer: str
    torch_layer: str
    keras_value: object
    torch_value: object
    message: str
    fix: str
    # every (keras, torch) pair the finding stands for, the first one above included
    pairs: tuple = ()

    def line(self) -> str:
        values = ("" if self.keras_value is None and self.torch_value is None else
                  f" (keras {_show(self.keras_value)}, torch {_show(self.torch_value)})")
        return f"{self.code} at {self.keras_layer} <-> {self.torch_layer}: {self.message}{values}"


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _finding(code: str, p: Pair | None, keras_value, torch_value, detail: str = "",
             keras_layer: str | None = None, torch_layer: str | None = None) -> Finding:
    kind = FINDINGS[code]
    return Finding(code, keras_layer or (p.keras.name if p else "(model)"),
                   torch_layer or (p.torch.name if p else "(model)"),
                   _plain(keras_value), _plain(torch_value),
                   kind.what + (f"; {detail}" if detail else ""), kind.fix)


def _plain(value):
    """JSON-ready: tuples become lists, numpy scalars floats."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------- #
# pairing
# --------------------------------------------------------------------------- #
def _brief(leaf: Leaf) -> str:
    shapes = ", ".join(f"{k} {tuple(v)}" for k, v in leaf.shapes.items())
    return f"{leaf.name} ({leaf.cls}, {leaf.kind}{': ' + shapes if shapes else ''})"


def _compatible(k: Leaf, t: Leaf) -> str:
    """Why ``k`` and ``t`` cannot be paired, or "" when they can."""
    if k.kind != t.kind:
        return f"kind {k.kind} vs {t.kind}"
    for key in ("weight", "bias"):
        if key in k.shapes and key in t.shapes and tuple(k.shapes[key]) != tuple(t.shapes[key]):
            return f"{key} shape {tuple(k.shapes[key])} vs {tuple(t.shapes[key])}"
    if k.kind in ("bn", "layernorm") and k.params.get("features") != t.params.get("features"):
        return f"features {k.params.get('features')} vs {t.params.get('features')}"
    return ""


def pair(keras_leaves: Sequence[Leaf], torch_leaves: Sequence[Leaf],
         name_map: Mapping[str, str] | None = None) -> list[Pair]:
    """Weighted leaves paired in call order (``name_map`` keras name -> torch name first).

    Raises :class:`PortError` naming both layers when a pair has different
    kinds or shapes, or when the counts differ.
    """
    ks = [leaf for leaf in keras_leaves if leaf.weighted]
    ts = [leaf for leaf in torch_leaves if leaf.weighted]
    name_map = dict(name_map or {})
    by_k = {leaf.name: leaf for leaf in ks}
    by_t = {leaf.name: leaf for leaf in ts}
    fixed = {}
    for kname, tname in name_map.items():
        if kname not in by_k:
            raise PortError(f"name map: keras layer {kname!r} is not a weighted leaf of the "
                            "Keras model")
        if tname not in by_t:
            raise PortError(f"name map: torch module {tname!r} is not a weighted leaf of the "
                            "torch model")
        fixed[kname] = by_t[tname]
    taken = {id(t) for t in fixed.values()}
    rest_t = [t for t in ts if id(t) not in taken]
    rest_k = [k for k in ks if k.name not in fixed]
    if len(rest_k) != len(rest_t):
        extra = (rest_k[len(rest_t)] if len(rest_k) > len(rest_t) else rest_t[len(rest_k)])
        side = "keras" if len(rest_k) > len(rest_t) else "torch"
        raise PortError(f"different weighted leaf counts: keras {len(ks)}, torch {len(ts)}; "
                        f"first {side} layer without a partner by order: {_brief(extra)}")
    order = iter(rest_t)
    pairs = [Pair(k, fixed[k.name] if k.name in fixed else next(order)) for k in ks]
    for p in pairs:
        why = _compatible(p.keras, p.torch)
        if why:
            raise PortError(f"cannot pair keras layer {_brief(p.keras)} with torch module "
                            f"{_brief(p.torch)}: {why} (pass a name map if the order differs)")
    return pairs


# --------------------------------------------------------------------------- #
# context: padding, activations, dropout
# --------------------------------------------------------------------------- #
def fold_context(leaves: Sequence[Leaf]) -> list[Leaf]:
    """Fold an explicit pad layer into the conv right after it, an activation into the layer
    before it. Returns the leaves with ``params["pad"]`` and ``params["activation"]`` final.
    """
    out = list(leaves)
    for i, leaf in enumerate(out):
        if leaf.kind == "conv" and i > 0 and out[i - 1].kind == "pad":
            t, b, left, r = leaf.params["pad"]
            pt, pb, pl, pr = out[i - 1].params["pad"]
            leaf.params["pad"] = (t + pt, b + pb, left + pl, r + pr)
            leaf.params["in_hw"] = out[i - 1].params["in_hw"]
        if leaf.weighted and leaf.params.get("activation") in (None, "linear"):
            for nxt in out[i + 1:]:
                if nxt.weighted:
                    break
                if nxt.kind == "activation":
                    leaf.params["activation"] = nxt.params["name"]
                    break
        leaf.params.setdefault("activation", None)
    return out


# --------------------------------------------------------------------------- #
# lint
# --------------------------------------------------------------------------- #
def _differs(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is None or b is None or not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a != b


def _lint_conv(p: Pair) -> list[Finding]:
    k, t = p.keras.params, p.torch.params
    out = []
    for code, key in (("PORT_CONV_STRIDE", "stride"), ("PORT_CONV_DILATION", "dilation"),
                      ("PORT_CONV_GROUPS", "groups"), ("PORT_CONV_BIAS", "bias")):
        if k[key] != t[key]:
            out.append(_finding(code, p, k[key], t[key]))
    if k["pad"] != t["pad"]:
        same_even = (k.get("same") and max(k["stride"]) > 1
                     and any(s % 2 == 0 for s in k.get("in_hw", ())))
        code = "PORT_SAME_PADDING_STRIDE2_EVEN" if same_even else "PORT_CONV_PADDING"
        out.append(_finding(code, p, k["pad"], t["pad"],
                            f"input {tuple(k.get('in_hw', ()))}, stride {tuple(k['stride'])}"))
    return out


def _lint_norm(p: Pair) -> list[Finding]:
    k, t = p.keras.params, p.torch.params
    out = []
    code = "PORT_BN_EPSILON" if p.keras.kind == "bn" else "PORT_LN_EPSILON"
    if _differs(k["eps"], t["eps"]):
        out.append(_finding(code, p, k["eps"], t["eps"]))
    if (k["center"], k["scale"]) != (t["center"], t["scale"]):
        out.append(_finding("PORT_BN_AFFINE", p, f"center={k['center']} scale={k['scale']}",
                            f"affine center={t['center']} scale={t['scale']}"))
    if p.keras.kind == "bn":
        if k["stats"] != t["stats"]:
            out.append(_finding("PORT_BN_STATS", p, k["stats"], t["stats"]))
        # momentum in torch's convention on both records; None: statistics never move
        km, tm = k.get("momentum"), t.get("momentum")
        if km is not None and tm is not None and _differs(km, tm):
            out.append(_finding("PORT_BN_MOMENTUM", p, k["keras_momentum"], tm,
                                f"Keras {k['keras_momentum']:g} is torch {km:g}"))
    return out


def _lint_dense(p: Pair) -> list[Finding]:
    k, t = p.keras.params, p.torch.params
    if k["bias"] != t["bias"]:
        return [_finding("PORT_DENSE_BIAS", p, k["bias"], t["bias"])]
    return []


def _lint_activation(p: Pair, last_k: bool, last_t: bool) -> list[Finding]:
    ka, ta = p.keras.params.get("activation"), p.torch.params.get("activation")
    if ka == ta:
        return []
    # A missing activation is only known when nothing can follow (torch's F.relu is unseen).
    if (ka is None and not last_k) or (ta is None and not last_t):
        return []
    return [_finding("PORT_ACTIVATION", p, ka or "none", ta or "none")]


def _lint_dropout(keras_leaves: Sequence[Leaf], torch_leaves: Sequence[Leaf]) -> list[Finding]:
    kd = [leaf for leaf in keras_leaves if leaf.kind == "dropout"]
    td = [leaf for leaf in torch_leaves if leaf.kind == "dropout"]
    out = []
    for k, t in zip(kd, td):
        if _differs(k.params["rate"], t.params["rate"]):
            out.append(_finding("PORT_DROPOUT_RATE", None, k.params["rate"], t.params["rate"],
                                keras_layer=k.name, torch_layer=t.name))
    extra = kd[len(td):] or td[len(kd):]
    for leaf in extra:
        rates = (leaf.params["rate"], "none") if leaf in kd else ("none", leaf.params["rate"])
        if leaf.params["rate"] > 0:
            out.append(_finding("PORT_DROPOUT_MISSING", None, *rates,
                                f"keras has {len(kd)} dropout layers, torch {len(td)}",
                                keras_layer=leaf.name if leaf in kd else "(none)",
                                torch_layer=leaf.name if leaf in td else "(none)"))
    return out


def lint(pairs: Sequence[Pair], keras_leaves: Sequence[Leaf], torch_leaves: Sequence[Leaf],
         tensors: Mapping[str, tuple[dict, dict]] | None = None) -> list[Finding]:
    """Static findings: hyperparameters of every pair; weights when ``tensors`` are given.

    ``tensors``: pair label -> (keras canonical tensors, torch canonical tensors),
    compared only for models checked with the weights they were given.
    """
    last_k = next((leaf for leaf in reversed(keras_leaves) if leaf.weighted), None)
    last_t = next((leaf for leaf in reversed(torch_leaves) if leaf.weighted), None)
    findings: list[Finding] = []
    for p in pairs:
        if p.keras.kind == "conv":
            findings += _lint_conv(p)
        elif p.keras.kind in ("bn", "layernorm"):
            findings += _lint_norm(p)
        elif p.keras.kind == "dense":
            findings += _lint_dense(p)
        findings += _lint_activation(p, p.keras is last_k, p.torch is last_t)
    findings += _lint_dropout(keras_leaves, torch_leaves)
    if tensors is not None:
        findings += _lint_weights(pairs, tensors)
    return _grouped(findings)


def _grouped(findings: Sequence[Finding]) -> list[Finding]:
    """One finding per (code, keras value, torch value): the first pair, and how many more."""
    groups: dict[tuple, list[Finding]] = {}
    for f in findings:
        groups.setdefault((f.code, str(f.keras_value), str(f.torch_value)), []).append(f)
    out = []
    for members in groups.values():
        first = members[0]
        pairs = tuple((f.keras_layer, f.torch_layer) for f in members)
        message = first.message
        if len(members) > 1:
            shown = ", ".join(f"{k} <-> {t}" for k, t in pairs[1:4])
            more = f" and {len(pairs) - 4} more" if len(pairs) > 4 else ""
            message += f"; {len(pairs)} pairs, also {shown}{more}"
        out.append(Finding(first.code, first.keras_layer, first.torch_layer, first.keras_value,
                           first.torch_value, message, first.fix, pairs))
    return out


def _lint_weights(pairs: Sequence[Pair], tensors) -> list[Finding]:
    out, differing = [], []
    for p in pairs:
        k, t = tensors[p.label]
        keys = [key for key in ("weight", "bias") if key in k and key in t]
        bad = [key for key in keys if not np.allclose(k[key], t[key], rtol=tol.FORWARD_RTOL,
                                                        atol=tol.FORWARD_ATOL)]
        if not bad:
            continue
        unpermuted = k.get("weight_unpermuted")
        if ("weight" in bad and unpermuted is not None
                and np.allclose(unpermuted, t["weight"], rtol=tol.FORWARD_RTOL,
                                atol=tol.FORWARD_ATOL)):
            out.append(_finding("PORT_FLATTEN_DENSE_ORDER", p,
                                f"Flatten of (H, W, C) {tuple(p.keras.params['flatten_from'])}",
                                "rows in (H, W, C) order instead of (C, H, W)"))
            continue
        differing.append((p, bad, max(float(np.max(np.abs(k[key] - t[key]))) for key in bad)))
    if differing:
        p, bad, change = differing[0]
        out.append(_finding("PORT_WEIGHTS_DIFFER", p, f"{'/'.join(bad)}",
                            f"max abs difference {change:.3g}",
                            f"{len(differing)} of {len(pairs)} pairs differ, first shown"))
    return out


# --------------------------------------------------------------------------- #
# transfer
# --------------------------------------------------------------------------- #
def transfer(pairs: Sequence[Pair], source: str,
             tensors: Mapping[str, tuple[dict, dict]]) -> dict[str, dict]:
    """The tensors each destination leaf gets: ``source`` ("torch" or "keras")'s, per pair.

    Returns destination leaf name -> canonical tensors (only keys both sides hold).
    """
    if source not in ("torch", "keras"):
        raise PortError(f"transfer: source must be 'torch' or 'keras', got {source!r}")
    out = {}
    for p in pairs:
        k, t = tensors[p.label]
        src, dst_leaf = (t, p.keras) if source == "torch" else (k, p.torch)
        dst = k if source == "torch" else t
        out[dst_leaf.name] = {key: src[key] for key in dst if key in src}
    return out


# --------------------------------------------------------------------------- #
# dynamic comparison
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class LayerDiff:
    keras_layer: str
    torch_layer: str
    max_abs: float  # max |keras - torch| over the layer's output
    max_rel: float  # max_abs / max |torch output|
    within: bool


def _diff(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> tuple[float, float, bool]:
    if a.shape != b.shape:
        return math.inf, math.inf, False
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    d = np.abs(a64 - b64)
    # relative to the layer's scale (its largest torch output), not element by element:
    # elements near zero would make any rounding look like an infinite relative error
    scale = float(np.abs(b64).max(initial=0.0))
    biggest = float(d.max(initial=0.0))
    rel = biggest / scale if scale > 0 else (0.0 if biggest == 0 else math.inf)
    return biggest, rel, bool(np.all(d <= atol + rtol * np.abs(b64)))


def divergence(pairs: Sequence[Pair], keras_out: Mapping[str, np.ndarray],
               torch_out: Mapping[str, np.ndarray], atol: float, rtol: float) -> list[LayerDiff]:
    """One row per pair, in call order (outputs are canonical NCHW arrays)."""
    rows = []
    for p in pairs:
        a, b = keras_out[p.keras.name], torch_out[p.torch.name]
        rows.append(LayerDiff(p.keras.name, p.torch.name, *_diff(a, b, atol, rtol)))
    return rows


def _first_out(rows: Sequence[LayerDiff]) -> LayerDiff | None:
    return next((r for r in rows if not r.within), None)


def make_batches(input_shape: tuple[int, int, int], count: int, batch_size: int,
                 classes: int | None, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` seeded batches: NCHW float32 images (+1 shift) and labels ``i % classes``."""
    rng = np.random.default_rng(seed)
    c, h, w = input_shape
    out = []
    for _ in range(count):
        x = (rng.standard_normal((batch_size, c, h, w)) + 1.0).astype(np.float32)
        y = (np.arange(batch_size) % classes if classes else np.zeros(batch_size)).astype(np.int64)
        out.append((x, y))
    return out


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #
@dataclass
class PortReport:
    keras_model: str
    torch_model: str
    input_shape: tuple  # canonical (C, H, W)
    pairs: list[tuple[str, str, str]]  # (keras name, torch name, kind)
    findings: list[Finding]
    inference: list[LayerDiff]
    training: list[LayerDiff]
    tolerance: dict  # {"name": ..., "atol": ..., "rtol": ...}
    steps: list[dict] = field(default_factory=list)  # per step: keras/torch train/eval loss
    moved: list[dict] = field(default_factory=list)  # per paired tensor: moved on each side
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # framework differences no port can remove (listed with a code, not failing the check)
    expected: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def first_divergent(self, mode: str = "inference") -> LayerDiff | None:
        return _first_out(self.inference if mode == "inference" else self.training)

    def to_dict(self) -> dict:
        return {"version": REPORT_VERSION, "ok": self.ok,
                "keras_model": self.keras_model, "torch_model": self.torch_model,
                "input_shape": list(self.input_shape), "tolerance": self.tolerance,
                "settings": self.settings,
                "first_divergent": {m: (asdict(r) if r else None) for m, r in
                                    (("inference", self.first_divergent("inference")),
                                     ("training", self.first_divergent("training")))},
                "findings": [asdict(f) for f in self.findings],
                "expected": [asdict(f) for f in self.expected],
                "pairs": [{"keras": k, "torch": t, "kind": kind} for k, t, kind in self.pairs],
                "inference": [asdict(r) for r in self.inference],
                "training": [asdict(r) for r in self.training],
                "steps": self.steps, "moved": self.moved, "notes": list(self.notes)}

    def finding_lines(self) -> list[str]:
        """Two lines per finding (what and where, then the fix); expected differences last."""
        lines = []
        for f in self.findings:
            lines.append(f.line())
            lines.append(f"  fix: {f.fix}")
        for f in self.expected:
            lines.append(f"expected: {f.line()}")
        return lines

    def summary(self) -> str:
        first = self.first_divergent("inference") or self.first_divergent("training")
        where = (f"first divergent layer {first.keras_layer} <-> {first.torch_layer} "
                 f"(max abs {first.max_abs:.3g})" if first else "no divergent layer")
        n = len(self.findings)
        return (f"port check: {len(self.pairs)} pairs, {n} finding{'s' if n != 1 else ''}, "
                f"{where}")

    def render(self):
        """Per-layer table (rich): both modes' max abs / rel differences, flagged rows red."""
        from rich.markup import escape
        from rich.table import Table

        flagged = {f.keras_layer for f in self.findings}
        firsts = {r.keras_layer for r in (self.first_divergent("inference"),
                                          self.first_divergent("training")) if r}
        table = Table(title=escape(f"{self.summary()}; tolerance {self.tolerance['name']} "
                                   f"(atol {self.tolerance['atol']:g}, "
                                   f"rtol {self.tolerance['rtol']:g})"))
        for column in ("#", "keras layer", "torch module", "kind", "inference max abs",
                       "rel", "training max abs", "rel", ""):
            table.add_column(column)
        for i, ((k, t, kind), inf, tr) in enumerate(zip(self.pairs, self.inference,
                                                        self.training)):
            mark = ("<- first divergent" if k in firsts else
                    "finding" if k in flagged else "")
            style = "red" if (k in firsts or k in flagged) else None
            cells = (str(i), k, t, kind, f"{inf.max_abs:.2e}", f"{inf.max_rel:.2e}",
                     f"{tr.max_abs:.2e}", f"{tr.max_rel:.2e}", mark)
            table.add_row(*map(escape, cells), style=style)
        return table


def _choose_tolerance(pairs: Sequence[Pair]) -> dict:
    if len(pairs) > DEEP_PAIR_COUNT:
        return {"name": "RESNET_FORWARD", "atol": tol.RESNET_FORWARD_ATOL,
                "rtol": tol.RESNET_FORWARD_RTOL}
    return {"name": "FORWARD", "atol": tol.FORWARD_ATOL, "rtol": tol.FORWARD_RTOL}


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
                findings.append(_finding("PORT_MOVED_ONE_SIDE", p, f"{key} changed by {kc:.3g}",
                                         f"{key} changed by {tc:.3g}"))
            elif kc > 0 and not np.allclose(
                    ka[key], ta[key], rtol=step_tol["rtol"],
                    atol=step_tol["atol"] + (0.0 if key in _STATISTICS else param_atol)):
                findings.append(_finding("PORT_STATS_DIVERGE", p, f"{key} changed by {kc:.3g}",
                                         f"{key} changed by {tc:.3g}",
                                         f"after the steps they are {gap:.3g} apart"))
            if (key == "running_var" and kc > 0 and tc > 0
                    and p.keras.params.get("variance_update") != p.torch.params.get(
                        "variance_update")):
                convention.append((p, kc, tc))
    kept = _first_of_each_code(findings)
    if convention:
        p, kc, tc = convention[0]
        kept.append(_finding("PORT_BN_VARIANCE_CONVENTION", p, f"{p.keras.params['variance_update']}"
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


def _hwc_to_chw(input_shape) -> tuple[int, int, int]:
    if input_shape is None:
        return None
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise PortError(f"input shape must be H,W,C (three positive integers), got {input_shape}")
    h, w, c = shape
    return (c, h, w)


def check_port(keras_model, torch_model, *, input_shape=None, steps: int = 3,
               optimizer: str = "sgd", learning_rate: float = 0.01, batch_size: int = 4,
               transfer_from: str | None = None, name_map: Mapping[str, str] | None = None,
               keras_optimizer=None, torch_optimizer=None, seed: int = 0,
               names: tuple[str, str] = ("keras model", "torch model")) -> PortReport:
    """Compare ``keras_model`` with ``torch_model`` layer by layer; a :class:`PortReport`.

    ``input_shape``: ``(H, W, C)`` (Keras order; default: the Keras model's input).
    ``transfer_from``: None compares the weights as given (a difference is a
    finding); "torch" or "keras" first copies that side's weights to the other
    through the pairing. ``steps``: K optimizer steps (``optimizer`` "sgd" or
    "adam", epsilon 1e-12 on both sides) on the same batches, each side frozen
    as the user set it up (or with the user's own optimizers); dropout is off
    on both sides in the training-mode pass and the steps (the lint covers
    it). Both models are left with the weights, statistics and modes they had after
    the transfer; optimizers you pass keep the state the steps gave them.
    """
    from shared import frameworks

    kp = frameworks.load("tf", "port")
    tp = frameworks.load("torch", "port")
    kp.check_model(keras_model, names[0])
    tp.check_model(torch_model, names[1])
    chw = _hwc_to_chw(input_shape) or kp.input_shape(keras_model, names[0])
    if optimizer not in ("sgd", "adam"):
        raise PortError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if steps < 0 or batch_size < 2:
        raise PortError(f"need steps >= 0 and batch_size >= 2, got {steps}, {batch_size}")
    probe = make_batches(chw, 1, batch_size, None, seed)[0][0]
    keras_leaves = fold_context(kp.describe(keras_model, probe, names[0]))
    torch_leaves = fold_context(tp.describe(torch_model, probe, names[1]))
    pairs = pair(keras_leaves, torch_leaves, name_map)
    tensors = _read(kp, tp, keras_model, torch_model, pairs)
    notes = []
    if transfer_from is not None:
        moved = transfer(pairs, transfer_from, tensors)
        dst, model, side = ((kp, keras_model, [p.keras for p in pairs]) if transfer_from == "torch"
                            else (tp, torch_model, [p.torch for p in pairs]))
        dst.write_tensors(model, side, moved)
        tensors = _read(kp, tp, keras_model, torch_model, pairs)
        notes.append(f"weights transferred from the {transfer_from} model through the pairing")
    findings = lint(pairs, keras_leaves, torch_leaves, None if transfer_from else tensors)
    tolerance = _choose_tolerance(pairs)
    atol, rtol = tolerance["atol"], tolerance["rtol"]
    x = make_batches(chw, 1, batch_size, None, seed + 1)[0][0]
    rows = {}
    for mode in ("inference", "training"):
        k_out = _guarded(names[0], f"the {mode}-mode pass", kp.capture, keras_model,
                         [p.keras for p in pairs], x, mode == "training")
        t_out = _guarded(names[1], f"the {mode}-mode pass", tp.capture, torch_model,
                         [p.torch for p in pairs], x, mode == "training")
        rows[mode] = divergence(pairs, k_out, t_out, atol, rtol)
    first_inf, first_tr = _first_out(rows["inference"]), _first_out(rows["training"])
    by_name = {p.keras.name: p for p in pairs}

    def where(row):
        return (f"max |keras - torch| {row.max_abs:.3g} (relative {row.max_rel:.3g}) over "
                f"{tolerance['name']} atol {atol:g} rtol {rtol:g}")

    if first_inf:
        findings.append(_finding("PORT_DIVERGES_INFERENCE", by_name[first_inf.keras_layer],
                                 None, None, where(first_inf)))
    if first_tr and (not first_inf or rows["training"].index(first_tr)
                     < rows["inference"].index(first_inf)):
        findings.append(_finding("PORT_DIVERGES_TRAINING", by_name[first_tr.keras_layer],
                                 None, None, where(first_tr)))
    step_rows, moved_rows, expected = [], [], []
    if steps:
        out_shape = pairs[-1].torch.output_shape if pairs else ()
        classes = out_shape[0] if len(out_shape) == 1 else None
        batches = make_batches(chw, steps, batch_size, classes, seed + 2)
        setup = {"optimizer": optimizer, "learning_rate": learning_rate,
                 "adam_epsilon": ADAM_EPSILON, "loss": "cross_entropy" if classes
                 else "mean_square"}
        k_losses, k_after = _guarded(names[0], "the training steps", kp.train_steps,
                                     keras_model, [p.keras for p in pairs], batches, setup,
                                     keras_optimizer)
        t_losses, t_after = _guarded(names[1], "the training steps", tp.train_steps,
                                     torch_model, [p.torch for p in pairs], batches, setup,
                                     torch_optimizer)
        after = {p.label: (k_after[p.keras.name], t_after[p.torch.name]) for p in pairs}
        step_tol = _step_tolerance(pairs, tensors, after)
        if keras_optimizer is None and torch_optimizer is None:  # the built-in optimizers
            step_tol["param_atol"] = _adam_tensor_atol(optimizer, learning_rate, steps)
        moved_rows, freeze_findings = _moved(pairs, tensors, after, step_tol,
                                             step_tol.get("param_atol", 0.0))
        for i, (kl, tl) in enumerate(zip(k_losses, t_losses)):
            step_rows.append({"step": i, "keras_train": kl[0], "keras_eval": kl[1],
                              "torch_train": tl[0], "torch_eval": tl[1]})
        bad = [r for r in step_rows for a, b in (("keras_train", "torch_train"),
                                                 ("keras_eval", "torch_eval"))
               if not math.isclose(r[a], r[b], rel_tol=step_tol["rtol"],
                                   abs_tol=step_tol["atol"])]
        expected = [f for f in freeze_findings if f.code in EXPECTED_CODES]
        findings += [f for f in freeze_findings if f.code not in EXPECTED_CODES]
        if bad:
            r = bad[0]
            findings.append(_finding("PORT_STEP_LOSS", None,
                                     f"train {r['keras_train']:.6g} eval {r['keras_eval']:.6g}",
                                     f"train {r['torch_train']:.6g} eval {r['torch_eval']:.6g}",
                                     f"first at step {r['step']} ({step_tol['name']} atol "
                                     f"{step_tol['atol']:g})",
                                     keras_layer="(model)", torch_layer="(model)"))
        tolerance["steps"] = step_tol
        notes.append(f"{steps} {optimizer} steps (lr {learning_rate:g}) on seeded batches of "
                     f"{batch_size}, dropout off on both sides; {setup['loss']} loss")
        if step_tol.get("param_atol"):
            notes.append(f"Adam: optimizer-updated tensors compared with atol "
                         f"{step_tol['atol']:g} + {step_tol['param_atol']:g} "
                         f"(PORT_ADAM_TENSOR_LR_STEPS x lr x steps: near-zero gradients step "
                         f"by about lr either way); BatchNorm statistics without it")
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


def _read(kp, tp, keras_model, torch_model, pairs) -> dict[str, tuple[dict, dict]]:
    k = kp.read_tensors(keras_model, [p.keras for p in pairs])
    t = tp.read_tensors(torch_model, [p.torch for p in pairs])
    return {p.label: (k[p.keras.name], t[p.torch.name]) for p in pairs}


# --------------------------------------------------------------------------- #
# figure and files
# --------------------------------------------------------------------------- #
def render_figure(report: PortReport, dpi: int = 100) -> bytes:
    """PNG: per-layer max abs difference (log scale), both modes, tolerance line, first marked."""
    from matplotlib.figure import Figure

    n = len(report.pairs)
    fig = Figure(figsize=(max(6.0, min(16.0, 0.25 * n + 4)), 4.5), dpi=dpi, layout="constrained")
    ax = fig.subplots()
    floor = np.finfo(np.float32).tiny
    for rows, style, label in ((report.inference, "-o", "inference mode"),
                               (report.training, "--x", "training mode")):
        ax.plot(range(n), [max(r.max_abs, floor) for r in rows], style, markersize=4,
                label=label)
    ax.axhline(report.tolerance["atol"], color="grey", linestyle=":",
               label=f"{report.tolerance['name']} atol {report.tolerance['atol']:g}")
    names = [k for k, _, _ in report.pairs]
    marks: dict[int, list[str]] = {}
    for mode in ("inference", "training"):
        first = report.first_divergent(mode)
        if first:
            marks.setdefault(names.index(first.keras_layer), []).append(mode)
    for i, modes in marks.items():
        ax.axvline(i, color="red", alpha=0.5)
        ax.annotate(f"first divergent ({' and '.join(modes)}): {names[i]}", (i, 0.97),
                    xycoords=("data", "axes fraction"), fontsize=8, color="red",
                    rotation=90, ha="right", va="top")
    if 0 < n <= 40:
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("paired layer (call order)")
    ax.set_ylabel("max |keras - torch|")
    n_findings = len(report.findings)
    ax.set_title(f"port check {report.keras_model} vs {report.torch_model}: {n} pairs, "
                 f"{n_findings} finding{'s' if n_findings != 1 else ''}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


PORT_FILES = ("port.json", "port.png")


def write_port_report(report: PortReport, out) -> dict[str, object]:
    """Write port.json and port.png into ``out``, all or none (temporary files, then renames)."""
    import json
    from contextlib import ExitStack
    from pathlib import Path

    from shared.io import atomic_path, ensure_writable_dir

    out = ensure_writable_dir(out)
    contents = {"port.json": (json.dumps(report.to_dict(), indent=2) + "\n").encode(),
                "port.png": render_figure(report)}
    paths = {name: Path(out) / name for name in PORT_FILES}
    with ExitStack() as stack:
        for name in PORT_FILES:
            tmp = stack.enter_context(atomic_path(paths[name]))
            tmp.write_bytes(contents[name])
    return paths
