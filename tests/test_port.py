"""The port check (``shared/port/`` + ``{tf,torch}_impl/port.py``) on pairs with known answers.

The project's own pairs (tinyconv, ResNet-18 against torchvision) must pair every
leaf and report no finding under each strategy; each seeded broken pair in
``tests/examples/port_pairs.py`` holds one porting mistake and must be reported
with its code at the right layer; bad input is a one-line PortError.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from shared import tolerances as tol
from shared.port import FINDINGS, PortError, check_port, divergence, fold_context, pair
from shared.port.divergence import training_cutoff
from shared.port.lint import affine_of
from shared.port.records import Leaf, Pair
from tests.examples import port_pairs as pp
from tf_impl import port as kport
from tf_impl.freeze import apply_strategy as keras_strategy
from tf_impl.model import build_model as keras_build
from tf_impl.train import norm_layer_for
from torch_impl import port as tport
from torch_impl.freeze import apply_strategy as torch_strategy
from torch_impl.model import build_model as torch_build

HWC = (pp.SIZE, pp.SIZE, 3)
STEPS = 2  # enough for a statistic to move once its batch is seen


def _check(keras_model, torch_model, **kwargs):
    kwargs.setdefault("input_shape", HWC)
    kwargs.setdefault("steps", STEPS)
    return check_port(keras_model, torch_model, **kwargs)


def _only(report, code):
    found = [f for f in report.findings if f.code == code]
    assert found, f"{code} not reported; findings: {report.finding_lines()}"
    return found[0]


def _project_pair(arch, strategy):
    # torch's default init draws from the global RNG, whose state depends on which tests ran
    # before on this xdist worker: seeded, so each pair (and its Adam steps, which amplify
    # near-zero gradients) is the same in every run
    torch.manual_seed(0)
    keras_model = keras_build(arch, 5, norm_layer=norm_layer_for(arch, strategy))
    return keras_strategy(keras_model, strategy), torch_strategy(torch_build(arch, 5), strategy)


# --------------------------------------------------------------------------- #
# the project's own pairs
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("strategy", ["frozen", "bn_adapt", "partial", "full"])
def test_cross_port_tinyconv_every_strategy_pairs_all_leaves_no_finding(strategy):
    keras_model, torch_model = _project_pair("tinyconv", strategy)
    report = _check(keras_model, torch_model, input_shape=(32, 32, 3), transfer_from="torch")
    assert [(k, t) for k, t, _ in report.pairs] == [
        (f"base.block{i}.{leaf}", f"base.block{i}.{leaf}") for i in (1, 2, 3)
        for leaf in ("conv", "bn")] + [("head.fc", "head.fc")]
    assert report.ok, report.finding_lines()
    assert report.tolerance["name"] == "FORWARD"
    for rows in (report.inference, report.training):
        assert all(r.max_abs <= tol.FORWARD_ATOL for r in rows[:-1])
    moved = {(m["keras_layer"], m["tensor"]): (m["keras_moved"], m["torch_moved"])
             for m in report.moved}
    assert moved[("head.fc", "weight")] == (True, True)  # the steps trained something
    base_bn_moves = strategy in ("bn_adapt", "full")
    assert moved[("base.block1.bn", "running_mean")] == (base_bn_moves, base_bn_moves)


def test_cross_port_tinyconv_plain_keras_bn_full_reports_variance_convention():
    # Plain Keras BN updates moving_variance with the biased batch variance, torch the
    # unbiased one: a real framework difference the project's parity runs reconcile.
    keras_model = keras_strategy(keras_build("tinyconv", 5), "full")
    report = _check(keras_model, torch_strategy(torch_build("tinyconv", 5), "full"),
                    input_shape=(32, 32, 3), transfer_from="torch")
    assert report.ok, report.finding_lines()  # expected, not a porting mistake ...
    (finding,) = report.expected  # ... but listed: the means agree, only variances differ
    assert (finding.code, finding.keras_layer) == ("PORT_BN_VARIANCE_CONVENTION",
                                                   "base.block1.bn")


def test_cross_port_tinyconv_naive_stats_move_only_in_torch():
    keras_model, torch_model = _project_pair("tinyconv", "naive")
    report = _check(keras_model, torch_model, input_shape=(32, 32, 3), transfer_from="torch")
    finding = _only(report, "PORT_MOVED_ONE_SIDE")
    assert (finding.keras_layer, finding.torch_layer) == ("base.block1.bn", "base.block1.bn")
    assert finding.keras_value.endswith("changed by 0")
    row = next(m for m in report.moved
               if m["keras_layer"] == "base.block1.bn" and m["tensor"] == "running_mean")
    assert row["keras_change"] == 0.0 and row["torch_change"] > tol.TRAP_MIN_GAP


def test_cross_port_resnet18_frozen_no_finding_within_resnet_tolerance():
    keras_model, torch_model = _project_pair("resnet18", "frozen")
    report = _check(keras_model, torch_model, input_shape=(32, 32, 3), transfer_from="torch",
                    steps=1)
    assert len(report.pairs) == 41  # 20 convs, 20 BatchNorms, the head
    assert report.ok, report.finding_lines()
    assert report.tolerance["name"] == "RESNET_FORWARD"
    assert max(r.max_abs for r in report.inference + report.training) <= tol.RESNET_FORWARD_ATOL
    # layer4 runs on 1x1 maps at 32x32: its BatchNorms see batch 4 x 1 x 1 values per channel
    judged = [r.keras_layer for r in report.training if r.judged]
    assert judged[-1] == "base.layer4.0.conv1" and len(judged) == 31, judged[-3:]
    assert any(note.startswith("training mode is not judged from base.layer4.0.bn1 <-> "
                               "base.layer4.0.bn1 on: its BatchNorm normalises over 4 values")
               for note in report.notes), report.notes


def test_port_training_cutoff_at_the_first_batchnorm_under_min_values():
    def leaf(name, kind, shape):
        return Leaf(name, kind, "X", {}, {}, shape)

    pairs = [Pair(leaf(n, k, s), leaf(n, k, s)) for n, k, s in (
        ("conv", "conv", (8, 2, 2)), ("bn", "bn", (8, 2, 2)), ("conv2", "conv", (8, 1, 1)),
        ("bn2", "bn", (8, 1, 1)), ("fc", "dense", (4,)))]
    assert training_cutoff(pairs, 4) == (3, training_cutoff(pairs, 4)[1])  # 4 x 1 x 1 < 16
    assert "bn2 <-> bn2" in training_cutoff(pairs, 4)[1]
    assert training_cutoff(pairs, 16) is None  # 16 x 1 x 1 values: judged
    assert training_cutoff(pairs[:2], 4) is None  # 4 x 2 x 2 = 16: judged


def test_cross_port_transfer_roundtrip_is_exact():
    keras_model, torch_model = pp.flatten_keras(), pp.flatten_torch()
    probe = np.zeros((2, 3, pp.SIZE, pp.SIZE), np.float32)
    k_leaves = fold_context(kport.describe(keras_model, probe))
    t_leaves = fold_context(tport.describe(torch_model, probe))
    pairs = pair(k_leaves, t_leaves)
    original = tport.read_tensors(torch_model, [p.torch for p in pairs])
    kport.write_tensors(keras_model, [p.keras for p in pairs],
                        {p.keras.name: original[p.torch.name] for p in pairs})
    back = kport.read_tensors(keras_model, [p.keras for p in pairs])
    fresh = pp.flatten_torch()
    with torch.no_grad():
        for param in fresh.parameters():
            param.add_(1.0)  # every value differs from the original before the copy back
    tport.write_tensors(fresh, [p.torch for p in pair(k_leaves, fold_context(
        tport.describe(fresh, probe)))], {p.torch.name: back[p.keras.name] for p in pairs})
    for key, value in torch_model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    # the Dense after Flatten really was permuted (not a plain transpose)
    fc = keras_model.get_layer("fc").kernel.numpy()
    assert not np.array_equal(fc, original["fc"]["weight"].T)


# --------------------------------------------------------------------------- #
# seeded broken ports: the right code at the right layer
# --------------------------------------------------------------------------- #
def test_port_seeded_bn_epsilon_keras_default_found_at_bn():
    report = _check(pp.bn_epsilon_keras(), pp.good_torch(), transfer_from="torch")
    finding = _only(report, "PORT_BN_EPSILON")
    assert (finding.keras_layer, finding.torch_layer) == ("bn", "bn")
    assert (finding.keras_value, finding.torch_value) == (1e-3, 1e-5)
    assert _only(report, "PORT_DIVERGES_INFERENCE").keras_layer == "bn"


def test_port_seeded_momentum_unconverted_visible_after_steps():
    report = _check(pp.bn_momentum_keras(), pp.good_torch(), transfer_from="torch")
    finding = _only(report, "PORT_BN_MOMENTUM")
    assert (finding.keras_layer, finding.keras_value, finding.torch_value) == ("bn", 0.1, 0.1)
    # the function itself is the same: both forward passes agree ...
    assert report.first_divergent("inference") is None
    assert report.first_divergent("training") is None
    # ... and the moving statistics diverge once a step has run
    diverged = _only(report, "PORT_STATS_DIVERGE")
    assert diverged.keras_layer == "bn" and "running_mean" in diverged.keras_value
    no_steps = _check(pp.bn_momentum_keras(), pp.good_torch(), transfer_from="torch", steps=0)
    assert no_steps.codes() == ["PORT_BN_MOMENTUM"]  # only the lint sees it without steps


def test_port_seeded_same_padding_stride2_even_found_at_conv():
    report = _check(pp.same_padding_keras(), pp.same_padding_torch(), transfer_from="torch")
    finding = _only(report, "PORT_SAME_PADDING_STRIDE2_EVEN")
    assert finding.keras_layer == "conv" and finding.torch_layer == "conv"
    # (top, bottom, left, right): TensorFlow puts the one padded row/column at the end
    assert (finding.keras_value, finding.torch_value) == ([0, 1, 0, 1], [1, 1, 1, 1])
    first = report.first_divergent("inference")
    assert first.keras_layer == "conv" and first.max_abs > tol.TRAP_MIN_GAP


def test_port_seeded_attention_in_proj_copied_untransposed_found_at_attn():
    """in_proj_weight's square (out, in) blocks reshaped into Keras's query/key/value
    kernels with no transpose: PORT_WEIGHT_TRANSPOSED names the attention and the fused
    weight, not PORT_WEIGHTS_DIFFER (out_proj, conv and fc were copied right); the
    outputs first part there; the project's transfer leaves nothing."""
    keras_model, torch_model = pp.attention_copied_untransposed()
    report = _check(keras_model, torch_model)
    finding = _only(report, "PORT_WEIGHT_TRANSPOSED")
    assert (finding.keras_layer, finding.torch_layer) == ("attn", "attn")
    assert (finding.keras_value, finding.torch_value) == ("weight = torch's transposed",
                                                          "weight (24, 8)")
    assert "PORT_WEIGHTS_DIFFER" not in report.codes()
    assert report.first_divergent("inference").keras_layer == "attn"
    fixed = _check(keras_model, torch_model, transfer_from="torch")
    assert fixed.ok, fixed.finding_lines()


