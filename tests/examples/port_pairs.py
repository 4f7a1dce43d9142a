"""Small Keras/torch pairs a user could have written, for ``freeze-parity port`` tests.

Each ``<name>_keras`` / ``<name>_torch`` factory builds one side of a pair
(the CLI imports them as ``tests.examples.port_pairs:<factory>``); the
``broken`` pairs each hold one classic porting mistake, named in the
factory's docstring. Inputs are 16x16x3 (even: the 'same' padding trap
shows). Layer names are the same on both sides where the framework allows,
so a test can assert where a finding points.
"""

from __future__ import annotations

SIZE = 16
CLASSES = 4


def _keras():
    import keras

    import torch_impl  # noqa: F401  (torch before TensorFlow)

    return keras


def _torch():
    import torch

    import torch_impl  # noqa: F401

    return torch


def _keras_net(*, conv=None, bn=None, dropout=0.0, flatten=False, fc=None, name="net"):
    """conv -> bn -> relu -> [flatten | global average pool] -> [dropout] -> fc (functional)."""
    keras = _keras()
    inputs = keras.Input((SIZE, SIZE, 3))
    conv_args = {"filters": 8, "kernel_size": 3, "strides": 1, "padding": "valid",
                 "use_bias": False, **(conv or {})}
    x = keras.layers.Conv2D(name="conv", **conv_args)(inputs)
    bn_args = {"epsilon": 1e-5, "momentum": 0.9, **(bn or {})}
    x = keras.layers.BatchNormalization(name="bn", **bn_args)(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Flatten(name="flatten")(x) if flatten else \
        keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(CLASSES, name="fc", **(fc or {}))(x)
    return keras.Model(inputs, outputs, name=name)


def _torch_net(*, stride=1, padding=0, bias=False, eps=1e-5, momentum=0.1, dropout=0.0,
               flatten=False, dilation=1, track_running_stats=True, fc_bias=True):
    torch = _torch()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=stride, padding=padding, bias=bias,
                                  dilation=dilation)
            self.bn = nn.BatchNorm2d(8, eps=eps, momentum=momentum,
                                     track_running_stats=track_running_stats)
            self.relu = nn.ReLU()
            out = (SIZE + 2 * padding - 2 * dilation - 1) // stride + 1
            self.flatten = nn.Flatten() if flatten else None
            self.dropout = nn.Dropout(dropout) if dropout else None
            self.fc = nn.Linear(8 * out * out if flatten else 8, CLASSES, bias=fc_bias)

        def forward(self, x):
            x = self.relu(self.bn(self.conv(x)))
            x = self.flatten(x) if self.flatten is not None else x.mean(dim=(2, 3))
            if self.dropout is not None:
                x = self.dropout(x)
            return self.fc(x)

    torch.manual_seed(0)
    return Net()


# --- a correct pair ----------------------------------------------------------
def good_keras():
    return _keras_net()


def good_torch():
    return _torch_net()


# --- broken pairs: one mistake each ------------------------------------------
def bn_epsilon_keras():
    """BatchNormalization epsilon left at Keras's default 1e-3 (torch: 1e-5)."""
    return _keras_net(bn={"epsilon": 1e-3})


def bn_momentum_keras():
    """torch's momentum 0.1 copied unconverted: Keras keeps 10% of the old statistic."""
    return _keras_net(bn={"momentum": 0.1})


def same_padding_keras():
    """padding='same' at stride 2 on the even 16x16 input (torch: padding=1)."""
    return _keras_net(conv={"strides": 2, "padding": "same"})


def same_padding_torch():
    return _torch_net(stride=2, padding=1)


def dropout_keras():
    """Dropout 0.5 in Keras against 0.2 in torch."""
    return _keras_net(dropout=0.5)


def dropout_torch():
    return _torch_net(dropout=0.2)


