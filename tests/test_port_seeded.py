"""Every finding code of the port check, produced by a pair that differs in that one thing.

``SEEDED`` holds, per code, the pair (factories in ``tests/examples/port_pairs.py``),
how it is checked, the layer the finding must name and, for the dynamic codes of the
lockstep steps, that the finding names its step. The catalogue and the table must hold
the same codes: a new code without a seeded pair fails here.

The lockstep steps are sharp: the issue's two seeded port differences (tinyconv ``full``
with a Keras SGD at lr 0.01 against a torch SGD at 0.03; Keras BatchNorm momentum 0.85
against torch 0.1) are found at step 0, naming the layer and the check, and the matched
pairs report nothing.
"""

from __future__ import annotations

import pytest

from shared.port import FINDINGS, PortError, check_port
from shared.port.findings import EXPECTED_CODES
from tests.examples import port_pairs as pp

HWC = (pp.SIZE, pp.SIZE, 3)
STEPS = 2


# factories that make both sides, their weights copied by hand
PAIR_FACTORIES = ("flatten_copied_naively", "attention_copied_untransposed")


def _side(name):
    """A factory's model and optimizer (None where it returns a model alone)."""
    if name in PAIR_FACTORIES:  # both sides from one factory
        raise AssertionError("use the pair factory")
    built = getattr(pp, name)()
    return built if isinstance(built, tuple) else (built, None)


def _report(keras, torch, **kwargs):
    if keras == torch and keras in PAIR_FACTORIES:
        keras_model, torch_model = getattr(pp, keras)()
        k_opt = t_opt = None
    else:
        (keras_model, k_opt), (torch_model, t_opt) = _side(keras), _side(torch)
    kwargs.setdefault("input_shape", HWC)
    kwargs.setdefault("steps", STEPS)
    return check_port(keras_model, torch_model, keras_optimizer=k_opt, torch_optimizer=t_opt,
                      **kwargs)


T = {"transfer_from": "torch"}
# code -> (keras factory, torch factory, check_port keywords, keras layer named, at a step)
SEEDED = {
    "PORT_BN_EPSILON": ("bn_epsilon_keras", "good_torch", T, "bn", False),
    "PORT_BN_MOMENTUM": ("bn_momentum_085_keras", "good_torch", T, "bn", False),
    "PORT_BN_AFFINE": ("bn_no_center_keras", "good_torch", T, "bn", False),
    "PORT_BN_STATS": ("good_keras", "bn_no_running_stats_torch", T, "bn", False),
    "PORT_LN_EPSILON": ("ln_default_epsilon_keras", "ln_torch", T, "ln", False),
    "PORT_CONV_STRIDE": ("conv_stride2_keras", "good_torch", T, "conv", False),
    "PORT_CONV_STRIDE_PLACEMENT": ("stride_on_1x1_keras", "stride_on_3x3_torch", T, "reduce",
                                   False),
    "PORT_CONV_DILATION": ("conv_dilation2_keras", "good_torch", T, "conv", False),
    "PORT_CONV_BIAS": ("conv_bias_keras", "good_torch", T, "conv", False),
    "PORT_DENSE_BIAS": ("dense_no_bias_keras", "good_torch", T, "fc", False),
    "PORT_CONV_PADDING": ("same_padding_stride1_keras", "good_torch", T, "conv", False),
    "PORT_SAME_PADDING_STRIDE2_EVEN": ("same_padding_keras", "same_padding_torch", T, "conv",
                                       False),
    "PORT_FLATTEN_DENSE_ORDER": ("flatten_copied_naively", "flatten_copied_naively", {}, "fc",
                                 False),
    "PORT_WEIGHTS_DIFFER": ("good_keras", "good_torch", {}, "conv", False),
    "PORT_WEIGHT_TRANSPOSED": ("attention_copied_untransposed", "attention_copied_untransposed",
                               {}, "attn", False),
    "PORT_DROPOUT_RATE": ("dropout_keras", "dropout_torch", T, "dropout", False),
    "PORT_DROPOUT_MISSING": ("dropout_keras", "good_torch", T, "dropout", False),
    "PORT_DROPOUT_MODE": ("drop_path_keras", "drop_path_batch_torch", T, "drop", False),
    "PORT_PREPROCESSING": ("imagenet_normalization_keras", "imagenet_normalize_torch_none", T,
                           "norm", False),
    "PORT_ACTIVATION": ("relu6_keras", "good_torch", T, "bn", False),
    "PORT_DIVERGES_INFERENCE": ("bn_epsilon_keras", "good_torch", T, "bn", False),
    "PORT_DIVERGES_TRAINING": ("frozen_base_keras", "frozen_base_torch_no_train_override", T,
                               "bn", False),
    "PORT_MOVED_ONE_SIDE": ("frozen_base_keras", "frozen_base_torch_no_train_override", T, "bn",
                            True),
    "PORT_STATS_DIVERGE": ("bn_momentum_085_keras", "good_torch", T, "bn", True),
    "PORT_STEP_UPDATE": ("good_keras_sgd", "good_torch_sgd_lr3x", T, "conv", True),
    "PORT_OPTIMIZER_KIND": ("good_keras_sgd", "good_torch_adam", T, "(optimizer)", False),
    "PORT_OPTIMIZER_SETTINGS": ("good_keras_sgd", "good_torch_sgd_lr3x", T, "(optimizer)",
                                False),
    "PORT_ATTENTION_HEADS": ("attention_four_heads_keras", "attention_torch", T, "attn", False),
    "PORT_ATTENTION_BIAS": ("attention_no_bias_keras", "attention_torch", T, "attn", False),
    "PORT_LORA_MISSING": ("lora_none_keras", "lora_torch", T, "hidden", False),
    "PORT_LORA_RANK": ("lora_rank4_keras", "lora_torch", T, "hidden", False),
    "PORT_LORA_SCALE": ("lora_alpha_default_keras", "lora_torch", T, "hidden", False),
    "PORT_LORA_DROPOUT": ("lora_keras", "lora_dropout_torch", T, "hidden", False),
    "PORT_BN_VARIANCE_CONVENTION": ("good_keras", "good_torch", T, "bn", False),
    "PORT_STEP_LOSS": ("same_padding_stride1_keras", "good_torch", T, "(model)", True),
}