def test_port_seeded_flatten_dense_rows_not_permuted_found_at_fc():
    keras_model, torch_model = pp.flatten_copied_naively()
    report = _check(keras_model, torch_model)  # the weights as the user copied them
    finding = _only(report, "PORT_FLATTEN_DENSE_ORDER")
    assert (finding.keras_layer, finding.torch_layer) == ("fc", "fc")
    assert "PORT_WEIGHTS_DIFFER" not in report.codes()  # conv and BN were copied right
    assert report.first_divergent("inference").keras_layer == "fc"
    fixed = _check(keras_model, torch_model, transfer_from="torch")
    assert fixed.ok, fixed.finding_lines()


def test_port_seeded_torch_wrapper_without_train_override_stats_move_only_in_torch():
    report = _check(pp.frozen_base_keras(), pp.frozen_base_torch_no_train_override(),
                    transfer_from="torch")
    finding = _only(report, "PORT_MOVED_ONE_SIDE")
    assert (finding.keras_layer, finding.torch_layer) == ("bn", "bn")
    assert "changed by 0 " in finding.keras_value + " " and "running_mean" in finding.torch_value
    assert _only(report, "PORT_DIVERGES_TRAINING").keras_layer == "bn"
    assert report.first_divergent("inference") is None
    fixed = _check(pp.frozen_base_keras(), pp.frozen_base_torch(), transfer_from="torch")
    assert fixed.ok, fixed.finding_lines()


