"""ViT: timm's VisionTransformer (torch) and the Keras rebuild compute one function.

Both are built by ``build_model("vit", ...)``; weights travel only through the
canonical form (timm's keys and layouts; the fused ``attn.qkv`` split into
Keras's MultiHeadAttention query/key/value in tf_impl/weights.py). The trap
tests pin what freezing does *not* do to a ViT: neither ``requires_grad_(False)``
nor ``trainable = False`` switches dropout or drop-path off.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from shared.archs import ViTConfig
from shared.init import canonical_init
from shared.record import RunConfig
from shared.tolerances import (
    FLOAT64_RUN_ATOL,
    FORWARD_ATOL,
    FORWARD_RTOL,
    GELU_APPROXIMATION_MIN_GAP,
    TRAP_MIN_GAP,
)
from tf_impl import model as tf_model
from tf_impl import vit as tf_vit
from tf_impl import weights as tf_weights
from torch_impl import model as torch_model
from torch_impl import weights as torch_weights

NUM_CLASSES = 5
BATCH = 3
CONFIG = ViTConfig()


@pytest.fixture(scope="module")
def torch_net():
    return torch_model.build_model("vit", NUM_CLASSES)


@pytest.fixture(scope="module")
def tf_net():
    return tf_model.build_model("vit", NUM_CLASSES)


@pytest.fixture(scope="module")
def weights(torch_net):
    """Canonical weights from seed 0, biases and LayerNorm gammas moved off 0 and 1 so a
    swapped or misplaced vector shows."""
    tensors = canonical_init(torch_weights.canonical_shapes(torch_net), seed=0)
    rng = np.random.default_rng(1)
    for key, value in tensors.items():
        if key.endswith(".bias") or (key.endswith(".weight") and value.ndim == 1):
            tensors[key] = (value + rng.normal(0.0, 0.1, value.shape)).astype(np.float32)
    return tensors


def _images_nchw(n: int, seed: int, dtype=np.float32) -> np.ndarray:
    size = CONFIG.image_size
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(dtype)


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def _torch_features(net, x_nchw: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net.base(torch.from_numpy(x_nchw)).numpy()


def _keras_base(config: ViTConfig, tensors: dict[str, np.ndarray]):
    """A bare Keras base of ``config`` holding ``tensors``' base part (keys without ``base.``)."""
    base = tf_vit.vit_base(config)
    base(np.zeros((1, config.image_size, config.image_size, 3), np.float32))
    tf_weights.import_weights(base, {k.removeprefix("base."): v for k, v in tensors.items()
                                     if k.startswith("base.")})
    return base


