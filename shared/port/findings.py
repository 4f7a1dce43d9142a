"""The findings catalogue: stable codes, what each means and its fix, and the finding record.

A code never changes meaning; a new mechanism gets a new code. Every rule that
emits findings (``lint``, ``divergence``, ``steps``) builds them here, so each
finding names both layers, both values and the fix the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.port.records import Pair

__all__ = ["EXPECTED_CODES", "FINDINGS", "Finding", "FindingKind", "grouped", "make_finding",
           "plain", "show"]


@dataclass(frozen=True)
class FindingKind:
    what: str
    fix: str


# The catalogue: a code never changes meaning; new mechanisms get new codes.
FINDINGS: dict[str, FindingKind] = {
    "PORT_BN_EPSILON": FindingKind(
        "BatchNorm epsilon differs",
        "pass the same epsilon on both sides (keras epsilon=1e-5 or torch eps=1e-3)"),
    "PORT_BN_MOMENTUM": FindingKind(
        "BatchNorm momentum differs in torch's convention (Keras momentum must be "
        "1 - torch momentum): moving statistics diverge after a training step",
        "set Keras momentum = 1 - torch momentum (torch 0.1 <-> Keras 0.9)"),
    "PORT_BN_AFFINE": FindingKind(
        "BatchNorm affine parameters differ (Keras center/scale vs torch affine)",
        "use center=True, scale=True in Keras with affine=True in torch, or turn both off"),
    "PORT_BN_STATS": FindingKind(
        "one BatchNorm keeps running statistics and the other does not "
        "(torch track_running_stats=False normalises with batch statistics even in eval mode)",
        "keep running statistics on both sides (torch track_running_stats=True)"),
    "PORT_LN_EPSILON": FindingKind(
        "LayerNorm epsilon differs (defaults: torch nn.LayerNorm 1e-5, Keras "
        "LayerNormalization 1e-3, timm's ViT 1e-6)",
        "pass the same epsilon on both sides (keras epsilon= <-> torch eps=)"),
    "PORT_ATTENTION_HEADS": FindingKind(
        "the attention splits the same projections into another number of heads (the "
        "weights have the same shapes; the function differs)",
        "use the same head count (Keras MultiHeadAttention(num_heads, key_dim=E // num_heads) "
        "<-> torch num_heads)"),
    "PORT_ATTENTION_BIAS": FindingKind(
        "one attention has biases on its projections and the other has none",
        "use use_bias (Keras) the same way as qkv_bias / bias= (torch) on both sides"),
    "PORT_LORA_MISSING": FindingKind(
        "one layer has a LoRA adapter and the other has none",
        "add the adapter on both sides (Keras layer.enable_lora(rank, lora_alpha=alpha) <-> "
        "PEFT LoraConfig(r=rank, lora_alpha=alpha, target_modules=[...]))"),
    "PORT_LORA_RANK": FindingKind(
        "the LoRA adapters have different ranks",
        "use the same rank (Keras enable_lora(rank) <-> PEFT r)"),
    "PORT_LORA_SCALE": FindingKind(
        "the LoRA updates are scaled differently (alpha / rank: Keras lora_alpha / rank, PEFT "
        "lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora)",
        "use the same alpha on both sides (Keras's default lora_alpha is the rank, PEFT's 8)"),
    "PORT_LORA_DROPOUT": FindingKind(
        "the LoRA adapters drop their input at different rates (Keras's enable_lora has no "
        "LoRA dropout)",
        "use lora_dropout=0.0 in PEFT against Keras"),
    "PORT_CONV_STRIDE": FindingKind("convolution stride differs", "use the same stride"),
    "PORT_CONV_STRIDE_PLACEMENT": FindingKind(
        "the downsampling stride sits on another convolution of the block on each side (Keras "
        "ResNet50, v1, puts it on the first 1x1 convolution; torchvision's resnet50, v1.5, on "
        "the 3x3): the same output size, a different function",
        "put the stride on the same convolution on both sides (torch: the block's "
        "conv1.stride and conv2.stride; Keras: strides= of the two Conv2D layers)"),
    "PORT_CONV_DILATION": FindingKind("convolution dilation differs", "use the same dilation"),
    "PORT_CONV_BIAS": FindingKind(
        "one convolution has a bias and the other has none",
        "use use_bias / bias the same way on both sides"),
    "PORT_DENSE_BIAS": FindingKind(
        "one dense layer has a bias and the other has none",
        "use use_bias / bias the same way on both sides"),
    "PORT_CONV_PADDING": FindingKind(
        "convolution zero padding (top, bottom, left, right) differs",
        "pad explicitly with the same amounts: keras ZeroPadding2D(((t, b), (l, r))) + "
        "padding='valid' against torch padding= (symmetric) or F.pad"),
    "PORT_SAME_PADDING_STRIDE2_EVEN": FindingKind(
        "Keras padding='same' at stride 2 on an even input pads 0 top/left and 1 bottom/right; "
        "torch's symmetric padding pads both sides",
        "replace padding='same' with ZeroPadding2D(k // 2) + padding='valid' in Keras "
        "(or F.pad(x, (0, 1, 0, 1)) + padding=0 in torch)"),
    "PORT_FLATTEN_DENSE_ORDER": FindingKind(
        "Dense after Flatten: Keras flattens (H, W, C), torch (C, H, W); the weights were "
        "copied with a transpose only, so the rows are in the wrong order",
        "permute the rows when copying: torch_w = keras_k.reshape(H, W, C, out)"
        ".transpose(3, 2, 0, 1).reshape(out, -1) (freeze-parity's transfer does it)"),
    "PORT_WEIGHT_TRANSPOSED": FindingKind(
        "a square weight was copied without its transpose: Keras's kernel is (in, out), "
        "torch's weight (out, in); each (out, in) block of the Keras side (a Dense kernel, "
        "MultiHeadAttention's query, key, value or output kernel against in_proj_weight's "
        "rows [q; k; v] or out_proj) is torch's transposed",
        "transpose when copying: keras_kernel = torch_w.T (MultiHeadAttention: "
        "in_proj_weight[i * E:(i + 1) * E].T.reshape(E, heads, head_dim) for q, k, v); "
        "freeze-parity's transfer does it"),
    "PORT_WEIGHTS_DIFFER": FindingKind(
        "paired layers hold different weights (the models were not given the same weights)",
        "copy the weights through the pairing (check_port(..., transfer='torch') or "
        "--transfer torch), or fix the conversion that produced them"),
    "PORT_DROPOUT_RATE": FindingKind(
        "dropout rates differ (checked statically: the frameworks' random masks cannot match)",
        "use the same rate (Keras rate == torch p)"),
    "PORT_DROPOUT_MISSING": FindingKind(
        "one model drops (dropout or stochastic depth) where the other does not",
        "add the missing Dropout / StochasticDepth with the same rate (or set the extra one's "
        "rate to 0) so both drop in the same places"),
    "PORT_DROPOUT_MODE": FindingKind(
        "the two dropout layers at this place drop different units (element, channel, row: a "
        "whole sample's path, or batch: the path for every sample at once)",
        "use the same mode: torchvision StochasticDepth(p, 'row') <-> keras Dropout(p, "
        "noise_shape=(None, 1, 1, 1)), 'batch' <-> noise_shape=(1, 1, 1, 1), nn.Dropout <-> "
        "Dropout, nn.Dropout2d <-> SpatialDropout2D"),
    "PORT_PREPROCESSING": FindingKind(
        "preprocessing inside the model differs (Rescaling / Normalization layers): the same "
        "data reaches the first layers as different inputs",
        "normalise the same way on both sides: remove it from the Keras model "
        "(include_preprocessing=False where keras.applications offers it) and normalise the "
        "data for both, or put torchvision.transforms.Normalize(mean=-b/a, std=1/a) first in "
        "the torch model for the map x -> a * x + b shown"),
    "PORT_ACTIVATION": FindingKind(
        "the activation after this layer differs (compared by function: hard_silu is "
        "Hardswish, swish is SiLU)",
        "use the same activation (e.g. ReLU6 <-> ReLU(max_value=6), no softmax inside a "
        "model whose torch twin returns logits)"),
    "PORT_DIVERGES_INFERENCE": FindingKind(
        "inference-mode outputs leave the tolerance first at this layer",
        "look at the lint findings for this layer and the ones before it"),
    "PORT_DIVERGES_TRAINING": FindingKind(
        "training-mode outputs (BatchNorm on batch statistics, dropout off on both sides) "
        "leave the tolerance first at this layer, while inference mode agrees there",
        "a layer that one side runs in inference mode during training: check base.eval() "
        "against model.train() in torch and trainable/training=False in Keras"),
    "PORT_MOVED_ONE_SIDE": FindingKind(
        "this tensor moved in the training steps on one side only (frozen on the other)",
        "freeze the same tensors: torch requires_grad and eval() kept through model.train() "
        "(override train()), Keras trainable and training=False from a wrapper layer or a "
        "subclassed model (a functional graph ignores training=False under fit)"),
    "PORT_STATS_DIVERGE": FindingKind(
        "in one training step from the same state, this BatchNorm statistic moved on both "
        "sides but by different amounts",
        "check the pair's BatchNorm momentum (Keras momentum = 1 - torch momentum) and "
        "whether both normalise with batch statistics in training (lint findings name them)"),
    "PORT_STEP_UPDATE": FindingKind(
        "in one training step from the same state (tensors and optimizer slots), this "
        "parameter's update or optimizer slot differs beyond the step's rounding",
        "give both sides the same optimizer (kind, learning rate, momentum, betas, epsilon, "
        "weight decay) and the same loss; PORT_OPTIMIZER_SETTINGS names a setting that differs"),
    "PORT_OPTIMIZER_KIND": FindingKind(
        "the optimizers are of different kinds, or one has no state the check can carry to "
        "the other side (SGD, Adam and AdamW on both sides can be checked)",
        "use the same optimizer on both sides (keras.optimizers.SGD <-> torch.optim.SGD, "
        "Adam <-> Adam, AdamW <-> AdamW)"),
    "PORT_OPTIMIZER_SETTINGS": FindingKind(
        "an optimizer setting differs between the two sides",
        "pass the same value on both sides (Keras learning_rate <-> torch lr, beta_1/beta_2 "
        "<-> betas, epsilon <-> eps; Keras weight_decay is decoupled: torch AdamW)"),
    "PORT_BN_VARIANCE_CONVENTION": FindingKind(
        "BatchNorm updated its running variance on both sides in the steps: torch with the "
        "unbiased batch variance (times N/(N-1)), Keras with the biased one",
        "expected between the frameworks; reconcile with a Keras BatchNormalization that "
        "updates with the unbiased variance (tf_impl.model.TorchVarianceBatchNormalization) "
        "or accept it (it shrinks as 1/N)"),
    "PORT_STEP_LOSS": FindingKind(
        "in one training step from the same state, the training-mode or inference-mode loss "
        "differs beyond one forward pass's rounding",
        "the first divergent layer and the freezing findings say why"),
}


# Codes for a difference between the frameworks themselves, not a porting mistake.
EXPECTED_CODES = ("PORT_BN_VARIANCE_CONVENTION",)


@dataclass(frozen=True)
class Finding:
    code: str
    keras_layer: str
    torch_layer: str
    keras_value: object
    torch_value: object
    message: str
    fix: str
    # every (keras, torch) pair the finding stands for, the first one above included
    pairs: tuple = ()

    def line(self) -> str:
        values = ("" if self.keras_value is None and self.torch_value is None else
                  f" (keras {show(self.keras_value)}, torch {show(self.torch_value)})")
        return f"{self.code} at {self.keras_layer} <-> {self.torch_layer}: {self.message}{values}"


def show(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def make_finding(code: str, p: Pair | None, keras_value, torch_value, detail: str = "",
                 keras_layer: str | None = None, torch_layer: str | None = None,
                 pairs: tuple = ()) -> Finding:
    """A finding of ``code`` at pair ``p`` (or at the named layers), with both values."""
    kind = FINDINGS[code]
    return Finding(code, keras_layer or (p.keras.name if p else "(model)"),
                   torch_layer or (p.torch.name if p else "(model)"),
                   plain(keras_value), plain(torch_value),
                   kind.what + (f"; {detail}" if detail else ""), kind.fix, tuple(pairs))


def plain(value):
    """JSON-ready: tuples become lists, numpy scalars floats."""
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def grouped(findings: Sequence[Finding]) -> list[Finding]:
    """One finding per (code, keras value, torch value): the first pair, and how many more."""
    groups: dict[tuple, list[Finding]] = {}
    for f in findings:
        groups.setdefault((f.code, str(f.keras_value), str(f.torch_value)), []).append(f)
    out = []
    for members in groups.values():
        first = members[0]
        pairs = tuple(p for f in members for p in (f.pairs or ((f.keras_layer, f.torch_layer),)))
        message = first.message
        if len(members) > 1:
            shown = ", ".join(f"{f.keras_layer} <-> {f.torch_layer}" for f in members[1:4])
            more = f" and {len(members) - 4} more" if len(members) > 4 else ""
            unit = "blocks" if any(len(f.pairs) > 1 for f in members) else "pairs"
            message += f"; {len(members)} {unit}, also {shown}{more}"
        out.append(Finding(first.code, first.keras_layer, first.torch_layer, first.keras_value,
                           first.torch_value, message, first.fix, pairs))
    return out