def test_port_seeded_keras_functional_training_false_stats_move_only_in_keras():
    report = _check(pp.functional_training_false_keras(), pp.bn_inference_torch(),
                    transfer_from="torch")
    finding = _only(report, "PORT_MOVED_ONE_SIDE")
    assert (finding.keras_layer, finding.torch_layer) == ("base.bn", "bn")
    assert "running_mean" in finding.keras_value and finding.torch_value.endswith("changed by 0")
    assert _only(report, "PORT_DIVERGES_TRAINING").keras_layer == "base.bn"


def test_port_seeded_dropout_rates_differ_found_at_dropout():
    report = _check(pp.dropout_keras(), pp.dropout_torch(), transfer_from="torch")
    finding = _only(report, "PORT_DROPOUT_RATE")
    assert (finding.keras_layer, finding.torch_layer) == ("dropout", "dropout")
    assert (finding.keras_value, finding.torch_value) == (0.5, 0.2)
    assert report.codes() == ["PORT_DROPOUT_RATE"]  # dropout off in the dynamic passes


def test_port_seeded_missing_conv_bias_found_at_conv():
    report = _check(pp.conv_bias_keras(), pp.good_torch(), transfer_from="torch")
    finding = _only(report, "PORT_CONV_BIAS")
    assert (finding.keras_layer, finding.torch_layer) == ("conv", "conv")
    assert (finding.keras_value, finding.torch_value) == (True, False)


