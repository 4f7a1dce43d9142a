"""Cross-framework numerics: where Keras 3 and PyTorch agree, and where they do not.

"Must differ" assertions pin a difference as it is in the installed versions (above
TRAP_MIN_GAP); "must match" assertions prove the porting fix. Every failure message
names the docs/PORTING.md row and the measured number, which is also recorded with
``record_property`` (``pytest --junitxml``). Layers are raw keras/torch ones with
weights copied from one side to the other (``x_tf`` / ``x_torch`` naming).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch  # before keras/TensorFlow: see tests/test_import_order.py
import torchvision
from torch import nn

from shared.tolerances import (
    FORWARD_ATOL,
    FORWARD_RTOL,
    OPTIMIZER_STEP_ATOL,
    SAME_FRAMEWORK_ATOL,
    TRAP_MIN_GAP,
)
from tf_impl import keras, tf  # tf_impl imports torch_impl before TensorFlow


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(0)  # Keras initialisers draw from the global seed
    torch.manual_seed(0)


def _row(name: str) -> str:
    return f"docs/PORTING.md row {name!r}"


def _np(value) -> np.ndarray:
    """A numpy copy of a torch tensor, Keras variable or TF tensor."""
    if isinstance(value, torch.Tensor):
        return value.detach().numpy().copy()
    return np.array(value.numpy())


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def _nhwc_to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _conv_kernel_to_torch(kernel_hwio: np.ndarray) -> torch.Tensor:
    """Keras Conv2D kernel (kh, kw, in, out) -> torch Conv2d weight (out, in, kh, kw)."""
    return torch.from_numpy(np.ascontiguousarray(kernel_hwio.transpose(3, 2, 0, 1)))


# --- BatchNormalization -------------------------------------------------------------

BN_BATCH = 32
BN_FEATURES = 4


def _bn_batch() -> np.ndarray:
    rng = np.random.RandomState(0)
    return (rng.randn(BN_BATCH, BN_FEATURES) * 1.5 + 2.0).astype(np.float32)


def _one_bn_step(keras_momentum: float, torch_momentum: float):
    """One training-mode BN call on the same batch; returns both layers (eps 1e-5 both)."""
    x = _bn_batch()
    bn_tf = keras.layers.BatchNormalization(momentum=keras_momentum, epsilon=1e-5)
    y_tf = bn_tf(x, training=True)
    bn_torch = nn.BatchNorm1d(BN_FEATURES, momentum=torch_momentum, eps=1e-5)
    y_torch = bn_torch(torch.from_numpy(x))
    return bn_tf, y_tf, bn_torch, y_torch


def test_cross_bn_momentum_converted_gives_equal_moving_mean(record_property):
    keras_momentum = 0.9
    bn_tf, _, bn_torch, _ = _one_bn_step(keras_momentum, 1.0 - keras_momentum)
    converted = _max_abs(_np(bn_tf.moving_mean), _np(bn_torch.running_mean))
    bn_tf, _, bn_torch, _ = _one_bn_step(keras_momentum, keras_momentum)  # copied as is
    unconverted = _max_abs(_np(bn_tf.moving_mean), _np(bn_torch.running_mean))
    record_property("measured", f"converted {converted:.3g}, copied as is {unconverted:.3g}")
    assert converted <= FORWARD_ATOL and unconverted > TRAP_MIN_GAP, (
        f"{_row('BN momentum convention')}: expected torch momentum = 1 - Keras momentum to "
        f"match ({converted:.3g}) and the same number to differ ({unconverted:.3g})"
    )


def test_cross_bn_moving_variance_biased_vs_unbiased_ratio(record_property):
    # Keras momentum 0 and torch momentum 1 make the moving variance the batch variance.
    bn_tf, y_tf, bn_torch, y_torch = _one_bn_step(0.0, 1.0)
    ratio = _np(bn_torch.running_var) / _np(bn_tf.moving_variance)
    expected = BN_BATCH / (BN_BATCH - 1)
    forward = _max_abs(_np(y_tf), _np(y_torch))  # normalisation itself: biased on both sides
    record_property("measured", f"ratio {ratio.mean():.5f} (N/(N-1) = {expected:.5f})")
    assert np.allclose(ratio, expected, rtol=FORWARD_RTOL) and forward <= FORWARD_ATOL, (
        f"{_row('BN moving variance estimator')}: expected torch/Keras moving variance = "
        f"N/(N-1) = {expected:.5f}, got {ratio}; training-mode outputs differ by {forward:.3g}"
    )


# --- convolution padding, flatten order, layouts ---------------------------------------


def _strided_conv_pair(size: int):
    """Keras Conv2D(3x3, stride 2, 'same') and its torch weights on a size x size input."""
    rng = np.random.RandomState(size)
    x_tf = rng.randn(1, size, size, 2).astype(np.float32)
    conv_tf = keras.layers.Conv2D(3, 3, strides=2, padding="same", use_bias=False)
    y_tf = _np(conv_tf(x_tf)).transpose(0, 3, 1, 2)  # compare in NCHW
    return _nhwc_to_nchw(x_tf), _conv_kernel_to_torch(_np(conv_tf.kernel)), y_tf


@pytest.mark.parametrize("size", [8, 9], ids=["even", "odd"])
def test_cross_same_padding_stride2_equals_torch_pad_bottom_right(size, record_property):
    x_torch, weight, y_tf = _strided_conv_pair(size)
    total = max((math.ceil(size / 2) - 1) * 2 + 3 - size, 0)  # TF's rule: extra pad goes last
    before, after = total // 2, total - total // 2
    padded = nn.functional.pad(x_torch, (before, after, before, after))
    diff = _max_abs(_np(nn.functional.conv2d(padded, weight, stride=2)), y_tf)
    record_property("measured", f"pad top/left {before}, bottom/right {after}, diff {diff:.3g}")
    assert diff <= FORWARD_ATOL, (
        f"{_row('padding=same, stride 2')}: expected Keras 'same' = torch F.pad"
        f"(x, ({before}, {after}, {before}, {after})) + 'valid' conv, diff {diff:.3g}"
    )


def test_cross_same_padding_stride2_even_size_differs_from_torch_padding1(record_property):
    x_torch, weight, y_tf = _strided_conv_pair(8)
    diff = _max_abs(_np(nn.functional.conv2d(x_torch, weight, stride=2, padding=1)), y_tf)
    record_property("measured", diff)
    assert diff > TRAP_MIN_GAP, (
        f"{_row('padding=same, stride 2')}: expected Keras 'same' and torch padding=1 to "
        f"disagree on an 8x8 input, max abs diff {diff:.3g}"
    )


def test_cross_same_padding_stride2_odd_size_matches_torch_padding1(record_property):
    x_torch, weight, y_tf = _strided_conv_pair(9)
    diff = _max_abs(_np(nn.functional.conv2d(x_torch, weight, stride=2, padding=1)), y_tf)
    record_property("measured", diff)
    assert diff <= FORWARD_ATOL, (
        f"{_row('padding=same, stride 2')}: expected Keras 'same' and torch padding=1 to "
        f"agree on a 9x9 input, max abs diff {diff:.3g}"
    )


def test_cross_flatten_order_needs_dense_rows_permuted(record_property):
    h, w, c, units = 3, 3, 2, 5
    x_tf = np.random.RandomState(0).randn(4, h, w, c).astype(np.float32)
    dense_tf = keras.layers.Dense(units)
    y_tf = _np(dense_tf(keras.layers.Flatten()(x_tf)))  # rows ordered (h, w, c)
    kernel, bias = _np(dense_tf.kernel), _np(dense_tf.bias)
    linear = nn.Linear(h * w * c, units)
    x_torch = _nhwc_to_nchw(x_tf)  # torch flattens (c, h, w)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(kernel.T.copy()))  # naive: transpose only
        linear.bias.copy_(torch.from_numpy(bias))
        naive = _max_abs(_np(linear(x_torch.flatten(1))), y_tf)
        permuted = kernel.reshape(h, w, c, units).transpose(2, 0, 1, 3).reshape(-1, units)
        linear.weight.copy_(torch.from_numpy(permuted.T.copy()))
        fixed = _max_abs(_np(linear(x_torch.flatten(1))), y_tf)
    record_property("measured", f"naive {naive:.3g}, rows permuted {fixed:.3g}")
    assert naive > TRAP_MIN_GAP and fixed <= FORWARD_ATOL, (
        f"{_row('Flatten order')}: expected transposed Dense kernel to mismatch ({naive:.3g}) "
        f"and (h,w,c)->(c,h,w) row permutation to match ({fixed:.3g})"
    )


def test_cross_kernel_layouts_hwio_to_oihw_and_dense_transposed(record_property):
    x_tf = np.random.RandomState(0).randn(2, 6, 6, 3).astype(np.float32)
    conv_tf = keras.layers.Conv2D(4, 3, padding="valid", bias_initializer="random_normal")
    dense_tf = keras.layers.Dense(2, bias_initializer="random_normal")
    y_tf = _np(dense_tf(keras.layers.GlobalAveragePooling2D()(conv_tf(x_tf))))
    conv_torch, linear = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)
    shapes = {
        "conv": (tuple(conv_tf.kernel.shape), tuple(conv_torch.weight.shape)),
        "dense": (tuple(dense_tf.kernel.shape), tuple(linear.weight.shape)),
    }
    with torch.no_grad():
        conv_torch.weight.copy_(_conv_kernel_to_torch(_np(conv_tf.kernel)))
        conv_torch.bias.copy_(torch.from_numpy(_np(conv_tf.bias)))
        linear.weight.copy_(torch.from_numpy(_np(dense_tf.kernel).T.copy()))
        linear.bias.copy_(torch.from_numpy(_np(dense_tf.bias)))
        y_torch = linear(conv_torch(_nhwc_to_nchw(x_tf)).mean(dim=(2, 3)))
    diff = _max_abs(_np(y_torch), y_tf)
    record_property("measured", f"{shapes}, diff {diff:.3g}")
    assert shapes == {"conv": ((3, 3, 3, 4), (4, 3, 3, 3)), "dense": ((4, 2), (2, 4))}, (
        f"{_row('kernel layouts')}: expected conv HWIO vs OIHW and Dense (in,out) vs Linear "
        f"(out,in), got {shapes}"
    )
    assert diff <= FORWARD_ATOL, f"{_row('kernel layouts')}: converted forward diff {diff:.3g}"


def test_cross_default_initialisers_differ(record_property):
    fan_in = fan_out = 256
    keras.utils.set_random_seed(0)
    dense_tf = keras.layers.Dense(fan_out)
    dense_tf.build((None, fan_in))
    torch.manual_seed(0)
    linear = nn.Linear(fan_in, fan_out)
    kernel, bias_tf = _np(dense_tf.kernel), _np(dense_tf.bias)
    weight, bias_torch = _np(linear.weight), _np(linear.bias)
    glorot_bound = math.sqrt(6.0 / (fan_in + fan_out))
    kaiming_bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) and the bias rule
    stats = {
        "keras": (float(np.abs(kernel).max()), float(kernel.std()), float(np.abs(bias_tf).max())),
        "torch": (
            float(np.abs(weight).max()),
            float(weight.std()),
            float(np.abs(bias_torch).max()),
        ),
    }
    record_property(
        "measured",
        f"(max|w|, std w, max|b|) {stats}; bounds glorot "
        f"{glorot_bound:.4f} kaiming {kaiming_bound:.4f}",
    )
    near = 0.99  # with 65,536 draws the largest one sits within 1% of the bound
    assert (
        type(dense_tf.kernel_initializer).__name__ == "GlorotUniform"
        and near * glorot_bound < stats["keras"][0] <= glorot_bound
        and stats["keras"][2] == 0.0
        and near * kaiming_bound < stats["torch"][0] <= kaiming_bound
        and near * kaiming_bound < stats["torch"][2] <= kaiming_bound
    ), (
        f"{_row('default initialisers')}: expected Keras glorot_uniform bound "
        f"{glorot_bound:.4f} + zero bias, torch U(+-{kaiming_bound:.4f}) weight and bias; "
        f"got (max|w|, std, max|b|) {stats}"
    )


# --- ResNet50: keras.applications vs torchvision --------------------------------------


@pytest.fixture(scope="module")
def resnets():
    return keras.applications.ResNet50(weights=None), torchvision.models.resnet50(weights=None)


def test_cross_resnet50_keras_strides_on_1x1_torch_on_3x3(resnets, record_property):
    resnet_tf, resnet_torch = resnets
    found = {}
    for stage in (3, 4, 5):
        first_tf = [resnet_tf.get_layer(f"conv{stage}_block1_{i}_conv") for i in (1, 2)]
        first_torch = getattr(resnet_torch, f"layer{stage - 1}")[0]
        found[stage] = (
            [(layer.kernel_size, layer.strides) for layer in first_tf],
            [(conv.kernel_size, conv.stride) for conv in (first_torch.conv1, first_torch.conv2)],
        )
    record_property("measured", found[3])
    v1 = [((1, 1), (2, 2)), ((3, 3), (1, 1))]  # Keras: stride on the 1x1 conv (ResNet v1)
    v1_5 = [((1, 1), (1, 1)), ((3, 3), (2, 2))]  # torchvision: on the 3x3 conv (v1.5)
    assert all(found[s] == (v1, v1_5) for s in found), (
        f"{_row('ResNet50 variant')}: expected Keras v1 and torchvision v1.5 strides in the "
        f"first block of stages 3-5, got {found}"
    )


def test_cross_resnet50_conv_biases_and_parameter_counts_differ(resnets, record_property):
    resnet_tf, resnet_torch = resnets
    convs_tf = [layer for layer in resnet_tf.layers if isinstance(layer, keras.layers.Conv2D)]
    convs_torch = [m for m in resnet_torch.modules() if isinstance(m, nn.Conv2d)]
    conv_bias_tf = sum(int(np.prod(layer.bias.shape)) for layer in convs_tf if layer.use_bias)
    conv_bias_torch = sum(conv.bias is not None for conv in convs_torch)
    trainable_tf = sum(int(np.prod(v.shape)) for v in resnet_tf.trainable_weights)
    params_torch = sum(p.numel() for p in resnet_torch.parameters())
    counts = {
        "keras count_params": resnet_tf.count_params(),
        "keras trainable": trainable_tf,
        "torch parameters": params_torch,
        "keras conv bias values": conv_bias_tf,
    }
    record_property("measured", counts)
    assert (
        len(convs_tf) == len(convs_torch) == 53
        and conv_bias_torch == 0
        and conv_bias_tf > 0
        and trainable_tf - params_torch == conv_bias_tf  # the conv biases are the whole gap
        and resnet_tf.count_params() > trainable_tf
    ), f"{_row('ResNet50 parameters')}: expected Keras-only conv biases, got {counts}"


def test_cross_resnet50_bn_epsilon_differs(resnets, record_property):
    resnet_tf, resnet_torch = resnets
    eps_tf = {
        layer.epsilon
        for layer in resnet_tf.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    eps_torch = {m.eps for m in resnet_torch.modules() if isinstance(m, nn.BatchNorm2d)}
    record_property("measured", f"keras {eps_tf} torch {eps_torch}")
    assert eps_tf == {1.001e-5} and eps_torch == {1e-5}, (
        f"{_row('ResNet50 BN epsilon')}: expected Keras 1.001e-5 and torch 1e-5, "
        f"got {eps_tf} and {eps_torch}"
    )


# A channel whose running variance is 0 (a dead ReLU channel) divides by sqrt(eps): there an
# epsilon of 1.001e-5 against 1e-5 moves each output by 0.158 x its input's distance from the
# mean. Inputs this far from the mean make that 3.2e-5: small, but 3x FORWARD_ATOL.
DEAD_CHANNEL_SPREAD = 2e-4


def _dead_channel_bn_keras(x: np.ndarray, eps: float) -> np.ndarray:
    layer = keras.layers.BatchNormalization(epsilon=eps)
    layer.build((None, BN_FEATURES))
    layer.moving_variance.assign(np.zeros(BN_FEATURES, np.float32))
    return _np(layer(x, training=False))


def test_cross_resnet50_bn_epsilon_visible_on_a_dead_channel(record_property):
    """Keras ResNet50's epsilon (1.001e-5) against torch's 1e-5, inference mode, running
    variance 0, running mean 0: the outputs differ by spread x (1/sqrt(1e-5) - 1/sqrt(1.001e-5))
    (written out here), which the forward tolerance must see; the copied epsilon agrees."""
    x = (np.linspace(-1.0, 1.0, BN_BATCH)[:, None] * np.ones(BN_FEATURES)
         * DEAD_CHANNEL_SPREAD).astype(np.float32)
    bn_torch = nn.BatchNorm1d(BN_FEATURES, eps=1e-5).eval()
    bn_torch.running_var.zero_()
    y_torch = _np(bn_torch(torch.from_numpy(x)))
    y_keras_default = _dead_channel_bn_keras(x, 1.001e-5)
    y_keras_copied = _dead_channel_bn_keras(x, 1e-5)
    expected = DEAD_CHANNEL_SPREAD * (1 / math.sqrt(1e-5) - 1 / math.sqrt(1.001e-5))
    gap = _max_abs(y_keras_default, y_torch)
    record_property("measured", f"epsilon 1.001e-5 vs 1e-5: {gap:.3g} (by hand {expected:.3g}); "
                                f"copied: {_max_abs(y_keras_copied, y_torch):.3g}")
    assert abs(gap - expected) <= SAME_FRAMEWORK_ATOL, (gap, expected)
    assert not np.allclose(y_keras_default, y_torch, atol=FORWARD_ATOL, rtol=FORWARD_RTOL), (
        f"{_row('ResNet50 BN epsilon')}: a {gap:.3g} difference passed FORWARD_ATOL")
    assert np.allclose(y_keras_copied, y_torch, atol=FORWARD_ATOL, rtol=FORWARD_RTOL), (
        f"{_row('ResNet50 BN epsilon')}: copied epsilon still differs")


# --- optimizers: the same gradients fed to both sides -----------------------------------

STEPS = 5
GRADIENT_SCALE = 1e-4  # small gradients, where epsilon placement shows


def _gradient_sequence():
    rng = np.random.RandomState(0)
    w0 = rng.randn(16).astype(np.float32)
    grads = [(rng.randn(16) * GRADIENT_SCALE).astype(np.float32) for _ in range(STEPS)]
    return w0, grads


def _run_keras(optimizer: keras.optimizers.Optimizer) -> np.ndarray:
    w0, grads = _gradient_sequence()
    variable = keras.Variable(w0)
    for g in grads:
        optimizer.apply_gradients([(tf.constant(g), variable)])
    return _np(variable)


def _run_torch(optimizer_class, **kwargs) -> np.ndarray:
    w0, grads = _gradient_sequence()
    param = nn.Parameter(torch.from_numpy(w0.copy()))
    optimizer = optimizer_class([param], **kwargs)
    for g in grads:
        param.grad = torch.from_numpy(g)
        optimizer.step()
    return _np(param)


ADAM_LR = 0.01


def test_cross_adam_default_epsilon_differs_after_steps(record_property):
    keras_eps = keras.optimizers.Adam().epsilon
    torch_eps = torch.optim.Adam([nn.Parameter(torch.zeros(1))]).defaults["eps"]
    diff = _max_abs(
        _run_keras(keras.optimizers.Adam(ADAM_LR)), _run_torch(torch.optim.Adam, lr=ADAM_LR)
    )
    record_property("measured", f"defaults {keras_eps} vs {torch_eps}; diff {diff:.3g}")
    assert (keras_eps, torch_eps) == (1e-7, 1e-8) and diff > TRAP_MIN_GAP, (
        f"{_row('Adam epsilon')}: expected defaults 1e-7 vs 1e-8 (got {keras_eps}, "
        f"{torch_eps}) to differ after {STEPS} steps, max abs param diff {diff:.3g}"
    )


def _numpy_adam(eps: float, eps_before_bias_correction: bool) -> np.ndarray:
    """Reference Adam in float64 (beta1 0.9, beta2 0.999), epsilon placed one way or the other."""
    w0, grads = _gradient_sequence()
    w, m, v = w0.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g.astype(np.float64) ** 2
        correction1, correction2 = 1 - 0.9**t, 1 - 0.999**t
        if eps_before_bias_correction:  # Keras: lr * sqrt(c2) / c1 * m / (sqrt(v) + eps)
            w = w - ADAM_LR * np.sqrt(correction2) / correction1 * m / (np.sqrt(v) + eps)
        else:  # torch: lr / c1 * m / (sqrt(v) / sqrt(c2) + eps)
            w = w - ADAM_LR / correction1 * m / (np.sqrt(v) / np.sqrt(correction2) + eps)
    return w


def test_cross_adam_epsilon_placement_matches_reference(record_property):
    gaps = {
        "keras vs eps-before reference": _max_abs(
            _run_keras(keras.optimizers.Adam(ADAM_LR)), _numpy_adam(1e-7, True)
        ),
        "torch vs eps-after reference": _max_abs(
            _run_torch(torch.optim.Adam, lr=ADAM_LR), _numpy_adam(1e-8, False)
        ),
        "keras vs eps-after reference": _max_abs(
            _run_keras(keras.optimizers.Adam(ADAM_LR)), _numpy_adam(1e-7, False)
        ),
    }
    record_property("measured", gaps)
    assert (
        gaps["keras vs eps-before reference"] <= OPTIMIZER_STEP_ATOL
        and gaps["torch vs eps-after reference"] <= OPTIMIZER_STEP_ATOL
        and gaps["keras vs eps-after reference"] > TRAP_MIN_GAP
    ), f"{_row('Adam epsilon')}: expected Keras eps before, torch after bias correction: {gaps}"


def test_cross_adam_tiny_epsilon_agrees(record_property):
    diff = _max_abs(
        _run_keras(keras.optimizers.Adam(ADAM_LR, epsilon=1e-12)),
        _run_torch(torch.optim.Adam, lr=ADAM_LR, eps=1e-12),
    )
    record_property("measured", diff)
    assert diff <= OPTIMIZER_STEP_ATOL, (
        f"{_row('Adam epsilon')}: expected eps=1e-12 on both sides to agree, diff {diff:.3g}"
    )


def test_cross_keras_adam_weight_decay_is_decoupled_like_adamw(record_property):
    decay = 0.1
    adam_wd_tf = _run_keras(keras.optimizers.Adam(ADAM_LR, epsilon=1e-12, weight_decay=decay))
    adamw_tf = _run_keras(keras.optimizers.AdamW(ADAM_LR, epsilon=1e-12, weight_decay=decay))
    adamw_torch = _run_torch(torch.optim.AdamW, lr=ADAM_LR, eps=1e-12, weight_decay=decay)
    adam_l2_torch = _run_torch(torch.optim.Adam, lr=ADAM_LR, eps=1e-12, weight_decay=decay)
    gaps = {
        "keras Adam(wd) vs keras AdamW": _max_abs(adam_wd_tf, adamw_tf),
        "keras AdamW vs torch AdamW": _max_abs(adamw_tf, adamw_torch),
        "keras Adam(wd) vs torch Adam(wd)": _max_abs(adam_wd_tf, adam_l2_torch),
    }
    record_property("measured", gaps)
    assert (
        gaps["keras Adam(wd) vs keras AdamW"] <= SAME_FRAMEWORK_ATOL
        and gaps["keras AdamW vs torch AdamW"] <= OPTIMIZER_STEP_ATOL
        and gaps["keras Adam(wd) vs torch Adam(wd)"] > TRAP_MIN_GAP
    ), f"{_row('weight_decay=')}: expected decoupled decay in Keras, L2 in torch Adam: {gaps}"


SGD_LR = 0.1


@pytest.mark.parametrize(
    "momentum, nesterov",
    [(0.0, False), (0.9, False), (0.9, True)],
    ids=["plain", "momentum", "nesterov"],
)
def test_cross_sgd_agrees(momentum, nesterov, record_property):
    diff = _max_abs(
        _run_keras(keras.optimizers.SGD(SGD_LR, momentum=momentum, nesterov=nesterov)),
        _run_torch(torch.optim.SGD, lr=SGD_LR, momentum=momentum, nesterov=nesterov),
    )
    record_property("measured", diff)
    assert diff <= OPTIMIZER_STEP_ATOL, (
        f"{_row('SGD')}: expected identical updates (momentum {momentum}, nesterov "
        f"{nesterov}), diff {diff:.3g}"
    )


def test_cross_sgd_weight_decay_without_momentum_agrees(record_property):
    diff = _max_abs(
        _run_keras(keras.optimizers.SGD(SGD_LR, weight_decay=0.1)),
        _run_torch(torch.optim.SGD, lr=SGD_LR, weight_decay=0.1),
    )
    record_property("measured", diff)
    assert diff <= OPTIMIZER_STEP_ATOL, (
        f"{_row('SGD weight_decay=')}: expected decoupled and L2 decay to coincide without "
        f"momentum, diff {diff:.3g}"
    )


def test_cross_sgd_momentum_weight_decay_differs(record_property):
    diff = _max_abs(
        _run_keras(keras.optimizers.SGD(SGD_LR, momentum=0.9, weight_decay=0.1)),
        _run_torch(torch.optim.SGD, lr=SGD_LR, momentum=0.9, weight_decay=0.1),
    )
    record_property("measured", diff)
    assert diff > TRAP_MIN_GAP, (
        f"{_row('SGD weight_decay=')}: expected Keras decoupled decay and torch L2 decay "
        f"through the momentum buffer to differ, diff {diff:.3g}"
    )


# --- losses --------------------------------------------------------------------------

CLASSES = 5


def _logits_and_labels():
    rng = np.random.RandomState(0)
    logits = (rng.randn(8, CLASSES) * 3).astype(np.float32)
    labels = rng.randint(0, CLASSES, size=8)
    return logits, labels


def test_cross_sparse_cce_from_logits_equals_cross_entropy(record_property):
    logits, labels = _logits_and_labels()
    loss_tf = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits))
    loss_torch = float(nn.CrossEntropyLoss()(torch.from_numpy(logits), torch.from_numpy(labels)))
    diff = abs(loss_tf - loss_torch)
    record_property("measured", f"keras {loss_tf:.7g} torch {loss_torch:.7g} diff {diff:.3g}")
    assert diff <= FORWARD_ATOL, (
        f"{_row('cross-entropy from logits')}: expected equal losses, keras {loss_tf:.7g} "
        f"torch {loss_torch:.7g}"
    )


def test_cross_class_weighted_loss_normalisation_differs(record_property):
    logits, labels = _logits_and_labels()
    class_weight = np.array([1.0, 2.0, 0.5, 3.0, 1.5], np.float32)
    per_sample = class_weight[labels]
    loss_tf = float(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
            labels, logits, sample_weight=per_sample
        )
    )
    loss_torch = float(
        nn.CrossEntropyLoss(weight=torch.from_numpy(class_weight))(
            torch.from_numpy(logits), torch.from_numpy(labels)
        )
    )
    rescaled = loss_tf * len(labels) / per_sample.sum()  # Keras divides by N, torch by sum(w)
    unnormalised_torch = nn.CrossEntropyLoss(reduction="none")(
        torch.from_numpy(logits), torch.from_numpy(labels)
    )
    keras_way_torch = float((unnormalised_torch * torch.from_numpy(per_sample)).mean())
    record_property(
        "measured",
        f"keras {loss_tf:.6g} torch {loss_torch:.6g} "
        f"(sum w / N = {per_sample.sum() / len(labels):.4g})",
    )
    assert (
        abs(loss_tf - loss_torch) > TRAP_MIN_GAP
        and math.isclose(rescaled, loss_torch, rel_tol=FORWARD_RTOL)
        and math.isclose(keras_way_torch, loss_tf, rel_tol=FORWARD_RTOL)
    ), (
        f"{_row('weighted loss normalisation')}: expected Keras sum(w*l)/N = {loss_tf:.6g} vs "
        f"torch sum(w*l)/sum(w) = {loss_torch:.6g}; rescaled Keras {rescaled:.6g}, torch "
        f"reduction='none' then (w*l).mean() {keras_way_torch:.6g}"
    )


def test_cross_label_smoothing_categorical_equals_torch(record_property):
    logits, labels = _logits_and_labels()
    one_hot = np.eye(CLASSES, dtype=np.float32)[labels]
    loss_tf = float(
        keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)(one_hot, logits)
    )
    loss_torch = float(
        nn.CrossEntropyLoss(label_smoothing=0.1)(torch.from_numpy(logits), torch.from_numpy(labels))
    )
    diff = abs(loss_tf - loss_torch)
    record_property("measured", f"keras {loss_tf:.7g} torch {loss_torch:.7g} diff {diff:.3g}")
    assert diff <= FORWARD_ATOL, (
        f"{_row('label smoothing')}: expected Keras CategoricalCrossentropy(label_smoothing=0.1) "
        f"== torch CrossEntropyLoss(label_smoothing=0.1); {loss_tf:.7g} vs {loss_torch:.7g}"
    )


# --- counting parameters ----------------------------------------------------------------


def test_cross_parameter_count_keras_includes_bn_stats_torch_excludes_buffers(record_property):
    features = 8
    bn_tf = keras.layers.BatchNormalization()
    bn_tf.build((None, features))
    bn_torch = nn.BatchNorm1d(features)
    counts = {
        "keras count_params": bn_tf.count_params(),
        "keras non-trainable": sum(int(np.prod(v.shape)) for v in bn_tf.non_trainable_weights),
        "torch parameters": sum(p.numel() for p in bn_torch.parameters()),
        "torch state_dict keys": sorted(bn_torch.state_dict()),
    }
    record_property("measured", counts)
    assert (
        counts["keras count_params"] == 4 * features
        and counts["keras non-trainable"] == 2 * features
        and counts["torch parameters"] == 2 * features
        and "num_batches_tracked" in counts["torch state_dict keys"]
    ), f"{_row('parameter counts')}: got {counts}"
