"""Metric losses on normalised queries q̂ (B x d) and targets t̂ (B x d): TIRG's (google/tirg) and the offline hinge."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_based_classification(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """TIRG's BBC loss: -1/B Σ_i log softmax_j(q̂_i · t̂_j)[i]; logits are s²·cos."""
    logits = q @ t.T
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def soft_triplet(q: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None,
                 negatives_per_anchor: int = 3) -> torch.Tensor:
    """TIRG's soft triplet loss over Z = [q̂; t̂]: mean log(1 + exp(D(a,p) - D(a,n))), D = squared L2.

    Each anchor's positive is its partner in the other modality; `negatives_per_anchor` random
    elements of other labels are its negatives (google/tirg keeps 3 per anchor).
    """
    b = q.shape[0]
    z = torch.cat([q, t])
    labels = torch.arange(b, device=z.device).repeat(2)
    d = torch.cdist(z, z).pow(2)
    anchors = torch.arange(2 * b, device=z.device)
    positives = (anchors + b) % (2 * b)
    # sample negatives uniformly among the 2B-2 elements whose label differs
    scores = torch.rand(2 * b, 2 * b, generator=generator, device="cpu").to(z.device)
    scores[labels[:, None] == labels[None, :]] = -1.0
    negatives = scores.topk(negatives_per_anchor, dim=1).indices
    d_ap = d[anchors, positives][:, None]
    d_an = d[anchors[:, None], negatives]
    return F.softplus(d_ap - d_an).mean()


def offline_negative_hinge(q: torch.Tensor, t: torch.Tensor, n: torch.Tensor, margin: float) -> torch.Tensor:
    """Hinge on cosine: mean over (i, k) of max(0, m - cos(q_i, t_i) + cos(q_i, n_ik)).

    n holds K mined hard negatives per query (B x K x d).
    """
    q, t, n = F.normalize(q, dim=-1), F.normalize(t, dim=-1), F.normalize(n, dim=-1)
    pos = (q * t).sum(-1, keepdim=True)
    neg = torch.einsum("bd,bkd->bk", q, n)
    return F.relu(margin - pos + neg).mean()


class _HalfGradient(torch.autograd.Function):
    """Identity forward, gradient × 0.5 backward (google/tirg@c58daa0 torch_functions.py, the soft-triplet backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return 0.5 * grad


def metric_loss(cfg, q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """bbc or soft_triplet (`cfg.name`, the `loss` section) on normalised q̂, t̂, with the GA repo's MSE term when
    ga_mse_weight > 0."""
    if cfg.name == "bbc":
        loss = batch_based_classification(q, t)
    else:
        loss = soft_triplet(q, t)
        if cfg.soft_triplet_half_gradient:
            loss = _HalfGradient.apply(loss)
    if cfg.ga_mse_weight:
        loss = loss + cfg.ga_mse_weight * F.mse_loss(q, t)
    return loss