def test_port_good_pair_as_given_weights_differ_then_transfer_agrees():
    report = _check(pp.good_keras(), pp.good_torch())  # independently initialised
    assert _only(report, "PORT_WEIGHTS_DIFFER").keras_layer == "conv"
    assert _check(pp.good_keras(), pp.good_torch(), transfer_from="torch").ok


def test_port_findings_catalogue_codes_have_what_and_fix():
    assert all(code.startswith("PORT_") and k.what and k.fix for code, k in FINDINGS.items())


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("make, match", [
    (lambda: (object(), pp.good_torch()),
     r"keras model: expected a keras\.Model, got builtins\.object"),
    (lambda: (pp.good_keras(), "a string"), r"torch model: expected a torch\.nn\.Module"),
    (lambda: (pp.two_convs_keras(), pp.good_torch()),
     (r"different weighted leaf counts: keras 4, torch 3; first keras layer without a "
      r"partner by order: fc")),
    (lambda: (pp.good_keras(), pp.dense_first_torch()),
     r"cannot pair keras layer conv \(Conv2D.*torch module fc0 \(Linear.*kind conv vs dense"),
])
def test_port_bad_pair_one_line_port_error(make, match):
    keras_model, torch_model = make()
    with pytest.raises(PortError, match=match) as info:
        _check(keras_model, torch_model)
    assert "\n" not in str(info.value)


def test_port_wrong_input_shape_names_model_and_shape():
    with pytest.raises(PortError, match=r"the forward pass on input \(H, W, C\) \(20, 20, 3\) "
                                        r"failed") as info:
        _check(pp.flatten_keras(), pp.flatten_torch(), input_shape=(20, 20, 3))
    assert "\n" not in str(info.value)


def test_cross_port_depthwise_multiplier_pair_transfers_and_agrees():
    report = _check(pp.depthwise_keras(), pp.depthwise_torch(), transfer_from="torch")
    assert [kind for _, _, kind in report.pairs] == ["conv", "conv", "bn", "dense"]
    assert report.ok, report.finding_lines()
    assert max(r.max_abs for r in report.inference) <= tol.FORWARD_ATOL


