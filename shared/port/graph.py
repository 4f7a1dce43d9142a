"""One model's records as a dataflow graph, and the context folded into its weighted layers.

Each framework half gives every record its ``sources``: the records whose outputs
reach its input through operations it does not record (add, concatenate,
pooling, reshapes). :class:`Graph` reads them: which weighted layers feed which
(through any number of parameter-free records), which records consume a record's
output, and the chain of activations and arithmetic right after a layer.
:func:`fold_context` then writes into each record what the lint compares: the
explicit padding folded into the convolution it feeds, and the activation
function that follows each weighted layer.

Records without ``sources`` (a model the describer could not trace) are read as a
chain in call order.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.port.activations import fold, function_of, token
from shared.port.records import INPUT, Leaf

__all__ = ["Graph", "fold_context"]

# Records a chain passes through when reading the activation after a layer: dropout is
# the identity in inference, a flatten commutes with an elementwise function.
_CHAIN_KINDS = ("activation", "op", "dropout", "flatten")


class Graph:
    """The records of one model, with their sources and consumers."""

    def __init__(self, leaves: Sequence[Leaf]):
        self.leaves = list(leaves)
        self.by_name = {leaf.name: leaf for leaf in self.leaves}
        # traced: every record knows its sources (else: a chain in call order)
        self.traced = all(leaf.sources is not None for leaf in self.leaves)
        self.sources: dict[str, tuple[str, ...]] = {}
        self.direct: dict[str, bool] = {}
        previous = INPUT
        for leaf in self.leaves:
            if self.traced:
                self.sources[leaf.name] = tuple(s for s in leaf.sources
                                                if s == INPUT or s in self.by_name)
                self.direct[leaf.name] = not leaf.via_ops and len(self.sources[leaf.name]) == 1
            else:
                self.sources[leaf.name], self.direct[leaf.name] = (previous,), True
            previous = leaf.name
        self.consumers: dict[str, list[str]] = {INPUT: []}
        for leaf in self.leaves:
            self.consumers.setdefault(leaf.name, [])
            for source in self.sources[leaf.name]:
                self.consumers.setdefault(source, []).append(leaf.name)
        self._weighted_sources: dict[str, frozenset[str]] = {}

    def weighted_sources(self, name: str) -> frozenset[str]:
        """The nearest weighted records (or INPUT) whose outputs reach ``name``'s input."""
        if name in self._weighted_sources:
            return self._weighted_sources[name]
        found: set[str] = set()
        stack, seen = list(self.sources.get(name, ())), set()
        while stack:
            source = stack.pop()
            if source in seen:
                continue
            seen.add(source)
            if source == INPUT or self.by_name[source].weighted:
                found.add(source)
            elif source in self._weighted_sources:
                found |= self._weighted_sources[source]
            else:
                stack.extend(self.sources[source])
        self._weighted_sources[name] = frozenset(found)
        return self._weighted_sources[name]

    def direct_source(self, leaf: Leaf) -> Leaf | None:
        """The one record whose output is exactly ``leaf``'s input, or None."""
        if not self.direct[leaf.name]:
            return None
        (source,) = self.sources[leaf.name]
        return self.by_name.get(source)

    def chain_after(self, leaf: Leaf) -> list[Leaf]:
        """The records after ``leaf`` that each take exactly the previous one's output and
        nothing else, up to a fork, a join, a weighted layer or the model's output."""
        chain, current = [], leaf
        while len(self.consumers[current.name]) == 1:
            nxt = self.by_name[self.consumers[current.name][0]]
            if nxt.kind not in _CHAIN_KINDS or self.direct_source(nxt) is not current:
                break
            chain.append(nxt)
            current = nxt
        return chain

    def has_weighted_after(self, leaf: Leaf) -> bool:
        """Whether any weighted record reads ``leaf``'s output, directly or through others."""
        stack, seen = list(self.consumers[leaf.name]), set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if self.by_name[name].weighted:
                return True
            stack.extend(self.consumers[name])
        return False


def fold_context(leaves: Sequence[Leaf]) -> list[Leaf]:
    """Fold an explicit pad record into the convolution it feeds, and the activation that
    follows each weighted layer into its ``params["activation"]`` (one name per function,
    None for none, UNKNOWN for a chain that is no known activation). Returns the leaves.
    """
    out = list(leaves)
    graph = Graph(out)
    for leaf in out:
        if leaf.kind == "conv":  # the convolution's own padding and input, kept for a refold
            leaf.params.setdefault("conv_pad", leaf.params["pad"])
            leaf.params.setdefault("conv_in_hw", leaf.params.get("in_hw"))
            leaf.params["pad"], leaf.params["in_hw"] = (leaf.params["conv_pad"],
                                                        leaf.params["conv_in_hw"])
            pad = graph.direct_source(leaf)
            if pad is not None and pad.kind == "pad" and graph.consumers[pad.name] == [leaf.name]:
                leaf.params["pad"] = tuple(a + b for a, b in zip(leaf.params["pad"],
                                                                 pad.params["pad"]))
                leaf.params["in_hw"] = pad.params["in_hw"]
        if leaf.weighted:
            fused = leaf.params.get("fused_activation")  # Keras's activation= argument
            leaf.params["activation"] = (
                function_of(fused, leaf.params.get("fused_activation_params")) if fused
                else fold([token(n.kind, n.params) for n in graph.chain_after(leaf)]))
    return out
