"""The port check on the architecture families keras.applications and torchvision share.

Each family (``shared/port/families.py``): ``keras.applications.<Family>(weights=None,
include_top=False, pooling="avg")`` against torchvision's model with its classifier
replaced by the identity, 64x64, torch weights transferred, one SGD step. The check runs
once per family per module (``checked``); the tests read that report:

- every weighted layer pairs without a map (against a count of each side's layers made
  here, and for ResNet50 and DenseNet121 against name maps written from the two
  libraries' naming schemes);
- the findings are what really differs (written out from the two libraries' sources);
- the fix-and-confirm tests apply exactly the fixes the report names to the torch side
  and check again: no finding may remain (a finding that were wrong would leave, or
  create, a difference; one that were missing would leave a divergence);
- the README and docs/PORTING.md coverage tables are these reports;
- activation names that are one function are one function, and GELU's tanh
  approximation differs by the amount the finding quotes.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import StochasticDepth
from torchvision.transforms import Normalize

from shared import tolerances as tol
from shared.port import check_port, function_of
from shared.port.activations import GELU_TANH_MAX_ABS
from shared.port.families import FAMILIES, SIZE, STEPS
from tf_impl import applications as keras_apps
from tf_impl import keras
from tf_impl import port as kport
from tf_impl.audit import _tree
from torch_impl import applications as torch_apps
from torch_impl import port as tport

REPO = Path(__file__).resolve().parents[1]
HWC = (SIZE, SIZE, 3)
# findings that follow from the others (the outputs, statistics and losses they change):
# each must go when the lint findings are fixed
CONSEQUENCES = ("PORT_DIVERGES_INFERENCE", "PORT_DIVERGES_TRAINING", "PORT_STATS_DIVERGE",
                "PORT_STEP_LOSS", "PORT_STEP_UPDATE")


def _check(keras_model, torch_model):
    return check_port(keras_model, torch_model, input_shape=HWC, steps=STEPS,
                      transfer_from="torch")


@pytest.fixture(scope="module")
def checked():
    """family -> (the Keras model, its report, the torch model): each family checked once
    (the check leaves both models as the transfer made them)."""
    done = {}

    def get(family):
        if family not in done:
            keras_model, torch_model = keras_apps.build(family), torch_apps.build(family)
            done[family] = (keras_model, _check(keras_model, torch_model), torch_model)
        return done[family]

    return get


def _findings(report) -> dict:
    """code -> [(number of layers, keras value, torch value), ...] in report order."""
    out = {}
    for f in report.findings:
        out.setdefault(f.code, []).append((len(f.pairs) or 1, f.keras_value, f.torch_value))
    return out


# --------------------------------------------------------------------------- #
# every weighted layer pairs, by dataflow
# --------------------------------------------------------------------------- #
def _torch_census(model: nn.Module) -> dict[str, int]:
    """Weighted layers by kind, counted on the torch model alone."""
    kinds = {"conv": nn.Conv2d, "bn": nn.BatchNorm2d, "layernorm": nn.LayerNorm,
             "dense": nn.Linear}
    out = {kind: sum(isinstance(m, cls) for m in model.modules()) for kind, cls in kinds.items()}
    out["scale"] = sum(name.endswith("layer_scale") for name, _ in model.named_parameters())
    return {kind: n for kind, n in out.items() if n}


# family -> weighted layers by kind, from the architectures (Keras side)
LAYERS = {
    "MobileNetV2": {"conv": 52, "bn": 52},  # 17 bottlenecks (3 convs, or 2), stem and head
    "DenseNet121": {"conv": 120, "bn": 121},  # 58 dense layers x 2, 3 transitions, stem
    "MobileNetV3Small": {"conv": 52, "bn": 34},  # 9 of 11 blocks with 2 squeeze-excite convs
    "VGG16": {"conv": 13},
    "ResNet50": {"conv": 53, "bn": 53},  # 16 bottlenecks x 3, 4 shortcuts, stem
    "ConvNeXtTiny": {"conv": 22, "layernorm": 23, "dense": 36, "scale": 18},  # 18 blocks
    "EfficientNetB0": {"conv": 81, "bn": 49},  # 16 blocks with squeeze-excite, stem, head
}


@pytest.mark.parametrize("family", FAMILIES)
def test_cross_port_family_pairs_every_weighted_layer_without_a_map(family, checked):
    _, report, torch_model = checked(family)
    kinds = [kind for _, _, kind in report.pairs]
    assert {kind: kinds.count(kind) for kind in set(kinds)} == LAYERS[family]
    assert _torch_census(torch_model) == LAYERS[family]


def test_cross_port_resnet50_pairs_shortcut_convs_with_downsample_by_dataflow(checked):
    _, report, _ = checked("ResNet50")
    expected = {"conv1_conv": "conv1", "conv1_bn": "bn1"}
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for block in range(1, blocks + 1):
            k, t = f"conv{stage}_block{block}", f"layer{stage - 1}.{block - 1}"
            for i in (1, 2, 3):
                expected[f"{k}_{i}_conv"], expected[f"{k}_{i}_bn"] = f"{t}.conv{i}", f"{t}.bn{i}"
            if block == 1:  # the shortcut: called first by Keras, last by torchvision
                expected[f"{k}_0_conv"] = f"{t}.downsample.0"
                expected[f"{k}_0_bn"] = f"{t}.downsample.1"
    assert {k: t for k, t, _ in report.pairs} == expected


def test_cross_port_densenet121_pairs_follow_the_dense_blocks(checked):
    _, report, _ = checked("DenseNet121")
    expected = {"conv1_conv": "features.conv0", "conv1_bn": "features.norm0",
                "bn": "features.norm5"}
    for stage, layers in zip(range(2, 6), (6, 12, 24, 16)):
        for i in range(1, layers + 1):
            k, t = f"conv{stage}_block{i}", f"features.denseblock{stage - 1}.denselayer{i}"
            expected.update({f"{k}_0_bn": f"{t}.norm1", f"{k}_1_conv": f"{t}.conv1",
                             f"{k}_1_bn": f"{t}.norm2", f"{k}_2_conv": f"{t}.conv2"})
        if stage < 5:
            k, t = f"pool{stage}", f"features.transition{stage - 1}"
            expected.update({f"{k}_bn": f"{t}.norm", f"{k}_conv": f"{t}.conv"})
    assert {k: t for k, t, _ in report.pairs} == expected


def test_cross_port_convnext_layer_scale_and_squeeze_excite_convs_pair(checked):
    _, convnext, _ = checked("ConvNeXtTiny")
    pairs = {k: (t, kind) for k, t, kind in convnext.pairs}
    # a torchvision CNBlock's own Parameter, used as x * layer_scale, against LayerScale
    assert pairs["convnext_tiny_stage_0_block_0_layer_scale"] == ("features.1.0.layer_scale",
                                                                  "scale")
    assert pairs["convnext_tiny_stage_3_block_2_layer_scale"] == ("features.7.2.layer_scale",
                                                                  "scale")
    _, efficientnet, _ = checked("EfficientNetB0")
    pairs = {k: t for k, t, _ in efficientnet.pairs}
    assert (pairs["block1a_se_reduce"], pairs["block1a_se_expand"]) == (
        "features.1.0.block.1.fc1", "features.1.0.block.1.fc2")


# --------------------------------------------------------------------------- #
# the findings are what really differs
# --------------------------------------------------------------------------- #
# From the two libraries' sources (keras/src/applications, torchvision/models): Keras pads
# a stride-2 convolution with 'same' (0 top/left, 1 bottom/right on an even input) or with
# ZeroPadding2D(correct_pad) (kernel // 2 - 1 before, kernel // 2 after), torchvision
# symmetrically with kernel // 2; BatchNorm defaults (Keras epsilon 1e-3, momentum 0.99;
# torch 1e-5, 0.1) unless the architecture sets them.
SAME = ([0, 1, 0, 1], [1, 1, 1, 1])
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CORRECT_PAD_5 = ([1, 2, 1, 2], [2, 2, 2, 2])
EXPECTED = {
    "MobileNetV2": {
        "PORT_SAME_PADDING_STRIDE2_EVEN": [(1, *SAME)],  # Conv1
        "PORT_CONV_PADDING": [(4, *SAME)],  # the stride-2 3x3 depthwise convs
        "PORT_BN_EPSILON": [(52, 1e-3, 1e-5)],
        "PORT_BN_MOMENTUM": [(52, 0.999, 0.1)],
    },
    "DenseNet121": {
        "PORT_BN_EPSILON": [(121, 1.001e-5, 1e-5)],
        "PORT_BN_MOMENTUM": [(121, 0.99, 0.1)],
    },
    "MobileNetV3Small": {
        "PORT_PREPROCESSING": [(1, ("Rescaling", [1 / 127.5] * 3, [-1.0] * 3), "none")],
        "PORT_SAME_PADDING_STRIDE2_EVEN": [(1, *SAME)],
        "PORT_BN_MOMENTUM": [(34, 0.999, 0.01)],  # torchvision: eps 1e-3, momentum 0.01
        "PORT_CONV_PADDING": [(2, *SAME), (2, *CORRECT_PAD_5)],
    },
    "VGG16": {},
    "ResNet50": {
        "PORT_CONV_BIAS": [(53, True, False)],
        "PORT_BN_EPSILON": [(53, 1.001e-5, 1e-5)],
        "PORT_BN_MOMENTUM": [(53, 0.99, 0.1)],
        # stages 3-5: Keras (v1) strides the first 1x1 conv, torchvision (v1.5) the 3x3
        "PORT_CONV_STRIDE_PLACEMENT": [(6, "stride 2 on the 1x1, 1 on the 3x3",
                                        "stride 1 on the 1x1, 2 on the 3x3")],
    },
    "ConvNeXtTiny": {
        # ImageNet's mean and std (x 255) as a Normalization layer (PreStem)
        "PORT_PREPROCESSING": [(1, ("Normalization", [1 / (s * 255) for s in IMAGENET_STD],
                                    [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]),
                                "none")],
        # torchvision: stochastic depth 0.1 * i / 17 in block i; Keras's default rate is 0
        "PORT_DROPOUT_MISSING": [(17, "none", 0.1 / 17)],
    },
    "EfficientNetB0": {
        # Rescaling(1 / 255), then a Normalization never adapted: mean 0, variance 1
        "PORT_PREPROCESSING": [(1, ("Rescaling", [1 / 255] * 3, [0.0] * 3), "none")],
        "PORT_CONV_PADDING": [(3, *SAME), (2, *CORRECT_PAD_5)],
        "PORT_BN_EPSILON": [(49, 1e-3, 1e-5)],
        "PORT_BN_MOMENTUM": [(49, 0.99, 0.1)],
    },
}
# family -> the first divergent layer (inference mode): the first pair the differences
# above change, or None (DenseNet121's epsilon moves its outputs by less than the tolerance)
FIRST_DIVERGENT = {
    "MobileNetV2": ("Conv1", "features.0.0"),
    "DenseNet121": None,
    "MobileNetV3Small": ("conv", "features.0.0"),  # its input is rescaled on one side only
    "VGG16": None,
    "ResNet50": ("conv3_block1_1_conv", "layer2.0.conv1"),  # the 1x1: Keras halves its map
    "ConvNeXtTiny": ("convnext_tiny_stem.convnext_tiny_stem_conv", "features.0.0"),
    "EfficientNetB0": ("stem_conv", "features.0.0"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_cross_port_family_findings_are_what_really_differs(family, checked):
    _, report, _ = checked(family)
    lint = {code: found for code, found in _findings(report).items() if code not in CONSEQUENCES}
    assert lint.keys() == EXPECTED[family].keys(), report.finding_lines()
    for code, expected in EXPECTED[family].items():
        for (n, kv, tv), (got_n, got_kv, got_tv) in zip(expected, lint[code], strict=True):
            if code == "PORT_PREPROCESSING":  # the layers, and the map x -> a * x + b
                layer, a, b = kv
                got_a, got_b = _affine(got_kv)
                assert layer in got_kv and got_a == pytest.approx(a) and got_b == pytest.approx(
                    b), (got_kv, a, b)
                kv = got_kv
            assert got_n == n and got_kv == pytest.approx(kv) and got_tv == pytest.approx(tv), (
                code, got_n, got_kv, got_tv)
    first = report.first_divergent("inference")
    assert (first and (first.keras_layer, first.torch_layer)) == (FIRST_DIVERGENT[family] or None)
    assert ("PORT_DIVERGES_INFERENCE" in report.codes()) == (first is not None)


def test_cross_port_densenet121_epsilon_line_quotes_both_models_values_not_a_default(checked):
    _, report, _ = checked("DenseNet121")
    (line,) = [f.line() for f in report.findings if f.code == "PORT_BN_EPSILON"]
    assert line.startswith("PORT_BN_EPSILON at conv1_bn <-> features.norm0: BatchNorm epsilon "
                           "differs; 121 pairs")
    assert line.endswith("(keras 1.001e-05, torch 1e-05)") and "1e-3" not in line, line


def test_cross_port_resnet50_first_divergence_is_the_strided_1x1_map_size(checked):
    _, report, _ = checked("ResNet50")
    first = report.first_divergent("inference")
    # Keras's 1x1 conv halves the 16x16 map, torchvision's keeps it (stride on the 3x3)
    assert first.shapes == ((128, 8, 8), (128, 16, 16))
    previous = report.inference[report.inference.index(first) - 1]
    assert previous.within  # everything before it agrees: conv biases are zero, epsilon tiny


def test_cross_port_convnext_stochastic_depth_is_torchvisions_ramp_and_keras_has_none(checked):
    _, report, _ = checked("ConvNeXtTiny")
    (missing,) = [f for f in report.findings if f.code == "PORT_DROPOUT_MISSING"]
    rates = {name: m.p for name, m in torch_apps.build("ConvNeXtTiny").named_modules()
             if isinstance(m, StochasticDepth)}
    assert [t for _, t in missing.pairs] == [name for name, p in rates.items() if p > 0]
    assert [rates[t] for _, t in missing.pairs] == pytest.approx([0.1 * i / 17
                                                                   for i in range(1, 18)])
    keras_model = checked("ConvNeXtTiny")[0]
    assert not [layer for _, layer, _ in _tree(keras_model)
                if type(layer).__name__ in ("StochasticDepth", "Dropout")]


def test_cross_port_efficientnet_drop_connect_matches_stochastic_depth_no_dropout_finding(
        checked):
    keras_model, report, _ = checked("EfficientNetB0")
    assert not [code for code in report.codes() if code.startswith("PORT_DROPOUT")]
    probe = np.zeros((2, 3, SIZE, SIZE), np.float32)
    k = [(leaf.params["rate"], leaf.params["mode"]) for leaf in kport.describe(keras_model, probe)
         if leaf.kind == "dropout"]
    t = [(leaf.params["rate"], leaf.params["mode"])
         for leaf in tport.describe(torch_apps.build("EfficientNetB0"), probe)
         if leaf.kind == "dropout" and leaf.params["rate"]]
    # 9 residual blocks drop their branch, at 0.2 * block / 16 on both sides, row-wise
    blocks = (2, 4, 6, 7, 9, 10, 12, 13, 14)  # the blocks with a residual add, from 0
    assert [rate for rate, _ in k] == pytest.approx([0.2 * b / 16 for b in blocks])
    assert [rate for rate, _ in t] == pytest.approx([0.2 * b / 16 for b in blocks])
    assert {mode for _, mode in k + t} == {"row"}


# --------------------------------------------------------------------------- #
# fix and confirm: the report's fixes, applied to the torch side, leave no finding
# --------------------------------------------------------------------------- #
AFFINE = re.compile(r"x -> x \* (\[[^\]]*\]|\S+) ([+-]) (\[[^\]]*\]|\S+)$")


def _numbers(text: str) -> np.ndarray:
    return np.broadcast_to(np.array([float(v) for v in text.strip("[]").split(",")]), 3)


def _affine(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the map ``x -> x * a + b`` a PORT_PREPROCESSING value ends with."""
    a, sign, b = AFFINE.search(text).groups()
    return _numbers(a), _numbers(b) * (-1.0 if sign == "-" else 1.0)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_torch_fixes(model: nn.Module, report, keras_model) -> tuple[nn.Module, list[str]]:
    """The torch model with every lint finding's fix applied at the layers it names (the
    Keras side's value taken), and the codes fixed. A code without a fix here fails."""
    layers = {path: layer for path, layer, _ in _tree(keras_model)}
    modules = dict(model.named_modules())
    fixed, first = [], None
    for f in report.findings:
        if f.code in CONSEQUENCES:
            continue
        fixed.append(f.code)
        pairs = f.pairs or ((f.keras_layer, f.torch_layer),)
        if f.code == "PORT_BN_EPSILON":
            for _, t in pairs:
                modules[t].eps = f.keras_value
        elif f.code == "PORT_BN_MOMENTUM":  # torch momentum = 1 - Keras momentum
            for _, t in pairs:
                modules[t].momentum = 1.0 - f.keras_value
        elif f.code == "PORT_CONV_BIAS":
            for _, t in pairs:
                modules[t].bias = nn.Parameter(torch.zeros(modules[t].out_channels))
        elif f.code in ("PORT_CONV_STRIDE", "PORT_CONV_STRIDE_PLACEMENT"):
            for k, t in pairs:
                modules[t].stride = tuple(layers[k].strides)
        elif f.code in ("PORT_CONV_PADDING", "PORT_SAME_PADDING_STRIDE2_EVEN"):
            top, bottom, left, right = f.keras_value
            for _, t in pairs:
                modules[t].padding = (0, 0)
                _replace(model, t, nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)),
                                                 modules[t]))
        elif f.code == "PORT_PREPROCESSING":  # Normalize(mean=-b/a, std=1/a) first
            a, b = _affine(f.keras_value)
            first = Normalize(mean=list(-b / a), std=list(1.0 / a))
        elif f.code == "PORT_DROPOUT_MISSING":  # Keras has none there: rate 0
            for _, t in pairs:
                modules[t].p = 0.0
        else:
            raise AssertionError(f"no fix for {f.code} in this test: {f.line()}")
    return (nn.Sequential(first, model) if first is not None else model), fixed