# --------------------------------------------------------------------------- #
# a real ecosystem pair: torchvision's MobileNetV2 against Keras's
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="session")
def mobilenet_report():
    keras_model, torch_model = pp.mobilenet_v2_keras(), pp.mobilenet_v2_torch()
    with warnings.catch_warnings():  # Keras: from_logits=True on its softmax output (reported)
        warnings.simplefilter("ignore", UserWarning)
        return check_port(keras_model, torch_model, transfer_from="torch", steps=0)


def _pairs_of(report, code):
    return next(f.pairs for f in report.findings if f.code == code)


def test_cross_port_mobilenet_v2_every_leaf_pairs(mobilenet_report):
    kinds = [kind for _, _, kind in mobilenet_report.pairs]
    # 52 convs (17 depthwise among them), 52 BatchNorms, the classifier
    assert (len(kinds), kinds.count("conv"), kinds.count("bn"), kinds.count("dense")) == (
        105, 52, 52, 1)
    assert mobilenet_report.pairs[0][:2] == ("Conv1", "features.0.0")
    assert mobilenet_report.pairs[-1][:2] == ("predictions", "classifier.1")


def test_cross_port_mobilenet_v2_names_what_really_differs(mobilenet_report):
    report = mobilenet_report
    same = _only(report, "PORT_SAME_PADDING_STRIDE2_EVEN")
    assert (same.keras_layer, same.keras_value, same.torch_value) == (
        "Conv1", [0, 1, 0, 1], [1, 1, 1, 1])
    # keras.applications pads stride-2 depthwise convs with correct_pad: (0, 1) on even maps
    assert [k for k, _ in _pairs_of(report, "PORT_CONV_PADDING")] == [
        "block_1_depthwise", "block_3_depthwise", "block_6_depthwise", "block_13_depthwise"]
    eps = _only(report, "PORT_BN_EPSILON")
    assert (eps.keras_value, eps.torch_value, len(eps.pairs)) == (1e-3, 1e-5, 52)
    momentum = _only(report, "PORT_BN_MOMENTUM")
    assert (momentum.keras_value, momentum.torch_value, len(momentum.pairs)) == (0.999, 0.1, 52)
    activation = _only(report, "PORT_ACTIVATION")
    assert (activation.keras_layer, activation.keras_value, activation.torch_value) == (
        "predictions", "softmax", "none")
    dropout = _only(report, "PORT_DROPOUT_MISSING")
    assert (dropout.torch_layer, dropout.torch_value) == ("classifier.0", 0.2)
    first = report.first_divergent("inference")
    assert first.keras_layer == "Conv1" and first.max_abs > tol.TRAP_MIN_GAP


def test_cross_port_tinyconv_adam_parity_settings_no_finding():
    keras_model, torch_model = _project_pair("tinyconv", "partial")
    report = _check(keras_model, torch_model, input_shape=(32, 32, 3), transfer_from="torch",
                    optimizer="adam", learning_rate=0.001)
    assert report.ok, report.finding_lines()
    assert report.steps[-1]["keras_train"] != report.steps[0]["keras_train"]  # it trained
    # judged lockstep with the one-step bounds: nothing grows with lr x steps any more
    assert report.tolerance["steps"]["name"] == "LOCKSTEP"
    assert "param_atol" not in report.tolerance["steps"]
    assert all(0 <= row["ratio"] <= 1 for row in report.steps), report.steps
    # Adam's slots came over from torch each step: both sides updated the same tensors
    trained = {(m["keras_layer"], m["tensor"]) for m in report.moved if m["torch_moved"]}
    assert ("head.fc", "weight") in trained and trained == {
        (m["keras_layer"], m["tensor"]) for m in report.moved if m["keras_moved"]}


