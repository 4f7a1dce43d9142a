"""freeze-parity's pytest plugin: freezing checks for your own models, torch or Keras.

Installed with the package (``pytest11`` entry point), so every pytest run in
the environment loads it, before any conftest. It therefore imports no
framework at load time: the fixtures import the matching ``*_impl`` package
only when first used, through :func:`shared.frameworks.load` (torch first).
With the pinned wheels TensorFlow imported before torchvision segfaults; a
suite that imports Keras at module level should ``import torch_impl`` first
(e.g. at the top of its conftest.py). TensorFlow's start-up log (absl's preamble,
"oneDNN custom operations are on", written to fd 2 while TensorFlow is imported)
stays out of the run's output wherever the suite imports it: the plugin makes
TensorFlow's first import quiet (:func:`shared.quiet.install_quiet_import`;
``FREEZE_PARITY_DEBUG=1`` shows the log).

Fixtures:

- ``freeze_guard``: ``with freeze_guard(model) as watched: <training step>`` raises
  :class:`shared.audit.FrozenTensorChanged`, naming each changed tensor and
  its largest change, if the step moved a frozen parameter or the statistics
  of a BatchNorm that should be in inference mode. ``watched`` lists the
  guarded tensor names.
- ``assert_train_eval_match``: ``assert_train_eval_match(model, (x, y), loss_fn)``
  fails unless the training-mode loss equals the inference-mode loss at the
  same weights (what a correctly frozen base with no dropout gives). Nothing
  is updated. ``loss_fn`` follows the framework's convention: torch
  ``loss_fn(output, target)``, Keras ``loss_fn(y_true, y_pred)``.
- ``freeze_audit``: ``freeze_audit(model, optimizer=None)`` returns the
  :class:`shared.audit.AuditReport` (``report.ok``, ``report.hazard_lines()``).
- ``assert_port_matches``: ``assert_port_matches(keras_model, torch_model, **options)``
  fails unless the port check (:func:`shared.port.check_port`, same options:
  ``input_shape=(H, W, C)``, ``steps``, ``transfer_from``, ...) finds nothing; the
  message names the first divergent layer and every finding. Returns the report.
"""

from __future__ import annotations

import pytest

from shared.audit import FrozenTensorChanged, framework_of
from shared.quiet import install_quiet_import

__all__ = ["FrozenTensorChanged", "assert_port_matches", "assert_train_eval_match",
           "freeze_audit", "freeze_guard"]


_UNDO_QUIET = pytest.StashKey()


def pytest_configure(config):
    # a suite's `import keras` imports TensorFlow: its first import is quiet
    config.stash[_UNDO_QUIET] = install_quiet_import(("tensorflow",))


def pytest_unconfigure(config):
    config.stash.get(_UNDO_QUIET, lambda: None)()


def _impl(model):
    framework = framework_of(model)
    if framework is None:
        raise TypeError(f"freeze-parity: expected a torch.nn.Module or a keras.Model, got "
                        f"{type(model).__module__}.{type(model).__name__}")
    from shared.frameworks import load

    return load(framework, "audit")


def freeze_guard(model):
    """Context manager: the framework's ``freeze_guard`` for ``model``."""
    return _impl(model).freeze_guard(model)


def freeze_audit(model, optimizer=None):
    """The framework's ``audit(model, optimizer)``: an AuditReport."""
    return _impl(model).audit(model, optimizer)


def assert_train_eval_match(model, batch, loss_fn) -> None:
    """Assert training-mode loss == inference-mode loss on ``batch`` at the same weights."""
    from shared.tolerances import SAME_FRAMEWORK_ATOL

    train, evaluation = _impl(model).train_eval_losses(model, batch, loss_fn)
    gap = abs(train - evaluation)
    if not gap <= SAME_FRAMEWORK_ATOL:
        raise AssertionError(
            f"training-mode loss {train:.7g} != inference-mode loss {evaluation:.7g} at the same "
            f"weights (|diff| {gap:.3g} > SAME_FRAMEWORK_ATOL {SAME_FRAMEWORK_ATOL:g}): BatchNorm "
            "using batch statistics or Dropout still active in training; "
            "freeze_audit(model).hazard_lines() says where")


def assert_port_matches(keras_model, torch_model, **options):
    """Assert the port check of ``keras_model`` against ``torch_model`` finds nothing."""
    from shared.port import check_port

    report = check_port(keras_model, torch_model, **options)
    if not report.ok:
        raise AssertionError("\n".join([report.summary()] + report.finding_lines()))
    return report


@pytest.fixture(name="freeze_guard")
def _freeze_guard_fixture():
    """``with freeze_guard(model) as watched:`` fails if the block moved a frozen tensor."""
    return freeze_guard


@pytest.fixture(name="assert_train_eval_match")
def _assert_train_eval_match_fixture():
    """``assert_train_eval_match(model, (x, y), loss_fn)``: training-mode loss == inference-mode."""
    return assert_train_eval_match


@pytest.fixture(name="freeze_audit")
def _freeze_audit_fixture():
    """``freeze_audit(model, optimizer=None)`` -> AuditReport of the model's freezing hazards."""
    return freeze_audit


@pytest.fixture(name="assert_port_matches")
def _assert_port_matches_fixture():
    """``assert_port_matches(keras_model, torch_model, **options)``: the port check finds nothing."""
    return assert_port_matches