def conv_bias_keras():
    """Keras Conv2D's default use_bias=True against torch bias=False."""
    return _keras_net(conv={"use_bias": True})


def flatten_keras():
    return _keras_net(flatten=True)


def flatten_torch():
    return _torch_net(flatten=True)


def flatten_copied_naively():
    """The pair with torch's weights copied by hand: conv OIHW -> HWIO, Linear transposed,
    and the Dense rows NOT permuted from (C, H, W) to (H, W, C)."""
    keras_model, torch_model = flatten_keras(), flatten_torch()
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    keras_model.get_layer("conv").kernel.assign(state["conv.weight"].transpose(2, 3, 1, 0))
    bn = keras_model.get_layer("bn")
    for var, key in ((bn.gamma, "weight"), (bn.beta, "bias"), (bn.moving_mean, "running_mean"),
                     (bn.moving_variance, "running_var")):
        var.assign(state[f"bn.{key}"])
    fc = keras_model.get_layer("fc")
    fc.kernel.assign(state["fc.weight"].T)  # the mistake: no row permutation
    fc.bias.assign(state["fc.bias"])
    return keras_model, torch_model


def frozen_base_keras():
    """Base (conv, bn) frozen with trainable=False inside a subclassed model: BN in
    inference mode under fit, statistics fixed."""
    keras = _keras()

    class Model(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")
            self.bn = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name="bn")
            self.fc = keras.layers.Dense(CLASSES, name="fc")

        def call(self, x, training=None):
            x = keras.ops.relu(self.bn(self.conv(x), training=training))
            return self.fc(keras.ops.mean(x, axis=(1, 2)))

    model = Model()
    model(keras.ops.zeros((1, SIZE, SIZE, 3)))
    model.conv.trainable = False
    model.bn.trainable = False
    return model


def frozen_base_torch_no_train_override():
    """The torch port of the frozen base: requires_grad False and base.eval(), in a wrapper
    WITHOUT a train() override, so the loop's model.train() puts the BN back in training."""
    model = _torch_net()
    for module in (model.conv, model.bn):
        module.requires_grad_(False)
        module.eval()
    return model


def frozen_base_torch():
    """The same, done right: train() re-applies eval() to the frozen part."""
    torch = _torch()
    model = _torch_net()
    for module in (model.conv, model.bn):
        module.requires_grad_(False)

    def train(mode=True):
        torch.nn.Module.train(model, mode)
        model.bn.eval()
        return model

    model.train = train
    model.train()
    return model


def functional_training_false_keras():
    """A trainable base called with training=False inside a functional model (the Keras
    fine-tuning recipe): under fit the graph's training=False is overridden, BN trains."""
    keras = _keras()
    base = keras.Sequential([keras.layers.Conv2D(8, 3, use_bias=False, name="conv"),
                             keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9,
                                                             name="bn"),
                             keras.layers.ReLU(name="relu")], name="base")
    inputs = keras.Input((SIZE, SIZE, 3))
    x = base(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(CLASSES, name="fc")(x)
    return keras.Model(inputs, outputs, name="functional")


def bn_inference_torch():
    """The torch twin of the recipe: base trainable, its BN kept in eval mode by train()."""
    torch = _torch()
    model = _torch_net()

    def train(mode=True):
        torch.nn.Module.train(model, mode)
        model.bn.eval()
        return model

    model.train = train
    return model


# --- bad input -----------------------------------------------------------------
def two_convs_keras():
    keras = _keras()
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inputs)
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv2")(x)
    x = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="fc")(x))


def dense_first_torch():
    """Linear where the Keras model has its conv: unpairable by kind."""
    torch = _torch()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0 = nn.Linear(3, 8)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, CLASSES)

        def forward(self, x):
            x = self.fc0(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return self.fc(self.bn(x).mean(dim=(2, 3)))

    return Net()


def not_a_model():
    return "a string"


def raises():
    raise RuntimeError("the factory could not build its model")


# --- a depthwise pair (MobileNet's building block), correct -------------------
def depthwise_keras():
    keras = _keras()
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 1, use_bias=False, name="expand")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, use_bias=False,
                                     name="depthwise")(x)
    x = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name="bn")(x)
    x = keras.layers.ReLU(6.0, name="relu6")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="fc")(x))


