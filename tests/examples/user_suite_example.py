"""A user's own test module using the freeze-parity pytest plugin (copied into README.md).

tests/test_pytest_plugin.py runs it with pytester as ``test_user_suite.py``,
beside a conftest.py holding ``import torch_impl``. The two ``naive`` tests
fail on purpose: requires_grad_(False) alone does not freeze a torch base.
"""

import numpy as np
import torch
from torch import nn


class FineTuner(nn.Module):
    """A frozen conv base plus a new head; ``pin_base`` keeps the base in eval mode."""

    def __init__(self, pin_base: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 3)
        self.base.requires_grad_(False)
        self.pin_base = pin_base

    def forward(self, x):
        return self.head(self.base(x))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.pin_base:
            self.base.eval()  # survives every model.train(), unlike a one-off base.eval()
        return self


BATCH = (torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) + 1.0,
         torch.arange(8) % 3)


def training_step(model, batch):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = batch
    model.train()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_frozen_base_stays_frozen(freeze_guard, assert_train_eval_match, freeze_audit):
    model = FineTuner(pin_base=True)
    report = freeze_audit(model)
    assert report.ok, "\n".join(report.hazard_lines())
    assert_train_eval_match(model, BATCH, nn.functional.cross_entropy)
    with freeze_guard(model):
        training_step(model, BATCH)


def test_naive_base_guard(freeze_guard):
    model = FineTuner(pin_base=False)
    with freeze_guard(model):  # fails: BatchNorm running statistics move
        training_step(model, BATCH)


def test_naive_base_train_eval(assert_train_eval_match):
    # fails: BatchNorm normalises with batch statistics in training mode
    assert_train_eval_match(FineTuner(pin_base=False), BATCH, nn.functional.cross_entropy)


def test_keras_frozen_base_stays_frozen(freeze_guard, assert_train_eval_match):
    import keras  # after torch: conftest.py imports torch_impl first

    base = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(8, 3),
                             keras.layers.BatchNormalization(),
                             keras.layers.GlobalAveragePooling2D()])
    base.trainable = False  # Keras BatchNormalization then runs in inference mode, even in fit
    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, keras.layers.Dense(3)(base(inputs)))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    x = np.random.default_rng(0).standard_normal((8, 16, 16, 3)).astype("float32") + 1.0
    y = np.arange(8) % 3
    assert_train_eval_match(model, (x, y), loss)
    with freeze_guard(model):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
