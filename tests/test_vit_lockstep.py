"""One lockstep step on the verdict ViT (dropout rates 0): Keras from torch's state."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch  # before TensorFlow

from shared import lockstep
from shared.archs import verdict_config
from shared.init import canonical_init
from tf_impl import model as tf_model
from tf_impl import weights as tf_weights
from tf_impl.train import BatchLoss
from torch_impl import model as torch_model
from torch_impl import weights as torch_weights

NUM_CLASSES, BATCH, LR, MOMENTUM = 5, 8, 0.01, 0.9


def _step(setup: str, dtype: str = "float32", keras_config=None, keras_lr: float = LR):
    import keras

    config = verdict_config("vit")
    t_net = torch_model.build_model("vit", NUM_CLASSES, config=config, dtype=dtype)
    k_net = tf_model.build_model("vit", NUM_CLASSES, config=keras_config or config, dtype=dtype)
    torch_weights.import_weights(t_net, canonical_init(torch_weights.canonical_shapes(t_net), 0))
    if setup == "head":
        t_net.base.requires_grad_(False)
        t_net.pin_inference(["base"])
        k_net.base.trainable = False
    params = [p for p in t_net.parameters() if p.requires_grad]
    t_opt = torch.optim.SGD(params, lr=float(np.float32(LR)), momentum=float(np.float32(MOMENTUM)))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(BATCH, 3, 32, 32)).astype(dtype)
    y = np.arange(BATCH) % NUM_CLASSES
    start = torch_weights.export_training_state(t_net, t_opt)
    k_net.compile(optimizer=keras.optimizers.SGD(keras_lr, momentum=MOMENTUM),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype),
                  metrics=[BatchLoss(dtype=dtype)])  # the loss tracker is float32
    tf_weights.import_training_state(k_net, k_net.optimizer, start)
    x_k = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    k_eval = float(keras.ops.mean(keras.losses.sparse_categorical_crossentropy(
        y, k_net(x_k, training=False), from_logits=True)))
    from tf_impl.train import _floatx

    with _floatx(dtype):  # train_on_batch casts NumPy inputs to floatx (docs/verdicts.md)
        k_train = float(k_net.train_on_batch(x_k, y, return_dict=True)["batch_loss"])
    t_net.eval()
    with torch.no_grad():
        t_eval = float(torch.nn.functional.cross_entropy(t_net(torch.from_numpy(x)),
                                                         torch.from_numpy(y)))
    t_net.train()
    loss = torch.nn.functional.cross_entropy(t_net(torch.from_numpy(x)), torch.from_numpy(y))
    t_opt.zero_grad()
    loss.backward()
    t_opt.step()
    after = {"tf": tf_weights.export_training_state(k_net, k_net.optimizer),
             "torch": torch_weights.export_training_state(t_net, t_opt)}
    losses = {"tf": (k_train, k_eval), "torch": (float(loss.detach()), t_eval)}
    strategy = "full" if setup == "full" else "frozen"
    return lockstep.compare_step(start, losses, after, strategy, lockstep.step_bounds(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("setup", ["full", "head"])
def test_cross_vit_verdict_one_sgd_step_within_lockstep_bounds(setup, dtype, record_property):
    checks = _step(setup, dtype)
    worst = max(checks, key=lambda c: c.ratio)
    record_property(f"worst_ratio_{setup}_{dtype}", worst.ratio)
    assert not worst.outside, worst.describe()


@pytest.mark.parametrize("change", ["layer_norm_epsilon", "dropout", "learning_rate"])
def test_cross_vit_verdict_seeded_keras_difference_leaves_lockstep_bound(change):
    """Keras's default LayerNorm epsilon (1e-3), dropout left on in Keras only, or a
    learning rate 0.1% off in Keras."""
    config = verdict_config("vit")
    keras_config = {"layer_norm_epsilon": dataclasses.replace(config, layer_norm_epsilon=1e-3),
                    "dropout": dataclasses.replace(config, dropout=0.1)}.get(change, config)
    keras_lr = LR * 1.001 if change == "learning_rate" else LR
    checks = _step("full", "float32", keras_config, keras_lr)
    worst = max(checks, key=lambda c: c.ratio)
    assert worst.outside, f"{change}: every check within its bound ({worst.describe()})"
