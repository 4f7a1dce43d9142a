"""The neutral records the two framework halves describe their models with.

A :class:`Leaf` is one layer (or one recorded operation) as a forward pass on a
probe input ran it: its kind, the hyperparameters that matter, its tensors'
shapes in the canonical layout (torch's), its output shape, and where its input
came from (``sources``: the records whose outputs reach it through operations
the describer does not record). Weighted kinds are paired one to one; the others
are context the lint reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.errors import UsageError

__all__ = ["CONTEXT_KINDS", "INPUT", "WEIGHTED_KINDS", "Leaf", "Pair", "PortError"]

# Kinds whose layers carry tensors and are paired one to one.
# "attention": a multi-head self-attention unit (Keras MultiHeadAttention, timm's
# Attention, nn.MultiheadAttention) with canonical tensors ``weight`` (3E, E: rows
# [q; k; v], head h at rows h * head_dim + j of each), ``bias`` (3E,), ``out_weight``
# (E_out, E), ``out_bias``; "token": a bare model tensor (a class token, a position
# embedding) that reads no input. A LoRA-wrapped dense layer is a "dense" record with
# ``lora_A`` (r, in) and ``lora_B`` (out, r) beside its base ``weight``.
WEIGHTED_KINDS = ("conv", "dense", "bn", "layernorm", "scale", "attention", "token")
# Kinds the lint reads around them: dropout (and stochastic depth), flatten, explicit
# zero padding, activation functions, preprocessing inside the model (Rescaling,
# Normalization: tensors, but nothing to pair them with), arithmetic with a constant.
CONTEXT_KINDS = ("dropout", "flatten", "pad", "activation", "preprocess", "op")
# The name of the model's input in ``Leaf.sources``.
INPUT = "(input)"


class PortError(UsageError):
    """The two models cannot be compared (not a model, unpairable, wrong input): one line."""


@dataclass
class Leaf:
    """One leaf layer (or recorded operation) as a forward pass called it, framework-neutral."""

    name: str
    kind: str  # one of WEIGHTED_KINDS or CONTEXT_KINDS
    cls: str  # the framework's class (or function) name
    params: dict
    # canonical tensor key -> shape (torch layout); empty for context leaves
    shapes: dict = field(default_factory=dict)
    # canonical output shape without the batch dimension
    output_shape: tuple = ()
    # the framework layer/module itself (not part of the record)
    ref: object = field(default=None, repr=False, compare=False)
    # names of the records whose outputs reach this one's input (INPUT: the model's
    # input), in call order; None when the describer could not trace the dataflow (the
    # records are then taken as a chain in call order)
    sources: tuple | None = None
    # False when the input is exactly the output of the one source (nothing in between);
    # True when operations the describer does not record (add, concatenate, pooling,
    # reshapes) lie between
    via_ops: bool = False

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
