"""Freeze a pretrained base in Keras 3, in two stages (docs/PORTING.md, "Recipes").

Stage 1 trains the new head only. Stage 2 fine-tunes the base too, with every
BatchNormalization frozen: moving statistics and gamma/beta kept, inference mode.
Dropout inside the base stays off in both stages.
"""

import keras


class InferenceMode(keras.layers.Layer):
    """Calls ``inner`` with training=False, even inside fit().

    Keras 3.15 overrides ``base(x, training=False)`` written in a functional model
    once ``base.trainable`` is True; a training=False inside a layer's call holds.
    """

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, inputs):
        return self.inner(inputs, training=False)


def build_classifier(base, num_classes):
    inputs = keras.Input(base.input_shape[1:])
    features = InferenceMode(base, name="base_in_inference_mode")(inputs)
    outputs = keras.layers.Dense(num_classes, name="head")(features)
    return keras.Model(inputs, outputs)


def compile_frozen_stage(model, base, learning_rate=1e-3):
    """Stage 1: only the head trains."""
    base.trainable = False  # before compile, or recompile: fit keeps its traced step
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def compile_fine_tune_stage(model, base, learning_rate=1e-5):
    """Stage 2: the base trains too; its BatchNormalization layers stay frozen."""
    base.trainable = True  # sets every nested layer, BatchNormalization included...
    for layer in _layers(base):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False  # ...so freeze those again: gamma/beta and statistics
    model.compile(
        # a NEW optimizer: the stage-1 one only knows the head's variables
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def _layers(layer):
    """``layer`` and every layer nested in it (``Model.layers`` lists one level only)."""
    yield layer
    for sublayer in getattr(layer, "layers", ()):
        yield from _layers(sublayer)
