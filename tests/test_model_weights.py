"""tinyconv in both frameworks: weight porting, forward parity, pretraining."""

import numpy as np
import pytest
import torch

from shared import data, tolerances
from shared.archs import TinyConvConfig
from shared.checkpoint import CheckpointError, load_checkpoint
from shared.init import canonical_init
from shared.pretrain import MIN_SOURCE_ACCURACY, PretrainConfig, pretrain
from tf_impl import model as tf_model
from tf_impl import train as tf_train
from tf_impl import weights as tf_weights
from torch_impl import model as torch_model
from torch_impl import train as torch_train
from torch_impl import weights as torch_weights


def _random_tensors(shapes, seed=1):
    """Canonical init with non-trivial BN statistics and affine parameters."""
    tensors = canonical_init(shapes, seed)
    rng = np.random.default_rng(seed)
    for key, value in tensors.items():
        if key.endswith(("running_mean", "bn.bias")):
            tensors[key] = rng.normal(0, 0.3, value.shape).astype(np.float32)
        elif key.endswith(("running_var", "bn.weight")):
            tensors[key] = rng.uniform(0.5, 2.0, value.shape).astype(np.float32)
    return tensors


@pytest.fixture(scope="module")
def pair():
    x_torch = torch_model.build_model("tinyconv", 5)
    x_tf = tf_model.build_model("tinyconv", 5, norm_layer=tf_train.norm_layer_for("tinyconv", "full"))
    tensors = _random_tensors(torch_weights.canonical_shapes(x_torch))
    torch_weights.import_weights(x_torch, tensors)
    tf_weights.import_weights(x_tf, tensors)
    return x_tf, x_torch, tensors


def test_canonical_shapes_identical_in_both_frameworks(pair):
    x_tf, x_torch, _ = pair
    assert tf_weights.canonical_shapes(x_tf) == torch_weights.canonical_shapes(x_torch)


def test_weights_roundtrip_torch_to_keras_to_torch_exact(pair):
    x_tf, _, tensors = pair
    via_tf = tf_weights.export_weights(x_tf)
    fresh = torch_model.build_model("tinyconv", 5)
    torch_weights.import_weights(fresh, via_tf)
    back = torch_weights.export_weights(fresh)
    assert back.keys() == tensors.keys()
    for key in tensors:
        assert np.array_equal(back[key], tensors[key]), key


def test_weights_roundtrip_keras_to_torch_to_keras_exact(pair):
    _, x_torch, tensors = pair
    via_torch = torch_weights.export_weights(x_torch)
    fresh = tf_model.build_model("tinyconv", 5)
    tf_weights.import_weights(fresh, via_torch)
    back = tf_weights.export_weights(fresh)
    for key in tensors:
        assert np.array_equal(back[key], tensors[key]), key


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_cross_forward_parity_on_target_batches(pair, mode):
    x_tf, x_torch, _ = pair
    images = data.load_domains().target_train.images[:64]
    x_torch.train(mode == "training")
    with torch.no_grad():
        y_torch = x_torch(torch.from_numpy(data.nhwc_to_nchw(images))).numpy()
    y_tf = np.asarray(x_tf(images, training=mode == "training"))
    diff = float(np.max(np.abs(y_tf - y_torch)))
    assert np.allclose(y_tf, y_torch, atol=tolerances.FORWARD_ATOL, rtol=tolerances.FORWARD_RTOL), (
        f"tinyconv logits ({mode} mode) tf vs torch: max abs diff {diff:.3g} > FORWARD_ATOL")


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_import_weights_rejects_missing_key_and_wrong_shape(framework):
    mod_model, mod_weights = ((tf_model, tf_weights) if framework == "tf"
                              else (torch_model, torch_weights))
    model = mod_model.build_model("tinyconv", 5)
    tensors = canonical_init(mod_weights.canonical_shapes(model), 0)
    missing = dict(tensors)
    del missing["base.block2.bn.running_var"]
    with pytest.raises(CheckpointError, match="base.block2.bn.running_var"):
        mod_weights.import_weights(model, missing, "ckpt.safetensors")
    wrong = dict(tensors)
    wrong["base.block1.conv.weight"] = np.zeros((16, 3, 5, 5), np.float32)
    with pytest.raises(CheckpointError, match=r"base\.block1\.conv\.weight.*\(16, 3, 3, 3\)"):
        mod_weights.import_weights(model, wrong, "ckpt.safetensors")


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_build_model_rejects_unknown_arch_and_bad_classes(framework):
    build = tf_model.build_model if framework == "tf" else torch_model.build_model
    with pytest.raises(ValueError, match="unknown arch 'vgg'"):
        build("vgg", 5)
    with pytest.raises(ValueError, match="num_classes"):
        build("tinyconv", 0)


def test_tinyconv_uses_explicit_padding_and_shared_bn_settings():
    config = TinyConvConfig()
    x_tf = tf_model.build_model("tinyconv", 5)
    conv = x_tf.base.block2.conv
    assert conv.padding == "valid" and conv.strides == (2, 2)
    bn = x_tf.base.block2.bn
    assert bn.epsilon == config.bn_epsilon and bn.momentum == pytest.approx(1 - config.bn_momentum)
    x_torch = torch_model.build_model("tinyconv", 5)
    assert x_torch.base.block2.bn.eps == config.bn_epsilon
    assert x_torch.base.block2.bn.momentum == config.bn_momentum


def test_pretrained_checkpoint_learns_source_and_stores_source_statistics(tinyconv_checkpoint):
    tensors, meta = load_checkpoint(tinyconv_checkpoint)
    assert meta["arch"] == "tinyconv"
    assert float(meta["source_test_accuracy"]) >= MIN_SOURCE_ACCURACY
    # BN statistics are the source domain's, not the initial 0/1: the first BN saw
    # grey source images through the first conv.
    assert np.abs(tensors["base.block1.bn.running_mean"]).max() > tolerances.TRAP_MIN_GAP


# A short Keras pretraining (cheap in the suite) must still have clearly learned the
# ten source classes (chance: 0.10); 6 epochs reached 0.716 (4: 0.587).
SHORT_PRETRAIN_EPOCHS = 6
MIN_SHORT_PRETRAIN_ACCURACY = 0.5


def test_keras_pretrained_checkpoint_loads_into_torch_with_same_predictions(tmp_path):
    out = tmp_path / "tf.safetensors"
    metrics = pretrain(PretrainConfig(framework="tf", epochs=SHORT_PRETRAIN_EPOCHS), out)
    assert metrics["accuracy"] >= MIN_SHORT_PRETRAIN_ACCURACY
    tensors, _ = load_checkpoint(out)
    x_torch = torch_model.build_model("tinyconv", len(data.SOURCE_CLASSES))
    torch_weights.import_weights(x_torch, tensors)
    loss, accuracy = torch_train.evaluate(x_torch, data.load_domains().source_test)
    assert accuracy == pytest.approx(metrics["accuracy"])
    assert loss == pytest.approx(metrics["loss"], abs=tolerances.FORWARD_ATOL, rel=tolerances.FORWARD_RTOL)
