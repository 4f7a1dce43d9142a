"""Freeze audit: each hazard fires on the mistake it names and never on a correct freeze.

"Correct" is the project's own strategies (``apply_strategy`` in both
frameworks, also after compile + fit in Keras) and a torchvision ResNet-18
frozen the two recommended ways. Each mistake is built the way people make
it. The CLI (``freeze-parity audit``) is tested on factories from
``tests/examples/audit_factories.py`` and on a saved ``.keras`` file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
import torchvision
from cli_inprocess import cli
from torch import nn

from shared.archs import arch_config
from shared.audit import (
    HAZARDS,
    AuditReport,
    FrozenTensorChanged,
    Hazard,
    LayerRow,
    framework_of,
    make_hazard,
    snapshot_diff,
)
from shared.errors import UsageError
from tf_impl import audit as tf_audit
from tf_impl.freeze import apply_strategy as tf_apply
from tf_impl.model import LegacyBatchNormalization, default_norm_layer
from tf_impl.model import build_model as tf_build
from torch_impl import audit as torch_audit
from torch_impl.freeze import apply_strategy as torch_apply
from torch_impl.model import build_model as torch_build

REPO = Path(__file__).resolve().parents[1]
CORRECT = ["frozen", "feature_extraction", "partial"]
N, CLASSES = 4, 5


def _images_tf(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((N, 32, 32, 3)).astype("float32") + 1.0


def _labels() -> np.ndarray:
    return np.arange(N) % CLASSES


def _compile_fit(model, optimizer=None):
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(_images_tf(), _labels(), batch_size=N, epochs=1, verbose=0, shuffle=False)
    return model


def _tf_naive():
    norm = default_norm_layer(arch_config("tinyconv"), LegacyBatchNormalization)
    return tf_apply(tf_build("tinyconv", CLASSES, norm_layer=norm), "naive")


# --- shared: report, catalogue, diff -----------------------------------------------------------

def test_hazard_catalogue_codes_name_their_framework():
    for code, kind in HAZARDS.items():
        prefix = {"torch": "TORCH_", "tf": "KERAS_"}[kind.framework]
        assert code.startswith(prefix), f"{code}: framework {kind.framework} wants prefix {prefix}"
        assert kind.trigger and kind.fix, f"{code}: empty trigger or fix"


def test_make_hazard_groups_layers_under_common_prefix():
    hazard = make_hazard("TORCH_EVAL_UNDONE_BY_TRAIN",
                         ["base.block1.bn", "base.block2.bn", "base.block3.bn", "base.block4.bn"])
    assert hazard.layer == "base"
    assert "4 layers (base.block1.bn, base.block2.bn, base.block3.bn and 1 more)" in hazard.message
    assert hazard.fix == HAZARDS["TORCH_EVAL_UNDONE_BY_TRAIN"].fix


def test_report_ok_to_dict_and_render():
    row = LayerRow("base.bn", "BatchNorm2d", "none", "batch", True, None)
    hazard = Hazard("TORCH_BN_FROZEN_PARAMS_BATCH_STATS", "base.bn", "msg", "fix", ("base.bn",))
    report = AuditReport("torch", [row], [hazard])
    assert not report.ok and AuditReport("torch", [row], []).ok
    data = report.to_dict()
    assert data["ok"] is False and data["rows"][0]["norm_mode"] == "batch"
    assert data["hazards"][0]["layers"] == ["base.bn"]
    table = report.render()
    assert table.row_count == 1 and "[torch]" in str(table.title) and "1 hazard" in str(table.title)
    assert report.hazard_lines() == ["TORCH_BN_FROZEN_PARAMS_BATCH_STATS at base.bn: msg",
                                     "  fix: fix"]


def test_snapshot_diff_reports_largest_abs_change_per_tensor():
    before = {"a": np.zeros(3, np.float32), "b": np.ones(2, np.float32), "n": np.array(3)}
    after = {"a": np.array([0.0, -0.5, 0.25], np.float32), "b": np.ones(2, np.float32),
             "n": np.array(4)}
    assert snapshot_diff(before, after) == [("a", 0.5), ("n", 1.0)]
    assert snapshot_diff(before, {"b": after["b"]})[0] == ("a", float("inf"))


def test_frozen_tensor_changed_message_names_tensor_and_change():
    exc = FrozenTensorChanged([("base.bn.running_mean", 0.218)], "torch")
    assert isinstance(exc, AssertionError)
    assert "base.bn.running_mean (max abs change 0.218)" in str(exc) and "[torch]" in str(exc)


def test_framework_of_dispatches_on_class_hierarchy():
    class Mine(nn.Module):  # a user's class lives in the user's module
        pass

    assert framework_of(Mine()) == "torch"
    assert framework_of(keras.Sequential([keras.layers.Dense(1)])) == "tf"
    assert framework_of("a string") is None


# --- torch ------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", CORRECT)
def test_audit_torch_correct_strategy_no_hazard(strategy):
    report = torch_audit.audit(torch_apply(torch_build("tinyconv", CLASSES), strategy))
    assert report.ok, report.hazard_lines()
    bns = [r for r in report.rows if r.kind == "BatchNorm2d"]
    assert bns and all(r.norm_mode == "stored" and r.stats_updated is False for r in bns)


def test_audit_torch_naive_flags_bn_batch_stats():
    report = torch_audit.audit(torch_apply(torch_build("tinyconv", CLASSES), "naive"))
    assert report.codes() == ["TORCH_BN_FROZEN_PARAMS_BATCH_STATS"]
    assert report.hazards[0].layer == "base"
    assert {r.norm_mode for r in report.rows if r.kind == "BatchNorm2d"} == {"batch"}


def test_audit_torch_base_eval_undone_by_train_flagged_and_flags_restored():
    model = torch_build("tinyconv", CLASSES)
    model.base.requires_grad_(False)
    model.base.eval()  # the mistake: the next model.train() undoes it
    before = {name: m.training for name, m in model.named_modules()}
    report = torch_audit.audit(model)
    assert report.codes() == ["TORCH_EVAL_UNDONE_BY_TRAIN"]
    assert {name: m.training for name, m in model.named_modules()} == before


def test_audit_torch_optimizer_with_momentum_holding_frozen_params_flagged():
    model = torch_apply(torch_build("tinyconv", CLASSES), "frozen")
    report = torch_audit.audit(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert report.codes() == ["TORCH_OPTIMIZER_FROZEN_PARAMS"]
    trainable_only = [p for p in model.parameters() if p.requires_grad]
    assert torch_audit.audit(model, torch.optim.SGD(trainable_only, lr=0.1, momentum=0.9)).ok


def test_audit_torch_optimizer_missing_unfrozen_params_flagged():
    model = torch_apply(torch_build("tinyconv", CLASSES), "frozen")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch_apply(model, "full")  # unfrozen later, optimizer not rebuilt
    assert torch_audit.audit(model, optimizer).codes() == ["TORCH_OPTIMIZER_MISSING_TRAINABLE"]


def test_audit_torch_dropout_in_frozen_part_flagged():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    report = torch_audit.audit(model)
    assert report.codes() == ["TORCH_DROPOUT_ACTIVE_IN_FROZEN"]
    assert report.hazards[0].layers == ("0.1",)


class DropPath(nn.Module):
    """timm-style stochastic depth, written here (timm is not a dependency)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class _Residual(nn.Module):
    def __init__(self, drop):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.drop = drop

    def forward(self, x):
        return x + self.drop(self.conv(x))


