"""Apply a freezing strategy to a Keras FineTuneModel.

A Keras BatchNormalization with ``trainable=False`` runs in inference mode
even inside ``fit`` (``training and self.trainable``), so "frozen" needs no
extra mode switch here, unlike torch. Two Keras rules shape this module: a
change of ``trainable`` after a ``fit`` is ignored by the already traced
train step, so a compiled model is recompiled, and with a *fresh* optimizer
(recompiling with the same instance raises ``Unknown variable``).
"""

from __future__ import annotations

from shared.init import lora_init
from shared.strategies import (
    LORA_ALPHA,
    LORA_RANK,
    LORA_TARGETS,
    Strategy,
    check_strategy_arch,
    get_strategy,
    last_block,
)
from tf_impl.model import FineTuneModel, LegacyBatchNormalization, is_batch_norm, named_leaves

__all__ = ["apply_strategy", "trainable_parameters"]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def apply_strategy(model: FineTuneModel, strategy: Strategy | str,
                   adapter_seed: int = 0) -> FineTuneModel:
    """Set ``trainable`` flags of ``model`` for ``strategy`` (recompiling if compiled); returns it.

    A base without BatchNorm (vit) is pinned to inference mode (called with
    ``training=False``) where the strategy keeps the base in inference mode (``frozen``,
    ``partial``, ``lora``): ``trainable=False`` alone leaves its dropout, attention dropout
    and drop-path on. ``lora`` adds the adapters (``shared.strategies.LORA_*``), started
    from ``shared.init.lora_init(adapter_seed)``.
    """
    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
    if not isinstance(model, FineTuneModel):
        raise TypeError(f"apply_strategy needs a tf_impl FineTuneModel, got {type(model).__name__}")
    check_strategy_arch(strategy, model.arch)
    # Reset every layer to trainable. Setting True on a layer that already reads True is a
    # no-op in Keras 3.15 (attribute short-circuit), so children frozen one by one by an
    # earlier strategy would stay frozen: go through False first.
    model.trainable = False
    model.trainable = True
    model.pin_inference([])
    leaves = list(named_leaves(model.base, "base"))
    bn_names = [name for name, layer in leaves if is_batch_norm(layer)]
    if strategy.name == "naive":
        legacy = [n for n, layer in leaves if isinstance(layer, LegacyBatchNormalization)]
        if legacy != bn_names:
            raise ValueError("strategy 'naive' reproduces the pre-TF-2.0 BatchNormalization: build the "
                             "model with norm_layer=default_norm_layer(config, LegacyBatchNormalization)")
        model.base.trainable = False
    elif strategy.name == "lora":
        from tf_impl import lora

        lora.add_lora(model, LORA_RANK, LORA_ALPHA, targets=LORA_TARGETS)
        lora.set_lora_tensors(model, lora_init(lora.lora_tensors(model), adapter_seed),
                              "canonical LoRA init")
        model.pin_inference(["base"])
    elif strategy.base_trains == "none":
        model.base.trainable = False
        if not bn_names:
            model.pin_inference(["base"])
    elif strategy.base_trains == "bn":
        for name, layer in leaves:
            layer.trainable = name in bn_names
    elif strategy.base_trains == "last_block":
        block = last_block(model.arch)
        for name, layer in leaves:
            layer.trainable = _under(name, block) and name not in bn_names
        if not bn_names:  # vit: the whole base in inference mode, as torch's
            model.pin_inference(["base"])
    elif strategy.base_trains != "all":
        raise ValueError(f"strategy {strategy.name!r}: unknown base_trains {strategy.base_trains!r}")
    if model.compiled:
        _recompile_fresh(model)
    return model


def _recompile_fresh(model: FineTuneModel) -> None:
    # The traced train step keeps the old trainable set; the same optimizer instance
    # would raise "Unknown variable" on the new set. A fresh optimizer of the same config.
    optimizer = model.optimizer.__class__.from_config(model.optimizer.get_config())
    model.compile(optimizer=optimizer, loss=model.loss, metrics=model._compile_config.config.get("metrics")
                  if model._compile_config else None)


def trainable_parameters(model) -> list:
    """Only the variables that train: what the optimizer updates."""
    return list(model.trainable_variables)
