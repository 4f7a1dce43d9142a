"""The freezing-strategy catalogue and what each strategy promises.

Each strategy declares which base tensors are frozen (must come out of a run
bit-identical), whether BatchNorm statistics may change, and whether the
training-mode loss equals the inference-mode loss at the same weights. The
runs record what happened; :func:`check_expectations` turns the difference
into a verdict. ``naive`` is the only strategy whose expectations differ by
framework: each framework's classic mistake fails differently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.frameworks import FRAMEWORKS, check_framework

__all__ = ["Strategy", "Expectation", "STRATEGIES", "get_strategy", "frozen_keys", "bn_prefixes",
           "last_block", "check_expectations"]


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

    def expectation(self, framework: str) -> Expectation:
        return self.expect[check_framework(framework)]


def _same(e: Expectation) -> dict[str, Expectation]:
    return {fw: e for fw in FRAMEWORKS}


STRATEGIES: dict[str, Strategy] = {s.name: s for s in [
    Strategy("frozen", "base frozen and in inference mode; only the head trains",
             "none", "stored", False, _same(Expectation(True, True, False))),
    Strategy("feature_extraction",
             "features computed once by the base in inference mode and cached; the head trains on them",
             "none", "stored", True, _same(Expectation(True, True, False))),
    Strategy("bn_adapt",
             "base frozen except BatchNorm, which trains and updates its statistics on target data",
             "bn", "batch", False, _same(Expectation(False, True, True))),
    Strategy("partial", "last block of the base unfrozen, BatchNorm kept in inference mode",
             "last_block", "stored", False, _same(Expectation(True, True, False))),
    Strategy("full", "everything trains, BatchNorm in training mode",
             "all", "batch", False, _same(Expectation(False, True, True))),
    # The classic mistakes. torch: requires_grad_(False) only, so BN keeps using batch
    # statistics and updating running statistics (declared-frozen stats change). Keras:
    # the pre-TF-2.0 BN (legacy layer): batch statistics in training, moving stats fixed.
    Strategy("naive", "each framework's classic mistake (torch: requires_grad_(False) only; "
             "Keras: the pre-TF-2.0 BatchNormalization)", "none", "batch", False,
             {"torch": Expectation(False, False, True), "tf": Expectation(False, True, False)}),
]}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; expected one of: {', '.join(STRATEGIES)}") from None


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
    """Canonical keys that ``strategy`` declares frozen (must not change in a run)."""
    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
    keys = list(keys)
    base = [k for k in keys if _under(k, "base")]
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
                       frozen_unchanged: bool, bn_stats_changed: bool) -> list[str]:
    """Failures, as sentences, of what a run showed against what ``strategy`` declares."""
    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
    expected = strategy.expectation(framework)
    seen = {"train_eval_match": train_eval_match, "frozen_unchanged": frozen_unchanged,
            "bn_stats_changed": bn_stats_changed}
    return [f"{strategy.name}[{framework}]: expected {name}={getattr(expected, name)}, got {value}"
            for name, value in seen.items() if getattr(expected, name) != value]