class RandomBranchSkip(DropPath):
    """The same mechanism under a name no audit knows: found by behaviour only."""


def _residual_net(drop) -> nn.Module:
    net = nn.Sequential(_Residual(drop), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 4, 4, 4))
    net[0].requires_grad_(False)
    return net


@pytest.mark.parametrize("drop", [DropPath(0.2), RandomBranchSkip(0.2),
                                  torchvision.ops.StochasticDepth(0.2, "row")],
                         ids=["DropPath", "by-behaviour", "StochasticDepth"])
def test_audit_torch_stochastic_depth_in_frozen_part_flagged(drop):
    net = _residual_net(drop)
    torch.manual_seed(0)  # row masks are random: seeded, and 32 rows (two equal masks: 0.68**32)
    x = torch.randn(32, 4, 4, 4)
    net.train()
    assert not torch.equal(net[0](x), net[0](x))  # two passes differ: the frozen part drops
    report = torch_audit.audit(net)
    assert report.codes() == ["TORCH_STOCHASTIC_DEPTH_ACTIVE_IN_FROZEN"]
    assert report.hazards[0].layers == ("0.drop",)
    row = next(r for r in report.rows if r.name == "0.drop")
    assert row.kind == type(drop).__name__ and row.dropout_active is True
    assert not any(r.name == "1" for r in report.rows)  # ReLU: mode-independent, no row
    assert net.training and all(m.training for m in net.modules())  # flags kept