# family -> the codes its fixes confirm
CONFIRMED = {
    "ResNet50": ["PORT_CONV_BIAS", "PORT_BN_EPSILON", "PORT_BN_MOMENTUM",
                 "PORT_CONV_STRIDE_PLACEMENT"],
    "MobileNetV2": ["PORT_SAME_PADDING_STRIDE2_EVEN", "PORT_BN_EPSILON", "PORT_BN_MOMENTUM",
                    "PORT_CONV_PADDING"],
    "MobileNetV3Small": ["PORT_PREPROCESSING", "PORT_SAME_PADDING_STRIDE2_EVEN",
                         "PORT_BN_MOMENTUM", "PORT_CONV_PADDING", "PORT_CONV_PADDING"],
    "EfficientNetB0": ["PORT_PREPROCESSING", "PORT_CONV_PADDING", "PORT_BN_EPSILON",
                       "PORT_BN_MOMENTUM", "PORT_CONV_PADDING"],
    "ConvNeXtTiny": ["PORT_PREPROCESSING", "PORT_DROPOUT_MISSING"],
}


# ConvNeXtTiny's second check runs no step: its Keras step (grouped convolutions compiled
# with XLA) costs ~20 s here, and what its report names is static (preprocessing, dropout)
CONFIRM_STEPS = {"ConvNeXtTiny": 0}


