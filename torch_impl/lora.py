"""LoRA adapters on the ViT's attention projections, through PEFT.

timm's ``Attention`` fuses q, k and v into one ``qkv`` Linear (3 * width out): PEFT
on it is ONE rank-r adapter whose A is shared by q, k and v, which is not what
Keras's ``enable_lora`` on MultiHeadAttention's separate query/key/value layers
computes (three adapters; tests/test_lora.py measures the gap). :func:`split_qkv`
swaps each block's attention for :class:`SplitAttention` (separate ``q``, ``k``,
``v`` Linears cut from the fused weight, same function), so PEFT targets q, k, v
(and ``proj``) with rank r each. Canonical adapter keys, torch layout:
``base.blocks.0.attn.q.lora_A`` (r, in) and ``.lora_B`` (out, r); the update is
``(alpha / r) * B @ A`` (PEFT's scaling, Keras's ``lora_alpha / rank``).
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from timm.layers import Attention
from torch import nn

__all__ = ["SplitAttention", "split_qkv", "add_lora", "lora_tensors", "set_lora_tensors",
           "merge"]

TARGETS = ("q", "k", "v", "proj", "fc1", "fc2")
# targets in each block's MLP (the rest are in its attention)
_MLP = ("fc1", "fc2")
_ADAPTER = "default"


class SplitAttention(nn.Module):
    """timm's ``Attention`` with ``q``, ``k``, ``v`` Linears in place of the fused ``qkv``."""

    def __init__(self, attn: Attention):
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise ValueError("SplitAttention: timm Attention with a gate is not supported")
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.scale, self.fused_attn = attn.scale, attn.fused_attn
        width = attn.qkv.in_features
        out = attn.qkv.out_features // 3
        dtype = attn.qkv.weight.dtype
        bias = attn.qkv.bias is not None
        # rows [q; k; v] of the fused weight, as timm's reshape(B, N, 3, heads, head_dim)
        for i, name in enumerate(("q", "k", "v")):
            linear = nn.Linear(width, out, bias=bias, dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(attn.qkv.weight[i * out:(i + 1) * out])
                if bias:
                    linear.bias.copy_(attn.qkv.bias[i * out:(i + 1) * out])
            setattr(self, name, linear)
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, attn.norm
        self.attn_drop, self.proj, self.proj_drop = attn.attn_drop, attn.proj, attn.proj_drop

    def _heads(self, x):
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise ValueError("SplitAttention: attn_mask / is_causal are not supported")
        b, n, _ = x.shape
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:  # timm's own two paths, the same way
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        x = self.norm(x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        return self.proj_drop(self.proj(x))


def split_qkv(base: nn.Module) -> nn.Module:
    """Replace every timm ``Attention`` under ``base`` by :class:`SplitAttention`, in place."""
    for _, module in list(base.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Attention):
                setattr(module, child_name, SplitAttention(child))
    return base


def _parts(model_or_base):
    if hasattr(model_or_base, "base") and hasattr(model_or_base, "head"):
        return model_or_base.base, model_or_base.head
    return model_or_base, None


def add_lora(model_or_base, rank: int, alpha: float, targets=("q", "k", "v"),
             dropout: float = 0.0):
    """PEFT LoRA (rank, alpha, dropout) on each block's attention (``q``, ``k``, ``v``,
    ``proj``) and MLP (``fc1``, ``fc2``) ``targets``; every other tensor frozen but the
    head's (if a model with a head is given). In place; returns it.

    ``targets`` may hold ``"qkv"`` (timm's fused Linear, kept fused: the unfaithful pairing).
    """
    unknown = sorted(set(targets) - set(TARGETS) - {"qkv"})
    if unknown or not targets:
        raise ValueError(f"add_lora: targets {tuple(targets)!r}: expected some of {TARGETS}")
    if rank < 1:
        raise ValueError(f"add_lora: rank must be >= 1, got {rank}")
    base, head = _parts(model_or_base)
    if set(targets) & {"q", "k", "v"}:
        split_qkv(base)
    paths = [("mlp." if t in _MLP else "attn.") + t for t in targets]
    pattern = r".*\.(" + "|".join(re.escape(p) for p in paths) + r")$"
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern,
                        lora_dropout=dropout, bias="none")
    inject_adapter_in_model(config, base)
    dtype = next(base.parameters()).dtype
    base.to(dtype)  # PEFT creates lora_A / lora_B in float32
    for name, p in base.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    if head is not None:
        head.requires_grad_(True)
    return model_or_base


def _adapters(model_or_base) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """Canonical prefix ("base.blocks.0.attn.q") -> (lora_A weight, lora_B weight)."""
    base, _ = _parts(model_or_base)
    out = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and _ADAPTER in module.lora_A:
            out[f"base.{name}"] = (module.lora_A[_ADAPTER].weight, module.lora_B[_ADAPTER].weight)
    return out


def lora_tensors(model_or_base) -> dict[str, np.ndarray]:
    """Canonical key -> numpy for every adapter: ``<prefix>.lora_A`` (r, in), ``.lora_B``
    (out, r)."""
    out = {}
    for prefix, (a, b) in _adapters(model_or_base).items():
        out[f"{prefix}.lora_A"] = a.detach().cpu().numpy().copy()
        out[f"{prefix}.lora_B"] = b.detach().cpu().numpy().copy()
    return out


@torch.no_grad()
def set_lora_tensors(model_or_base, tensors: dict[str, np.ndarray],
                     where: str = "lora tensors") -> None:
    """Load :func:`lora_tensors`' form; strict about keys and shapes."""
    targets = {}
    for prefix, (a, b) in _adapters(model_or_base).items():
        targets[f"{prefix}.lora_A"], targets[f"{prefix}.lora_B"] = a, b
    if set(tensors) != set(targets):
        extra, missing = sorted(set(tensors) - set(targets)), sorted(set(targets) - set(tensors))
        raise ValueError(f"{where}: keys differ from the model's adapters: unexpected "
                         f"{extra[:3]}, missing {missing[:3]}")
    for key, p in targets.items():
        value = np.asarray(tensors[key])
        if value.shape != tuple(p.shape):
            raise ValueError(f"{where}: key {key!r}: shape expected {tuple(p.shape)}, "
                             f"got {value.shape}")
        p.copy_(torch.from_numpy(np.ascontiguousarray(value)))


@torch.no_grad()
def merge(model_or_base):
    """Fold every adapter into its Linear (PEFT's ``LoraLayer.merge``: W + (alpha/r) B A) and
    put the plain Linear back, as ``merge_and_unload`` does. In place; returns it."""
    base, _ = _parts(model_or_base)
    for _, module in list(base.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoraLayer):
                child.merge()
                setattr(module, child_name, child.get_base_layer())
    return model_or_base
