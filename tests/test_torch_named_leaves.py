"""torch_impl.model.named_leaves reaches every parameter, timm's bare ones included."""

from __future__ import annotations

import pytest
import torch  # noqa: F401  (before TensorFlow)

from torch_impl import model as torch_model


def _old_named_leaves(module, prefix=""):
    """The definition before vit: weighted leaf modules only."""
    for name, child in module.named_modules(prefix=prefix):
        if not list(child.children()) and (list(child.parameters(recurse=False))
                                           or list(child.buffers(recurse=False))):
            yield name, child


@pytest.mark.parametrize("arch", ["tinyconv", "resnet18"])
def test_torch_named_leaves_unchanged_for_conv_archs(arch):
    net = torch_model.build_model(arch, 5)
    got = [(n, id(m)) for n, m in torch_model.named_leaves(net.base, "base")]
    assert got == [(n, id(m)) for n, m in _old_named_leaves(net.base, "base")]


def test_torch_named_leaves_vit_reaches_every_parameter():
    net = torch_model.build_model("vit", 5)
    leaves = list(torch_model.named_leaves(net.base, "base"))
    reached = {id(p) for _, leaf in leaves for p in leaf.parameters()}
    assert reached == {id(p) for p in net.base.parameters()}
    held = {n: leaf for n, leaf in leaves if isinstance(leaf, torch_model.HeldTensor)}
    assert sorted(held) == ["base.cls_token", "base.pos_embed"]  # Keras's Weight paths
    held["base.cls_token"].requires_grad_(False)
    assert not net.base.cls_token.requires_grad and net.base.pos_embed.requires_grad
    assert all(p.requires_grad for p in net.base.blocks.parameters())  # no recursion
