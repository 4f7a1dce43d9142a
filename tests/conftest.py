"""Test-session set-up.

torch_impl is imported before anything else that could load TensorFlow (the
import-order segfault, docs/PORTING.md "Environment"); tf_impl then turns off
TF32 on the TensorFlow side as torch_impl does on the torch side.
"""

import torch_impl  # noqa: F401  (must precede tf_impl / tensorflow / keras)
import tf_impl  # noqa: F401