@pytest.mark.parametrize("family", CONFIRMED)
def test_cross_port_family_report_fixes_applied_to_torch_leave_no_finding(family, checked):
    keras_model, report, _ = checked(family)
    assert not report.ok  # something to fix ...
    torch_model, fixed = apply_torch_fixes(torch_apps.build(family), report, keras_model)
    assert fixed == CONFIRMED[family]
    again = check_port(keras_model, torch_model, input_shape=HWC, transfer_from="torch",
                       steps=CONFIRM_STEPS.get(family, STEPS))
    assert again.ok, again.finding_lines()  # ... and nothing left once it is
    assert len(again.pairs) == len(report.pairs)
    assert again.first_divergent("inference") is None


# --------------------------------------------------------------------------- #
# activations compared by function
# --------------------------------------------------------------------------- #
GRID = np.linspace(-8.0, 8.0, 16001, dtype=np.float32)


def _keras_fn(name, **params):
    return lambda x: keras.ops.convert_to_numpy(keras.activations.get(name)(x, **params))


def _torch_fn(module):
    return lambda x: module(torch.from_numpy(x)).numpy()


# (keras name, its parameters, torch module, torch name and parameters as its half reports)
SAME_FUNCTION = [
    ("hard_silu", {}, nn.Hardswish(), "hard_swish", {}),
    ("hard_swish", {}, nn.Hardswish(), "hard_swish", {}),
    ("swish", {}, nn.SiLU(), "silu", {}),
    ("silu", {}, nn.SiLU(), "silu", {}),
    ("hard_sigmoid", {}, nn.Hardsigmoid(), "hard_sigmoid", {}),
    ("relu6", {}, nn.ReLU6(), "relu6", {}),
    ("gelu", {"approximate": False}, nn.GELU(), "gelu", {"approximate": "none"}),
    ("gelu", {"approximate": True}, nn.GELU("tanh"), "gelu", {"approximate": "tanh"}),
]


