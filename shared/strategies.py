"""The freezing-strategy catalogue and what each strategy promises.

Each strategy declares which base tensors are frozen (must come out of a run
bit-identical), whether BatchNorm statistics may change, and whether the
training-mode loss equals the inference-mode loss at the same weights. The
runs record what happened; :func:`check_expectations` turns the difference
into a verdict. ``naive`` is the only strategy whose expectations differ by
framework on the BatchNorm archs: each framework's classic mistake fails differently.

On ``vit`` (no BatchNorm; dropout, attention dropout and drop-path instead) some
expectations differ by arch (``Strategy.arch_expect``): no statistics ever change,
and the training-mode loss differs from the inference-mode loss wherever dropout
or drop-path runs in the training step (``full``, and ``naive`` in both
frameworks: ``requires_grad_(False)`` / ``trainable=False`` switch none of them
off). ``partial`` on vit trains the last block's weights with the whole base in
inference mode (its dropout and drop-path off too), as tinyconv's ``partial``
keeps the last block's BatchNorm in inference mode: train and eval losses match.
``bn_adapt`` has nothing to adapt on vit and is refused; ``lora``
(:data:`ADAPTER_STRATEGIES`) runs on vit only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from shared.frameworks import FRAMEWORKS, check_framework

__all__ = ["Strategy", "Expectation", "STRATEGIES", "ADAPTER_STRATEGIES", "ALL_STRATEGIES",
           "LORA_RANK", "LORA_ALPHA", "LORA_TARGETS", "get_strategy", "strategies_for",
           "check_strategy_arch", "frozen_keys", "bn_prefixes", "last_block",
           "check_expectations"]


@dataclass(frozen=True)
class Expectation:
    # training-mode loss == inference-mode loss at the same weights, every step
    train_eval_match: bool
    # every tensor the strategy declares frozen is bit-identical after the run
    frozen_unchanged: bool
    # some BatchNorm running statistic changed during the run
    bn_stats_changed: bool


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str
    # which base tensors train: "none", "bn" (BN affine + stats), "last_block", "all"
    base_trains: str
    # BatchNorm normalisation during a training step: "stored" statistics or "batch" statistics
    bn_mode: str
    # the head trains on features computed once by the base in inference mode
    cached_features: bool
    expect: dict[str, Expectation] = field(repr=False)
    # arch -> framework -> Expectation, where an arch's expectation differs from `expect`
    arch_expect: dict[str, dict[str, Expectation]] = field(default_factory=dict, repr=False)
    # the archs the strategy runs on (None: every arch)
    archs: tuple[str, ...] | None = None

    def expectation(self, framework: str, arch: str | None = None,
                    base_dropout: bool = True) -> Expectation:
        """What a run in ``framework`` on ``arch`` shows; ``base_dropout`` False
        (``RunConfig.base_dropout``: the verdict runs' model, no dropout or drop-path in a
        base without BatchNorm) makes training mode inference mode: train == eval."""
        framework = check_framework(framework)
        expected = self.arch_expect.get(arch, self.expect)[framework]
        if not base_dropout:
            expected = replace(expected, train_eval_match=True)
        return expected


def _same(e: Expectation) -> dict[str, Expectation]:
    return {fw: e for fw in FRAMEWORKS}


STRATEGIES: dict[str, Strategy] = {s.name: s for s in [
    # vit: the base in inference mode means dropout, attention dropout and drop-path off
    Strategy("frozen", "base frozen and in inference mode (vit: dropout and drop-path off); "
             "only the head trains",
             "none", "stored", False, _same(Expectation(True, True, False))),
    Strategy("feature_extraction",
             "features computed once by the base in inference mode and cached; the head trains on them",
             "none", "stored", True, _same(Expectation(True, True, False))),
    Strategy("bn_adapt",
             "base frozen except BatchNorm, which trains and updates its statistics on target data",
             "bn", "batch", False, _same(Expectation(False, True, True)),
             archs=("tinyconv", "resnet18")),
    # vit: blocks.3 trains with the whole base in inference mode (its dropout and drop-path
    # off, as BatchNorm here), so train and eval losses match
    Strategy("partial", "last block of the base unfrozen, BatchNorm kept in inference mode "
             "(vit: the whole base in inference mode, the last block's dropout and drop-path off)",
             "last_block", "stored", False, _same(Expectation(True, True, False))),
    Strategy("full", "everything trains, BatchNorm in training mode (vit: dropout and "
             "drop-path on)",
             "all", "batch", False, _same(Expectation(False, True, True)),
             arch_expect={"vit": _same(Expectation(False, True, False))}),
    # The classic mistakes. torch: requires_grad_(False) only, so BN keeps using batch
    # statistics and updating running statistics (declared-frozen stats change). Keras:
    # the pre-TF-2.0 BN (legacy layer): batch statistics in training, moving stats fixed.
    # vit: the same mistake in both (gradients off, the base still called in training
    # mode): dropout and drop-path run, nothing declared frozen moves, no statistics.
    Strategy("naive", "each framework's classic mistake (torch: requires_grad_(False) only; "
             "Keras: the pre-TF-2.0 BatchNormalization; vit: trainable=False with the base "
             "still in training mode, dropout and drop-path on)", "none", "batch", False,
             {"torch": Expectation(False, False, True), "tf": Expectation(False, True, False)},
             arch_expect={"vit": _same(Expectation(False, True, False))}),
]}

# LoRA of the pipeline (vit only): rank-r adapters on each block's attention output
# projection and MLP fc1/fc2, scaling alpha / r, LoRA dropout 0 (Keras's enable_lora has
# none). Not timm's q/k/v: Keras's enable_lora on MultiHeadAttention's query/key/value is
# per head (A (width, heads, r), one B (r, head_dim) for every head), which equals a
# PEFT rank-r adapter only at one head; the shipped ViT has 4. The output projection
# (Keras kernel (heads, head_dim, width): A (heads, head_dim, r), B (r, width)) and the
# Dense fc1/fc2 are true rank-r adapters of their (in, out) maps on both sides
# (tests/test_vit_strategies.py: test_cross_lora_pipeline_targets_forward_agree).
LORA_RANK = 4
LORA_ALPHA = 8.0
LORA_TARGETS = ("proj", "fc1", "fc2")

ADAPTER_STRATEGIES: dict[str, Strategy] = {s.name: s for s in [
    Strategy("lora", f"rank-{LORA_RANK} LoRA adapters (alpha {LORA_ALPHA:g}, dropout 0) on "
             f"each block's attention output projection and MLP fc1/fc2, plus the head; base "
             f"frozen in inference mode (dropout and drop-path off); not q/k/v: Keras's "
             f"MultiHeadAttention query/key/value LoRA is per head and pairs with PEFT only "
             f"at one head",
             "none", "stored", False, _same(Expectation(True, True, False)), archs=("vit",)),
]}

ALL_STRATEGIES: dict[str, Strategy] = {**STRATEGIES, **ADAPTER_STRATEGIES}


def get_strategy(name: str) -> Strategy:
    # looked up in the two dicts each call (a test may replace an entry of STRATEGIES)
    try:
        return STRATEGIES[name] if name in STRATEGIES else ADAPTER_STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; expected one of: "
                         f"{', '.join(ALL_STRATEGIES)}") from None


def strategies_for(arch: str) -> list[str]:
    """The strategy names that run on ``arch``, in catalogue order."""
    every = {**STRATEGIES, **ADAPTER_STRATEGIES}
    return [n for n, s in every.items() if s.archs is None or arch in s.archs]


def check_strategy_arch(strategy: Strategy | str, arch: str) -> None:
    """Raise a one-line error when ``strategy`` does not run on ``arch``."""
    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
    if strategy.archs is not None and arch not in strategy.archs:
        why = {"bn_adapt": "it adapts BatchNorm and vit has none (LayerNorm only)",
               "lora": "its adapters target the ViT's attention projection and MLP"}
        raise ValueError(f"strategy {strategy.name!r} does not run on arch {arch!r}: "
                         f"{why.get(strategy.name, 'not supported')} (runs on "
                         f"{', '.join(strategy.archs)})")


def last_block(arch: str) -> str:
    """Canonical prefix of the base's last block (what ``partial`` unfreezes)."""
    from shared.archs import TinyConvConfig, ViTConfig, arch_config

    config = arch_config(arch)
    if isinstance(config, TinyConvConfig):
        return f"base.block{len(config.channels)}"
    if isinstance(config, ViTConfig):
        return f"base.blocks.{config.depth - 1}"
    return "base.layer4"


