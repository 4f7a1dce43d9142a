"""Apply a freezing strategy to a PyTorch FineTuneModel.

``requires_grad_(False)`` only stops gradients: BatchNorm still normalises
with batch statistics and updates its running statistics in ``train()``
mode. Strategies that want inference-mode BN therefore *pin* those modules
to eval mode in the model (``FineTuneModel.pin_inference``), which survives
every later ``model.train()``; a bare ``base.eval()`` would not.
"""

from __future__ import annotations

from torch import nn

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
from torch_impl.model import FineTuneModel, is_batch_norm, named_leaves

__all__ = ["apply_strategy", "trainable_parameters"]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def apply_strategy(model: FineTuneModel, strategy: Strategy | str,
                   adapter_seed: int = 0) -> FineTuneModel:
    """Set ``requires_grad`` and BatchNorm modes of ``model`` for ``strategy``; returns it.

    A base without BatchNorm (vit) is pinned to inference mode whole where the strategy
    keeps the base in inference mode (``frozen``, ``partial``, ``lora``): its dropout,
    attention dropout and drop-path are off. ``lora`` adds the adapters
    (``shared.strategies.LORA_*``), started from ``shared.init.lora_init(adapter_seed)``.
    """
    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
    if not isinstance(model, FineTuneModel):
        raise TypeError(f"apply_strategy needs a torch_impl FineTuneModel, got {type(model).__name__}")
    check_strategy_arch(strategy, model.arch)
    model.requires_grad_(True)
    model.pin_inference([])
    leaves = list(named_leaves(model.base, "base"))
    bn_names = [name for name, module in leaves if is_batch_norm(module)]
    if strategy.name == "naive":
        # The classic mistake, on purpose: gradients off, nothing else.
        model.base.requires_grad_(False)
    elif strategy.name == "lora":
        from torch_impl import lora

        lora.add_lora(model, LORA_RANK, LORA_ALPHA, targets=LORA_TARGETS)
        lora.set_lora_tensors(model, lora_init(lora.lora_tensors(model), adapter_seed),
                              "canonical LoRA init")
        model.pin_inference(["base"])
    elif strategy.base_trains == "none":
        model.base.requires_grad_(False)
        model.pin_inference(["base"])
    elif strategy.base_trains == "bn":
        model.base.requires_grad_(False)
        for name in bn_names:
            model.get_submodule(name).requires_grad_(True)
    elif strategy.base_trains == "last_block":
        block = last_block(model.arch)
        model.base.requires_grad_(False)  # also the base's own tensors (vit's cls_token, pos_embed)
        for name, module in leaves:
            module.requires_grad_(_under(name, block) and name not in bn_names)
        # BatchNorm in inference mode; a base without any (vit): the whole base
        model.pin_inference(bn_names or ["base"])
    elif strategy.base_trains != "all":
        raise ValueError(f"strategy {strategy.name!r}: unknown base_trains {strategy.base_trains!r}")
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Only the parameters that train: what the optimizer must be given.

    Handing frozen parameters to an optimizer with momentum or weight decay
    moves them after a late freeze, even with ``requires_grad=False``.
    """
    return [p for p in model.parameters() if p.requires_grad]
