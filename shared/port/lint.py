"""Lint: every hyperparameter that changes the function or the training step, pair by pair.

Rules read the neutral records only, once for both frameworks: convolution stride,
dilation, groups, bias and padding (and a downsampling stride placed on another
convolution of the block), normalisation epsilon, momentum, affine parameters and
statistics, dense bias, attention heads, biases and dropout, LoRA adapters (on one
side only, rank, alpha / rank, dropout), the activation after each weighted layer (compared by
function), dropout and stochastic depth (placed by the dataflow graph, compared by
rate and mode), preprocessing inside a model, and, for models checked with the
weights they were given, the weights themselves. Findings with the same code and
values are grouped into one, listing every pair it stands for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from shared import tolerances as tol
from shared.port.activations import GELU_TANH_MAX_ABS, UNKNOWN
from shared.port.findings import Finding, grouped, make_finding
from shared.port.graph import Graph
from shared.port.records import INPUT, Leaf, Pair

__all__ = ["affine_of", "lint"]


def _differs(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is None or b is None or not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a != b


def _lint_conv(p: Pair) -> list[Finding]:
    k, t = p.keras.params, p.torch.params
    out = []
    # groups never reach here: with the same input channels, other groups give another
    # weight shape, and the pairing refuses the pair naming both groups
    for code, key in (("PORT_CONV_STRIDE", "stride"), ("PORT_CONV_DILATION", "dilation"),
                      ("PORT_CONV_BIAS", "bias")):
        if k[key] != t[key]:
            out.append(make_finding(code, p, k[key], t[key]))
    if k["pad"] != t["pad"]:
        same_even = (k.get("same") and max(k["stride"]) > 1
                     and any(s % 2 == 0 for s in k.get("in_hw", ())))
        code = "PORT_SAME_PADDING_STRIDE2_EVEN" if same_even else "PORT_CONV_PADDING"
        out.append(make_finding(code, p, k["pad"], t["pad"],
                                f"input {tuple(k.get('in_hw', ()))}, stride {tuple(k['stride'])}"))
    return out


def _stride_text(first: Leaf, second: Leaf) -> str:
    def one(leaf):
        s = tuple(leaf.params["stride"])
        kernel = "x".join(str(d) for d in leaf.params["kernel"])
        return f"{s[0] if len(set(s)) == 1 else 'x'.join(map(str, s))} on the {kernel}"
    return f"stride {one(first)}, {one(second)}"


def _stride_placements(pairs: Sequence[Pair], graph: Graph) -> list[tuple[Pair, Pair]]:
    """(first, second) conv pairs of one block whose strides are swapped between the sides:
    the second is the next convolution after the first (through normalisation layers), and
    the product of the two strides is the same on both sides."""
    by_keras = {p.keras.name: p for p in pairs}
    mismatched = [p for p in pairs if p.keras.kind == "conv"
                  and tuple(p.keras.params["stride"]) != tuple(p.torch.params["stride"])]
    names = {p.keras.name for p in mismatched}
    found, used = [], set()
    for first in mismatched:
        if first.keras.name in used:
            continue
        frontier, seen, nxt = [first.keras.name], set(), None
        while frontier and nxt is None:
            name = frontier.pop(0)
            for p in pairs:
                if p.keras.name in seen or name not in graph.weighted_sources(p.keras.name):
                    continue
                seen.add(p.keras.name)
                if p.keras.kind == "conv":
                    nxt = nxt or p
                else:
                    frontier.append(p.keras.name)
        if nxt is None or nxt.keras.name in used or nxt.keras.name not in names:
            continue
        product = [a * b for a, b in zip(first.keras.params["stride"], nxt.keras.params["stride"])]
        if product == [a * b for a, b in zip(first.torch.params["stride"],
                                             nxt.torch.params["stride"])]:
            found.append((by_keras[first.keras.name], nxt))
            used.update((first.keras.name, nxt.keras.name))
    return found


def _lint_strides(pairs: Sequence[Pair], graph: Graph, findings: list[Finding]) -> list[Finding]:
    """Replace the two PORT_CONV_STRIDE findings of a swapped stride by one placement finding."""
    placements = _stride_placements(pairs, graph)
    if not placements:
        return findings
    inside = {(p.keras.name, p.torch.name) for pq in placements for p in pq}
    out = [f for f in findings if not (f.code == "PORT_CONV_STRIDE"
                                       and (f.keras_layer, f.torch_layer) in inside)]
    for first, second in placements:
        out.append(make_finding("PORT_CONV_STRIDE_PLACEMENT", None,
                                _stride_text(first.keras, second.keras),
                                _stride_text(first.torch, second.torch),
                                keras_layer=first.keras.name, torch_layer=second.torch.name,
                                pairs=((first.keras.name, first.torch.name),
                                       (second.keras.name, second.torch.name))))
    return out


def _lint_norm(p: Pair) -> list[Finding]:
    k, t = p.keras.params, p.torch.params
    out = []
    code = "PORT_BN_EPSILON" if p.keras.kind == "bn" else "PORT_LN_EPSILON"
    if _differs(k["eps"], t["eps"]):
        out.append(make_finding(code, p, k["eps"], t["eps"]))
    if (k["center"], k["scale"]) != (t["center"], t["scale"]):
        out.append(make_finding("PORT_BN_AFFINE", p, f"center={k['center']} scale={k['scale']}",
                                f"affine center={t['center']} scale={t['scale']}"))
    if p.keras.kind == "bn":
        if k["stats"] != t["stats"]:
            out.append(make_finding("PORT_BN_STATS", p, k["stats"], t["stats"]))
        # momentum in torch's convention on both records; None: statistics never move
        km, tm = k.get("momentum"), t.get("momentum")
        if km is not None and tm is not None and _differs(km, tm):
            out.append(make_finding("PORT_BN_MOMENTUM", p, k["keras_momentum"], tm,
                                    f"Keras {k['keras_momentum']:g} is torch {km:g}"))
    return out


def _lint_dense(p: Pair) -> list[Finding]:
    k, t = p.keras.params, p.torch.params
    out = []
    if k["bias"] != t["bias"]:
        out.append(make_finding("PORT_DENSE_BIAS", p, k["bias"], t["bias"]))
    return out + _lint_lora(p)


def _lint_lora(p: Pair) -> list[Finding]:
    """A LoRA adapter on one side only, or with another rank, scale or dropout."""
    k, t = p.keras.params, p.torch.params
    kr, tr = k.get("lora_rank"), t.get("lora_rank")
    if kr is None and tr is None:
        return []
    if kr is None or tr is None:
        return [make_finding("PORT_LORA_MISSING", p, f"rank {kr}" if kr else "none",
                             f"rank {tr}" if tr else "none")]
    out = []
    if kr != tr:
        out.append(make_finding("PORT_LORA_RANK", p, kr, tr))
    if _differs(k["lora_scale"], t["lora_scale"]):
        out.append(make_finding("PORT_LORA_SCALE", p, k["lora_scale"], t["lora_scale"],
                                "alpha / rank"))
    if _differs(k.get("lora_dropout", 0.0), t.get("lora_dropout", 0.0)):
        out.append(make_finding("PORT_LORA_DROPOUT", p, k.get("lora_dropout", 0.0),
                                t.get("lora_dropout", 0.0)))
    return out


def _lint_attention(p: Pair) -> list[Finding]:
    k, t = p.keras.params, p.torch.params
    out = []
    if k["heads"] != t["heads"]:
        out.append(make_finding("PORT_ATTENTION_HEADS", p, k["heads"], t["heads"],
                                f"head_dim {k['head_dim']} vs {t['head_dim']}"))
    if (k["bias"], k["out_bias"]) != (t["bias"], t["out_bias"]):
        out.append(make_finding("PORT_ATTENTION_BIAS", p,
                                f"q/k/v {k['bias']}, output {k['out_bias']}",
                                f"q/k/v {t['bias']}, output {t['out_bias']}"))
    if not math.isclose(k["dropout"], t["dropout"], rel_tol=tol.PORT_RATE_RTOL):
        out.append(make_finding("PORT_DROPOUT_RATE", p, k["dropout"], t["dropout"],
                                "the attention probabilities' dropout"))
    return out


def _lint_activation(p: Pair, last_k: bool, last_t: bool) -> list[Finding]:
    ka, ta = p.keras.params.get("activation"), p.torch.params.get("activation")
    if ka == ta or UNKNOWN in (ka, ta):
        return []
    # "none" is only certain where nothing weighted follows: a describer records the
    # activation functions it knows, and one written as arithmetic would pass unseen.
    if (ka is None and not last_k) or (ta is None and not last_t):
        return []
    detail = (f"exact GELU and its tanh approximation differ by up to {GELU_TANH_MAX_ABS:g} "
              "per element" if {ka, ta} == {"gelu", "gelu_tanh"} else "")
    return [make_finding("PORT_ACTIVATION", p, ka or "none", ta or "none", detail)]


def _anchor(graph: Graph, leaf: Leaf, rename: Mapping[str, str]) -> frozenset[str]:
    """Where a context record sits: the weighted layers its input comes from (torch names)."""
    return frozenset(rename.get(s, s) for s in graph.weighted_sources(leaf.name))


def _lint_dropout(pairs: Sequence[Pair], keras_graph: Graph,
                  torch_graph: Graph) -> list[Finding]:
    """Dropout and stochastic depth, matched by place (the layers they follow), compared by
    rate and mode; those with no twin at their place are missing on the other side."""
    kd = [leaf for leaf in keras_graph.leaves if leaf.kind == "dropout" and leaf.params["rate"]]
    td = [leaf for leaf in torch_graph.leaves if leaf.kind == "dropout" and leaf.params["rate"]]
    matched: list[tuple[Leaf, Leaf]] = []
    if keras_graph.traced and torch_graph.traced:
        rename = {p.keras.name: p.torch.name for p in pairs} | {INPUT: INPUT}
        free = list(td)
        for k in kd:
            place = _anchor(keras_graph, k, rename)
            t = next((t for t in free if _anchor(torch_graph, t, {}) == place), None)
            if t is not None:
                free.remove(t)
                matched.append((k, t))
    else:
        matched = list(zip(kd, td))
    out = []
    for k, t in matched:
        if not math.isclose(k.params["rate"], t.params["rate"], rel_tol=tol.PORT_RATE_RTOL):
            out.append(make_finding("PORT_DROPOUT_RATE", None, k.params["rate"],
                                    t.params["rate"], keras_layer=k.name, torch_layer=t.name))
        if k.params.get("mode", "element") != t.params.get("mode", "element"):
            out.append(make_finding("PORT_DROPOUT_MODE", None, k.params.get("mode", "element"),
                                    t.params.get("mode", "element"), keras_layer=k.name,
                                    torch_layer=t.name))
    for side, extra in (("keras", [k for k in kd if all(k is not m for m, _ in matched)]),
                        ("torch", [t for t in td if all(t is not m for _, m in matched)])):
        if not extra:
            continue
        first, rates = extra[0], [leaf.params["rate"] for leaf in extra]
        spread = (f", rates {min(rates):g} to {max(rates):g}" if len(set(rates)) > 1 else "")
        detail = (f"{len(extra)} {side} {first.cls} layers{spread} with no twin after the same "
                  f"layers on the other side; keras has {len(kd)} dropout layers, torch {len(td)}")
        values = (first.params["rate"], "none") if side == "keras" else ("none",
                                                                          first.params["rate"])
        out.append(make_finding("PORT_DROPOUT_MISSING", None, *values, detail,
                                keras_layer=first.name if side == "keras" else "(none)",
                                torch_layer=first.name if side == "torch" else "(none)",
                                pairs=tuple((leaf.name, "(none)") if side == "keras"
                                            else ("(none)", leaf.name) for leaf in extra)))
    return out


def affine_of(records: Sequence[Leaf], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel map x -> a * x + b that a model's preprocessing records apply."""
    a, b = np.ones(channels), np.zeros(channels)
    for leaf in records:
        params = leaf.params
        if params["op"] == "rescale":
            scale = np.broadcast_to(np.asarray(params["scale"], np.float64), channels)
            a, b = a * scale, b * scale + np.broadcast_to(
                np.asarray(params["offset"], np.float64), channels)
        else:  # normalize: (x - mean) / max(sqrt(variance), epsilon)
            std = np.maximum(np.sqrt(np.broadcast_to(np.asarray(params["variance"], np.float64),
                                                     channels)), params.get("epsilon", 0.0))
            a, b = a / std, (b - np.broadcast_to(np.asarray(params["mean"], np.float64),
                                                 channels)) / std
    return a, b


