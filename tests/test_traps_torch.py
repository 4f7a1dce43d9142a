"""PyTorch traps: surprising behaviours pinned as they are in torch 2.14.1 / torchvision 0.29.1.

Each test asserts that the surprise still exists. Its failure message names the
docs/PORTING.md row and the number measured now, so a framework upgrade that changes
the behaviour fails loudly and says which row of the guide to update. The measured
number is also recorded with ``record_property`` (``pytest --junitxml``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from shared.tolerances import SAME_FRAMEWORK_ATOL, TRAP_MIN_GAP

N, C, H, W = 8, 3, 4, 4
DATA_MEAN = 2.0  # inputs far from BN's initial running mean 0, so any stat update shows


def _row(name: str) -> str:
    return f"docs/PORTING.md row {name!r}"


def _images(seed: int = 0) -> torch.Tensor:
    rng = np.random.RandomState(seed)
    return torch.from_numpy(rng.randn(N, C, H, W).astype(np.float32) + DATA_MEAN)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


def _base() -> nn.Sequential:
    """A stand-in for a pretrained conv base: conv -> BN -> ReLU -> pooled features."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(C, 4, 1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def test_torch_bn_defaults_momentum_0_1_eps_1e_5(record_property):
    bn = nn.BatchNorm2d(C)
    record_property("measured", f"momentum={bn.momentum} eps={bn.eps}")
    assert (bn.momentum, bn.eps) == (0.1, 1e-5), (
        f"{_row('BN defaults')}: expected torch momentum 0.1 eps 1e-5, "
        f"got momentum {bn.momentum} eps {bn.eps}"
    )


def test_torch_requires_grad_false_bn_still_updates_running_stats(record_property):
    bn = nn.BatchNorm2d(C).requires_grad_(False)  # "frozen" the Keras way of thinking
    before = bn.running_mean.clone()
    bn(_images())  # module is in train() mode: requires_grad says nothing about mode
    moved = _max_abs(bn.running_mean, before)
    record_property("measured", moved)
    assert moved > TRAP_MIN_GAP, (
        f"{_row('requires_grad_(False) on BN')}: expected running_mean to move, moved {moved:.3g}"
    )


def test_torch_requires_grad_false_bn_normalises_with_batch_stats(record_property):
    bn = nn.BatchNorm2d(C).requires_grad_(False)
    x = _images()
    y_train_mode = bn(x)
    y_eval_mode = bn.eval()(x)
    gap = _max_abs(y_train_mode, y_eval_mode)
    batch_mean_out = float(y_train_mode.mean(dim=(0, 2, 3)).abs().max())
    record_property("measured", gap)
    assert gap > TRAP_MIN_GAP and batch_mean_out < SAME_FRAMEWORK_ATOL, (
        f"{_row('requires_grad_(False) on BN')}: expected batch-statistics normalisation "
        f"(per-channel mean ~0) unlike eval(); gap to eval() {gap:.3g}, "
        f"output channel mean {batch_mean_out:.3g}"
    )


def test_model_train_undoes_base_eval(record_property):
    base = _base()
    model = nn.Sequential(base, nn.Linear(4, 2))
    base.eval()
    model.train()  # what every training loop calls at the top of an epoch
    bn = base[1]
    before = bn.running_mean.clone()
    model(_images())
    moved = _max_abs(bn.running_mean, before)
    record_property("measured", moved)
    assert bn.training and moved > TRAP_MIN_GAP, (
        f"{_row('model.train() after base.eval()')}: expected model.train() to put the base "
        f"BN back in training mode; bn.training={bn.training}, running_mean moved {moved:.3g}"
    )


class _KeepsBaseInEval(nn.Module):
    """The fix: train() re-applies eval() to the base after nn.Module.train() recursed."""

    def __init__(self, base: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))

    def train(self, mode: bool = True) -> _KeepsBaseInEval:
        super().train(mode)
        self.base.eval()
        return self


def test_train_override_reapplying_base_eval_keeps_running_stats(record_property):
    model = _KeepsBaseInEval(_base(), nn.Linear(4, 2))
    model.train()
    bn = model.base[1]
    before = bn.running_mean.clone()
    model(_images())
    moved = _max_abs(bn.running_mean, before)
    record_property("measured", moved)
    assert model.head.training and not bn.training and moved == 0.0, (
        f"{_row('train() override')}: expected head in train mode and base BN untouched; "
        f"head.training={model.head.training} bn.training={bn.training} moved {moved:.3g}"
    )