def depthwise_torch():
    torch = _torch()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.expand = nn.Conv2d(3, 8, 1, bias=False)
            self.depthwise = nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=False)
            self.bn = nn.BatchNorm2d(16)
            self.relu6 = nn.ReLU6()
            self.fc = nn.Linear(16, CLASSES)

        def forward(self, x):
            x = self.relu6(self.bn(self.depthwise(self.expand(x))))
            return self.fc(x.mean(dim=(2, 3)))

    return Net()


# --- a real ecosystem pair ------------------------------------------------------
MOBILENET_SIZE = 32


def mobilenet_v2_keras():
    """keras.applications.MobileNetV2, random weights, 32x32 input (small and fast)."""
    keras = _keras()
    return keras.applications.MobileNetV2(weights=None,
                                          input_shape=(MOBILENET_SIZE, MOBILENET_SIZE, 3))


def mobilenet_v2_torch():
    """torchvision's mobilenet_v2, random weights (seed 0)."""
    torch = _torch()
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(weights=None)


def frozen_bn_torch():
    """The frozen base with torchvision's FrozenBatchNorm2d: no train() override needed."""
    _torch()  # torch_impl (torch, torchvision) before anything else
    from torchvision.ops import FrozenBatchNorm2d

    model = _torch_net()
    frozen = FrozenBatchNorm2d(8, eps=1e-5)
    frozen.load_state_dict(model.bn.state_dict(), strict=False)
    model.bn = frozen
    model.conv.requires_grad_(False)
    return model


# --- dataflow: branches called in another order, and what the graph cannot decide --------
def _block_keras(shortcut_first: bool, same_branches: bool = False, name: str = "block"):
    """conv -> bn -> relu, then a residual block whose shortcut is a 1x1 conv + BN; with
    ``same_branches`` the main branch is a 1x1 conv + BN too (the two are interchangeable)."""
    keras = _keras()
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)

    def shortcut(t):
        t = keras.layers.Conv2D(16, 1, use_bias=False, name="shortcut")(t)
        return keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name="shortcut_bn")(t)

    def main(t):
        kernel = 1 if same_branches else 3
        t = keras.layers.Conv2D(16, kernel, padding="same", use_bias=False, name="main")(t)
        return keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name="main_bn")(t)

    if shortcut_first:
        s = shortcut(x)
        m = main(x)
    else:
        m = main(x)
        s = shortcut(x)
    x = keras.layers.ReLU(name="out_relu")(keras.layers.Add(name="add")([m, s]))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="fc")(x), name=name)


def _block_torch(same_branches: bool = False):
    torch = _torch()
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.stem_bn = nn.BatchNorm2d(8)
            kernel = 1 if same_branches else 3
            self.main = nn.Conv2d(8, 16, kernel, padding=kernel // 2, bias=False)
            self.main_bn = nn.BatchNorm2d(16)
            self.shortcut = nn.Conv2d(8, 16, 1, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, CLASSES)

        def forward(self, x):
            x = torch.relu(self.stem_bn(self.stem(x)))
            out = self.main_bn(self.main(x))  # the main branch first, the shortcut after
            out += self.shortcut_bn(self.shortcut(x))
            return self.fc(torch.relu(out).mean(dim=(2, 3)))

    torch.manual_seed(0)
    return Block()


def shortcut_first_keras():
    """A residual block whose Keras model calls the shortcut conv before the main branch
    (as keras.applications.ResNet50 does); its torch twin calls it after."""
    return _block_keras(shortcut_first=True)


def shortcut_after_torch():
    return _block_torch()


def twin_branches_keras():
    """Two branches of the same kind and shapes from the same input, added: the dataflow
    graph cannot tell which Keras branch is which torch branch."""
    return _block_keras(shortcut_first=True, same_branches=True)


def twin_branches_torch():
    return _block_torch(same_branches=True)


# --- stochastic depth and drop-connect dropout --------------------------------------------
def drop_path_keras(rate: float = 0.2):
    """A residual conv whose branch has Keras's drop-connect (EfficientNet's
    Dropout(noise_shape=(None, 1, 1, 1))) before the add."""
    keras = _keras()
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    y = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="branch")(x)
    y = keras.layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name="drop")(y)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="fc")(x))


