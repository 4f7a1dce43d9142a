"""Models: a pretrained-style base plus a new classification head (NCHW input).

Attribute names are the canonical checkpoint names (``base.block1.conv.weight``);
``tf_impl/model.py`` builds the same tree with the same names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from shared.archs import TinyConvConfig, arch_config

__all__ = ["ConvBlock", "TinyConvBase", "Head", "FineTuneModel", "build_model", "default_norm_layer",
           "named_leaves", "HeldTensor", "is_batch_norm"]


def default_norm_layer(config, cls=nn.BatchNorm2d) -> Callable[[int], nn.Module]:
    # Same epsilon and momentum as the Keras model (torch momentum convention).
    def make(num_features: int, name: str = "bn"):
        return cls(num_features, eps=config.bn_epsilon, momentum=config.bn_momentum)
    return make


class ConvBlock(nn.Module):
    """conv (explicit symmetric zero padding, no bias) -> BatchNorm -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, config: TinyConvConfig, norm_layer):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, config.kernel_size, stride=stride,
                              padding=config.padding, bias=False)
        self.bn = norm_layer(out_ch)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class TinyConvBase(nn.Module):
    """Blocks ``block1..blockN`` then global average pooling to (N, C)."""

    def __init__(self, config: TinyConvConfig, norm_layer):
        super().__init__()
        in_ch = 3
        self.block_names = []
        for i, (out_ch, stride) in enumerate(zip(config.channels, config.strides), start=1):
            setattr(self, f"block{i}", ConvBlock(in_ch, out_ch, stride, config, norm_layer))
            self.block_names.append(f"block{i}")
            in_ch = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.block_names:
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))


class Head(nn.Module):
    """The new classification head: optional dropout, then one linear layer."""

    def __init__(self, feature_dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x))


class FineTuneModel(nn.Module):
    """``head(base(x))`` with a clear base/head split.

    Modules registered with :meth:`pin_inference` stay in eval mode through
    every later ``train()`` call: a plain ``model.train()`` would otherwise put
    a frozen base's BatchNorm back into batch-statistics mode.
    """

    def __init__(self, base: nn.Module, head: Head, arch: str, feature_dim: int):
        super().__init__()
        self.base = base
        self.head = head
        self.arch = arch
        self.feature_dim = feature_dim
        self._pinned: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    def pin_inference(self, names: list[str]) -> None:
        """Keep the named submodules (``model.get_submodule`` paths) in eval mode."""
        for name in names:
            self.get_submodule(name)  # raises AttributeError naming a bad path
        self._pinned = list(names)
        self.train(self.training)

    @property
    def pinned_inference(self) -> list[str]:
        return list(self._pinned)

    def train(self, mode: bool = True) -> FineTuneModel:
        super().train(mode)
        for name in self._pinned:
            self.get_submodule(name).eval()
        return self


class HeldTensor:
    """A parameter held directly by a module that has children (timm's ``cls_token`` and
    ``pos_embed`` on the ``VisionTransformer``), as a leaf of its own: canonical key = path,
    as Keras's ``tf_impl.vit.Weight`` layer. ``requires_grad_`` sets that tensor only (the
    owner's would recurse into every child)."""

    def __init__(self, owner: nn.Module, name: str):
        self.owner, self.name = owner, name

    @property
    def tensor(self) -> nn.Parameter:
        return getattr(self.owner, self.name)

    def parameters(self, recurse: bool = True):
        return iter([self.tensor])

    def requires_grad_(self, requires_grad: bool = True) -> HeldTensor:
        self.tensor.requires_grad_(requires_grad)
        return self


def named_leaves(module: nn.Module, prefix: str = ""):
    """``(canonical path, module)`` for every weighted leaf module under ``module``, and
    ``(path, HeldTensor)`` for every parameter a non-leaf module holds itself (none in
    tinyconv or resnet18), so every parameter is reached."""
    for name, child in module.named_modules(prefix=prefix):
        if list(child.children()):
            for key, _ in child.named_parameters(recurse=False):
                yield (f"{name}.{key}" if name else key), HeldTensor(child, key)
        elif list(child.parameters(recurse=False)) or list(child.buffers(recurse=False)):
            yield name, child


def is_batch_norm(module) -> bool:
    from torchvision.ops import FrozenBatchNorm2d

    return isinstance(module, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))


def build_model(arch: str, num_classes: int, *, head_dropout: float = 0.0,
                norm_layer: Callable[[int], nn.Module] | None = None,
                dtype: str = "float32", config=None) -> FineTuneModel:
    """A base of ``arch`` plus a new head of ``num_classes`` logits (NCHW input).

    ``dtype="float64"`` converts every parameter and buffer (used to show that
    cross-framework differences are float32 rounding, not different maths).
    """
    config = config if config is not None else arch_config(arch)  # e.g. verdict_config(arch)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if arch == "vit":
        if norm_layer is not None:
            raise ValueError("build_model: arch 'vit' has no BatchNorm to build with norm_layer "
                             "(its LayerNorm epsilon is ViTConfig.layer_norm_epsilon)")
        from torch_impl.vit import vit_base

        base = vit_base(config)
    elif arch == "tinyconv":
        base = TinyConvBase(config, norm_layer or default_norm_layer(config))
    else:
        from torch_impl.resnet import resnet18_base

        base = resnet18_base(config, norm_layer or default_norm_layer(config))
    model = FineTuneModel(base, Head(config.feature_dim, num_classes, head_dropout), arch,
                          config.feature_dim)
    return model.to(getattr(torch, dtype))
