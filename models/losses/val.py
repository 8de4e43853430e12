"""VAL's bidirectional semi-hard triplet on squared L2, summed over the levels (yanbeic/VAL@8d12749 model.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bidirectional_matching_loss(f: torch.Tensor, g: torch.Tensor, margin: float = 0.2, semi_hard: bool = True,
                  semi_hard_mode: str = "as_released") -> torch.Tensor:
    """Bidirectional hinge with semi-hard negatives on squared L2 (model.py bidirectional_matching_loss).

    L₁ = mean_i max(0, d⁺_i − min_{j≠i, kept} d(f_i, g_j) + m), L₂ the same with f and g swapped; returns L₁ + L₂.
    semi_hard_mode "as_released": negative (i, j) is dropped when d_ij < d⁺_j (TF broadcasting of the B-vector
    d⁺ over the last axis); "row": dropped when d_ij < d⁺_i. If all negatives of a row are dropped the hinge is 0.
    """
    if semi_hard_mode not in ("as_released", "row"):
        raise ValueError(f"unknown semi_hard_mode {semi_hard_mode!r}")
    f, g = F.normalize(f, dim=-1), F.normalize(g, dim=-1)
    d_pos = (f - g).pow(2).sum(-1)                                          # d⁺, B
    d_fg = (f[:, None] - g[None]).pow(2).sum(-1)                            # d(f_i, g_j), B×B
    eye = torch.eye(f.shape[0], dtype=torch.bool, device=f.device)
    inf = torch.tensor(float("inf"), device=f.device, dtype=d_fg.dtype)

    def one_direction(d_all: torch.Tensor) -> torch.Tensor:
        mask = eye
        if semi_hard:
            ref = d_pos[None, :] if semi_hard_mode == "as_released" else d_pos[:, None]
            mask = mask | (d_all < ref)
        d_neg = torch.where(mask, inf, d_all).amin(dim=1)
        return F.relu(d_pos - d_neg + margin).mean()

    return one_direction(d_fg) + one_direction(d_fg.T)                      # composite→target + target→composite


def val_loss(queries_per_level: list[torch.Tensor], targets_per_level: list[torch.Tensor], margin: float = 0.2,
             semi_hard: bool = True, semi_hard_mode: str = "as_released") -> torch.Tensor:
    """L = Σ_ℓ L^ℓ (low + mid + high), each level L2-normalised separately. Weight decay (4e-5) is left to the
    optimiser; the release adds it to the loss over slim-scoped weights."""
    return sum(bidirectional_matching_loss(f, g, margin, semi_hard, semi_hard_mode)
               for f, g in zip(queries_per_level, targets_per_level))