def drop_path_torch(rate: float = 0.2, mode: str = "row"):
    """The torch twin with torchvision's StochasticDepth(rate, mode) on the branch."""
    torch = _torch()
    nn = torch.nn
    from torchvision.ops import StochasticDepth

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.branch = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.drop = StochasticDepth(rate, mode)
            self.fc = nn.Linear(8, CLASSES)

        def forward(self, x):
            x = self.stem(x)
            return self.fc((x + self.drop(self.branch(x))).mean(dim=(2, 3)))

    torch.manual_seed(0)
    return Net()


def drop_path_batch_torch():
    """StochasticDepth in 'batch' mode: one draw for the whole batch, not one per sample."""
    return drop_path_torch(mode="batch")


def drop_path_rate_torch():
    return drop_path_torch(rate=0.3)


# --- GELU: exact against the tanh approximation ---------------------------------------------
def gelu_tanh_keras():
    """A Dense block with keras.activations.gelu(approximate=True) (torch: exact nn.GELU())."""
    import functools

    keras = _keras()
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    gelu = functools.partial(keras.activations.gelu, approximate=True)
    x = keras.layers.Dense(16, activation=gelu, name="fc1")(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="fc")(x))


def gelu_torch():
    torch = _torch()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, bias=False)
            self.fc1 = nn.Linear(8, 16)
            self.gelu = nn.GELU()
            self.fc = nn.Linear(16, CLASSES)

        def forward(self, x):
            return self.fc(self.gelu(self.fc1(self.conv(x).mean(dim=(2, 3)))))

    torch.manual_seed(0)
    return Net()


# --- a parameter of a non-leaf module used other than as a per-channel scale -------------
def class_token_torch():
    """A module whose own parameter (a class token, as in a vision transformer) is joined to
    the features with torch.cat: no Keras layer holds such a thing in the port check."""
    torch = _torch()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.token = nn.Parameter(torch.zeros(1, 8))
            self.fc = nn.Linear(8, CLASSES)

        def forward(self, x):
            features = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
            tokens = torch.cat([self.token.expand(len(x), -1)[:, None], features[:, None]], 1)
            return self.fc(tokens.mean(dim=1))

    torch.manual_seed(0)
    return Net()


# --- preprocessing inside the model, on both sides ------------------------------------------
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def imagenet_normalization_keras():
    """keras.applications.ConvNeXt's PreStem: a Normalization with ImageNet's mean and
    variance (x 255), then a conv."""
    keras = _keras()
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Normalization(mean=list(IMAGENET_MEAN),
                                   variance=[s ** 2 for s in IMAGENET_STD], name="norm")(inputs)
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="fc")(x))