def test_port_every_finding_code_has_a_seeded_pair():
    assert sorted(SEEDED) == sorted(FINDINGS)


@pytest.mark.parametrize("code", sorted(SEEDED))
def test_port_seeded_difference_found_with_its_code_naming_layer(code):
    keras, torch, kwargs, layer, at_step = SEEDED[code]
    report = _report(keras, torch, **kwargs)
    pool = report.expected if code in EXPECTED_CODES else report.findings
    found = [f for f in pool if f.code == code]
    assert found, f"{code} not reported: {report.finding_lines()}"
    assert found[0].keras_layer == layer, found[0].line()
    if at_step:
        assert "at step 0, from the same state" in found[0].message, found[0].line()


def test_port_seeded_three_x_learning_rate_under_full_found_at_step_zero():
    report = _report("tinyconv_full_keras", "tinyconv_full_torch_lr3x",
                     input_shape=(32, 32, 3), **T)
    update = next(f for f in report.findings if f.code == "PORT_STEP_UPDATE")
    assert "at step 0, from the same state: update " in update.message, update.line()
    settings = next(f for f in report.findings if f.code == "PORT_OPTIMIZER_SETTINGS")
    assert (settings.keras_value, settings.torch_value) == ("learning_rate 0.01",
                                                            "learning_rate 0.03")
    # the same pair with matched learning rates: nothing, under batch statistics
    matched = _report("tinyconv_full_keras", "tinyconv_full_torch", input_shape=(32, 32, 3),
                      **T)
    assert matched.ok, matched.finding_lines()
    assert all(row["ratio"] <= 1 for row in matched.steps), matched.steps


def test_port_seeded_keras_bn_momentum_085_statistics_found_at_step_zero():
    report = _report("bn_momentum_085_keras", "good_torch", **T)
    stats = next(f for f in report.findings if f.code == "PORT_STATS_DIVERGE")
    assert stats.keras_layer == "bn" and "stats bn <-> bn running_mean" in stats.message
    assert "at step 0" in stats.message
    # what the lockstep step sees, by hand: from the same running mean r and batch mean b,
    # Keras keeps 0.85 r + 0.15 b and torch 0.9 r + 0.1 b, so Keras's change is 1.5 x torch's
    row = next(m for m in report.moved if m["keras_layer"] == "bn"
               and m["tensor"] == "running_mean")
    assert row["keras_change"] == pytest.approx(1.5 * row["torch_change"], rel=1e-4)


def test_port_groups_differ_refused_at_pairing_naming_both_groups():
    # other groups with the same input channels give another weight shape: no pair, so no
    # lint finding; the one-line refusal names both groups (the catalogue has no groups code)
    with pytest.raises(PortError, match=r"^cannot pair keras layer depthwise .*weight shape "
                                        r"\(16, 1, 3, 3\) vs \(16, 8, 3, 3\) \(groups 8 vs 1: "
                                        r"a Keras DepthwiseConv2D is torch groups=in_channels\)"):
        _report("depthwise_keras", "depthwise_as_dense_conv_torch", **T)
