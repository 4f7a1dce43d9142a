"""torchvision models as the port check's families use them. Mirrors
``tf_impl/applications.py``.

``build("ResNet50")`` is ``torchvision.models.resnet50(weights=None)`` (seed 0) with
its classifier replaced by ``nn.Identity()``: what its own ``forward`` computes before
the classifier (DenseNet's final ReLU and pooling included). VGG's own pooling is 7x7
and its classifier three Linears, so its twin of Keras's ``pooling="avg"`` is
``features`` and a global average pool; ConvNeXt keeps its classifier's LayerNorm2d
(Keras ends with a LayerNormalization too).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from shared.port.families import FAMILIES, SIZE

__all__ = ["build"]


def build(family: str, size: int = SIZE, **options) -> nn.Module:
    """``family`` (a FAMILIES key, or any torchvision.models builder) without its classifier;
    ``size`` is unused (a torch model takes any input)."""
    name = FAMILIES[family][1] if family in FAMILIES else family
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **options)
    if name.startswith("vgg"):
        return nn.Sequential(model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        model.fc = nn.Identity()
    elif name.startswith("convnext"):
        model.classifier[2] = nn.Identity()
    else:
        model.classifier = nn.Identity()
    return model
