"""Weight transfer through the pairing: one side's canonical tensors, pair by pair, for the other.

Layouts change only in each framework's ``weights.py`` (through its ``port.py``
read/write); here every tensor is canonical, so a transfer is a dictionary per pair.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from shared.port.records import Pair, PortError

__all__ = ["read_pairs", "transfer"]


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
        # a tensor of another shape on the other side (another LoRA rank) is not copied:
        # the lint names the difference
        out[dst_leaf.name] = {key: src[key] for key in dst
                              if key in src and np.shape(src[key]) == np.shape(dst[key])}
    return out


def read_pairs(kp, tp, keras_model, torch_model, pairs) -> dict[str, tuple[dict, dict]]:
    """Pair label -> (keras canonical tensors, torch canonical tensors)."""
    k = kp.read_tensors(keras_model, [p.keras for p in pairs])
    t = tp.read_tensors(torch_model, [p.torch for p in pairs])
    return {p.label: (k[p.keras.name], t[p.torch.name]) for p in pairs}