def _gap(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# --------------------------------------------------------------------------- #
# structure and weights
# --------------------------------------------------------------------------- #
def test_torch_vit_base_is_timm_vision_transformer(torch_net):
    base = torch_net.base
    assert isinstance(base, VisionTransformer)
    assert isinstance(base.head, torch.nn.Identity) and base.global_pool == "token"
    assert {m.eps for m in base.modules() if isinstance(m, torch.nn.LayerNorm)} == {
        CONFIG.layer_norm_epsilon}
    rates = [block.drop_path1.drop_prob if hasattr(block.drop_path1, "drop_prob") else 0.0
             for block in base.blocks]
    assert np.allclose(rates, CONFIG.drop_path_rates), rates  # float32 linspace in timm


def test_vit_canonical_keys_are_timm_keys(torch_net, tf_net):
    reference = torch_model.build_model("vit", NUM_CLASSES).base
    want = {f"base.{k}": tuple(v.shape) for k, v in reference.state_dict().items()}
    want.update({"head.fc.weight": (NUM_CLASSES, CONFIG.width), "head.fc.bias": (NUM_CLASSES,)})
    got_torch = torch_weights.canonical_shapes(torch_net)
    got_tf = tf_weights.canonical_shapes(tf_net)
    assert got_torch == want
    assert got_tf == want, (f"Keras-only keys {sorted(set(got_tf) - set(want))[:5]}, "
                            f"missing {sorted(set(want) - set(got_tf))[:5]}, shapes differ at "
                            f"{[k for k in want if got_tf.get(k, want[k]) != want[k]][:5]}")
    assert got_tf["base.blocks.0.attn.qkv.weight"] == (3 * CONFIG.width, CONFIG.width)


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_vit_weights_roundtrip_exact(framework, torch_net, tf_net, weights):
    module = torch_weights if framework == "torch" else tf_weights
    net = torch_net if framework == "torch" else tf_net
    module.import_weights(net, weights)
    back = module.export_weights(net)
    assert back.keys() == weights.keys()
    changed = [k for k in weights if not np.array_equal(back[k], weights[k])]
    assert not changed, f"{framework}: round trip changed {changed[:5]}"


def test_cross_vit_weights_transfer_exact_both_ways(torch_net, tf_net, weights):
    torch_weights.import_weights(torch_net, weights)
    tf_weights.import_weights(tf_net, torch_weights.export_weights(torch_net))
    via_tf = tf_weights.export_weights(tf_net)
    assert [k for k in weights if not np.array_equal(via_tf[k], weights[k])] == []
    torch_weights.import_weights(torch_net, via_tf)
    via_torch = torch_weights.export_weights(torch_net)
    assert [k for k in weights if not np.array_equal(via_torch[k], weights[k])] == []


def test_cross_vit_qkv_split_is_timm_head_order(tf_net, weights):
    """Row h * head_dim + j of timm's q block is Keras query kernel [:, h, j] (not [:, j, h])."""
    tf_weights.import_weights(tf_net, weights)
    attn = tf_net.base.blocks.blocks[0].attn
    qkv = weights["base.blocks.0.attn.qkv.weight"]
    w, d = CONFIG.width, CONFIG.head_dim
    for part, dense in enumerate((attn.query_dense, attn.key_dense, attn.value_dense)):
        kernel = np.asarray(dense.kernel)
        assert np.array_equal(kernel[:, 1, 2], qkv[part * w + 1 * d + 2])


# --------------------------------------------------------------------------- #
# numerics
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_vit_forward_agrees(dtype, weights, record_property):
    torch_net = torch_model.build_model("vit", NUM_CLASSES, dtype=dtype)
    tf_net = tf_model.build_model("vit", NUM_CLASSES, dtype=dtype)
    torch_weights.import_weights(torch_net, weights)
    tf_weights.import_weights(tf_net, weights)
    x_torch = _images_nchw(BATCH, seed=2, dtype=dtype)
    torch_net.eval()
    with torch.no_grad():
        features_torch = torch_net.base(torch.from_numpy(x_torch))
        logits_torch = torch_net.head(features_torch).numpy()
        features_torch = features_torch.numpy()
    features_tf = tf_net.base(_nhwc(x_torch), training=False)
    logits_tf = np.asarray(tf_net.head(features_tf, training=False))
    atol, rtol = (FORWARD_ATOL, FORWARD_RTOL) if dtype == "float32" else (FLOAT64_RUN_ATOL, 0.0)
    for path, got, want in (("base", np.asarray(features_tf), features_torch),
                            ("logits", logits_tf, logits_torch)):
        diff = _gap(got, want)
        record_property(f"max_abs_diff_{path}_{dtype}", diff)
        bound = atol + rtol * np.abs(want)
        assert (np.abs(got - want) <= bound).all(), (
            f"vit {dtype} {path}: max |tf - torch| {diff:.3g} beyond atol {atol} rtol {rtol}")


def test_vit_keras_layer_norm_default_epsilon_changes_output(tf_net, weights):
    import keras

    default = keras.layers.LayerNormalization().epsilon
    assert default == 1e-3  # Keras's default: 1000x timm's 1e-6
    x = _nhwc(_images_nchw(BATCH, seed=3))
    exact = _keras_base(CONFIG, weights)(x, training=False)
    keras_default = _keras_base(dataclasses.replace(CONFIG, layer_norm_epsilon=default), weights)
    gap = _gap(keras_default(x, training=False), exact)
    assert gap > TRAP_MIN_GAP, f"LayerNorm epsilon 1e-3 vs 1e-6 moved the features by only {gap:.3g}"


def test_vit_keras_tanh_gelu_changes_output(weights):
    x = _nhwc(_images_nchw(BATCH, seed=3))
    exact = _keras_base(CONFIG, weights)(x, training=False)
    tanh = _keras_base(dataclasses.replace(CONFIG, gelu_approximate=True), weights)
    gap = _gap(tanh(x, training=False), exact)
    assert gap > GELU_APPROXIMATION_MIN_GAP, f"tanh vs exact GELU moved the features by only {gap:.3g}"


def test_keras_exact_gelu_float64_uses_float32_constant():
    """Trap: ``ops.gelu(x, approximate=False)`` in float64 on TensorFlow is 5e-9 from the exact
    GELU (its 1/sqrt(2) goes through a float32 tensor); tf_impl.vit.gelu is exact."""
    import keras

    x = np.linspace(-6.0, 6.0, 20001)
    want = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    stock = _gap(keras.ops.gelu(keras.ops.convert_to_tensor(x), approximate=False), want)
    ours = _gap(tf_vit.gelu(keras.ops.convert_to_tensor(x)), want)
    assert stock > FLOAT64_RUN_ATOL, f"TensorFlow's float64 exact gelu is now exact ({stock:.3g})"
    assert ours <= FLOAT64_RUN_ATOL, f"tf_impl.vit.gelu float64 off by {ours:.3g}"


# --------------------------------------------------------------------------- #
# freezing traps: dropout and drop-path
# --------------------------------------------------------------------------- #
def test_torch_vit_requires_grad_false_then_train_keeps_dropout_active(weights):
    net = torch_model.build_model("vit", NUM_CLASSES)
    torch_weights.import_weights(net, weights)
    net.base.requires_grad_(False)
    x = _images_nchw(BATCH, seed=4)
    eval_out = _torch_features(net.eval(), x)
    net.train()
    torch.manual_seed(0)
    first, second = _torch_features(net, x), _torch_features(net, x)
    assert _gap(first, second) > TRAP_MIN_GAP, "frozen base in train(): two passes agreed"
    assert _gap(first, eval_out) > TRAP_MIN_GAP, "frozen base in train(): equals eval output"
    net.base.eval()  # what switches dropout and drop-path off
    assert _gap(_torch_features(net, x), eval_out) == 0.0
    assert _gap(_torch_features(net, x), eval_out) == 0.0
    net.train()  # ... until the next model.train(), unless pinned
    assert _gap(_torch_features(net, x), eval_out) > TRAP_MIN_GAP
    net.pin_inference(["base"])
    net.train()
    assert _gap(_torch_features(net, x), eval_out) == 0.0


def test_keras_vit_trainable_false_keeps_dropout_active(tf_net, weights):
    tf_weights.import_weights(tf_net, weights)
    x = _nhwc(_images_nchw(BATCH, seed=4))
    tf_net.base.trainable = False
    try:
        eval_out = tf_net.base(x, training=False)
        first, second = tf_net.base(x, training=True), tf_net.base(x, training=True)
    finally:
        tf_net.base.trainable = True
    assert _gap(first, eval_out) > TRAP_MIN_GAP, "trainable=False base: training=True equals inference"
    assert _gap(first, second) > TRAP_MIN_GAP, "trainable=False base: two training passes agreed"


def test_keras_drop_path_drops_whole_samples_only_in_training():
    layer = tf_vit.DropPath(0.5, seed=0)
    layer.trainable = False  # no effect, as for Dropout
    x = np.ones((64, 4, 3), np.float32)
    y = np.asarray(layer(x, training=True))
    per_sample = y.reshape(64, -1)
    assert (per_sample == per_sample[:, :1]).all(), "DropPath mask differs inside one sample"
    assert set(np.unique(per_sample)) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / 0.5
    assert np.array_equal(np.asarray(layer(x, training=False)), x)


# --------------------------------------------------------------------------- #
# what vit does not do (yet)
# --------------------------------------------------------------------------- #
def test_vit_bn_adapt_refused_one_line():
    with pytest.raises(ValueError, match=r"strategy 'bn_adapt' does not run on arch 'vit': it "
                                         r"adapts BatchNorm and vit has none"):
        RunConfig(arch="vit", strategy="bn_adapt")


def test_lora_refused_on_batchnorm_arch_one_line():
    with pytest.raises(ValueError, match=r"strategy 'lora' does not run on arch 'tinyconv'"):
        RunConfig(arch="tinyconv", strategy="lora")


def test_vit_not_in_bench_one_line_error():
    from shared.archs import require_pipeline_arch

    with pytest.raises(ValueError, match=r"bench: arch 'vit' is not in this part of the "
                                         r"fine-tuning pipeline yet"):
        require_pipeline_arch("vit", "bench")


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_vit_build_model_rejects_norm_layer(framework):
    module = torch_model if framework == "torch" else tf_model
    with pytest.raises(ValueError, match="arch 'vit' has no BatchNorm"):
        module.build_model("vit", NUM_CLASSES, norm_layer=lambda n, name="bn": None)


# --------------------------------------------------------------------------- #
# training states: the fused qkv's optimizer slots split as its weights are
# --------------------------------------------------------------------------- #
LR, MOMENTUM = 0.01, 0.9


def _keras_optimizer(kind: str):
    import keras

    return (keras.optimizers.SGD(LR, momentum=MOMENTUM) if kind == "sgd"
            else keras.optimizers.Adam(LR, beta_1=0.875, beta_2=1 - 2 ** -10, epsilon=1e-16))


def _torch_stepped(kind: str, weights, steps: int = 2):
    """A torch ViT and its optimizer after ``steps`` steps on random batches (dropout on)."""
    net = torch_model.build_model("vit", NUM_CLASSES)
    torch_weights.import_weights(net, weights)
    optimizer = (torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM) if kind == "sgd"
                 else torch.optim.Adam(net.parameters(), lr=LR, betas=(0.875, 1 - 2 ** -10),
                                       eps=1e-16))
    net.train()
    torch.manual_seed(0)
    for step in range(steps):
        x = torch.from_numpy(_images_nchw(BATCH, seed=10 + step))
        y = torch.arange(BATCH) % NUM_CLASSES
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net, optimizer


