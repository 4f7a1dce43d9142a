"""Vision Transformer in Keras (NHWC), weight-compatible with timm's ``VisionTransformer``.

Same function as timm's (``torch_impl/vit.py`` uses timm's model itself): a
patch embedding (a Conv2D with kernel = stride = patch, 'valid'), the class
token prepended and a learned position embedding added, ``depth`` pre-norm
blocks ``x + drop_path(proj_drop(attn(norm1(x))))`` then
``x + drop_path(mlp(norm2(x)))``, a final LayerNorm, the class token out.

Each container's :meth:`named_children` returns timm's state_dict path
segments (``patch_embed.proj``, ``blocks.0.norm1``, ``blocks.0.attn``,
``blocks.0.mlp.fc1``, ``norm``), so ``tf_impl/weights.py`` derives timm's
canonical keys. Two leaves differ in layout only: timm's fused ``attn.qkv``
is Keras's MultiHeadAttention query/key/value kernels, its ``attn.proj`` the
MHA output kernel; ``weights.py`` splits and fuses them.

Freezing traps: ``trainable=False`` switches none of the Dropout layers, the
MHA's attention dropout or :class:`DropPath` off; only ``training=False`` does.
"""

from __future__ import annotations

import keras
from keras import ops

from shared.archs import ViTConfig
from tf_impl.model import NamedSequence

__all__ = ["Block", "Blocks", "DropPath", "Mlp", "PatchEmbed", "ViTBase", "Weight", "gelu",
           "vit_base"]

_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2), float64


def gelu(x, approximate: bool = False):
    """GELU; exact: 0.5 x (1 + erf(x / sqrt(2))), written out.

    Not ``ops.gelu(x, approximate=False)``: TensorFlow's exact gelu casts the Python float
    1 / sqrt(2) to the input's dtype through a float32 tensor, so in float64 it is 5e-9
    off (tests/test_vit.py pins it). A Python float multiplied in takes x's dtype exactly.
    ``approximate=True`` is Keras's default, the tanh approximation.
    """
    if approximate:
        return ops.gelu(x, approximate=True)
    return 0.5 * x * (1.0 + ops.erf(x * _SQRT_HALF))


def vit_base(config: ViTConfig) -> ViTBase:
    """Keras ViT base: NHWC images -> (N, width) class-token features, canonical child names."""
    return ViTBase(config, name="base")


class Weight(keras.layers.Layer):
    """One bare tensor of the model (timm's ``cls_token``, ``pos_embed``): canonical key = path."""

    def __init__(self, shape: tuple[int, ...], **kwargs):
        super().__init__(**kwargs)
        # timm: trunc_normal_(std=.02) for pos_embed, normal_(std=1e-6) for cls_token;
        # runs load canonical tensors anyway
        self.tensor = self.add_weight(shape=shape, name="tensor",
                                      initializer=keras.initializers.TruncatedNormal(stddev=0.02))

    def call(self, x=None):
        return self.tensor


class DropPath(keras.layers.Layer):
    """Stochastic depth (timm's ``DropPath``): zero a sample's residual branch with ``rate``,
    scale the kept ones by 1 / (1 - rate). Active only when called with ``training=True``,
    whatever ``trainable`` says (as Dropout)."""

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"DropPath {self.name!r}: rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        mask = ops.floor(keep + keras.random.uniform(shape, seed=self.seed_generator, dtype=x.dtype))
        return x * mask / keep


class PatchEmbed(keras.layers.Layer):
    """timm's ``patch_embed``: ``proj`` (Conv2D, kernel = stride = patch) -> (N, patches, width)."""

    def __init__(self, config: ViTConfig, **kwargs):
        super().__init__(**kwargs)
        self.num_patches, self.width = config.num_patches, config.width
        self.proj = keras.layers.Conv2D(config.width, config.patch_size, strides=config.patch_size,
                                        padding="valid", use_bias=True, name="proj")

    def call(self, x):
        # (N, H/p, W/p, width) row-major = timm's flatten(2).transpose(1, 2) of NCHW
        return ops.reshape(self.proj(x), (-1, self.num_patches, self.width))

    def named_children(self):
        return [("proj", self.proj)]


