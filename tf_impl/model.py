"""Models: a pretrained-style base plus a new classification head (NHWC input).

Attribute names are the canonical checkpoint names (``base.block1.conv``);
``torch_impl/model.py`` builds the same tree with the same names. Each
container layer lists its weighted children in :meth:`named_children`, the
tree ``weights.py`` walks.

The outer model is *subclassed*, never functional: Keras 3.15's ``fit``
overrides ``base(x, training=False)`` written inside a functional model (see
docs/PORTING.md), while a subclassed model passes ``training`` on as written.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import ops

from shared.archs import TinyConvConfig, arch_config, keras_momentum

__all__ = [
    "ConvBlock", "TinyConvBase", "Head", "FineTuneModel", "build_model", "default_norm_layer",
    "TorchVarianceBatchNormalization", "LegacyBatchNormalization", "NamedSequence", "named_leaves",
    "is_batch_norm",
]


class TorchVarianceBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization whose training step follows torch's numerics.

    Both frameworks *normalise* with the biased batch variance, but torch
    updates ``running_var`` with the unbiased one (times N / (N - 1)); Keras
    with the biased one. Cross-framework runs that update statistics use this
    layer so the difference is reconciled explicitly, in code, not hidden in a
    tolerance. Its batch moments are also computed in two passes, as accurately
    as torch's (see ``_batch_moments``). Inference and frozen behaviour are
    Keras's own.
    """

    def _batch_moments(self, inputs):
        # Two-pass moments: TensorFlow's one-pass float32 reduce_mean loses ~1e-6 of the
        # mean on 16k values; on inputs whose mean is large against their spread (the
        # shifted target domain) that becomes ~1e-4 after normalisation, while torch's
        # reduction is accurate to ~1e-5. A correction pass on the residual recovers it.
        axis = self.axis if self.axis >= 0 else len(inputs.shape) + self.axis
        axes = [i for i in range(len(inputs.shape)) if i != axis]
        if self.synchronized:
            return self._synchronized_moments(inputs, axes)
        mean = ops.mean(inputs, axis=axes)
        mean = mean + ops.mean(inputs - mean, axis=axes)
        centred = inputs - mean
        variance = ops.mean(centred * centred, axis=axes)
        count = 1
        for i in axes:
            count = count * ops.shape(inputs)[i]
        return mean, variance, ops.cast(count, inputs.dtype)

    def _synchronized_moments(self, inputs, axes):
        # ``synchronized=True``: the same two-pass moments over every replica's batch
        # (sums all-reduced in the replica context). Keras's own layer does this in
        # ``ops.moments(..., synchronized=True)``, which ``call`` below bypasses, so
        # without this branch the flag would be accepted and silently ignored.
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        total = (lambda t: context.all_reduce("sum", t)) if context else (lambda t: t)
        count = total(ops.cast(ops.size(inputs) // ops.shape(inputs)[self.axis], inputs.dtype))
        mean = total(ops.sum(inputs, axis=axes)) / count
        mean = mean + total(ops.sum(inputs - mean, axis=axes)) / count
        centred = inputs - mean
        variance = total(ops.sum(centred * centred, axis=axes)) / count
        return mean, variance, count

    def _normalise(self, inputs, mean, variance):
        return ops.batch_normalization(inputs, mean=mean, variance=variance, axis=self.axis,
                                       offset=self.beta, scale=self.gamma, epsilon=self.epsilon)

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable):
            return super().call(inputs, training=False)
        inputs = ops.cast(inputs, self.compute_dtype)
        mean, variance, count = self._batch_moments(inputs)
        unbiased = variance * count / (count - 1.0)
        m = self.momentum
        self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
        self.moving_variance.assign(self.moving_variance * m + unbiased * (1.0 - m))
        return self._normalise(inputs, mean, variance)


class LegacyBatchNormalization(TorchVarianceBatchNormalization):
    """Pre-TF-2.0 Keras behaviour, kept only to reproduce the classic mistake.

    With ``trainable=False`` and ``training=True`` this layer still normalises
    with *batch* statistics (while its moving statistics stay fixed), as Keras
    did before TensorFlow 2.0. Current Keras switches a non-trainable
    BatchNormalization to inference mode instead. Used by the ``naive``
    strategy only.
    """

    def call(self, inputs, training=None, mask=None):
        if training and not self.trainable:
            inputs = ops.cast(inputs, self.compute_dtype)
            mean, variance, _ = self._batch_moments(inputs)
            return self._normalise(inputs, mean, variance)
        return super().call(inputs, training=training, mask=mask)


def default_norm_layer(config, cls=keras.layers.BatchNormalization) -> Callable[[int], keras.layers.Layer]:
    # Same epsilon and momentum as the torch model: Keras momentum = 1 - torch momentum.
    def make(num_features: int, name: str = "bn"):
        return cls(momentum=keras_momentum(config.bn_momentum), epsilon=config.bn_epsilon, name=name)
    return make


class ConvBlock(keras.layers.Layer):
    """conv (explicit symmetric zero padding, no bias) -> BatchNorm -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, config: TinyConvConfig, norm_layer,
                 **kwargs):
        super().__init__(**kwargs)
        self.pad = keras.layers.ZeroPadding2D(config.padding)
        self.conv = keras.layers.Conv2D(out_ch, config.kernel_size, strides=stride,
                                        padding="valid", use_bias=False, name="conv")
        self.bn = norm_layer(out_ch)
        self.relu = keras.layers.ReLU()

    def call(self, x, training=None):
        return self.relu(self.bn(self.conv(self.pad(x)), training=training))

    def named_children(self):
        return [("conv", self.conv), ("bn", self.bn)]


class TinyConvBase(keras.layers.Layer):
    """Blocks ``block1..blockN`` then global average pooling to (N, C)."""

    def __init__(self, config: TinyConvConfig, norm_layer, **kwargs):
        super().__init__(**kwargs)
        in_ch = 3
        self.block_names = []
        for i, (out_ch, stride) in enumerate(zip(config.channels, config.strides), start=1):
            setattr(self, f"block{i}", ConvBlock(in_ch, out_ch, stride, config, norm_layer,
                                                 name=f"block{i}"))
            self.block_names.append(f"block{i}")
            in_ch = out_ch

    def call(self, x, training=None):
        for name in self.block_names:
            x = getattr(self, name)(x, training=training)
        return ops.mean(x, axis=(1, 2))

    def named_children(self):
        return [(name, getattr(self, name)) for name in self.block_names]


class Head(keras.layers.Layer):
    """The new classification head: optional dropout, then one dense layer."""

    def __init__(self, feature_dim: int, num_classes: int, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.dropout = keras.layers.Dropout(dropout)
        self.fc = keras.layers.Dense(num_classes, name="fc")

    def call(self, x, training=None):
        return self.fc(self.dropout(x, training=training))

    def named_children(self):
        return [("fc", self.fc)]


class FineTuneModel(keras.Model):
    """``head(base(x))`` with a clear base/head split (subclassed: see module docstring)."""

    def __init__(self, base, head: Head, arch: str, feature_dim: int, image_size: int, **kwargs):
        super().__init__(**kwargs)
        self.base = base
        self.head = head
        self.arch = arch
        self.feature_dim = feature_dim
        self.image_size = image_size
        self._pinned: list[str] = []

    def call(self, x, training=None):
        base_training = False if self._pinned else training
        return self.head(self.base(x, training=base_training), training=training)

    def pin_inference(self, names: list[str]) -> None:
        """Call the named parts (``[]`` or ``["base"]``) with ``training=False`` in every
        later call: ``trainable=False`` switches no Dropout or DropPath off (a BatchNorm
        needs no pin: a non-trainable one runs in inference mode). Mirrors torch's."""
        if list(names) not in ([], ["base"]):
            raise ValueError(f"pin_inference: {list(names)!r}: a Keras FineTuneModel pins [] or "
                             f"['base'] (a non-trainable BatchNorm runs in inference mode already)")
        self._pinned = list(names)

    @property
    def pinned_inference(self) -> list[str]:
        return list(self._pinned)

    def features(self, x, training=False):
        return self.base(x, training=training)

    def named_children(self):
        return [("base", self.base), ("head", self.head)]


class NamedSequence(keras.layers.Layer):
    """Layers applied in order, named ``"0"``, ``"1"``, ... as a torch ``nn.Sequential``
    names its children (so canonical keys read ``layer1.0.conv1``, ``blocks.3.attn``)."""

    def __init__(self, layers: list, **kwargs):
        super().__init__(**kwargs)
        self.blocks = list(layers)

    def call(self, x, training=None):
        for block in self.blocks:
            x = block(x, training=training)
        return x

    def named_children(self):
        return [(str(i), block) for i, block in enumerate(self.blocks)]


def named_leaves(layer, prefix: str = ""):
    """``(canonical path, layer)`` for every weighted leaf layer under ``layer``."""
    for name, child in layer.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if hasattr(child, "named_children"):
            yield from named_leaves(child, path)
        else:
            yield path, child


def is_batch_norm(layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


def build_model(arch: str, num_classes: int, *, head_dropout: float = 0.0,
                norm_layer: Callable[[int], keras.layers.Layer] | None = None,
                dtype: str = "float32", config=None) -> FineTuneModel:
    """A base of ``arch`` plus a new head of ``num_classes`` logits (NHWC input), built.

    ``dtype="float64"`` builds every layer with a float64 policy (used to show that
    cross-framework differences are float32 rounding, not different maths).
    """
    config = config if config is not None else arch_config(arch)  # e.g. verdict_config(arch)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)  # layers take the policy in force when created
    try:
        return _build(arch, config, num_classes, head_dropout, norm_layer, dtype)
    finally:
        keras.config.set_dtype_policy(previous)


def _build(arch, config, num_classes, head_dropout, norm_layer, dtype) -> FineTuneModel:
    if arch == "vit":
        if norm_layer is not None:
            raise ValueError("build_model: arch 'vit' has no BatchNorm to build with norm_layer "
                             "(its LayerNorm epsilon is ViTConfig.layer_norm_epsilon)")
        from tf_impl.vit import vit_base

        base = vit_base(config)
    elif arch == "tinyconv":
        base = TinyConvBase(config, norm_layer or default_norm_layer(config), name="base")
    else:
        from tf_impl.resnet import resnet18_base

        base = resnet18_base(config, norm_layer or default_norm_layer(config))
    model = FineTuneModel(base, Head(config.feature_dim, num_classes, head_dropout, name="head"),
                          arch, config.feature_dim, config.image_size)
    model(ops.zeros((1, config.image_size, config.image_size, 3), dtype=dtype))  # create variables
    return model

