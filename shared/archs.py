"""Architecture configurations shared by both frameworks.

One config object drives the Keras and the PyTorch builder, so the two
compute the same function: same channels, strides, explicit padding and the
same BatchNorm epsilon and momentum.

Momentum convention: every momentum here is **torch's**:
``running = (1 - m) * running + m * batch``. Keras's BatchNormalization
momentum is the weight of the *old* value, so the Keras builder passes
``1 - m`` (see :func:`keras_momentum`).
"""

from __future__ import annotations

from dataclasses import dataclass

ARCHS = ("tinyconv", "resnet18", "vit")
# The archs every step of the fine-tuning pipeline (pretrain, run, compare, bench, explain)
# takes.
PIPELINE_ARCHS = ("tinyconv", "resnet18")
# The archs `pretrain` and `run` take: vit too (its strategies: no BatchNorm, dropout and
# drop-path instead; tests/test_vit_strategies.py). bench and explain do not take vit yet
# (explain's decomposition is of BatchNorm's statistics).
RUN_ARCHS = ("tinyconv", "resnet18", "vit")
# The archs `compare` takes: vit's verdicts run with its dropout rates at 0 (verdict_config,
# RunConfig.base_dropout), its train/eval trap on each framework's runs with them on
# (shared/matrix.py).
COMPARE_ARCHS = ("tinyconv", "resnet18", "vit")


@dataclass(frozen=True)
class TinyConvConfig:
    # Three conv -> BN -> ReLU blocks; the stride-2 ones halve the resolution.
    channels: tuple[int, ...] = (16, 32, 32)
    strides: tuple[int, ...] = (1, 2, 2)
    # 3x3 kernels with explicit symmetric zero padding of 1 on each side
    # (never Keras padding='same', which pads bottom/right only at stride 2).
    kernel_size: int = 3
    # torch's default epsilon; Keras's default (1e-3) would change the function.
    bn_epsilon: float = 1e-5
    # torch convention (see module docstring); Keras gets 1 - 0.1 = 0.9.
    bn_momentum: float = 0.1
    # Input resolution the data pipeline produces (NHWC 32x32x3).
    image_size: int = 32

    @property
    def feature_dim(self) -> int:
        return self.channels[-1]

    @property
    def padding(self) -> int:
        return self.kernel_size // 2


@dataclass(frozen=True)
class ResNet18Config:
    # torchvision's ResNet-18 (v1.5: stride on the 3x3 conv), BN defaults of torch.
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.1
    # Small resolution so pretraining on the digits runs in seconds on a CPU.
    image_size: int = 32
    feature_dim: int = 512


@dataclass(frozen=True)
class ViTConfig:
    """A small Vision Transformer (timm's ``VisionTransformer``): class token, pre-norm blocks."""

    # 32x32x3 images in 4x4 patches: an 8x8 grid of 64 patch tokens plus the class token.
    image_size: int = 32
    patch_size: int = 4
    # embed_dim; the class token's final-LayerNorm output is the feature vector.
    width: int = 64
    depth: int = 4
    heads: int = 4
    # hidden width of each block's MLP (timm's mlp_ratio = mlp_dim / width = 2)
    mlp_dim: int = 128
    # timm's ViT default. torch's nn.LayerNorm defaults to 1e-5 and Keras's
    # LayerNormalization to 1e-3: either default would change the function.
    layer_norm_epsilon: float = 1e-6
    # GELU as timm's nn.GELU: exact (erf). Keras's gelu defaults to approximate=True (tanh).
    gelu_approximate: bool = False
    # Dropout on the attention probabilities (timm attn_drop_rate, Keras MHA dropout=).
    attention_dropout: float = 0.1
    # Dropout after the attention projection and after each MLP layer (timm proj_drop_rate).
    dropout: float = 0.1
    # Stochastic depth of the last block; block i drops its residual branches with
    # drop_path * i / (depth - 1) (timm's linear decay rule). These three rates are what
    # freezing a ViT is about: requires_grad or trainable=False switches none of them off.
    drop_path: float = 0.1

    @property
    def feature_dim(self) -> int:
        return self.width

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def drop_path_rates(self) -> tuple[float, ...]:
        if self.depth == 1:
            return (0.0,)
        return tuple(self.drop_path * i / (self.depth - 1) for i in range(self.depth))

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"ViTConfig: width {self.width} is not a multiple of heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")


