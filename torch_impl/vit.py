"""Vision Transformer: timm's own ``VisionTransformer`` as the base (NCHW images).

The base *is* ``timm.models.vision_transformer.VisionTransformer`` with
``num_classes=0`` (its ``head`` is ``nn.Identity``; the project's
:class:`~torch_impl.model.Head` is separate), so canonical keys are timm's
state_dict keys under ``base.`` (``base.blocks.0.attn.qkv.weight``).
``tf_impl/vit.py`` builds the same function in Keras with the same names.

Freezing traps live here: ``requires_grad_(False)`` leaves the attention
dropout, the projection/MLP dropout and timm's ``DropPath`` active whenever
the module is in ``train()`` mode; only ``eval()`` switches them off.
"""

from __future__ import annotations

import functools

# timm imports torchvision: before TensorFlow, or the process segfaults (docs/PORTING.md)
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from shared.archs import ViTConfig

__all__ = ["vit_base"]


def vit_base(config: ViTConfig) -> nn.Module:
    """timm's ViT (NCHW images -> (N, width) class-token features), randomly initialised.

    No pretrained download: weights come in through the canonical form.
    """
    return VisionTransformer(
        img_size=config.image_size, patch_size=config.patch_size, in_chans=3,
        num_classes=0,  # head = nn.Identity: forward returns the pooled class token
        global_pool="token", class_token=True,
        embed_dim=config.width, depth=config.depth, num_heads=config.heads,
        mlp_ratio=config.mlp_dim / config.width, qkv_bias=True,
        # every LayerNorm (norm1, norm2, the final norm) with the config's epsilon, not
        # torch's 1e-5
        norm_layer=functools.partial(nn.LayerNorm, eps=config.layer_norm_epsilon),
        act_layer=functools.partial(nn.GELU, approximate="tanh" if config.gelu_approximate
                                    else "none"),
        # drop_rate is timm's dropout after pooling (head_drop): the project's Head has its
        # own; pos_drop_rate (after the position embedding) is not in the config either
        drop_rate=0.0, pos_drop_rate=0.0,
        attn_drop_rate=config.attention_dropout, proj_drop_rate=config.dropout,
        drop_path_rate=config.drop_path,
    )