def _numbers(values: np.ndarray) -> str:
    """Per-channel numbers to 8 digits: enough to apply them again (float32 holds ~7)."""
    values = np.asarray(values, np.float64).ravel()
    if np.all(values == values[0]):
        return f"{values[0]:.8g}"
    return "[" + ", ".join(f"{v:.8g}" for v in values) + "]"


def _describe_preprocessing(records: Sequence[Leaf], channels: int) -> str:
    if not records:
        return "none"
    parts = []
    for leaf in records:
        params = leaf.params
        if params["op"] == "rescale":
            parts.append(f"{leaf.cls}(scale {_numbers(params['scale'])}, offset "
                         f"{_numbers(params['offset'])})")
        else:
            parts.append(f"{leaf.cls}(mean {_numbers(params['mean'])}, variance "
                         f"{_numbers(params['variance'])})")
    a, b = affine_of(records, channels)
    offset = (f"- {_numbers(-b)}" if np.all(b < 0) and np.all(b == b[0]) else
              f"+ {_numbers(b)}")
    return f"{' then '.join(parts)}: x -> x * {_numbers(a)} {offset}"


def _lint_preprocessing(keras_leaves: Sequence[Leaf],
                        torch_leaves: Sequence[Leaf]) -> list[Finding]:
    """Preprocessing inside a model (Rescaling, Normalization): the same per-channel affine
    on both sides, or a finding with each side's mean and variance."""
    k = [leaf for leaf in keras_leaves if leaf.kind == "preprocess"]
    t = [leaf for leaf in torch_leaves if leaf.kind == "preprocess"]
    if not k and not t:
        return []
    channels = int((k or t)[0].params["channels"])
    (ka, kb), (ta, tb) = affine_of(k, channels), affine_of(t, channels)
    rtol = tol.PORT_PREPROCESSING_RTOL
    if np.allclose(ka, ta, rtol=rtol, atol=0) and np.allclose(kb, tb, rtol=rtol, atol=rtol):
        return []
    side = "keras" if k and not t else "torch" if t and not k else "each"
    return [make_finding("PORT_PREPROCESSING", None, _describe_preprocessing(k, channels),
                         _describe_preprocessing(t, channels),
                         f"{side} model normalises its input inside the model",
                         keras_layer=", ".join(leaf.name for leaf in k) or "(none)",
                         torch_layer=", ".join(leaf.name for leaf in t) or "(none)")]