def test_port_adam_lockstep_bn_momentum_unconverted_still_found():
    report = _check(pp.bn_momentum_keras(), pp.good_torch(), transfer_from="torch",
                    optimizer="adam", learning_rate=0.001)
    assert "PORT_BN_MOMENTUM" in report.codes()
    diverged = _only(report, "PORT_STATS_DIVERGE")
    assert diverged.keras_layer == "bn" and "running_mean" in diverged.keras_value
    assert "at step 0" in diverged.message
    sgd = _check(pp.good_keras(), pp.good_torch(), transfer_from="torch")
    assert sgd.ok, sgd.finding_lines()


def test_port_name_map_fixes_pairs_and_rejects_unknown_names():
    report = _check(pp.good_keras(), pp.good_torch(), transfer_from="torch", steps=0,
                    name_map={"fc": "fc", "conv": "conv"})
    assert [(k, t) for k, t, _ in report.pairs] == [("conv", "conv"), ("bn", "bn"), ("fc", "fc")]
    with pytest.raises(PortError, match=r"name map: torch module 'head' is not a weighted leaf"):
        _check(pp.good_keras(), pp.good_torch(), name_map={"fc": "head"})
    with pytest.raises(PortError, match=r"cannot pair keras layer conv .* torch module fc "):
        _check(pp.good_keras(), pp.good_torch(), name_map={"conv": "fc"})


def test_cross_port_frozen_batchnorm2d_pairs_with_frozen_keras_bn_no_finding():
    report = _check(pp.frozen_base_keras(), pp.frozen_bn_torch(), transfer_from="torch")
    assert report.pairs[1] == ("bn", "bn", "bn")
    assert report.ok, report.finding_lines()
    moved = {(m["keras_layer"], m["tensor"]): (m["keras_moved"], m["torch_moved"])
             for m in report.moved}
    assert moved[("bn", "running_mean")] == (False, False)
    assert moved[("fc", "weight")] == (True, True)


def test_port_model_failing_in_training_mode_one_line_port_error():
    torch_model = pp.good_torch()
    forward = torch_model.forward

    def fails_in_training(x):
        if torch_model.training:
            raise RuntimeError("training mode is not supported here")
        return forward(x)

    torch_model.forward = fails_in_training
    with pytest.raises(PortError, match=r"^torch model: the training-mode pass failed "
                                        r"\(RuntimeError: training mode is not supported here\)$"):
        _check(pp.good_keras(), torch_model, transfer_from="torch")


# --------------------------------------------------------------------------- #
# pairing by dataflow, and what the graph cannot decide
# --------------------------------------------------------------------------- #
def test_cross_port_shortcut_called_first_in_keras_pairs_by_dataflow_not_call_order():
    keras_model, torch_model = pp.shortcut_first_keras(), pp.shortcut_after_torch()
    k_calls = [leaf.name for leaf in kport.describe(keras_model, np.zeros((2, 3, pp.SIZE,
                                                                             pp.SIZE),
                                                                            np.float32))
               if leaf.weighted]
    assert k_calls.index("shortcut") < k_calls.index("main")  # Keras: the shortcut first
    report = _check(keras_model, torch_model, transfer_from="torch")
    assert {(k, t) for k, t, _ in report.pairs} == {(name, name) for name in (
        "stem", "stem_bn", "main", "main_bn", "shortcut", "shortcut_bn", "fc")}
    assert report.ok, report.finding_lines()


def test_port_twin_branches_ambiguity_one_line_then_name_map_decides():
    with pytest.raises(PortError, match=r"^pairing is ambiguous: keras layer shortcut "
                                        r"\(Conv2D.*fits torch modules main, shortcut equally"
                                        r".*--map shortcut=TORCH_MODULE") as info:
        _check(pp.twin_branches_keras(), pp.twin_branches_torch())
    assert "\n" not in str(info.value)
    report = _check(pp.twin_branches_keras(), pp.twin_branches_torch(), transfer_from="torch",
                    name_map={"shortcut": "shortcut"})
    assert ("main", "main", "conv") in report.pairs and report.ok, report.finding_lines()


