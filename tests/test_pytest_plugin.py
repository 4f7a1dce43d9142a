"""The pytest plugin: loaded by entry point without importing a framework; its fixtures work.

``tests/examples/user_suite_example.py`` is a user's suite (the README example):
it is run with pytester in a fresh pytest process, as a user runs it (what the
frameworks print at start-up shows only there), and its two frozen tests must
pass and its two naive-torch tests must fail, each with the plugin's own
message. Loading the plugin without a framework needs a fresh interpreter too.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from torch import nn

from shared.archs import arch_config
from shared.pytest_plugin import assert_train_eval_match
from shared.quiet import DEBUG_ENV, split_framework_log
from tf_impl.freeze import apply_strategy as tf_apply
from tf_impl.model import LegacyBatchNormalization, default_norm_layer
from tf_impl.model import build_model as tf_build
from torch_impl.freeze import apply_strategy as torch_apply
from torch_impl.model import build_model as torch_build

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).parent / "examples" / "user_suite_example.py"
N, CLASSES = 4, 5


def _batch_torch():
    x = np.random.default_rng(0).standard_normal((N, 3, 32, 32)).astype(np.float32)
    x = torch.from_numpy(x)
    return x + 1.0, torch.arange(N) % CLASSES


def _batch_tf():
    x = np.random.default_rng(0).standard_normal((N, 32, 32, 3)).astype("float32") + 1.0
    return x, np.arange(N) % CLASSES


def test_plugin_registered_as_pytest11_entry_point(pytestconfig):
    points = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert points.get("freeze_parity") == "shared.pytest_plugin"
    assert pytestconfig.pluginmanager.has_plugin("freeze_parity")


def test_plugin_import_loads_no_framework():
    code = ("import sys, shared.pytest_plugin; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_assert_train_eval_match_torch_frozen_passes_and_restores_state():
    model = torch_apply(torch_build("tinyconv", CLASSES), "frozen")
    model.eval()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    assert_train_eval_match(model, _batch_torch(), nn.functional.cross_entropy)
    assert not model.training  # modes as found
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items())


def test_assert_train_eval_match_torch_naive_fails_with_both_losses():
    model = torch_apply(torch_build("tinyconv", CLASSES), "naive")
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AssertionError, match=r"training-mode loss .* != inference-mode loss .*"):
        assert_train_eval_match(model, _batch_torch(), nn.functional.cross_entropy)
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items())  # stats restored


def test_assert_train_eval_match_tf_frozen_passes_naive_fails():
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    assert_train_eval_match(tf_apply(tf_build("tinyconv", CLASSES), "frozen"), _batch_tf(), loss)
    norm = default_norm_layer(arch_config("tinyconv"), LegacyBatchNormalization)
    naive = tf_apply(tf_build("tinyconv", CLASSES, norm_layer=norm), "naive")
    with pytest.raises(AssertionError, match="training-mode loss"):
        assert_train_eval_match(naive, _batch_tf(), loss)


def test_assert_train_eval_match_rejects_non_model():
    with pytest.raises(TypeError, match="expected a torch.nn.Module or a keras.Model"):
        assert_train_eval_match(object(), _batch_torch(), nn.functional.cross_entropy)


@pytest.mark.slow
def test_plugin_user_suite_frozen_passes_naive_fails_no_framework_log(pytester, monkeypatch):
    """A fresh pytest process, as a user runs their suite, with TensorFlow's oneDNN start-up
    log forced on and pytest's capture off (-s): the raw output holds no framework log line,
    though the suite imports Keras itself (the plugin makes TensorFlow's first import quiet)."""
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    pytester.makeconftest("import torch_impl  # noqa: F401  (torch before TensorFlow)\n")
    pytester.makepyfile(test_user_suite=EXAMPLE.read_text())
    result = pytester.runpytest_subprocess("-q", "-s", "-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines([
        ("E * shared.audit.FrozenTensorChanged: freeze_guard [[]torch]: *base.1.running_mean "
         "(max abs change *"),
        "E * AssertionError: training-mode loss * != inference-mode loss * at the same weights*",
    ], consecutive=False)
    raw = "\n".join(result.outlines + result.errlines)
    assert "absl::InitializeLog" not in raw and "oneDNN custom operations" not in raw, raw
    assert split_framework_log(raw)[1] == "", raw