def _pretrained_like_bn(seed: int = 1) -> nn.BatchNorm2d:
    rng = np.random.RandomState(seed)
    bn = nn.BatchNorm2d(C)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, C).astype(np.float32)))
        bn.bias.copy_(torch.from_numpy(rng.randn(C).astype(np.float32)))
        bn.running_mean.copy_(torch.from_numpy(rng.randn(C).astype(np.float32) + DATA_MEAN))
        bn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, C).astype(np.float32)))
    bn.num_batches_tracked.fill_(1000)
    return bn


def test_torch_frozen_bn_close_to_bn_eval_but_not_bit_exact(record_property):
    bn = _pretrained_like_bn().eval()
    frozen = FrozenBatchNorm2d(C)  # eps default 1e-5, like BatchNorm2d
    frozen.load_state_dict(bn.state_dict())
    x = torch.from_numpy(np.random.RandomState(2).randn(16, C, 8, 8).astype(np.float32))
    diff = _max_abs(frozen(x), bn(x))
    record_property("measured", diff)
    # FrozenBatchNorm2d folds the statistics into scale/shift (x * scale + shift); BN eval
    # computes (x - mean) / sqrt(var + eps) * w + b: same maths, different rounding.
    assert frozen.eps == bn.eps and 0.0 < diff <= SAME_FRAMEWORK_ATOL, (
        f"{_row('FrozenBatchNorm2d vs BatchNorm2d.eval()')}: expected close but not "
        f"bit-exact outputs, max abs diff {diff:.3g}"
    )


def test_torch_frozen_bn_load_drops_num_batches_tracked(record_property):
    bn = _pretrained_like_bn()
    frozen = FrozenBatchNorm2d(C)
    result = frozen.load_state_dict(bn.state_dict(), strict=True)  # no "unexpected key"
    keys_bn, keys_frozen = set(bn.state_dict()), set(frozen.state_dict())
    record_property("measured", ", ".join(sorted(keys_bn - keys_frozen)))
    assert keys_bn - keys_frozen == {"num_batches_tracked"} and not result.unexpected_keys, (
        f"{_row('FrozenBatchNorm2d state_dict')}: expected num_batches_tracked silently "
        f"dropped; BN-only keys {sorted(keys_bn - keys_frozen)}, load result {result}"
    )


def test_torch_requires_grad_false_does_not_disable_dropout(record_property):
    torch.manual_seed(0)
    drop = nn.Dropout(0.5)
    model = nn.Sequential(drop).requires_grad_(False)
    ones = torch.ones(4, 64)
    zeroed_train = float((model(ones) == 0).float().mean())
    zeroed_eval = float((model.eval()(ones) == 0).float().mean())
    record_property("measured", zeroed_train)
    assert zeroed_train > 0.25 and zeroed_eval == 0.0, (
        f"{_row('Dropout in a frozen base')}: expected Dropout active under requires_grad_(False) "
        f"and off after eval(); zeroed fraction train {zeroed_train:.3g} eval {zeroed_eval:.3g}"
    )


def _late_freeze_run(set_to_none: bool) -> float:
    """Train base+head with SGD momentum, then freeze the base; return how far it still moves."""
    torch.manual_seed(0)
    base, head = nn.Linear(4, 4), nn.Linear(4, 1)
    model = nn.Sequential(base, head)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.from_numpy(np.random.RandomState(0).randn(8, 4).astype(np.float32))
    y = torch.ones(8, 1)

    def step() -> None:
        optimizer.zero_grad(set_to_none=set_to_none)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    for _ in range(3):
        step()
    base.requires_grad_(False)  # the optimizer still holds the base and its momentum
    frozen_at = base.weight.detach().clone()
    step()
    return _max_abs(base.weight.detach(), frozen_at)


def test_torch_late_freeze_with_zeroed_grads_momentum_still_moves_base(record_property):
    moved = _late_freeze_run(set_to_none=False)
    record_property("measured", moved)
    assert moved > TRAP_MIN_GAP, (
        f"{_row('freezing after optimizer steps')}: expected the momentum buffer to keep "
        f"moving the 'frozen' base when grads are zeros, moved {moved:.3g}"
    )


def test_torch_late_freeze_with_none_grads_keeps_base(record_property):
    moved = _late_freeze_run(set_to_none=True)
    record_property("measured", moved)
    assert moved == 0.0, (
        f"{_row('freezing after optimizer steps')}: expected zero_grad() (set_to_none=True) "
        f"to make the optimizer skip the frozen base, moved {moved:.3g}"
    )