def imagenet_normalize_torch(normalize: bool = True):
    """The torch twin: torchvision.transforms.Normalize as the model's first module (or,
    ``normalize=False``, none: the data would have to come normalised)."""
    torch = _torch()
    nn = torch.nn
    from torchvision.transforms import Normalize

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = Normalize(IMAGENET_MEAN, IMAGENET_STD) if normalize else nn.Identity()
            self.conv = nn.Conv2d(3, 8, 3, bias=False)
            self.fc = nn.Linear(8, CLASSES)

        def forward(self, x):
            return self.fc(self.conv(self.norm(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    return Net()


def untraceable_keras():
    """A subclassed model whose call reads a value (``float(...)``): it runs eagerly but
    cannot be traced into a graph, so its dataflow is unknown (conv, bn, fc in call order)."""
    keras = _keras()

    class Model(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")
            self.bn = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name="bn")
            self.fc = keras.layers.Dense(CLASSES, name="fc")

        def call(self, x, training=None):
            x = keras.ops.relu(self.bn(self.conv(x), training=training))
            scale = 1.0 if float(keras.ops.max(x)) >= 0 else -1.0  # a value, not a tensor
            return self.fc(keras.ops.mean(x, axis=(1, 2)) * scale)

    model = Model()
    model(keras.ops.zeros((1, SIZE, SIZE, 3)))
    return model


# --- one difference each, for every finding code (tests/test_port_seeded.py) ----------------
def bn_momentum_085_keras():
    """Keras BatchNormalization momentum 0.85 against torch's 0.1 (Keras 0.9 would match):
    the moving statistics keep 85% of the old value, torch 90%."""
    return _keras_net(bn={"momentum": 0.85})


def bn_no_running_stats_torch():
    """torch BatchNorm2d(track_running_stats=False): batch statistics even in eval mode."""
    return _torch_net(track_running_stats=False)


def bn_no_center_keras():
    """Keras BatchNormalization(center=False): no beta, where torch's affine BN has a bias."""
    return _keras_net(bn={"center": False})


def conv_stride2_keras():
    """Conv2D strides=2 where the torch conv has stride 1."""
    return _keras_net(conv={"strides": 2})


def conv_dilation2_keras():
    """Conv2D dilation_rate=2 where the torch conv has dilation 1."""
    return _keras_net(conv={"dilation_rate": 2})


def dense_no_bias_keras():
    """Dense(use_bias=False) where torch's Linear has a bias."""
    return _keras_net(fc={"use_bias": False})


def depthwise_as_dense_conv_torch():
    """The depthwise pair's torch side with groups=1 (a full convolution) where Keras has a
    DepthwiseConv2D."""
    torch = _torch()
    nn = torch.nn
    model = depthwise_torch()
    model.depthwise = nn.Conv2d(8, 16, 3, padding=1, groups=1, bias=False)
    return model


def _ln_keras(epsilon: float):
    keras = _keras()
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(8, name="hidden")(x)
    x = keras.layers.LayerNormalization(epsilon=epsilon, name="ln")(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="fc")(x), name="ln_net")


def ln_keras():
    """conv -> pool -> dense -> LayerNormalization(epsilon=1e-5) -> fc."""
    return _ln_keras(1e-5)


def ln_default_epsilon_keras():
    """The same with Keras's default LayerNormalization epsilon, 1e-3 (torch: 1e-5)."""
    return _ln_keras(1e-3)


def ln_torch():
    torch = _torch()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, bias=False)
            self.hidden = nn.Linear(8, 8)
            self.ln = nn.LayerNorm(8)
            self.fc = nn.Linear(8, CLASSES)

        def forward(self, x):
            return self.fc(self.ln(self.hidden(self.conv(x).mean(dim=(2, 3)))))

    torch.manual_seed(0)
    return Net()


def keras_sgd(learning_rate: float = 0.01, **kwargs):
    return _keras().optimizers.SGD(learning_rate=learning_rate, **kwargs)


def good_keras_sgd():
    """The good pair's Keras side with its own SGD (lr 0.01)."""
    return good_keras(), keras_sgd(0.01)


def good_torch_sgd_lr3x():
    """The good pair's torch side with an SGD at 3x the Keras learning rate (0.03)."""
    torch = _torch()
    model = good_torch()
    return model, torch.optim.SGD(model.parameters(), lr=0.03)


def good_torch_adam():
    """The good pair's torch side with Adam where the Keras side has SGD."""
    torch = _torch()
    model = good_torch()
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def _tinyconv_full(framework: str, learning_rate: float):
    """The project's tinyconv under ``full`` (every tensor trains, BN on batch statistics),
    with the framework's plain SGD at ``learning_rate``."""
    torch = _torch()
    from shared.frameworks import load

    torch.manual_seed(0)
    model_mod, freeze = load(framework, "model"), load(framework, "freeze")
    if framework == "tf":
        from tf_impl.train import norm_layer_for

        model = freeze.apply_strategy(model_mod.build_model(
            "tinyconv", 5, norm_layer=norm_layer_for("tinyconv", "full")), "full")
        return model, keras_sgd(learning_rate)
    model = freeze.apply_strategy(model_mod.build_model("tinyconv", 5), "full")
    return model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                  lr=learning_rate)


