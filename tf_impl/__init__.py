"""Keras 3 (TensorFlow backend) side of freeze-parity.

``torch_impl`` is imported first on purpose: TensorFlow loaded before
torchvision / ``torch._dynamo`` segfaults the process with the pinned wheels,
so this import makes ``import tf_impl; import torch_impl`` safe too. TensorFlow's
start-up log is kept off stderr (:mod:`shared.quiet`; ``FREEZE_PARITY_DEBUG=1``
shows it).
"""

from __future__ import annotations

import os

import torch_impl  # noqa: F401  (import order: torch before TensorFlow, see above)
from shared.quiet import debug_requested, quiet_native_stderr

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
if not debug_requested():  # native records below ERROR after the import (debug: all of them)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow's start-up log (absl preamble, "oneDNN custom operations are on") is written
# to fd 2 during this import, whatever TF_CPP_MIN_LOG_LEVEL says: see shared/quiet.py
with quiet_native_stderr():
    import keras  # noqa: E402
    import tensorflow as tf  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"freeze-parity: tf_impl needs the Keras TensorFlow backend, got KERAS_BACKEND="
        f"{keras.backend.backend()!r}; unset KERAS_BACKEND or set it to 'tensorflow'."
    )

# Cross-framework parity is measured in float32: no TF32 on GPUs that have it.
tf.config.experimental.enable_tensor_float_32_execution(False)

# TensorFlow's Python log: compare builds a model per run (free run, lockstep, float64
# decisions), and TensorFlow warns on stderr that "5 out of the last 5 calls ... triggered
# tf.function retracing" (each is a new model's own function, traced once). No framework
# log line in the project's output (FREEZE_PARITY_DEBUG=1: all of it).
if not debug_requested():
    tf.get_logger().setLevel("ERROR")

__all__ = ["keras", "tf"]