def test_audit_torch_stochastic_depth_off_or_trainable_not_flagged():
    assert torch_audit.audit(_residual_net(DropPath(0.0))).ok
    net = _residual_net(torchvision.ops.StochasticDepth(0.2, "row"))
    net.requires_grad_(True)  # the part trains: dropping is regularisation, not a hazard
    assert torch_audit.audit(net).ok


class _PinnedEfficientNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = torchvision.models.efficientnet_b0(
            weights=None, norm_layer=torchvision.ops.FrozenBatchNorm2d).features
        self.base.requires_grad_(False)

    def forward(self, x):
        return self.base(x)

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()
        return self


def test_audit_torch_efficientnet_b0_frozen_base_stochastic_depth_flagged():
    model = torchvision.models.efficientnet_b0(weights=None,
                                               norm_layer=torchvision.ops.FrozenBatchNorm2d)
    model.features.requires_grad_(False)  # BN frozen by type; only stochastic depth is left
    model.train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model.features(x), model.features(x))
    report = torch_audit.audit(model)
    assert report.codes() == ["TORCH_STOCHASTIC_DEPTH_ACTIVE_IN_FROZEN"]
    assert len(report.hazards[0].layers) == 15  # one per MBConv block after the first
    assert all(name.endswith("stochastic_depth") for name in report.hazards[0].layers)
    pinned = _PinnedEfficientNet()
    assert torch_audit.audit(pinned).ok
    pinned.train()
    with torch.no_grad():
        assert torch.equal(pinned(x), pinned(x))


class _PinnedResNet(nn.Module):
    """A user's wrapper that keeps its frozen torchvision base in eval mode via train()."""

    def __init__(self):
        super().__init__()
        self.base = torchvision.models.resnet18(weights=None)
        self.base.fc = nn.Identity()
        self.base.requires_grad_(False)
        self.head = nn.Linear(512, CLASSES)

    def forward(self, x):
        return self.head(self.base(x))

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()
        return self


def test_audit_torch_resnet18_frozen_bn_or_pinned_no_hazard():
    frozen_bn = torchvision.models.resnet18(weights=None,
                                            norm_layer=torchvision.ops.FrozenBatchNorm2d)
    for name, p in frozen_bn.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    assert torch_audit.audit(frozen_bn).ok
    assert torch_audit.audit(_PinnedResNet()).ok


def test_audit_torch_resnet18_requires_grad_only_flagged():
    model = torchvision.models.resnet18(weights=None)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    report = torch_audit.audit(model)
    assert report.codes() == ["TORCH_BN_FROZEN_PARAMS_BATCH_STATS"]
    assert len(report.hazards[0].layers) == 20  # every BatchNorm of ResNet-18


# --- Keras ------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", CORRECT)
def test_audit_tf_correct_strategy_no_hazard_before_and_after_fit(strategy):
    model = tf_apply(tf_build("tinyconv", CLASSES), strategy)
    assert tf_audit.audit(model).ok, tf_audit.audit(model).hazard_lines()
    report = tf_audit.audit(_compile_fit(model))
    assert report.ok, report.hazard_lines()
    assert not report.notes  # the probe ran: modes are measured, not assumed
    bns = [r for r in report.rows if r.kind == "BatchNormalization"]
    assert bns and all(r.norm_mode == "stored" and r.stats_updated is False for r in bns)


def test_audit_tf_naive_legacy_bn_flagged():
    report = tf_audit.audit(_tf_naive())
    assert report.codes() == ["KERAS_BN_FROZEN_BATCH_STATS"]