def arch_config(arch: str):
    if arch == "tinyconv":
        return TinyConvConfig()
    if arch == "resnet18":
        return ResNet18Config()
    if arch == "vit":
        return ViTConfig()
    raise ValueError(f"unknown arch {arch!r}; expected one of: {', '.join(ARCHS)}")


def verdict_config(arch: str):
    """The config the lockstep and float64 verdict runs of ``arch`` build; free runs build
    :func:`arch_config`.

    vit: dropout, attention dropout and drop-path rates 0 (``dataclasses.replace``). Their
    masks are drawn by each framework's own generator, so a Keras step from torch's state
    cannot take torch's masks: with them on, one step's difference is the masks', not the
    frameworks' arithmetic. Zeroed, the training-mode step is deterministic and the sharp
    one-step and float64 verdicts apply; that freezing leaves dropout on (train != eval) is
    measured on the free runs, which keep the rates. tinyconv and resnet18 have no dropout
    in the base: their config unchanged.
    """
    import dataclasses

    config = arch_config(arch)
    if isinstance(config, ViTConfig):
        return dataclasses.replace(config, dropout=0.0, attention_dropout=0.0, drop_path=0.0)
    return config


def has_base_dropout(arch: str) -> bool:
    """Whether ``arch``'s base draws random masks in training mode (dropout, drop-path):
    whether its verdict runs build :func:`verdict_config` rather than :func:`arch_config`."""
    return verdict_config(arch) != arch_config(arch)


def model_config(arch: str, base_dropout: bool = True):
    """The config a run of ``arch`` builds: :func:`arch_config`, or with ``base_dropout``
    False (``RunConfig.base_dropout``) :func:`verdict_config`."""
    return arch_config(arch) if base_dropout else verdict_config(arch)


def _down(size: int, stride: int) -> int:
    return -(-size // stride)  # 3x3 (or 7x7) padded convolutions and pools: ceil(size / stride)


def bn_reduction_sizes(arch: str, batch_size: int) -> dict[str, int]:
    """Canonical BatchNorm prefix -> the number of values one channel's batch mean is over
    (batch x height x width of that BatchNorm's input)."""
    config = arch_config(arch)
    size, out = config.image_size, {}
    if isinstance(config, ViTConfig):
        return out  # LayerNorm only: no batch statistics
    if isinstance(config, TinyConvConfig):
        for i, stride in enumerate(config.strides, start=1):
            size = _down(size, stride)
            out[f"base.block{i}.bn"] = batch_size * size * size
        return out
    size = _down(size, 2)  # conv1, stride 2
    out["base.bn1"] = batch_size * size * size
    size = _down(size, 2)  # maxpool
    for layer in range(1, 5):
        stride = 1 if layer == 1 else 2
        for block in range(2):
            if block == 0:
                size = _down(size, stride)
                if stride != 1:
                    out[f"base.layer{layer}.0.downsample.1"] = batch_size * size * size
            for bn in ("bn1", "bn2"):
                out[f"base.layer{layer}.{block}.{bn}"] = batch_size * size * size
    return out


def require_pipeline_arch(arch: str, where: str, archs: tuple[str, ...] = PIPELINE_ARCHS) -> None:
    """Raise a one-line error when ``where`` (a pipeline step taking ``archs``) does not take
    ``arch`` yet."""
    if arch in ARCHS and arch not in archs:
        raise ValueError(f"{where}: arch {arch!r} is not in this part of the fine-tuning "
                         f"pipeline yet (it takes {', '.join(archs)}); build it with "
                         f"build_model({arch!r}, num_classes)")


def keras_momentum(torch_momentum: float) -> float:
    """Keras BatchNormalization momentum equivalent to torch's ``momentum``."""
    return 1.0 - torch_momentum