def test_port_non_leaf_parameter_not_a_scale_one_line_port_error():
    with pytest.raises(PortError, match=r"^torch model: .*'\(model\)' \(Net\): parameter "
                                        r"'token' \(1, 8\) is used by expand and has no port "
                                        r"mapping") as info:
        _check(pp.good_keras(), pp.class_token_torch())
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- #
# stochastic depth against drop-connect dropout; GELU against its tanh approximation
# --------------------------------------------------------------------------- #
def test_cross_port_drop_connect_dropout_pairs_with_row_stochastic_depth_no_finding():
    report = _check(pp.drop_path_keras(), pp.drop_path_torch(), transfer_from="torch")
    assert report.ok, report.finding_lines()
    # the two were seen and matched: a batch-wise or another rate is found at them
    batch = _check(pp.drop_path_keras(), pp.drop_path_batch_torch(), transfer_from="torch")
    mode = _only(batch, "PORT_DROPOUT_MODE")
    assert (mode.keras_layer, mode.torch_layer, mode.keras_value, mode.torch_value) == (
        "drop", "drop", "row", "batch")
    rate = _only(_check(pp.drop_path_keras(), pp.drop_path_rate_torch(), transfer_from="torch"),
                 "PORT_DROPOUT_RATE")
    assert (rate.keras_value, rate.torch_value) == (0.2, 0.3)


def test_port_seeded_gelu_tanh_against_exact_found_with_its_size():
    report = _check(pp.gelu_tanh_keras(), pp.gelu_torch(), transfer_from="torch")
    finding = _only(report, "PORT_ACTIVATION")
    assert (finding.keras_layer, finding.keras_value, finding.torch_value) == (
        "fc1", "gelu_tanh", "gelu")
    assert "differ by up to 0.00047 per element" in finding.message


def test_cross_port_imagenet_normalization_both_sides_no_finding():
    report = _check(pp.imagenet_normalization_keras(), pp.imagenet_normalize_torch(),
                    transfer_from="torch")
    assert report.ok, report.finding_lines()
    # the two maps differ by float32 storage alone, which PORT_PREPROCESSING_RTOL allows
    probe = np.zeros((2, 3, pp.SIZE, pp.SIZE), np.float32)
    k = [leaf for leaf in kport.describe(pp.imagenet_normalization_keras(), probe)
         if leaf.kind == "preprocess"]
    t = [leaf for leaf in tport.describe(pp.imagenet_normalize_torch(), probe)
         if leaf.kind == "preprocess"]
    (ka, kb), (ta, tb) = affine_of(k, 3), affine_of(t, 3)
    gap = max(np.abs(ka / ta - 1).max(), np.abs(kb / tb - 1).max())
    assert 0 < gap <= tol.PORT_PREPROCESSING_RTOL, gap
    # without it on one side: the finding, with the mean and variance
    one_side = _check(pp.imagenet_normalization_keras(), pp.imagenet_normalize_torch(False),
                      transfer_from="torch")
    finding = _only(one_side, "PORT_PREPROCESSING")
    assert (finding.keras_layer, finding.torch_layer, finding.torch_value) == ("norm", "(none)",
                                                                              "none")
    assert finding.keras_value.startswith("Normalization(mean [123.675, 116.28, 103.53], "
                                          "variance [3409.9761, 3262.6943, 3291.8906])")


def test_port_untraceable_keras_model_paired_in_call_order_with_a_note():
    report = _check(pp.untraceable_keras(), pp.good_torch(), transfer_from="torch")
    assert [(k, t) for k, t, _ in report.pairs] == [("conv", "conv"), ("bn", "bn"), ("fc", "fc")]
    assert ("the keras model's dataflow could not be traced: weighted layers paired in call "
            "order") in report.notes
    assert report.ok, report.finding_lines()