@pytest.mark.parametrize("keras_name, keras_params, module, torch_name, torch_params",
                         SAME_FUNCTION, ids=[f"{k}-{t}" for k, _, _, t, _ in SAME_FUNCTION])
def test_cross_port_activation_names_of_one_function_compare_equal(keras_name, keras_params,
                                                                   module, torch_name,
                                                                   torch_params):
    assert function_of(keras_name, keras_params) == function_of(torch_name, torch_params)
    gap = np.abs(_keras_fn(keras_name, **keras_params)(GRID) - _torch_fn(module)(GRID)).max()
    assert gap <= tol.FORWARD_ATOL, gap


def test_cross_port_gelu_tanh_approximation_differs_by_the_size_the_finding_quotes():
    assert function_of("gelu", {"approximate": True}) != function_of("gelu", {})
    exact, approximate = _keras_fn("gelu")(GRID), _keras_fn("gelu", approximate=True)(GRID)
    keras_gap = np.abs(exact - approximate).max()
    torch_gap = np.abs(_torch_fn(nn.GELU())(GRID) - _torch_fn(nn.GELU("tanh"))(GRID)).max()
    half_unit = 0.05e-4  # GELU_TANH_MAX_ABS is printed to 2 significant digits
    for gap in (keras_gap, torch_gap):
        assert abs(gap - GELU_TANH_MAX_ABS) <= half_unit and gap > tol.FORWARD_ATOL, gap