def lint(pairs: Sequence[Pair], keras_leaves: Sequence[Leaf], torch_leaves: Sequence[Leaf],
         tensors: Mapping[str, tuple[dict, dict]] | None = None) -> list[Finding]:
    """Static findings: hyperparameters of every pair; weights when ``tensors`` are given.

    ``tensors``: pair label -> (keras canonical tensors, torch canonical tensors),
    compared only for models checked with the weights they were given.
    """
    keras_graph, torch_graph = Graph(keras_leaves), Graph(torch_leaves)
    findings: list[Finding] = _lint_preprocessing(keras_leaves, torch_leaves)
    per_pair: list[Finding] = []
    for p in pairs:
        if p.keras.kind == "conv":
            per_pair += _lint_conv(p)
        elif p.keras.kind in ("bn", "layernorm"):
            per_pair += _lint_norm(p)
        elif p.keras.kind == "dense":
            per_pair += _lint_dense(p)
        elif p.keras.kind == "attention":
            per_pair += _lint_attention(p)
        per_pair += _lint_activation(p, not keras_graph.has_weighted_after(p.keras),
                                     not torch_graph.has_weighted_after(p.torch))
    findings += _lint_strides(pairs, keras_graph, per_pair)
    findings += _lint_dropout(pairs, keras_graph, torch_graph)
    if tensors is not None:
        findings += _lint_weights(pairs, tensors)
    return grouped(findings)


