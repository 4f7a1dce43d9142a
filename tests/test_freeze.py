"""apply_strategy in both frameworks, and the Keras trap it has to work around."""

import keras
import numpy as np
import pytest
import torch

from shared.strategies import STRATEGIES, frozen_keys
from tf_impl import freeze as tf_freeze
from tf_impl import model as tf_model
from tf_impl import weights as tf_weights
from torch_impl import freeze as torch_freeze
from torch_impl import model as torch_model
from torch_impl import weights as torch_weights

NON_NAIVE = [s for s in STRATEGIES if s != "naive"]


def _keras_trainable_keys(model):
    ids = {id(v) for v in model.trainable_variables}
    return {key for key, (var, _) in tf_weights._variables(model).items() if id(var) in ids}


def _torch_trainable_keys(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_keras_trainable_true_on_trainable_parent_does_not_reach_children():
    """Trap (Keras 3.15): `layer.trainable = True` is skipped when it already reads True,
    so children frozen one by one stay frozen; apply_strategy goes through False first."""
    model = tf_model.build_model("tinyconv", 5)
    model.base.block1.conv.trainable = False
    model.base.trainable = True
    assert model.base.block1.conv.trainable is False
    model.base.trainable = False
    model.base.trainable = True
    assert model.base.block1.conv.trainable is True


@pytest.mark.parametrize("strategy", NON_NAIVE)
def test_apply_strategy_trains_exactly_what_is_not_declared_frozen(strategy):
    x_tf = tf_model.build_model("tinyconv", 5)
    x_torch = torch_model.build_model("tinyconv", 5)
    # start from another strategy: apply_strategy must reset, not accumulate
    tf_freeze.apply_strategy(x_tf, "partial")
    torch_freeze.apply_strategy(x_torch, "partial")
    tf_freeze.apply_strategy(x_tf, strategy)
    torch_freeze.apply_strategy(x_torch, strategy)
    keys = torch_weights.canonical_shapes(x_torch)
    frozen = set(frozen_keys(strategy, keys, "tinyconv"))
    stats = {k for k in keys if "running_" in k}
    expected = set(keys) - frozen - stats
    assert _torch_trainable_keys(x_torch) == expected
    assert _keras_trainable_keys(x_tf) == expected


def test_torch_inference_strategies_survive_model_train():
    model = torch_freeze.apply_strategy(torch_model.build_model("tinyconv", 5), "frozen")
    model.train()
    assert not model.base.training and not model.base.block1.bn.training
    assert model.head.training
    model = torch_freeze.apply_strategy(model, "partial")
    model.train()
    assert not model.base.block3.bn.training and model.base.block3.conv.training
    model = torch_freeze.apply_strategy(model, "full")
    model.train()
    assert model.base.block1.bn.training


def test_torch_naive_leaves_bn_in_batch_statistics_mode():
    model = torch_freeze.apply_strategy(torch_model.build_model("tinyconv", 5), "naive")
    model.train()
    assert model.base.block1.bn.training and not model.base.block1.conv.weight.requires_grad


def test_keras_naive_requires_the_legacy_bn_layer():
    with pytest.raises(ValueError, match="LegacyBatchNormalization"):
        tf_freeze.apply_strategy(tf_model.build_model("tinyconv", 5), "naive")


def test_keras_apply_strategy_after_fit_recompiles_with_fresh_optimizer():
    """Without the recompile, the traced train step would keep training the base."""
    model = tf_model.build_model("tinyconv", 5)
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).random((8, 32, 32, 3)).astype("float32")
    y = np.arange(8) % 5
    model.fit(x, y, batch_size=8, verbose=0)
    old_optimizer = model.optimizer
    tf_freeze.apply_strategy(model, "frozen")
    assert model.optimizer is not old_optimizer
    before = tf_weights.export_weights(model)
    model.fit(x, y, batch_size=8, verbose=0)
    after = tf_weights.export_weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before if k.startswith("base."))
    assert not np.array_equal(before["head.fc.weight"], after["head.fc.weight"])


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_apply_strategy_rejects_foreign_models_and_unknown_names(framework):
    freeze = tf_freeze if framework == "tf" else torch_freeze
    foreign = keras.layers.Dense(2) if framework == "tf" else torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="FineTuneModel"):
        freeze.apply_strategy(foreign, "frozen")
    build = tf_model.build_model if framework == "tf" else torch_model.build_model
    with pytest.raises(ValueError, match="unknown strategy 'freeze'"):
        freeze.apply_strategy(build("tinyconv", 5), "freeze")