def tinyconv_full_keras():
    """tinyconv ``full``, Keras SGD lr 0.01."""
    return _tinyconv_full("tf", 0.01)


def tinyconv_full_torch():
    """tinyconv ``full``, torch SGD lr 0.01 (the matched port)."""
    return _tinyconv_full("torch", 0.01)


def tinyconv_full_torch_lr3x():
    """tinyconv ``full``, torch SGD lr 0.03: a 3x learning rate."""
    return _tinyconv_full("torch", 0.03)


def same_padding_stride1_keras():
    """Conv2D padding='same' at stride 1 (pads 1 on every side) where torch pads 0."""
    return _keras_net(conv={"padding": "same"})


def relu6_keras():
    """ReLU(max_value=6) where torch's model has a plain ReLU."""
    keras = _keras()
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name="bn")(x)
    x = keras.layers.ReLU(max_value=6.0, name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="fc")(x), name="relu6_net")


def stride_on_1x1_keras():
    """A downsampling pair of convolutions with the stride on the first 1x1 (Keras
    ResNet50, v1)."""
    keras = _keras()
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 1, strides=2, use_bias=False, name="reduce")(inputs)
    x = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name="reduce_bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.ZeroPadding2D(1, name="pad")(x)
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv3")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="fc")(x), name="v1")


def stride_on_3x3_torch():
    """The same pair with the stride on the 3x3 (torchvision's resnet50, v1.5)."""
    torch = _torch()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.reduce = nn.Conv2d(3, 8, 1, bias=False)
            self.reduce_bn = nn.BatchNorm2d(8)
            self.conv3 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
            self.fc = nn.Linear(8, CLASSES)

        def forward(self, x):
            x = self.conv3(torch.relu(self.reduce_bn(self.reduce(x))))
            return self.fc(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    return Net()


def imagenet_normalize_torch_none():
    """The ImageNet pair's torch side without its Normalize: the Keras model normalises
    inside, the torch model does not."""
    return imagenet_normalize_torch(False)


# --- transformer layers: self-attention over patch tokens, LoRA on a dense layer ---------
def _attention_keras(heads: int = 2, use_bias: bool = True):
    """conv (4x4 patches) -> 16 tokens of width 8 -> MultiHeadAttention -> mean -> fc."""
    keras = _keras()
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 4, strides=4, name="conv")(inputs)
    x = keras.layers.Reshape((16, 8), name="tokens")(x)
    x = keras.layers.MultiHeadAttention(heads, 8 // heads, use_bias=use_bias, name="attn")(x, x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="fc")(x))


def attention_keras():
    return _attention_keras()


def attention_four_heads_keras():
    """The same projections split into 4 heads (torch: 2): same shapes, another function."""
    return _attention_keras(heads=4)


def attention_no_bias_keras():
    """MultiHeadAttention(use_bias=False) against torch's default bias=True."""
    return _attention_keras(use_bias=False)


def attention_torch():
    """The same with nn.MultiheadAttention(8, 2, batch_first=True) (in_proj_weight, out_proj)."""
    torch = _torch()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 4, stride=4)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, CLASSES)

        def forward(self, x):
            x = self.conv(x).flatten(2).transpose(1, 2)
            return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(dim=1))

    torch.manual_seed(0)
    return Net()


