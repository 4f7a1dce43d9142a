"""ResNet-18 in Keras (NHWC), weight-compatible with ``torchvision.models.resnet18``.

Same function as torchvision's (``torch_impl/resnet.py`` uses torchvision's
model itself): v1.5 (stride on the 3x3 conv), no conv biases, BatchNorm
epsilon and momentum from the config, a 1x1 stride-2 conv + BN downsample.
Every torch ``padding=`` is an explicit ``ZeroPadding2D`` followed by a
``'valid'`` layer: Keras ``padding='same'`` at stride 2 pads bottom/right only.

Each container's :meth:`named_children` returns torchvision's state_dict path
segments (``layer1`` -> ``"0"``, ``"1"``; block -> ``conv1``, ``bn1``,
``conv2``, ``bn2``, ``downsample``; downsample -> ``"0"`` conv, ``"1"`` BN),
so ``tf_impl/weights.py`` derives the same canonical keys as torch with no
ResNet-specific code.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import ops

from shared.archs import ResNet18Config, keras_momentum
from tf_impl.model import NamedSequence

__all__ = ["BasicBlock", "Downsample", "ResNet18Base", "Stage", "resnet18_base"]

# torchvision's resnet18: ResNet(BasicBlock, [2, 2, 2, 2]); (width, first stride) per stage.
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
BLOCKS_PER_STAGE = 2
STEM_WIDTH = 64


def resnet18_base(config: ResNet18Config, norm_layer: Callable[..., keras.layers.Layer]):
    """Keras ResNet-18 base: NHWC images -> (N, 512) features, canonical child names.

    Every BatchNorm built is checked against ``config`` (epsilon, and Keras
    momentum = 1 - torch momentum) so a layer with Keras's defaults
    (1e-3, 0.99) cannot slip in.
    """
    from tf_impl.model import named_leaves

    base = ResNet18Base(config, norm_layer, name="base")
    for name, layer in named_leaves(base, "base"):
        if isinstance(layer, keras.layers.BatchNormalization):
            _check_norm(name, layer, config)
    return base


def _check_norm(name: str, layer: keras.layers.BatchNormalization, config: ResNet18Config) -> None:
    got = (layer.epsilon, layer.momentum)
    want = (config.bn_epsilon, keras_momentum(config.bn_momentum))
    if got != want:
        raise ValueError(f"resnet18: norm layer {name!r} has (epsilon, momentum) {got}, config "
                         f"wants {want}: build norm_layer with default_norm_layer(config, ...)")


def _conv(filters: int, kernel: int, stride: int, name: str) -> keras.layers.Conv2D:
    # torch: nn.Conv2d(..., bias=False); padding is a separate ZeroPadding2D.
    return keras.layers.Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=False,
                               name=name)


class Downsample(keras.layers.Layer):
    """The shortcut projection: 1x1 conv (stride, no padding, no bias) -> BN."""

    def __init__(self, filters: int, stride: int, norm_layer, **kwargs):
        super().__init__(**kwargs)
        self.conv = _conv(filters, 1, stride, name="0")
        self.bn = norm_layer(filters, name="1")

    def call(self, x, training=None):
        return self.bn(self.conv(x), training=training)

    def named_children(self):
        # torchvision: nn.Sequential(conv1x1, norm_layer) -> children "0" and "1".
        return [("0", self.conv), ("1", self.bn)]


class BasicBlock(keras.layers.Layer):
    """torchvision's BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, filters: int, stride: int, downsample: bool, norm_layer, **kwargs):
        super().__init__(**kwargs)
        # 3x3 convs with torch padding=1; the stride sits on conv1, the 3x3 (v1.5).
        self.pad1 = keras.layers.ZeroPadding2D(1)
        self.conv1 = _conv(filters, 3, stride, name="conv1")
        self.bn1 = norm_layer(filters, name="bn1")
        self.pad2 = keras.layers.ZeroPadding2D(1)
        self.conv2 = _conv(filters, 3, 1, name="conv2")
        self.bn2 = norm_layer(filters, name="bn2")
        self.downsample = Downsample(filters, stride, norm_layer, name="downsample") if downsample else None
        self.relu = keras.layers.ReLU()

    def call(self, x, training=None):
        out = self.relu(self.bn1(self.conv1(self.pad1(x)), training=training))
        out = self.bn2(self.conv2(self.pad2(out)), training=training)
        shortcut = x if self.downsample is None else self.downsample(x, training=training)
        return self.relu(out + shortcut)

    def named_children(self):
        children = [("conv1", self.conv1), ("bn1", self.bn1), ("conv2", self.conv2), ("bn2", self.bn2)]
        if self.downsample is not None:
            children.append(("downsample", self.downsample))
        return children


class Stage(NamedSequence):
    """torchvision's ``layerN``: an ``nn.Sequential`` of blocks named ``"0"``, ``"1"``, ..."""


class ResNet18Base(keras.layers.Layer):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool), ``layer1..layer4``, global average pool."""

    def __init__(self, config: ResNet18Config, norm_layer, **kwargs):
        super().__init__(**kwargs)
        self.pad1 = keras.layers.ZeroPadding2D(3)  # torch conv1: kernel 7, stride 2, padding 3
        self.conv1 = _conv(STEM_WIDTH, 7, 2, name="conv1")
        self.bn1 = norm_layer(STEM_WIDTH, name="bn1")
        self.relu = keras.layers.ReLU()
        # torch MaxPool2d(3, 2, padding=1) pads with -inf; zeros give the same maximum here
        # because the input is a ReLU output (>= 0) and every 3x3 window holds at least one
        # real value (padding 1 < kernel 3): max(real values >= 0, 0) == max(real values).
        self.pad_pool = keras.layers.ZeroPadding2D(1)
        self.maxpool = keras.layers.MaxPooling2D(3, strides=2, padding="valid")
        in_width = STEM_WIDTH
        self.stage_names = []
        for i, (width, stride) in enumerate(STAGES, start=1):
            blocks = [BasicBlock(width, stride if j == 0 else 1,
                                 downsample=j == 0 and (stride != 1 or in_width != width),
                                 norm_layer=norm_layer, name=str(j))
                      for j in range(BLOCKS_PER_STAGE)]
            setattr(self, f"layer{i}", Stage(blocks, name=f"layer{i}"))
            self.stage_names.append(f"layer{i}")
            in_width = width
        self.feature_dim = in_width
        if self.feature_dim != config.feature_dim:
            raise ValueError(f"resnet18: last stage width {self.feature_dim} != config.feature_dim "
                             f"{config.feature_dim}")

    def call(self, x, training=None):
        x = self.relu(self.bn1(self.conv1(self.pad1(x)), training=training))
        x = self.maxpool(self.pad_pool(x))
        for name in self.stage_names:
            x = getattr(self, name)(x, training=training)
        return ops.mean(x, axis=(1, 2))  # torch: AdaptiveAvgPool2d((1, 1)) + flatten

    def named_children(self):
        return [("conv1", self.conv1), ("bn1", self.bn1)] + [
            (name, getattr(self, name)) for name in self.stage_names]