# tensors compared for a model checked with the weights it was given: base and adapter
# tensors each on their own
_COMPARED = ("weight", "bias", "out_weight", "out_bias", "lora_A", "lora_B")


def _square_blocks(value) -> list[np.ndarray] | None:
    """A canonical (out, in) weight as its square blocks: itself when square, the three
    (E, E) rows [q; k; v] of a fused (3E, E) attention projection; None otherwise."""
    value = np.asarray(value)
    if value.ndim != 2:
        return None
    rows, cols = value.shape
    if rows == cols:
        return [value]
    if rows == 3 * cols:
        return [value[i * cols:(i + 1) * cols] for i in range(3)]
    return None


def _transposed(keras_value, torch_value) -> bool:
    """Every square block of the Keras side equals torch's transposed (copied with no
    transpose: the shapes cannot tell)."""
    kb, tb = _square_blocks(keras_value), _square_blocks(torch_value)
    return (kb is not None and tb is not None and len(kb) == len(tb)
            and all(np.allclose(a.T, b, rtol=tol.FORWARD_RTOL, atol=tol.FORWARD_ATOL)
                    for a, b in zip(kb, tb)))


def _lint_weights(pairs: Sequence[Pair], tensors) -> list[Finding]:
    out, differing = [], []
    for p in pairs:
        k, t = tensors[p.label]
        keys = [key for key in _COMPARED if key in k and key in t
                and np.shape(k[key]) == np.shape(t[key])]
        bad = [key for key in keys if not np.allclose(k[key], t[key], rtol=tol.FORWARD_RTOL,
                                                        atol=tol.FORWARD_ATOL)]
        if not bad:
            continue
        unpermuted = k.get("weight_unpermuted")
        if ("weight" in bad and unpermuted is not None
                and np.allclose(unpermuted, t["weight"], rtol=tol.FORWARD_RTOL,
                                atol=tol.FORWARD_ATOL)):
            out.append(make_finding("PORT_FLATTEN_DENSE_ORDER", p,
                                    f"Flatten of (H, W, C) {tuple(p.keras.params['flatten_from'])}",
                                    "rows in (H, W, C) order instead of (C, H, W)"))
            continue
        transposed = [key for key in bad if _transposed(k[key], t[key])]
        if transposed:
            out.append(make_finding("PORT_WEIGHT_TRANSPOSED", p,
                                    f"{'/'.join(transposed)} = torch's transposed",
                                    f"{'/'.join(transposed)} {tuple(np.shape(t[transposed[0]]))}"))
            bad = [key for key in bad if key not in transposed]
            if not bad:
                continue
        differing.append((p, bad, max(float(np.max(np.abs(k[key] - t[key]))) for key in bad)))
    if differing:
        p, bad, change = differing[0]
        out.append(make_finding("PORT_WEIGHTS_DIFFER", p, f"{'/'.join(bad)}",
                                f"max abs difference {change:.3g}",
                                f"{len(differing)} of {len(pairs)} pairs differ, first shown"))
    return out