def attention_copied_untransposed():
    """The attention pair with torch's weights copied by hand, every one right but the
    query/key/value kernels: in_proj_weight's (out, in) rows reshaped into Keras's (in,
    heads, head_dim) kernels with no transpose (square: the shapes fit)."""
    keras_model, torch_model = attention_keras(), attention_torch()
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    keras_model.get_layer("conv").kernel.assign(state["conv.weight"].transpose(2, 3, 1, 0))
    keras_model.get_layer("conv").bias.assign(state["conv.bias"])
    attn = keras_model.get_layer("attn")
    width = state["attn.out_proj.weight"].shape[0]
    parts = (attn.query_dense, attn.key_dense, attn.value_dense)
    for i, dense in enumerate(parts):
        rows = slice(i * width, (i + 1) * width)
        dense.kernel.assign(state["attn.in_proj_weight"][rows].reshape(dense.kernel.shape))
        dense.bias.assign(state["attn.in_proj_bias"][rows].reshape(dense.bias.shape))
    out = attn.output_dense
    out.kernel.assign(state["attn.out_proj.weight"].T.reshape(out.kernel.shape))  # right
    out.bias.assign(state["attn.out_proj.bias"])
    keras_model.get_layer("fc").kernel.assign(state["fc.weight"].T)
    keras_model.get_layer("fc").bias.assign(state["fc.bias"])
    return keras_model, torch_model


def _lora_keras(rank: int | None = 2, alpha: float = 4.0):
    """conv -> pool -> hidden Dense (LoRA rank, alpha) -> fc; every variable but the adapter
    frozen."""
    model = _ln_free_keras()
    if rank:
        model.get_layer("hidden").enable_lora(rank, lora_alpha=alpha)
    for variable in model.weights:  # as PEFT's inject_adapter_in_model leaves torch's
        # (without an adapter the hidden layer trains whole)
        variable.trainable = ("lora_kernel" in variable.path
                              or (not rank and variable.path.startswith("hidden/")))
    return model


def _ln_free_keras():
    keras = _keras()
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(8, name="hidden")(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="fc")(x))


def lora_keras():
    return _lora_keras()


def lora_none_keras():
    """The hidden Dense without an adapter (torch: PEFT LoRA rank 2)."""
    return _lora_keras(rank=None)


def lora_rank4_keras():
    """LoRA rank 4, alpha 8 (torch: rank 2, alpha 4): the same scale, another rank."""
    return _lora_keras(rank=4, alpha=8.0)


def lora_alpha_default_keras():
    """enable_lora(2) with Keras's default lora_alpha (= rank: scale 1; torch alpha 4: 2)."""
    return _lora_keras(rank=2, alpha=2.0)


def _lora_torch(dropout: float = 0.0):
    torch = _torch()
    nn = torch.nn
    from peft import LoraConfig, inject_adapter_in_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, bias=False)
            self.hidden = nn.Linear(8, 8)
            self.fc = nn.Linear(8, CLASSES)

        def forward(self, x):
            return self.fc(self.hidden(self.conv(x).mean(dim=(2, 3))))

    torch.manual_seed(0)
    net = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, lora_dropout=dropout,
                                             target_modules=["hidden"]), Net())
    with torch.no_grad():  # PEFT starts lora_B at zero: a non-zero adapter shows in outputs
        net.hidden.lora_B["default"].weight.normal_(0.0, 0.1)
    return net


def lora_torch():
    """PEFT LoRA (r=2, lora_alpha=4) on the hidden Linear."""
    return _lora_torch()


def lora_dropout_torch():
    """The same with lora_dropout=0.1 (Keras's enable_lora has none)."""
    return _lora_torch(dropout=0.1)
