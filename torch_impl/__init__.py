"""PyTorch side of freeze-parity.

Importing this package loads torch, ``torch._dynamo`` and torchvision *first*:
with the pinned wheels, TensorFlow loaded before them makes the process die
with SIGSEGV (see docs/PORTING.md, "Environment"). ``tf_impl`` imports this
package before TensorFlow, so either import order of the two packages is safe.
"""

from __future__ import annotations

import sys

_LATE = [m for m in ("tensorflow", "keras") if m in sys.modules]
if _LATE and not {"torch._dynamo", "torchvision"} <= set(sys.modules):
    # Failing loudly here beats the segfault that importing torchvision or
    # creating a torch optimizer would cause a moment later.
    raise ImportError(
        f"freeze-parity: {', '.join(_LATE)} was imported before torch/torchvision; with these "
        "wheels that order segfaults. Import torch_impl (or tf_impl, which imports it first) "
        "before TensorFlow/Keras."
    )

from shared.quiet import quiet_native_stderr  # noqa: E402

# as tf_impl does for TensorFlow's start-up log (torch writes nothing to fd 2 here)
with quiet_native_stderr():
    import torch  # noqa: E402
    import torch._dynamo  # noqa: E402  (optimizers import it lazily; load it before TF)
    import torchvision  # noqa: E402,F401

# Cross-framework parity is measured in float32: no TF32 on GPUs that have it.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

__all__ = ["torch"]
