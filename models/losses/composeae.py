"""ComposeAE's objective (ecom-research/ComposeAE): the metric loss plus the model's reconstruction and rotational
symmetry terms (ComposeAE.auxiliary_losses).

    L = w₀ L_base + w₁ L_RI + w₂ L_RT + w₃ L_RS,   released weights (1, 0.1, 0.1, 0.01)
"""
from __future__ import annotations

import torch

RELEASED_WEIGHTS = (1.0, 0.1, 0.1, 0.01)


def total_loss(main: torch.Tensor, aux: dict[str, torch.Tensor], weights=RELEASED_WEIGHTS) -> torch.Tensor:
    w = weights
    return (w[0] * main + w[1] * aux["reconstruction_image"].float() + w[2] * aux["reconstruction_text"].float()
            + w[3] * aux["rotational_symmetry"].float())