def test_port_deep_scale_tolerance_forgives_rounding_on_large_outputs_only():
    pair = Pair(Leaf("a", "conv", "X", {}), Leaf("a", "conv", "X", {}))
    atol, rtol = tol.RESNET_FORWARD_ATOL, tol.RESNET_FORWARD_RTOL
    scale_rtol = tol.PORT_DEEP_INFERENCE_SCALE_RTOL
    big = np.array([[150.0, 0.0, 1e-3]], np.float32)  # a layer whose largest output is 150
    # 2e-4 apart at a small element: over atol + rtol * |torch| there, but 1.3e-6 of 150
    (row,) = divergence([pair], {"a": big + [[0, 0, 2e-4]]}, {"a": big}, atol, rtol)
    assert not row.within
    (row,) = divergence([pair], {"a": big + [[0, 0, 2e-4]]}, {"a": big}, atol, rtol, scale_rtol)
    assert row.within
    small = np.array([[1.0, 0.0, 1e-3]], np.float32)  # the same gap on a layer of scale 1
    (row,) = divergence([pair], {"a": small + [[0, 0, 2e-4]]}, {"a": small}, atol, rtol,
                        scale_rtol)
    assert not row.within


# --------------------------------------------------------------------------- #
# transformer layers: attention units, class tokens, LayerNorm on tokens, LoRA
# --------------------------------------------------------------------------- #
def test_cross_port_project_vit_ports_with_no_finding():
    """tf_impl/vit.py against timm's VisionTransformer (torch_impl/vit.py): every tensor
    pairs (tokens, patch conv, per block norm1 / attention / norm2 / fc1 / fc2, the final
    norm, the head), dropout and DropPath matched by place and rate, one step agrees."""
    from tf_impl import model as tf_model
    from torch_impl import model as torch_model

    torch_net, keras_net = torch_model.build_model("vit", 5), tf_model.build_model("vit", 5)
    report = check_port(keras_net, torch_net, input_shape=(32, 32, 3), steps=1,
                        transfer_from="torch")
    assert report.ok, report.finding_lines()
    kinds = [kind for _, _, kind in report.pairs]
    assert (len(kinds), kinds.count("attention"), kinds.count("token"),
            kinds.count("layernorm")) == (25, 4, 2, 9)
    assert ("base.blocks.0.attn", "base.blocks.0.attn", "attention") in report.pairs


@pytest.mark.parametrize("side", ["keras", "torch"])
def test_cross_port_vit_gelu_tanh_on_one_side_is_named_at_every_fc1(side):
    """The ViT's exact GELU (Keras: written out, 0.5 x (1 + erf(x / sqrt 2)); timm:
    nn.GELU) against the tanh approximation on one side (Keras: keras.ops.gelu(approximate=
    True) as operations; torch: nn.GELU("tanh")): a PORT_ACTIVATION at each block's fc1,
    naming both functions, even where the outputs stay within the forward tolerance."""
    import dataclasses

    from shared.archs import arch_config
    from tf_impl import model as tf_model
    from torch_impl import model as torch_model

    tanh = dataclasses.replace(arch_config("vit"), gelu_approximate=True)
    torch_net = torch_model.build_model("vit", 5, config=tanh if side == "torch" else None)
    keras_net = tf_model.build_model("vit", 5, config=tanh if side == "keras" else None)
    report = check_port(keras_net, torch_net, input_shape=(32, 32, 3), steps=0,
                        transfer_from="torch")
    (found,) = [f for f in report.findings if f.code == "PORT_ACTIVATION"]  # one, 4 places
    assert sorted(k for k, _ in found.pairs) == [f"base.blocks.{i}.mlp.fc1" for i in range(4)]
    want = ("gelu_tanh", "gelu") if side == "keras" else ("gelu", "gelu_tanh")
    assert (found.keras_value, found.torch_value) == want, report.finding_lines()
    assert "exact GELU and its tanh approximation differ by up to" in found.message + str(
        report.finding_lines())


def test_cross_port_keras_mha_against_nn_multihead_attention_no_finding():
    report = _check(pp.attention_keras(), pp.attention_torch(), transfer_from="torch")
    assert report.ok, report.finding_lines()
    assert ("attn", "attn", "attention") in report.pairs


def test_cross_port_keras_lora_dense_against_peft_lora_linear_no_finding():
    """Base kernel and adapter paired apart: lora_A / lora_B transferred and trained, the
    base kernel frozen on both sides, one step agrees tensor by tensor."""
    report = _check(pp.lora_keras(), pp.lora_torch(), transfer_from="torch")
    assert report.ok, report.finding_lines()
    assert ("hidden", "hidden", "dense") in report.pairs
