"""AMC's losses (KevinLight831/AMC@313511a model.py compute_loss): L = L_BBC + λ L_BSC."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def bbc_loss(query: torch.Tensor, target: torch.Tensor, scale: float = 10.0) -> torch.Tensor:
    """L_BBC = CE(scale · cos(f_q,i, f_t,j), labels = i); scale is the fixed constant 10 (not learned)."""
    logits = scale * F.normalize(query, dim=-1) @ F.normalize(target, dim=-1).T
    return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device))


def bsc_loss(query_graph_features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_BSC = MSE(G_q, G_t), G = X̂X̂ᵀ (B × B cosine Gram matrices, mean over all B² entries)."""
    q, t = F.normalize(query_graph_features, dim=-1), F.normalize(target, dim=-1)
    return F.mse_loss(q @ q.T, t @ t.T)


def amc_loss(pooled: Sequence[torch.Tensor], target: torch.Tensor, sim_weight: float = 1.0,
             scale: float = 10.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """pooled = [mean_k R¹, mean_k R²]; f_q = pooled[-1]; Q = concat(pooled). L = L_BBC + λ L_BSC."""
    terms = {"bbc": bbc_loss(pooled[-1], target, scale), "bsc": bsc_loss(torch.cat(list(pooled), dim=-1), target)}
    return terms["bbc"] + sim_weight * terms["bsc"], terms