def bn_prefixes(keys) -> set[str]:
    """Canonical prefixes of the BatchNorm layers among ``keys``."""
    return {k[: -len(".running_mean")] for k in keys if k.endswith(".running_mean")}


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def frozen_keys(strategy: Strategy | str, keys, arch: str) -> list[str]:
    """Canonical keys that ``strategy`` declares frozen (must not change in a run).

    LoRA adapters (``...lora_A``, ``...lora_B``) sit under ``base.`` but are never frozen.
    """
    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
    keys = list(keys)
    base = [k for k in keys if _under(k, "base") and not k.endswith((".lora_A", ".lora_B"))]
    bns = bn_prefixes(keys)
    in_bn = lambda k: any(_under(k, p) for p in bns)  # noqa: E731
    if strategy.base_trains == "none":
        return sorted(base)
    if strategy.base_trains == "bn":
        return sorted(k for k in base if not in_bn(k))
    if strategy.base_trains == "last_block":
        block = last_block(arch)
        return sorted(k for k in base if in_bn(k) or not _under(k, block))
    return []


def check_expectations(strategy: Strategy | str, framework: str, *, train_eval_match: bool,
                       frozen_unchanged: bool, bn_stats_changed: bool,
                       arch: str | None = None, base_dropout: bool = True) -> list[str]:
    """Failures, as sentences, of what a run showed against what ``strategy`` declares
    (for ``arch``, where its expectation differs by arch; ``base_dropout`` False: a verdict
    run, see :meth:`Strategy.expectation`)."""
    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
    expected = strategy.expectation(framework, arch, base_dropout)
    where = "" if base_dropout else ", base dropout off"
    seen = {"train_eval_match": train_eval_match, "frozen_unchanged": frozen_unchanged,
            "bn_stats_changed": bn_stats_changed}
    return [f"{strategy.name}[{framework}{where}]: expected {name}={getattr(expected, name)}, got {value}"
            for name, value in seen.items() if getattr(expected, name) != value]