def _keras_stepped(kind: str, weights, steps: int = 2):
    """A Keras ViT and its optimizer after ``steps`` updates from random gradients."""

    net = tf_model.build_model("vit", NUM_CLASSES)
    tf_weights.import_weights(net, weights)
    optimizer = _keras_optimizer(kind)
    optimizer.build(net.trainable_variables)
    rng = np.random.default_rng(7)
    for _ in range(steps):
        grads = [rng.normal(0.0, 0.1, v.shape).astype(np.float32) for v in net.trainable_variables]
        optimizer.apply_gradients(zip(grads, net.trainable_variables))
    return net, optimizer


def _raw(net, optimizer) -> list[np.ndarray]:
    """Every Keras weight and optimizer variable, in Keras's own order (not the project's)."""
    import keras

    return [np.array(keras.ops.convert_to_numpy(v))
            for v in list(net.weights) + list(optimizer.variables)]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_keras_vit_training_state_roundtrip_every_variable_bit_identical(kind, weights):
    net, optimizer = _keras_stepped(kind, weights)
    state = tf_weights.export_training_state(net, optimizer)
    fresh = tf_model.build_model("vit", NUM_CLASSES)
    fresh_optimizer = _keras_optimizer(kind)
    tf_weights.import_training_state(fresh, fresh_optimizer, state)
    want, got = _raw(net, optimizer), _raw(fresh, fresh_optimizer)
    assert len(want) == len(got)
    names = [v.path for v in list(net.weights) + list(optimizer.variables)]
    changed = [n for n, a, b in zip(names, want, got) if not np.array_equal(a, b)]
    assert not changed, f"{kind}: round trip changed {changed[:5]}"
    again = tf_weights.export_training_state(fresh, fresh_optimizer)
    for name in state.slots:
        assert all(np.array_equal(again.slots[name][k], v) for k, v in state.slots[name].items())
    qkv = "base.blocks.0.attn.qkv.weight"
    assert state.slots[next(iter(state.slots))][qkv].shape == (3 * CONFIG.width, CONFIG.width)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_cross_vit_torch_training_state_keys_match_both_sides(kind, weights):
    net, optimizer = _torch_stepped(kind, weights, steps=1)
    state = torch_weights.export_training_state(net, optimizer)
    tf_net = tf_model.build_model("vit", NUM_CLASSES)
    tf_optimizer = _keras_optimizer(kind)
    tf_weights.import_training_state(tf_net, tf_optimizer, state)
    back = tf_weights.export_training_state(tf_net, tf_optimizer)
    assert sorted(back.tensors) == sorted(state.tensors) == sorted(torch_weights.canonical_shapes(net))
    assert back.parameters == state.parameters  # every tensor trains, in the same order
    assert "base.cls_token" in state.parameters and "base.pos_embed" in state.parameters
    assert {n: sorted(v) for n, v in back.slots.items()} == {n: sorted(v) for n, v in state.slots.items()}
    assert back.step == state.step