# --------------------------------------------------------------------------- #
# the coverage tables in README.md and docs/PORTING.md are these reports
# --------------------------------------------------------------------------- #
def _value(value) -> str:
    if isinstance(value, str) and ":" in value:  # a preprocessing description
        value = value.split(":")[0]
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def coverage_cells(family: str, report) -> tuple[str, str, str]:
    """The table's pairs, findings and first divergent layer cells for one report."""
    findings = []
    for f in report.findings:
        if f.code in CONSEQUENCES:
            findings.append(f"`{f.code}`")
        else:
            findings.append(f"`{f.code}` x{len(f.pairs) or 1} ({_value(f.keras_value)} vs "
                            f"{_value(f.torch_value)})")
    first = report.first_divergent("inference") or report.first_divergent("training")
    where = "none" if first is None else (
        f"`{first.keras_layer}` <-> `{first.torch_layer}` "
        f"({'shapes differ' if first.shapes else f'{first.max_abs:.3g}'})")
    return str(len(report.pairs)), "; ".join(findings) or "none", where


def _table_rows(path: Path) -> dict[str, list[str]]:
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in FAMILIES:
            rows[cells[0]] = cells
    return rows


@pytest.mark.parametrize("doc", ["README.md", "docs/PORTING.md"])
def test_cross_port_coverage_table_is_the_families_reports(doc, checked):
    rows = _table_rows(REPO / doc)
    assert list(rows) == list(FAMILIES), f"{doc}: coverage table rows {list(rows)}"
    for family, cells in rows.items():
        expected = coverage_cells(family, checked(family)[1])
        assert tuple(cells[1:4]) == expected, (doc, family, cells[1:4], expected)
        assert re.fullmatch(r"\d+(\.\d)? s", cells[4]), (doc, family, cells[4])
