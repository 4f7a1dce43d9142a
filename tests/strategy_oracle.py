"""The independent oracle: which canonical tensors each strategy trains, written by hand.

The runs (``train.run``) and ``frozen_keys`` / ``last_block``
(shared/strategies.py) share one idea of what each strategy trains, so they
cannot check each other. These lists are written by hand from the strategy
descriptions in README.md and never computed by the code under test; nothing
here imports the project. Used by tests/test_strategy_oracle.py (tinyconv runs)
and tests/test_resnet.py (one ResNet-18 step per strategy).
"""

from __future__ import annotations

# --- tinyconv: every canonical tensor, by hand ---------------------------------------------------

HEAD = ["head.fc.weight", "head.fc.bias"]
TINY_CONV = ["base.block1.conv.weight", "base.block2.conv.weight", "base.block3.conv.weight"]
TINY_BN_AFFINE = ["base.block1.bn.weight", "base.block1.bn.bias",
                  "base.block2.bn.weight", "base.block2.bn.bias",
                  "base.block3.bn.weight", "base.block3.bn.bias"]
TINY_BN_STATS = ["base.block1.bn.running_mean", "base.block1.bn.running_var",
                 "base.block2.bn.running_mean", "base.block2.bn.running_var",
                 "base.block3.bn.running_mean", "base.block3.bn.running_var"]
# torch's BatchNorm counter, outside the canonical form (torch_impl.weights.export_bookkeeping)
TINY_BN_COUNTERS = {"tf": [], "torch": ["base.block1.bn.num_batches_tracked",
                                        "base.block2.bn.num_batches_tracked",
                                        "base.block3.bn.num_batches_tracked"]}


def tiny_all(framework: str) -> set[str]:
    return set(HEAD + TINY_CONV + TINY_BN_AFFINE + TINY_BN_STATS + TINY_BN_COUNTERS[framework])


def tiny_moved_by_run(strategy: str, framework: str) -> set[str]:
    """What a tinyconv run of ``strategy`` must change (everything else stays bit-identical)."""
    counters = TINY_BN_COUNTERS[framework]
    return {
        "frozen": set(HEAD),
        "feature_extraction": set(HEAD),
        "bn_adapt": set(HEAD + TINY_BN_AFFINE + TINY_BN_STATS + counters),
        # the last block's conv; its BatchNorm stays frozen and in inference mode
        "partial": set(HEAD + ["base.block3.conv.weight"]),
        "full": tiny_all(framework),
        # torch: gradients off, BN still in training mode (statistics and counters move);
        # Keras legacy BN: batch statistics in the forward pass, moving statistics fixed
        "naive": set(HEAD + (TINY_BN_STATS + counters if framework == "torch" else [])),
    }[strategy]


# The base tensors each strategy *declares* frozen (shared/strategies.py's promise), by hand.
TINY_DECLARED_FROZEN = {
    "frozen": TINY_CONV + TINY_BN_AFFINE + TINY_BN_STATS,
    "feature_extraction": TINY_CONV + TINY_BN_AFFINE + TINY_BN_STATS,
    "naive": TINY_CONV + TINY_BN_AFFINE + TINY_BN_STATS,
    "bn_adapt": TINY_CONV,
    "partial": ["base.block1.conv.weight", "base.block2.conv.weight"]
    + TINY_BN_AFFINE + TINY_BN_STATS,
    "full": [],
}


# --- ResNet-18: canonical keys (torchvision's names under "base."), by hand-written rules ---------

def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.weight", f"{prefix}.bias", f"{prefix}.running_mean", f"{prefix}.running_var"]


def resnet_keys() -> dict[str, list[str]]:
    """ResNet-18's base tensors by kind: 4 stages of 2 BasicBlocks; stages 2-4 downsample."""
    conv, bn = ["base.conv1.weight"], ["base.bn1"]
    for stage in (1, 2, 3, 4):
        for block in (0, 1):
            p = f"base.layer{stage}.{block}"
            conv += [f"{p}.conv1.weight", f"{p}.conv2.weight"]
            bn += [f"{p}.bn1", f"{p}.bn2"]
            if stage > 1 and block == 0:
                conv.append(f"{p}.downsample.0.weight")
                bn.append(f"{p}.downsample.1")
    return {"conv": conv, "bn_affine": [k for p in bn for k in _bn(p)[:2]],
            "bn_stats": [k for p in bn for k in _bn(p)[2:]]}


# what `partial` unfreezes: layer4's convolutions, written out
RESNET_LAYER4_CONV = ["base.layer4.0.conv1.weight", "base.layer4.0.conv2.weight",
                      "base.layer4.0.downsample.0.weight",
                      "base.layer4.1.conv1.weight", "base.layer4.1.conv2.weight"]

RESNET_DECLARED_FROZEN_RULE = {
    "frozen": lambda k: k["conv"] + k["bn_affine"] + k["bn_stats"],
    "feature_extraction": lambda k: k["conv"] + k["bn_affine"] + k["bn_stats"],
    "naive": lambda k: k["conv"] + k["bn_affine"] + k["bn_stats"],
    "bn_adapt": lambda k: k["conv"],
    "partial": lambda k: [c for c in k["conv"] if c not in RESNET_LAYER4_CONV]
    + k["bn_affine"] + k["bn_stats"],
    "full": lambda k: [],
}


def resnet_moved_by_one_step(strategy: str, framework: str) -> set[str]:
    """Canonical tensors one training step of ``strategy`` changes in ResNet-18 (+ its head)."""
    k = resnet_keys()
    return {
        "frozen": set(HEAD),
        "feature_extraction": set(HEAD),
        "bn_adapt": set(HEAD + k["bn_affine"] + k["bn_stats"]),
        "partial": set(HEAD + RESNET_LAYER4_CONV),
        "full": set(HEAD + k["conv"] + k["bn_affine"] + k["bn_stats"]),
        "naive": set(HEAD + (k["bn_stats"] if framework == "torch" else [])),
    }[strategy]


# --- vit: every canonical tensor (timm's keys under "base."), by hand ----------------------------

def vit_keys(depth: int = 4) -> dict[str, list[str]]:
    """The shipped ViT's base tensors: embeddings, `depth` pre-norm blocks, final norm."""
    embed = ["base.cls_token", "base.pos_embed", "base.patch_embed.proj.weight",
             "base.patch_embed.proj.bias"]
    blocks = {i: [f"base.blocks.{i}.{leaf}.{p}" for leaf in
                  ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                  for p in ("weight", "bias")] for i in range(depth)}
    return {"embed": embed, "blocks": blocks, "norm": ["base.norm.weight", "base.norm.bias"]}


def vit_base_keys() -> list[str]:
    k = vit_keys()
    return k["embed"] + [x for i in sorted(k["blocks"]) for x in k["blocks"][i]] + k["norm"]


# lora: rank-4 adapters on each block's attn.proj, mlp.fc1, mlp.fc2
VIT_LORA = [f"base.blocks.{i}.{t}.{ab}" for i in range(4) for t in ("attn.proj", "mlp.fc1", "mlp.fc2")
            for ab in ("lora_A", "lora_B")]


def vit_moved_by_run(strategy: str) -> set[str]:
    """What a vit run of ``strategy`` must change (no BatchNorm: the same in both frameworks)."""
    return {
        "frozen": set(HEAD),
        "feature_extraction": set(HEAD),
        "partial": set(HEAD + vit_keys()["blocks"][3]),
        "full": set(HEAD + vit_base_keys()),
        "naive": set(HEAD),
        "lora": set(HEAD + VIT_LORA),
    }[strategy]