def test_cross_vit_adam_state_through_keras_bit_identical(weights):
    """torch -> Keras -> canonical: every tensor and Adam moment back bit for bit (the qkv
    moments split into query/key/value and fused again)."""
    net, optimizer = _torch_stepped("adam", weights)
    state = torch_weights.export_training_state(net, optimizer)
    tf_net = tf_model.build_model("vit", NUM_CLASSES)
    tf_optimizer = _keras_optimizer("adam")
    tf_weights.import_training_state(tf_net, tf_optimizer, state)
    back = tf_weights.export_training_state(tf_net, tf_optimizer)
    assert [k for k in state.tensors if not np.array_equal(back.tensors[k], state.tensors[k])] == []
    for name, values in state.slots.items():
        changed = [k for k in values if not np.array_equal(back.slots[name][k], values[k])]
        assert not changed, f"slot {name}: changed {changed[:5]}"
    assert back.step == state.step == 2


def _keras_parts_by_hand(canonical: np.ndarray) -> list[np.ndarray]:
    """timm's fused (3 * width, width) qkv rows as Keras's query/key/value kernels (width,
    heads, head_dim), element by element: kernel[i, h, j] = qkv[part * width + h * head_dim
    + j, i] (written here, not through tf_impl/weights.py)."""
    w, heads, d = CONFIG.width, CONFIG.heads, CONFIG.head_dim
    out = []
    for part in range(3):
        kernel = np.empty((w, heads, d), canonical.dtype)
        for h in range(heads):
            for j in range(d):
                kernel[:, h, j] = canonical[part * w + h * d + j, :]
        out.append(kernel)
    return out


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_cross_vit_qkv_slots_are_query_key_value_slots(kind, weights):
    """The Keras slot of each of query/key/value is torch's fused qkv slot split by hand;
    SGD's velocity is -lr x torch's momentum buffer (shared/training_state.py)."""
    net, optimizer = _torch_stepped(kind, weights)
    state = torch_weights.export_training_state(net, optimizer, np.float32)
    tf_net = tf_model.build_model("vit", NUM_CLASSES)
    tf_optimizer = _keras_optimizer(kind)
    tf_weights.import_training_state(tf_net, tf_optimizer, state)
    attn = tf_net.base.blocks.blocks[1].attn
    parts = (attn.query_dense, attn.key_dense, attn.value_dense)
    lr = float(np.asarray(tf_optimizer.learning_rate))
    if kind == "sgd":
        lists = {"momentum_buffer": (tf_optimizer.momentums, -lr)}
    else:
        lists = {"exp_avg": (tf_optimizer._momentums, 1.0),
                 "exp_avg_sq": (tf_optimizer._velocities, 1.0)}
    for name, (slots, scale) in lists.items():
        fused = state.slots[name]["base.blocks.1.attn.qkv.weight"].astype(np.float64) * scale
        for dense, want in zip(parts, _keras_parts_by_hand(fused)):
            got = np.asarray(slots[tf_optimizer._get_variable_index(dense.kernel)])
            assert np.array_equal(got, want.astype(np.float32)), f"{name} {dense.name}"