def test_audit_tf_leaves_every_variable_unchanged():
    model = tf_build("tinyconv", CLASSES, head_dropout=0.5)  # BN trainable, dropout on: a probe
    before = [v.numpy() for v in model.variables]  # that ran them would move state
    tf_audit.audit(model)
    after = [v.numpy() for v in model.variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def _functional_base(dropout: float = 0.3) -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(dropout)(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="base")


def test_audit_tf_functional_training_false_on_trainable_base_flagged():
    base = _functional_base()
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(base(inputs, training=False)))
    report = tf_audit.audit(model)
    assert report.codes() == ["KERAS_FUNCTIONAL_TRAINING_FALSE_IGNORED"]
    rows = {r.kind: r for r in report.rows}
    assert rows["BatchNormalization"].stats_updated is True  # what fit really does
    assert rows["Dropout"].dropout_active is True


class _InferenceWrapper(keras.layers.Layer):
    """The fix: a layer whose call pins its inner model to inference mode."""

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, x, training=None):
        return self.inner(x, training=False)


def test_audit_tf_wrapper_layer_keeps_inference_no_hazard():
    base = _functional_base()
    base.trainable = False
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(_InferenceWrapper(base, name="wrap")(inputs)))
    report = tf_audit.audit(model)
    assert report.ok, report.hazard_lines()
    rows = {r.kind: r for r in report.rows}
    assert rows["BatchNormalization"].norm_mode == "stored"
    assert rows["Dropout"].dropout_active is False


def test_audit_tf_dropout_in_frozen_base_flagged():
    base = _functional_base()
    base.trainable = False  # BN goes to inference mode, Dropout does not
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(base(inputs)))
    assert tf_audit.audit(model).codes() == ["KERAS_DROPOUT_ACTIVE_IN_FROZEN"]


def test_audit_tf_trainable_changed_after_fit_flagged_and_fixed_by_apply_strategy():
    model = _compile_fit(tf_build("tinyconv", CLASSES))
    model.base.trainable = False  # no recompile: the traced step still trains the base
    report = tf_audit.audit(model)
    assert report.codes() == ["KERAS_TRAINABLE_CHANGED_AFTER_FIT"]
    assert report.hazards[0].layer == "base"
    assert tf_audit.audit(tf_apply(model, "frozen")).ok  # recompiles with a fresh optimizer


def test_audit_tf_freeze_then_recompile_with_same_optimizer_no_hazard():
    # harmless (test_keras_recompile_same_optimizer_after_freeze_is_accepted): the next fit
    # trains the head and leaves the base as it is
    model = _compile_fit(tf_build("tinyconv", CLASSES))
    model.base.trainable = False
    model.compile(optimizer=model.optimizer, loss=model.loss)
    report = tf_audit.audit(model)
    assert report.ok, report.hazard_lines()
    kernel = model.base.block1.conv.kernel.numpy()
    head = model.head.fc.kernel.numpy()
    model.fit(_images_tf(), _labels(), batch_size=N, epochs=1, verbose=0, shuffle=False)
    assert np.array_equal(kernel, model.base.block1.conv.kernel.numpy())
    assert not np.array_equal(head, model.head.fc.kernel.numpy())


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_audit_tf_unfreeze_then_recompile_with_same_optimizer_flagged():
    model = tf_build("tinyconv", CLASSES)
    model.base.trainable = False
    _compile_fit(model)  # optimizer built for the head only
    model.base.trainable = True
    model.compile(optimizer=model.optimizer, loss=model.loss)
    report = tf_audit.audit(model)
    assert report.codes() == ["KERAS_OPTIMIZER_BUILT_FOR_OTHER_VARIABLES"]
    assert report.hazards[0].layer == "base"
    with pytest.raises(ValueError, match="Unknown variable"):  # what the hazard predicts
        model.fit(_images_tf(), _labels(), batch_size=N, epochs=1, verbose=0, shuffle=False)


@pytest.mark.slow
def test_audit_tf_resnet18_frozen_no_hazard():
    if not (REPO / "tf_impl" / "resnet.py").exists():
        pytest.skip("tf_impl/resnet.py not written yet")
    report = tf_audit.audit(tf_apply(tf_build("resnet18", CLASSES), "frozen"))
    assert report.ok, report.hazard_lines()
    bns = [r for r in report.rows if r.kind == "BatchNormalization"]
    assert len(bns) == 20 and all(r.norm_mode == "stored" for r in bns)


