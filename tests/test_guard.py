"""freeze_guard: silent around a correctly frozen training step, loud around each classic mistake.

Every "silent" test also checks that the head did train, so a guard that
watched nothing (or a step that did nothing) cannot pass by accident.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch
from torch import nn

from shared.archs import arch_config
from shared.audit import FrozenTensorChanged
from tf_impl import audit as tf_audit
from tf_impl.freeze import apply_strategy as tf_apply
from tf_impl.model import LegacyBatchNormalization, default_norm_layer
from tf_impl.model import build_model as tf_build
from torch_impl import audit as torch_audit
from torch_impl.freeze import apply_strategy as torch_apply
from torch_impl.freeze import trainable_parameters
from torch_impl.model import build_model as torch_build

N, CLASSES = 4, 5


def _batch_torch(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((N, 3, 32, 32)).astype(np.float32) + 1.0)
    return x, torch.arange(N) % CLASSES


def _step_torch(model: nn.Module, optimizer) -> None:
    x, y = _batch_torch()
    model.train()
    optimizer.zero_grad(set_to_none=False)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def _fit_tf(model) -> None:
    x = np.random.default_rng(0).standard_normal((N, 32, 32, 3)).astype("float32") + 1.0
    model.fit(x, np.arange(N) % CLASSES, batch_size=N, epochs=1, verbose=0, shuffle=False)


def _compile(model):
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


# --- torch ------------------------------------------------------------------------------------

def test_freeze_guard_torch_naive_step_raises_naming_running_stats():
    model = torch_apply(torch_build("tinyconv", CLASSES), "naive")
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    with pytest.raises(FrozenTensorChanged) as caught, torch_audit.freeze_guard(model):
        _step_torch(model, optimizer)
    changed = dict(caught.value.changes)
    assert {"base.block1.bn.running_mean", "base.block1.bn.running_var",
            "base.block1.bn.num_batches_tracked"} <= set(changed)
    assert not any(name.endswith("conv.weight") for name in changed)  # no gradient reached them
    assert "base.block1.bn.running_mean (max abs change " in str(caught.value)


def test_freeze_guard_torch_frozen_step_silent():
    model = torch_apply(torch_build("tinyconv", CLASSES), "frozen")
    head_before = model.head.fc.weight.detach().clone()
    with torch_audit.freeze_guard(model) as watched:
        _step_torch(model, torch.optim.SGD(trainable_parameters(model), lr=0.1))
    assert not torch.equal(head_before, model.head.fc.weight)
    assert {"base.block1.conv.weight", "base.block1.bn.running_mean",
            "base.block1.bn.num_batches_tracked"} <= set(watched)
    assert not any(name.startswith("head.") for name in watched)


def test_freeze_guard_torch_late_freeze_momentum_moves_frozen_weights():
    model = torch_build("tinyconv", CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # all parameters
    _step_torch(model, optimizer)
    torch_apply(model, "frozen")  # frozen now, but the optimizer keeps its momentum buffers
    with pytest.raises(FrozenTensorChanged) as caught, torch_audit.freeze_guard(model):
        _step_torch(model, optimizer)
    assert "base.block1.conv.weight" in dict(caught.value.changes)


def test_freeze_guard_body_exception_propagates_unchanged():
    model = torch_apply(torch_build("tinyconv", CLASSES), "naive")
    with pytest.raises(KeyError), torch_audit.freeze_guard(model):
        _step_torch(model, torch.optim.SGD(trainable_parameters(model), lr=0.1))
        raise KeyError("from the body")


# --- Keras ------------------------------------------------------------------------------------

def test_freeze_guard_tf_unrecompiled_freeze_raises():
    model = _compile(tf_build("tinyconv", CLASSES))
    _fit_tf(model)
    model.base.trainable = False  # no recompile: the traced train step still trains the base
    with pytest.raises(FrozenTensorChanged) as caught, tf_audit.freeze_guard(model):
        _fit_tf(model)
    changed = dict(caught.value.changes)
    assert {"base.block1.conv.kernel", "base.block1.bn.moving_mean"} <= set(changed)


def test_freeze_guard_tf_frozen_fit_silent():
    model = _compile(tf_apply(tf_build("tinyconv", CLASSES), "frozen"))
    head_before = model.head.fc.kernel.numpy()
    with tf_audit.freeze_guard(model) as watched:
        _fit_tf(model)
    assert not np.array_equal(head_before, model.head.fc.kernel.numpy())
    assert {"base.block1.conv.kernel", "base.block1.bn.moving_mean"} <= set(watched)
    assert not any(name.startswith("head.") for name in watched)


# Every variable of the frozen tinyconv base, by hand: what a step must leave bit-identical
# when the base is frozen and its BatchNorms do not update their moving statistics.
TF_TINY_BASE = {f"base.block{i}.{name}" for i in (1, 2, 3)
                for name in ("conv.kernel", "bn.gamma", "bn.beta", "bn.moving_mean",
                             "bn.moving_variance")}


def test_freeze_guard_tf_naive_legacy_bn_silent():
    # Keras's classic mistake changes the loss, not the frozen tensors (strategies.py "naive"):
    # legacy BN normalises with batch statistics but never writes its moving statistics.
    norm = default_norm_layer(arch_config("tinyconv"), LegacyBatchNormalization)
    model = _compile(tf_apply(tf_build("tinyconv", CLASSES, norm_layer=norm), "naive"))
    head = {"head.fc.kernel": model.head.fc.kernel, "head.fc.bias": model.head.fc.bias}
    head_before = {name: v.numpy() for name, v in head.items()}
    with tf_audit.freeze_guard(model) as watched:
        _fit_tf(model)
    assert set(watched) == TF_TINY_BASE
    unchanged = [name for name, v in head.items() if np.array_equal(head_before[name], v.numpy())]
    assert unchanged == [], f"the step did not train {unchanged}"


# --- torch: tensors replaced inside the block, read again by name on exit -----------------------

def test_freeze_guard_torch_rebound_running_mean_raises():
    model = torch_apply(torch_build("tinyconv", CLASSES), "frozen")
    bn = model.base.block1.bn
    with pytest.raises(FrozenTensorChanged) as caught, torch_audit.freeze_guard(model):
        bn.running_mean = bn.running_mean + 1.0  # a new tensor object under the same name
    assert dict(caught.value.changes) == {"base.block1.bn.running_mean": 1.0}


def test_freeze_guard_torch_model_to_float64_then_naive_step_raises():
    # .to() rebinds every buffer: the entry objects stay untouched while the new ones move
    model = torch_apply(torch_build("tinyconv", CLASSES), "naive")
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    with pytest.raises(FrozenTensorChanged) as caught, torch_audit.freeze_guard(model):
        model.to(torch.float64)
        x, y = _batch_torch()
        model.train()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x.double()), y).backward()
        optimizer.step()
    changed = dict(caught.value.changes)
    assert "base.block1.bn.running_mean" in changed and changed["base.block1.bn.running_mean"] > 0
    assert caught.value.reasons["base.block1.conv.weight"] == "dtype torch.float32 -> torch.float64"


def test_freeze_guard_torch_load_state_dict_assign_raises():
    model = torch_apply(torch_build("tinyconv", CLASSES), "frozen")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["base.block2.conv.weight"] = state["base.block2.conv.weight"] * 2.0
    with pytest.raises(FrozenTensorChanged) as caught, torch_audit.freeze_guard(model):
        model.load_state_dict(state, assign=True)
    assert set(dict(caught.value.changes)) == {"base.block2.conv.weight"}


def test_freeze_guard_torch_vanished_and_reshaped_tensors_named():
    model = torch_apply(torch_build("tinyconv", CLASSES), "frozen")
    with pytest.raises(FrozenTensorChanged) as caught, torch_audit.freeze_guard(model):
        model.base.block3.bn = nn.Identity()
        model.base.block2.conv.weight = nn.Parameter(torch.zeros(1), requires_grad=False)
    reasons = caught.value.reasons
    assert reasons["base.block3.bn.running_var"] == "vanished"
    assert reasons["base.block3.bn.weight"] == "vanished"
    assert reasons["base.block2.conv.weight"] == "shape (32, 16, 3, 3) -> (1,)"
    assert "base.block3.bn.running_var (vanished)" in str(caught.value)
    assert "base.block2.conv.weight (shape (32, 16, 3, 3) -> (1,))" in str(caught.value)


def _frozen_bn_net() -> nn.Module:
    from torchvision.ops import FrozenBatchNorm2d

    net = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 3, 8, 8))
    net[0].requires_grad_(False)
    return net


def test_freeze_guard_torch_frozen_batchnorm_buffers_guarded_in_place_and_rebound():
    net = _frozen_bn_net()
    with torch_audit.freeze_guard(net) as watched:
        pass
    assert {"1.weight", "1.bias", "1.running_mean", "1.running_var"} <= set(watched)
    with pytest.raises(FrozenTensorChanged) as caught, torch_audit.freeze_guard(net):
        net[1].running_var.mul_(2.0)  # in place
        net[1].weight = torch.full((4,), 3.0)  # rebound
    assert dict(caught.value.changes) == {"1.running_var": 1.0, "1.weight": 2.0}
