"""Model factories for ``freeze-parity audit tests.examples.audit_factories:<name>`` tests.

Each returns a model prepared as a training loop would use it (or
``(model, optimizer)``); the CLI imports this module by name, so it must
stay importable from the repository root.
"""

from __future__ import annotations


def frozen_torch():
    from torch_impl.freeze import apply_strategy
    from torch_impl.model import build_model

    return apply_strategy(build_model("tinyconv", 5), "frozen")


def naive_torch():
    from torch_impl.freeze import apply_strategy
    from torch_impl.model import build_model

    return apply_strategy(build_model("tinyconv", 5), "naive")


def frozen_torch_with_sgd_momentum_on_all_params():
    import torch

    model = frozen_torch()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def frozen_tf():
    from tf_impl.freeze import apply_strategy
    from tf_impl.model import build_model

    return apply_strategy(build_model("tinyconv", 5), "frozen")


def not_a_model():
    return "a string"


def broken():
    raise RuntimeError("factory failed on purpose")