# --- CLI: freeze-parity audit -----------------------------------------------------------------

FACTORIES = "tests.examples.audit_factories"


def _run(target: str, framework: str | None = None) -> int:
    from shared.commands import audit as command

    return command.run(argparse.Namespace(target=target, framework=framework, json=False))


@pytest.fixture
def in_repo(monkeypatch):
    """cwd at the repo, as a user's shell; the command's sys.path insert is undone after."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.mark.parametrize("factory, status", [("frozen_torch", 0), ("naive_torch", 1),
                                             ("frozen_torch_with_sgd_momentum_on_all_params", 1),
                                             ("frozen_tf", 0)])
def test_audit_command_exit_status_is_hazard_verdict(in_repo, capsys, factory, status):
    assert _run(f"{FACTORIES}:{factory}") == status
    out = capsys.readouterr().out
    assert "freeze audit" in out
    assert ("fix:" in out) == bool(status)


@pytest.mark.parametrize("target, framework, fragment", [
    (f"{FACTORIES}:not_a_model", None, "expected a torch.nn.Module or a keras.Model"),
    (f"{FACTORIES}:broken", None, "factory raised RuntimeError"),
    (f"{FACTORIES}:missing", None, "has no function 'missing'"),
    ("no_such_package.mod:f", None, "cannot import module"),
    ("not-a-target", None, "expected a .keras file or a factory"),
    ("missing.keras", None, "no such file"),
    (f"{FACTORIES}:frozen_torch", "tf", "got a torch model, but --framework tf"),
])
def test_audit_command_bad_target_usage_error(in_repo, target, framework, fragment):
    with pytest.raises(UsageError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        _run(target, framework)


# Keras's own save converts variables with np.array(variable), which numpy 2 warns about.
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
def test_audit_command_saved_keras_file(tmp_path, capsys):
    path = tmp_path / "frozen_base.keras"
    base = _functional_base(dropout=0.0)
    base.trainable = False
    inputs = keras.Input((8, 8, 3))
    keras.Model(inputs, keras.layers.Dense(2)(base(inputs, training=False))).save(path)
    assert _run(str(path)) == 0
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_text("not a zip")
    with pytest.raises(UsageError, match="cannot load it as a Keras model"):
        _run(str(corrupt))


def _dropout_in_frozen_base() -> keras.Model:
    base = _functional_base()
    base.trainable = False  # BN goes to inference mode, Dropout does not
    inputs = keras.Input((8, 8, 3))
    return keras.Model(inputs, keras.layers.Dense(2)(base(inputs)))


def _training_false_on_trainable_base() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    return keras.Model(inputs, keras.layers.Dense(2)(_functional_base()(inputs, training=False)))


@pytest.mark.parametrize("build, code", [
    (_dropout_in_frozen_base, "KERAS_DROPOUT_ACTIVE_IN_FROZEN"),
    (_training_false_on_trainable_base, "KERAS_FUNCTIONAL_TRAINING_FALSE_IGNORED"),
], ids=["dropout_in_frozen_base", "training_false_on_trainable_base"])
def test_audit_cli_saved_keras_file_with_hazard_exits_1_printing_its_code(tmp_path, build, code):
    """The hazard must survive saving and loading: it is read from the file, not the factory."""
    path = tmp_path / "model.keras"
    build().save(path)
    done = cli("audit", path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{code} at base" in done.stdout and done.stderr == ""
    as_json = cli("audit", path, "--json")
    assert as_json.returncode == 1
    assert [h["code"] for h in json.loads(as_json.stdout)["hazards"]] == [code]


def _not_a_zip(path: Path) -> None:
    path.write_text("not a zip")


def _zip_without_config(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model.weights.h5", b"")


@pytest.mark.parametrize("make, fragment", [
    (None, "no such file"),
    (Path.mkdir, "no such file"),  # a directory named like a model is no file either
    (_not_a_zip, "cannot load it as a Keras model (ValueError: "),
    (_zip_without_config, "cannot load it as a Keras model (KeyError: "),
], ids=["missing", "directory", "not_a_zip", "zip_without_config"])
def test_audit_cli_bad_keras_file_exits_2_one_line_naming_the_file(tmp_path, make, fragment):
    path = tmp_path / "model.keras"
    if make is not None:
        make(path)
    done = cli("audit", path)
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.endswith("\n"), done.stderr
    assert done.stderr.startswith(f"freeze-parity audit: error: {path}: {fragment}"), done.stderr


def test_audit_cli_json_naive_exits_1_names_the_hazard(in_repo):
    done = cli("audit", f"{FACTORIES}:naive_torch", "--json")
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["hazards"][0]["code"] == "TORCH_BN_FROZEN_PARAMS_BATCH_STATS"


def test_audit_cli_bad_target_exits_2_one_line_without_traceback(in_repo):
    """Through shared.cli.main, what the console script runs (tests/cli_inprocess.py)."""
    bad = cli("audit", f"{FACTORIES}:broken")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.startswith("freeze-parity audit: error: ") and bad.stderr.endswith("\n")
    assert bad.stderr.count("\n") == 1, bad.stderr
    assert "factory raised RuntimeError" in bad.stderr
    assert cli("audit", f"{FACTORIES}:naive_torch").returncode == 1


# --- transformer bases: dropout / drop-path in a frozen ViT, LoRA with a trainable base ---
@pytest.fixture(scope="module")
def vit_nets():
    return torch_build("vit", CLASSES), tf_build("vit", CLASSES)


def test_audit_torch_frozen_vit_dropout_and_drop_path_flagged_then_pinned_not(vit_nets):
    net = vit_nets[0]
    net.base.requires_grad_(False)
    codes = torch_audit.audit(net).codes()
    assert {"TORCH_DROPOUT_ACTIVE_IN_FROZEN", "TORCH_STOCHASTIC_DEPTH_ACTIVE_IN_FROZEN"} <= set(
        codes), codes
    net.pin_inference(["base"])
    try:
        assert torch_audit.audit(net).ok, torch_audit.audit(net).hazard_lines()
    finally:
        net.pin_inference([])
        net.base.requires_grad_(True)


def test_audit_tf_frozen_vit_dropout_and_drop_path_flagged_then_training_false_not(vit_nets):
    net = vit_nets[1]
    x = np.zeros((1, 32, 32, 3), "float32")
    net(x)
    net.base.trainable = False
    try:
        codes = tf_audit.audit(net).codes()
        assert {"KERAS_DROPOUT_ACTIVE_IN_FROZEN",
                "KERAS_STOCHASTIC_DEPTH_ACTIVE_IN_FROZEN"} <= set(codes), codes

        class Wrapped(keras.Model):  # the base called with training=False from call()
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def call(self, x, training=None):
                return self.inner.head(self.inner.base(x, training=False), training=training)

        wrapped = Wrapped(net)
        wrapped(x)
        report = tf_audit.audit(wrapped)
        assert report.ok, report.hazard_lines()
    finally:
        net.base.trainable = True


def test_audit_torch_lora_base_trainable_flagged_and_frozen_base_not():
    from torch_impl import lora as torch_lora

    net = torch_lora.add_lora(torch_build("vit", CLASSES), rank=2, alpha=4.0)
    assert "TORCH_LORA_BASE_TRAINABLE" not in torch_audit.audit(net).codes()
    net.base.requires_grad_(True)  # the trap: a later blanket unfreeze
    hazard = next(h for h in torch_audit.audit(net).hazards
                  if h.code == "TORCH_LORA_BASE_TRAINABLE")
    assert hazard.layers[0] == "base.blocks.0.attn.q"


def test_audit_tf_lora_base_trainable_flagged_and_frozen_base_not():
    from tf_impl import lora as tf_lora

    net = tf_build("vit", CLASSES)
    net(np.zeros((1, 32, 32, 3), "float32"))
    tf_lora.add_lora(net, rank=2, alpha=4.0)
    assert "KERAS_LORA_BASE_TRAINABLE" not in tf_audit.audit(net).codes()
    for variable in net.base.weights:  # the trap: a blanket per-variable unfreeze
        variable.trainable = True
    hazard = next(h for h in tf_audit.audit(net).hazards if h.code == "KERAS_LORA_BASE_TRAINABLE")
    assert "query" in hazard.layers[0], hazard.layers
