"""keras.applications models as the port check's families use them. Mirrors
``torch_impl/applications.py``.

``build("ResNet50", 64)`` is ``keras.applications.ResNet50(weights=None,
include_top=False, pooling="avg", input_shape=(64, 64, 3))``: random weights (no
download), the features a user fine-tunes on, average-pooled.
"""

from __future__ import annotations

import keras

from shared.port.families import FAMILIES, SIZE

__all__ = ["build"]


def build(family: str, size: int = SIZE, **options):
    """``family`` (a FAMILIES key, or any keras.applications name) without its top."""
    name = FAMILIES[family][0] if family in FAMILIES else family
    factory = getattr(keras.applications, name)
    return factory(weights=None, include_top=False, pooling="avg",
                   input_shape=(size, size, 3), **options)