@pytest.mark.parametrize("built", [False, True])
def test_keras_vit_training_state_refuses_part_of_qkv_trainable_one_line(built):
    net = tf_model.build_model("vit", NUM_CLASSES)
    net.base.blocks.blocks[0].attn.key_dense.trainable = False
    optimizer = _keras_optimizer("sgd")
    if built:
        optimizer.build(net.trainable_variables)
    with pytest.raises(ValueError, match=r"^training state: key 'base\.blocks\.0\.attn\.qkv"
                                         r"\.weight' joins 3 Keras variables .* updates 2"):
        tf_weights.export_training_state(net, optimizer)


# --------------------------------------------------------------------------- #
# the verdict config: dropout, attention dropout and drop-path off
# --------------------------------------------------------------------------- #
def test_cross_vit_verdict_config_training_mode_deterministic_and_agrees(weights):
    from shared.archs import verdict_config

    config = verdict_config("vit")
    assert (config.dropout, config.attention_dropout, config.drop_path) == (0.0, 0.0, 0.0)
    assert dataclasses.replace(config, dropout=CONFIG.dropout, drop_path=CONFIG.drop_path,
                               attention_dropout=CONFIG.attention_dropout) == CONFIG
    torch_net = torch_model.build_model("vit", NUM_CLASSES, config=config)
    tf_net = tf_model.build_model("vit", NUM_CLASSES, config=config)
    torch_weights.import_weights(torch_net, weights)
    tf_weights.import_weights(tf_net, weights)
    x = _images_nchw(BATCH, seed=5)
    torch_net.train()
    first, second = _torch_features(torch_net, x), _torch_features(torch_net, x)
    assert _gap(first, second) == 0.0
    keras_train = np.asarray(tf_net.base(_nhwc(x), training=True))
    assert _gap(keras_train, np.asarray(tf_net.base(_nhwc(x), training=False))) == 0.0
    bound = FORWARD_ATOL + FORWARD_RTOL * np.abs(first)
    assert (np.abs(keras_train - first) <= bound).all(), _gap(keras_train, first)