class Mlp(keras.layers.Layer):
    """timm's ``Mlp``: fc1 -> GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, config: ViTConfig, **kwargs):
        super().__init__(**kwargs)
        self.fc1 = keras.layers.Dense(config.mlp_dim, name="fc1")
        # timm's nn.GELU is exact (erf); Keras's gelu defaults to the tanh approximation
        self.approximate = config.gelu_approximate
        self.drop1 = keras.layers.Dropout(config.dropout)
        self.fc2 = keras.layers.Dense(config.width, name="fc2")
        self.drop2 = keras.layers.Dropout(config.dropout)

    def call(self, x, training=None):
        x = self.drop1(gelu(self.fc1(x), self.approximate), training=training)
        return self.drop2(self.fc2(x), training=training)

    def named_children(self):
        return [("fc1", self.fc1), ("fc2", self.fc2)]


class Block(keras.layers.Layer):
    """timm's pre-norm ``Block`` (no layer scale)."""

    def __init__(self, config: ViTConfig, drop_path: float, **kwargs):
        super().__init__(**kwargs)
        eps = config.layer_norm_epsilon  # timm's 1e-6, not Keras's default 1e-3
        self.norm1 = keras.layers.LayerNormalization(epsilon=eps, name="norm1")
        # dropout= drops attention probabilities, as timm's attn_drop
        self.attn = keras.layers.MultiHeadAttention(config.heads, config.head_dim,
                                                    dropout=config.attention_dropout,
                                                    use_bias=True, name="attn")
        self.proj_drop = keras.layers.Dropout(config.dropout)  # timm's attn.proj_drop
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = keras.layers.LayerNormalization(epsilon=eps, name="norm2")
        self.mlp = Mlp(config, name="mlp")
        self.drop_path2 = DropPath(drop_path)

    def call(self, x, training=None):
        y = self.norm1(x)
        y = self.proj_drop(self.attn(y, y, training=training), training=training)
        x = x + self.drop_path1(y, training=training)
        return x + self.drop_path2(self.mlp(self.norm2(x), training=training), training=training)

    def named_children(self):
        return [("norm1", self.norm1), ("attn", self.attn), ("norm2", self.norm2),
                ("mlp", self.mlp)]


class Blocks(NamedSequence):
    """timm's ``blocks``: an ``nn.Sequential`` of blocks named ``"0"``, ``"1"``, ..."""


class ViTBase(keras.layers.Layer):
    """Class token + patches, position embedding, blocks, final LayerNorm, class token out."""

    def __init__(self, config: ViTConfig, **kwargs):
        super().__init__(**kwargs)
        self.width, self.feature_dim = config.width, config.feature_dim
        self.cls_token = Weight((1, 1, config.width), name="cls_token")
        self.pos_embed = Weight((1, config.num_patches + 1, config.width), name="pos_embed")
        self.patch_embed = PatchEmbed(config, name="patch_embed")
        self.blocks = Blocks([Block(config, rate, name=str(i))
                              for i, rate in enumerate(config.drop_path_rates)], name="blocks")
        self.norm = keras.layers.LayerNormalization(epsilon=config.layer_norm_epsilon, name="norm")

    def call(self, x, training=None):
        x = self.patch_embed(x)
        cls = ops.broadcast_to(self.cls_token(), (ops.shape(x)[0], 1, self.width))
        # timm: concatenate the class token first, then add pos_embed over every token
        x = ops.concatenate([ops.cast(cls, x.dtype), x], axis=1) + self.pos_embed()
        x = self.norm(self.blocks(x, training=training))
        return x[:, 0]  # global_pool 'token'

    def named_children(self):
        return [("cls_token", self.cls_token), ("pos_embed", self.pos_embed),
                ("patch_embed", self.patch_embed), ("blocks", self.blocks), ("norm", self.norm)]
