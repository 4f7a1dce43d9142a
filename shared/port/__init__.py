"""Port check: a user's Keras model against their PyTorch model, layer by layer.

Framework-free half of ``tf_impl/port.py`` and ``torch_impl/port.py``. Each
framework half only *describes* its model (every leaf layer, and the operations
between leaves it can name, as a neutral :class:`Leaf` record with its tensors in
the canonical layout, torch's, and the records its input comes from) and *runs*
it (per-layer outputs in both modes, K training steps). Everything that compares
lives here, once, one module per concept:

- ``records``: :class:`Leaf`, :class:`Pair`, :class:`PortError`;
- ``graph``: each model's records as a dataflow graph; :func:`fold_context` folds
  explicit padding into convolutions and the following activation into each layer;
- ``activations``: activation functions compared by function, not by name;
- ``pairing``: :func:`pair`, weighted layers paired by dataflow, kind and shapes
  (or an explicit name map); anything unpairable or ambiguous is a :class:`PortError`;
- ``findings``: :data:`FINDINGS`, the codes, what each means and its fix;
- ``lint``: :func:`lint`, every hyperparameter that changes the function or the
  training step, compared pair by pair;
- ``transfer``: :func:`transfer`, weights through the pairing;
- ``divergence``: :func:`divergence`, per-layer max abs / relative differences
  against a named tolerance and the first layer that leaves it;
- ``steps``: the K training steps and what moved on each side;
- ``report``, ``figure``: :class:`PortReport` and its files;
- ``check``: :func:`check_port`, the whole check.

Canonical activations are NCHW (the Keras half transposes); canonical tensors are
torch's (conv OIHW, linear (out, in)) under the keys ``weight``, ``bias``,
``running_mean``, ``running_var``.
"""

from __future__ import annotations

from shared.port.activations import function_of
from shared.port.check import check_port, pair_models
from shared.port.divergence import LayerDiff, divergence, make_batches
from shared.port.figure import PORT_FILES, render_figure, write_port_report
from shared.port.findings import EXPECTED_CODES, FINDINGS, Finding, FindingKind
from shared.port.graph import Graph, fold_context
from shared.port.lint import lint
from shared.port.pairing import pair
from shared.port.records import (
    CONTEXT_KINDS,
    INPUT,
    WEIGHTED_KINDS,
    Leaf,
    Pair,
    PortError,
)
from shared.port.report import PortReport
from shared.port.transfer import transfer

__all__ = [
    "CONTEXT_KINDS",
    "EXPECTED_CODES",
    "FINDINGS",
    "INPUT",
    "PORT_FILES",
    "WEIGHTED_KINDS",
    "Finding",
    "FindingKind",
    "Graph",
    "LayerDiff",
    "Leaf",
    "Pair",
    "PortError",
    "PortReport",
    "check_port",
    "divergence",
    "fold_context",
    "function_of",
    "lint",
    "make_batches",
    "pair",
    "pair_models",
    "render_figure",
    "transfer",
    "write_port_report",
]
