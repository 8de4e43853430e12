"""An exponential moving average of the weights, saved as the model (AMC's utils.py EMA)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    """utils.py EMA of trainable parameters: shadow ← decay·shadow + (1 − decay)·θ after every step.

    `apply_shadow()` swaps the averages in for evaluation; `restore()` puts the raw weights back.
    The release calls apply_shadow() each epoch and never restore() (train continues from the EMA
    weights): reproduce with `average_for_eval(restore=False)`; the default restores.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.model, self.decay = model, decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.backup: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.model.named_parameters():
            if n in self.shadow:
                self.shadow[n] = (1.0 - self.decay) * p.detach() + self.decay * self.shadow[n]

    @torch.no_grad()
    def apply_shadow(self) -> None:
        for n, p in self.model.named_parameters():
            if n in self.shadow:
                self.backup[n] = p.detach().clone()
                p.copy_(self.shadow[n])

    @torch.no_grad()
    def restore(self) -> None:
        for n, p in self.model.named_parameters():
            if n in self.backup:
                p.copy_(self.backup[n])
        self.backup = {}

    @contextlib.contextmanager
    def average_for_eval(self, restore: bool = True):
        """EMA weights inside the block; afterwards the raw weights come back unless restore=False (release quirk)."""
        self.apply_shadow()
        try:
            yield self.model
        finally:
            if restore:
                self.restore()
            else:
                self.backup = {}
