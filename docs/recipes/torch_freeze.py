"""Freeze a pretrained base in PyTorch, in two stages (docs/PORTING.md, "Recipes").

Stage 1 trains the new head only. Stage 2 fine-tunes the base too, with every
BatchNorm frozen: running statistics and weight/bias kept, inference mode.
Dropout inside the base stays off in both stages.
"""

import torch
from torch import nn

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class Classifier(nn.Module):
    """A pretrained base and a new head; the base stays in eval() mode."""

    def __init__(self, base, head):
        super().__init__()
        self.base = base
        self.head = head

    def forward(self, x):
        return self.head(self.base(x))

    def train(self, mode=True):
        super().train(mode)  # recurses into the base, undoing any base.eval()...
        self.base.eval()  # ...so put its BatchNorm and Dropout back in inference mode
        return self


def frozen_stage_optimizer(model, lr=1e-3):
    """Stage 1: only the head trains."""
    model.base.requires_grad_(False)  # no gradients; eval() above is what keeps BN stats
    return torch.optim.Adam(model.head.parameters(), lr=lr)


def fine_tune_stage_optimizer(model, lr=1e-5):
    """Stage 2: the base trains too; its BatchNorm layers stay frozen."""
    model.base.requires_grad_(True)
    for module in model.base.modules():
        if isinstance(module, BATCH_NORMS):
            module.requires_grad_(False)  # weight/bias; eval() keeps the running statistics
    # a NEW optimizer over trainable parameters only: a frozen parameter left in an
    # optimizer can still be moved by its momentum
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)


def train_step(model, optimizer, images, labels):
    model.train()
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss.item()
