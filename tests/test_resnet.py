"""ResNet-18: torchvision's model (torch) and the Keras rebuild compute one function.

Both are built by ``build_model("resnet18", ...)``; weights travel only through
the canonical form. Models are module-scoped: building the Keras one costs
seconds, so tests re-import weights instead of rebuilding. The fine-tuning runs at
the end (a shortened `compare --arch resnet18` matrix) pretrain ResNet-18 once in the
session's cache and share their records through one module-scoped fixture.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import torch
import torchvision
from strategy_oracle import resnet_moved_by_one_step
from torch import nn

from shared.archs import ResNet18Config, keras_momentum
from shared.init import canonical_init
from shared.strategies import STRATEGIES, bn_prefixes, frozen_keys, get_strategy, last_block
from shared.tolerances import (
    FLOAT64_RUN_ATOL,
    RESNET_FORWARD_ATOL,
    RESNET_FORWARD_FLOAT64_ATOL,
    RESNET_FORWARD_RTOL,
    TRAP_MIN_GAP,
)
from tf_impl import freeze as tf_freeze
from tf_impl import model as tf_model
from tf_impl import resnet as tf_resnet
from tf_impl import weights as tf_weights
from torch_impl import freeze as torch_freeze
from torch_impl import model as torch_model
from torch_impl import resnet as torch_resnet
from torch_impl import weights as torch_weights

NUM_CLASSES = 1000  # torchvision's own head, so a fresh resnet18() loads what we write
BATCH = 2
CALIBRATION_BATCH = 8
BN_LAYERS = 20  # bn1, two per BasicBlock (8 blocks), three downsample BNs
STRATEGY_SIZE = 32  # ResNet18Config.image_size: layer4 is 1x1, still 4 values per BN channel
STRATEGY_BATCH = 4
LEARNING_RATE = 0.1
CONFIG = ResNet18Config()


# --------------------------------------------------------------------------- #
# fixtures
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def torch_net():
    return torch_model.build_model("resnet18", NUM_CLASSES)


@pytest.fixture(scope="module")
def tf_net():
    return tf_model.build_model("resnet18", NUM_CLASSES)


def _images_nchw(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.fixture(scope="module")
def weights(torch_net):
    """Canonical weights with randomised, realistic BatchNorm statistics.

    canonical_init leaves running_mean 0 and running_var 1, which would hide a
    swapped or misplaced statistic. The statistics are first measured on a
    calibration batch (what pretraining leaves behind: activations of order 1,
    not exploding through 8 residual blocks), then perturbed per channel so
    that they match no batch's statistics.
    """
    tensors = canonical_init(torch_weights.canonical_shapes(torch_net), seed=0)
    torch_weights.import_weights(torch_net, tensors)
    bns = [m for m in torch_net.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = 1.0  # running statistics := this batch's statistics
    torch_net.train()
    with torch.no_grad():
        torch_net(torch.from_numpy(_images_nchw(CALIBRATION_BATCH, 64, seed=1)))
    for bn in bns:
        bn.momentum = CONFIG.bn_momentum
    tensors = torch_weights.export_weights(torch_net)
    rng = np.random.default_rng(2)
    for prefix in sorted(bn_prefixes(tensors)):
        mean, var = tensors[f"{prefix}.running_mean"], tensors[f"{prefix}.running_var"]
        shape = mean.shape
        tensors[f"{prefix}.running_mean"] = mean + 0.1 * np.sqrt(var) * rng.normal(size=shape)
        tensors[f"{prefix}.running_var"] = var * rng.uniform(0.8, 1.25, shape)
        tensors[f"{prefix}.weight"] = rng.uniform(0.5, 1.5, shape)  # gamma, canonically 1
        tensors[f"{prefix}.bias"] = rng.normal(0.0, 0.1, shape)  # beta, canonically 0
    return {key: value.astype(np.float32) for key, value in tensors.items()}


# --------------------------------------------------------------------------- #
# structure
# --------------------------------------------------------------------------- #
def test_torch_resnet18_base_is_torchvision_without_fc(torch_net):
    assert isinstance(torch_net.base, torchvision.models.ResNet)
    assert isinstance(torch_net.base.fc, nn.Identity)
    with torch.no_grad():
        features = torch_net.eval().base(torch.zeros(BATCH, 3, STRATEGY_SIZE, STRATEGY_SIZE))
    assert tuple(features.shape) == (BATCH, CONFIG.feature_dim)


def test_resnet18_canonical_keys_are_torchvision_keys(torch_net, tf_net):
    reference = torchvision.models.resnet18()
    want = {("head." if k.startswith("fc.") else "base.") + k: tuple(v.shape)
            for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    got_torch = torch_weights.canonical_shapes(torch_net)
    got_tf = tf_weights.canonical_shapes(tf_net)
    assert got_torch == want
    assert got_tf == want, (f"Keras-only keys {sorted(set(got_tf) - set(want))[:5]}, "
                            f"missing {sorted(set(want) - set(got_tf))[:5]}")
    for key in ("base.conv1.weight", "base.bn1.running_var", "base.layer1.0.conv1.weight",
                "base.layer4.1.bn2.bias", "base.layer2.0.downsample.0.weight",
                "base.layer2.0.downsample.1.running_mean", "head.fc.weight"):
        assert key in got_tf


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_resnet18_every_bn_uses_config_eps_and_momentum(framework, torch_net, tf_net):
    if framework == "torch":
        bns = [m for m in torch_net.base.modules() if isinstance(m, nn.BatchNorm2d)]
        got = {(m.eps, m.momentum) for m in bns}
        want = {(CONFIG.bn_epsilon, CONFIG.bn_momentum)}
    else:
        bns = [la for _, la in tf_model.named_leaves(tf_net.base) if tf_model.is_batch_norm(la)]
        got = {(la.epsilon, la.momentum) for la in bns}
        want = {(CONFIG.bn_epsilon, keras_momentum(CONFIG.bn_momentum))}
    assert len(bns) == BN_LAYERS and got == want


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_resnet18_norm_layer_with_framework_defaults_rejected(framework):
    # torchvision calls norm_layer(num_features) only: a bare class would bring its own defaults.
    if framework == "torch":
        bad = lambda n: nn.BatchNorm2d(n, eps=1e-3)
        with pytest.raises(ValueError, match=r"'base\.bn1'"):
            torch_resnet.resnet18_base(CONFIG, bad)
    else:
        import keras

        bad = lambda n, name="bn": keras.layers.BatchNormalization(name=name)
        with pytest.raises(ValueError, match=r"'base\.bn1'"):
            tf_resnet.resnet18_base(CONFIG, bad)


# --------------------------------------------------------------------------- #
# numerics
# --------------------------------------------------------------------------- #
def test_cross_maxpool_zero_padding_equals_torch_only_after_relu():
    """Why ZeroPadding2D before MaxPooling2D is exact here: torch pads with -inf.

    On ReLU outputs (>= 0) a zero pad never wins a window that holds a real
    value, so both agree exactly; on signed inputs they must differ.
    """
    import keras

    x = _images_nchw(BATCH, 9, seed=3)
    pool_torch = nn.MaxPool2d(3, stride=2, padding=1)
    pool_tf = keras.Sequential([keras.layers.ZeroPadding2D(1),
                                keras.layers.MaxPooling2D(3, strides=2, padding="valid")])
    for signed, data in ((False, np.maximum(x, 0)), (True, x - 3.0)):
        y_torch = pool_torch(torch.from_numpy(data)).numpy()
        y_tf = np.transpose(np.asarray(pool_tf(_nhwc(data))), (0, 3, 1, 2))
        gap = float(np.abs(y_torch - y_tf).max())
        if signed:
            assert gap > TRAP_MIN_GAP, f"zero vs -inf padding agreed on signed input (gap {gap:.3g})"
        else:
            assert gap == 0.0, f"zero vs -inf padding differ on ReLU output by {gap:.3g}"


@pytest.mark.parametrize("size", [64, 65], ids=["even64", "odd65"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_cross_resnet18_forward_matches(size, training, torch_net, tf_net, weights,
                                        record_property):
    torch_weights.import_weights(torch_net, weights)
    tf_weights.import_weights(tf_net, weights)
    x_torch = _images_nchw(BATCH, size, seed=size)
    x_tf = _nhwc(x_torch)
    torch_net.train(training)
    with torch.no_grad():  # FineTuneModel is head(base(x)): one base pass serves both checks
        features_torch = torch_net.base(torch.from_numpy(x_torch))
        logits_torch = torch_net.head(features_torch).numpy()
        features_torch = features_torch.numpy()
    features_tf = tf_net.base(x_tf, training=training)
    logits_tf = np.asarray(tf_net.head(features_tf, training=training))
    features_tf = np.asarray(features_tf)
    for path, got, want in (("base", features_tf, features_torch),
                            ("logits", logits_tf, logits_torch)):
        diff = float(np.abs(got - want).max())
        record_property(f"max_abs_diff_{path}", diff)
        np.testing.assert_allclose(
            got, want, atol=RESNET_FORWARD_ATOL, rtol=RESNET_FORWARD_RTOL,
            err_msg=f"resnet18 {path} ({size}x{size}, training={training}): Keras vs torch max "
                    f"abs diff {diff:.3g} (output max |x| {float(np.abs(want).max()):.3g})")


@pytest.fixture(scope="module")
def nets_float64():
    return (torch_model.build_model("resnet18", NUM_CLASSES, dtype="float64"),
            tf_model.build_model("resnet18", NUM_CLASSES, dtype="float64"))


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_cross_resnet18_forward_float64_gap_is_rounding(training, nets_float64, weights,
                                                        record_property):
    """In float64 the gap all but vanishes: the float32 one is rounding, not different maths."""
    torch_net64, tf_net64 = nets_float64
    torch_weights.import_weights(torch_net64, weights)
    tf_weights.import_weights(tf_net64, weights)
    x_torch = _images_nchw(BATCH, 65, seed=65).astype(np.float64)
    with torch.no_grad():
        features_torch = torch_net64.train(training).base(torch.from_numpy(x_torch)).numpy()
    features_tf = np.asarray(tf_net64.base(_nhwc(x_torch), training=training))
    diff = float(np.abs(features_tf - features_torch).max())
    record_property("max_abs_diff_base_float64", diff)
    assert features_tf.dtype == features_torch.dtype == np.float64
    assert diff <= RESNET_FORWARD_FLOAT64_ATOL, (
        f"resnet18 base in float64 (65x65, training={training}): Keras vs torch max abs diff "
        f"{diff:.3g}: more than rounding")


def test_resnet18_weights_roundtrip_exact(torch_net, tf_net, weights):
    for name, module in (("torch", torch_weights), ("tf", tf_weights)):
        net = torch_net if name == "torch" else tf_net
        module.import_weights(net, weights)
        back = module.export_weights(net)
        assert back.keys() == weights.keys()
        changed = [k for k in sorted(weights) if not np.array_equal(back[k], weights[k])]
        assert not changed, f"{name}: canonical -> model -> canonical changed {changed[:5]}"


def test_cross_resnet18_torchvision_state_dict_roundtrip_exact(tf_net, weights):
    """torchvision state_dict -> canonical -> Keras -> canonical -> state_dict, bit-exact."""
    original = torchvision.models.resnet18()
    original.load_state_dict(torch_resnet.canonical_to_state_dict(weights))
    state_dict = original.state_dict()

    canonical = torch_resnet.state_dict_to_canonical(state_dict)
    tf_weights.import_weights(tf_net, canonical)
    back = torch_resnet.canonical_to_state_dict(tf_weights.export_weights(tf_net))

    assert list(back) == list(state_dict)
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            assert int(back[key]) == 0, key
        else:
            assert torch.equal(back[key], value), f"{key}: changed in the round trip"
    fresh = torchvision.models.resnet18()
    fresh.load_state_dict(back, strict=True)
    x = torch.from_numpy(_images_nchw(BATCH, 64, seed=4))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), original.eval()(x))


# --------------------------------------------------------------------------- #
# freezing strategies
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def strategy_nets():
    """Separate models: strategies change flags and weights."""
    legacy = tf_model.default_norm_layer(CONFIG, tf_model.LegacyBatchNormalization)
    return {
        "torch": torch_model.build_model("resnet18", NUM_CLASSES),
        "tf": tf_model.build_model("resnet18", NUM_CLASSES),
        "tf-naive": tf_model.build_model("resnet18", NUM_CLASSES, norm_layer=legacy),
    }


def _torch_step(net, x: np.ndarray, y: np.ndarray) -> None:
    optimizer = torch.optim.SGD(torch_freeze.trainable_parameters(net), lr=LEARNING_RATE)
    net.train()
    loss = nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _tf_step(net, x: np.ndarray, y: np.ndarray) -> None:
    variables = tf_freeze.trainable_parameters(net)
    with tf.GradientTape() as tape:
        logits = net(_nhwc(x), training=True)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
    for var, grad in zip(variables, tape.gradient(loss, variables)):
        var.assign_sub(LEARNING_RATE * grad)


def test_last_block_of_resnet18_is_layer4():
    assert last_block("resnet18") == "base.layer4"


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_resnet18_strategy_freezes_exactly_declared_keys(framework, strategy, strategy_nets,
                                                         weights):
    """One SGD step after apply_strategy: unchanged keys == frozen_keys (or the declared mistake)."""
    key = "tf-naive" if framework == "tf" and strategy == "naive" else framework
    net = strategy_nets[key]
    module = torch_weights if framework == "torch" else tf_weights
    freeze = torch_freeze if framework == "torch" else tf_freeze
    module.import_weights(net, weights)
    freeze.apply_strategy(net, strategy)
    x = _images_nchw(STRATEGY_BATCH, STRATEGY_SIZE, seed=5)
    y = np.arange(STRATEGY_BATCH, dtype=np.int64)
    (_torch_step if framework == "torch" else _tf_step)(net, x, y)
    after = module.export_weights(net)

    unchanged = {k for k in weights if np.array_equal(after[k], weights[k])}
    declared = set(frozen_keys(strategy, weights, "resnet18"))
    stats = {k for k in weights if k.endswith((".running_mean", ".running_var"))}
    expect = get_strategy(strategy).expectation(framework)
    label = f"{strategy}[{framework}]"
    assert (not stats <= unchanged) == expect.bn_stats_changed, f"{label}: BN statistics"
    # the hand-written oracle (tests/strategy_oracle.py), not frozen_keys/last_block
    moved, oracle = set(weights) - unchanged, resnet_moved_by_one_step(strategy, framework)
    assert moved == oracle, (f"{label}: expected to move but unchanged {sorted(oracle - moved)[:3]}; "
                             f"moved but must stay bit-identical {sorted(moved - oracle)[:3]}")
    if expect.frozen_unchanged:
        assert unchanged == declared | (set(weights) - oracle - declared), label
        assert not declared & moved, label
    else:  # torch's naive mistake: gradients off, statistics still move
        assert declared - unchanged and declared - unchanged <= stats, label
        assert unchanged == declared - stats, label


# --------------------------------------------------------------------------- #
# fine-tuning runs: the strategy matrix of `compare --arch resnet18`, shortened
# --------------------------------------------------------------------------- #
# Eight steps: enough for batch-statistics training to grow float32 rounding far above one
# forward's (the free runs are judged against the envelope measured in the same run).
MATRIX_STEPS = 8
# Learning rate and momentum that float32 holds exactly (2**-6, 7/8): effective step
# lr / (1 - momentum) = 0.125, near the default's 0.1.
MATRIX_LEARNING_RATE = 2.0**-6
MATRIX_MOMENTUM = 0.875


# The matrix starts from a short pretraining (on random weights even `frozen` loses parity):
# the code path of `compare --arch resnet18`'s own 8-epoch checkpoint, for a quarter of its
# CPU time (about 18 s instead of 70 s here), still far from chance on the source domain
# (asserted below). The verdicts are per step and do not depend on the epoch count.
MATRIX_PRETRAIN = {"arch": "resnet18", "framework": "torch", "epochs": 2, "decay_epochs": 1}
MATRIX_PRETRAIN_MIN_SOURCE_ACCURACY = 0.5  # chance is 0.1 (10 digits)


@pytest.fixture(scope="module")
def matrix_checkpoint(tmp_path_factory):
    from shared.checkpoint import load_checkpoint
    from shared.pretrain import PretrainConfig, pretrain

    path = tmp_path_factory.mktemp("resnet18") / "resnet18-matrix.safetensors"
    pretrain(PretrainConfig(**MATRIX_PRETRAIN), path)
    _, meta = load_checkpoint(path)
    assert meta["arch"] == "resnet18"
    return path


def test_resnet18_matrix_checkpoint_learned_the_source_domain(matrix_checkpoint):
    from shared.checkpoint import load_checkpoint

    accuracy = float(load_checkpoint(matrix_checkpoint)[1]["source_test_accuracy"])
    assert accuracy >= MATRIX_PRETRAIN_MIN_SOURCE_ACCURACY, accuracy


@pytest.fixture(scope="module")
def resnet_result(matrix_checkpoint):
    """``resnet_result(strategy, dtype)``: the compare matrix's StrategyResult for ResNet-18
    (lockstep, both free runs, envelope, float64 run), once per module."""
    from shared.matrix import _Shared, run_strategy
    from shared.record import RunConfig

    cache, shared = {}, _Shared()

    def get(strategy, dtype="float32"):
        if (strategy, dtype) not in cache:
            config = RunConfig(arch="resnet18", strategy=strategy, steps=MATRIX_STEPS,
                               eval_every=MATRIX_STEPS, learning_rate=MATRIX_LEARNING_RATE,
                               momentum=MATRIX_MOMENTUM, dtype=dtype,
                               checkpoint=str(matrix_checkpoint))
            cache[strategy, dtype] = run_strategy(config, shared)
        return cache[strategy, dtype]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["partial", "full"])
def test_cross_resnet18_lockstep_agrees_and_free_run_within_envelope(resnet_result, strategy,
                                                                     record_property):
    """`partial` trains layer4's convolutions on stored statistics, `full` all 20 conv+BN
    layers on batch statistics: both frameworks take every step from the same state within
    the one-step bounds (or float64 decides), and the free runs stay within the envelope."""
    result = resnet_result(strategy)
    record_property("free_run_max_diff", result.free.max_diff)
    record_property("lockstep_max_ratio", result.lockstep.max_ratio)
    assert result.lockstep.steps == MATRIX_STEPS and not result.lockstep.semantic_events
    assert result.ok, result.failures
    for event in result.lockstep.numerics_events:  # decided in float64, not absorbed
        assert event.ratio > 1 >= event.float64_ratio, event
    held = result.torch.heldout
    assert abs(held[-1].loss - held[0].loss) > TRAP_MIN_GAP, f"{strategy} changed nothing"


@pytest.mark.slow
def test_cross_resnet18_full_float64_agrees_within_float64_run_atol(resnet_result,
                                                                    record_property):
    """In float64 the two ResNet-18 runs of `full` agree to float64 rounding at every step:
    no BatchNorm convention differs (a wrong one shows at >= 1e-7)."""
    result = resnet_result("full", "float64")
    record_property("max_abs_diff_full_float64", result.free.max_diff)
    assert result.ok, result.failures
    assert result.free.max_diff <= FLOAT64_RUN_ATOL
