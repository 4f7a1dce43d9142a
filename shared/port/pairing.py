"""Pairing: each Keras weighted layer with the torch module that computes the same thing.

By dataflow, not call order: a Keras layer pairs with the torch module of the same
kind and tensor shapes whose input comes from the partners of the layers its own
input comes from (:meth:`shared.port.graph.Graph.weighted_sources`). Both graphs are
walked from the model input, so branches called in a different order (Keras calls
ResNet's shortcut convolution before the main branch, torchvision after it) pair
all the same. A name map (``--map KERAS=TORCH``) fixes pairs first. What the graph
cannot decide is an error that names it, never a guess: two torch modules that fit
one Keras layer equally (``--map`` decides), or a layer nothing fits.

Models whose dataflow a describer could not trace are paired in call order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shared.port.graph import Graph
from shared.port.records import INPUT, Leaf, Pair, PortError

__all__ = ["brief", "compatible", "pair"]


def brief(leaf: Leaf) -> str:
    shapes = ", ".join(f"{k} {tuple(v)}" for k, v in leaf.shapes.items())
    return f"{leaf.name} ({leaf.cls}, {leaf.kind}{': ' + shapes if shapes else ''})"


def compatible(k: Leaf, t: Leaf) -> str:
    """Why ``k`` and ``t`` cannot be paired, or "" when they can."""
    if k.kind != t.kind:
        return f"kind {k.kind} vs {t.kind}"
    for key in ("weight", "bias", "out_weight", "out_bias"):
        if key in k.shapes and key in t.shapes and tuple(k.shapes[key]) != tuple(t.shapes[key]):
            groups = (k.params.get("groups"), t.params.get("groups"))
            why = (f" (groups {groups[0]} vs {groups[1]}: a Keras DepthwiseConv2D is torch "
                   f"groups=in_channels)" if k.kind == "conv" and groups[0] != groups[1] else "")
            return f"{key} shape {tuple(k.shapes[key])} vs {tuple(t.shapes[key])}{why}"
    if (k.kind in ("bn", "layernorm", "scale")
            and k.params.get("features") != t.params.get("features")):
        return f"features {k.params.get('features')} vs {t.params.get('features')}"
    return ""


def pair(keras_leaves: Sequence[Leaf], torch_leaves: Sequence[Leaf],
         name_map: Mapping[str, str] | None = None) -> list[Pair]:
    """Weighted leaves paired by dataflow (``name_map`` keras name -> torch name first).

    Returns the pairs in Keras call order. Raises :class:`PortError` (one line) when the
    counts differ, a mapped pair has different kinds or shapes, no torch module fits a
    Keras layer, or several fit it equally.
    """
    ks = [leaf for leaf in keras_leaves if leaf.weighted]
    ts = [leaf for leaf in torch_leaves if leaf.weighted]
    by_k = {leaf.name: leaf for leaf in ks}
    by_t = {leaf.name: leaf for leaf in ts}
    fixed: dict[str, Leaf] = {}
    for kname, tname in dict(name_map or {}).items():
        if kname not in by_k:
            raise PortError(f"name map: keras layer {kname!r} is not a weighted leaf of the "
                            "Keras model")
        if tname not in by_t:
            raise PortError(f"name map: torch module {tname!r} is not a weighted leaf of the "
                            "torch model")
        fixed[kname] = by_t[tname]
    for kname, t in fixed.items():
        _check_compatible(by_k[kname], t, "")
    if len(ks) != len(ts):
        taken = {id(t) for t in fixed.values()}
        rest_t = [t for t in ts if id(t) not in taken]
        rest_k = [k for k in ks if k.name not in fixed]
        extra = (rest_k[len(rest_t)] if len(rest_k) > len(rest_t) else rest_t[len(rest_k)])
        side = "keras" if len(rest_k) > len(rest_t) else "torch"
        raise PortError(f"different weighted leaf counts: keras {len(ks)}, torch {len(ts)}; "
                        f"first {side} layer without a partner by order: {brief(extra)}")
    keras_graph, torch_graph = Graph(keras_leaves), Graph(torch_leaves)
    if keras_graph.traced and torch_graph.traced:
        partner = _by_dataflow(ks, ts, keras_graph, torch_graph, fixed)
    else:
        partner = _by_order(ks, ts, fixed)
    return [Pair(k, partner[k.name]) for k in ks]


def _check_compatible(k: Leaf, t: Leaf, context: str) -> None:
    why = compatible(k, t)
    if why:
        raise PortError(f"cannot pair keras layer {brief(k)} with torch module {brief(t)}: "
                        f"{why}{context} (pass a name map if the graph cannot decide)")


def _by_order(ks: Sequence[Leaf], ts: Sequence[Leaf], fixed: dict[str, Leaf]) -> dict:
    taken = {id(t) for t in fixed.values()}
    order = iter([t for t in ts if id(t) not in taken])
    partner = {k.name: fixed[k.name] if k.name in fixed else next(order) for k in ks}
    for k in ks:
        _check_compatible(k, partner[k.name], " (paired in call order: a dataflow could not "
                                              "be traced)")
    return partner


def _by_dataflow(ks: Sequence[Leaf], ts: Sequence[Leaf], keras_graph: Graph,
                 torch_graph: Graph, fixed: dict[str, Leaf]) -> dict[str, Leaf]:
    k_in = {k.name: keras_graph.weighted_sources(k.name) for k in ks}
    t_in = {t.name: torch_graph.weighted_sources(t.name) for t in ts}
    mapped = {INPUT: INPUT}  # keras name -> torch name, for the paired ones
    partner: dict[str, Leaf] = {}
    taken: set[str] = set()
    pending = list(ks)
    while pending:
        ready = [k for k in pending if all(s in mapped for s in k_in[k.name])]
        candidates = {}
        for k in ready:
            if k.name in fixed:
                candidates[k.name] = [fixed[k.name]]
                continue
            wanted = frozenset(mapped[s] for s in k_in[k.name])
            candidates[k.name] = [t for t in ts if t.name not in taken
                                  and t_in[t.name] == wanted and not compatible(k, t)]
        progress = False
        for k in ready:
            found = [t for t in candidates[k.name] if t.name not in taken]
            if len(found) == 1:
                partner[k.name], mapped[k.name] = found[0], found[0].name
                taken.add(found[0].name)
                pending.remove(k)
                progress = True
        if progress:
            continue
        ambiguous = next((k for k in ready if len(candidates[k.name]) > 1), None)
        if ambiguous is not None:
            names = ", ".join(t.name for t in candidates[ambiguous.name])
            raise PortError(
                f"pairing is ambiguous: keras layer {brief(ambiguous)} fits torch modules "
                f"{names} equally (same inputs, kind and shapes in the dataflow graph); pass "
                f"a name map (--map {ambiguous.name}=TORCH_MODULE) to decide")
        _unpairable(ready[0] if ready else pending[0], ts, taken, k_in, t_in, mapped)
    return partner


def _unpairable(k: Leaf, ts, taken, k_in, t_in, mapped) -> None:
    """Raise the one-line error for a Keras layer no torch module fits."""
    inputs = ", ".join(sorted(mapped.get(s, s) for s in k_in[k.name]))
    wanted = frozenset(mapped.get(s, s) for s in k_in[k.name])
    free = [t for t in ts if t.name not in taken]
    same_inputs = [t for t in free if t_in[t.name] == wanted]
    if same_inputs:
        _check_compatible(k, same_inputs[0], f"; both read {inputs}")
    nearest = f"; first unpaired torch module: {brief(free[0])}" if free else ""
    raise PortError(f"cannot pair keras layer {brief(k)}: no torch module reads the partners of "
                    f"its inputs ({inputs}) with the same kind and shapes{nearest} (pass a name "
                    "map if the graph cannot decide)")
