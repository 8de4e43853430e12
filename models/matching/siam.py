"""SIAM, the Spatial Information Aggregator Module of guided image retrieval (sibasmarak/guided-image-retrieval;
src/model.py): a text-guided re-ranker of the dual encoder's top-K images.

    r_k = L2norm(W_roi r_k)                              (region projection, region_dim → D)
    w_k = r_k · û,  û = L2norm(DE_text(T))               (text-region weights, no softmax, as released)
    a = Σ_k w_k r_k ∈ R^D                                 (text-guided aggregate)
    α = W_α a ∈ R^h,  β = W_β a ∈ R^w,  γ = W_γ a ∈ R^C     (row / column / channel modulators)
    X' = X + α_h ⊙ X + β_w ⊙ X + γ_c ⊙ X                  (FiLM-like modulation of the guide map X ∈ R^{C×h×w})
    f = L2norm(W_img L2norm(avgpool(X')))                 (image feature, C → D)

Adaptation: the release takes 50 Faster R-CNN proposals (fc7, 1024-d) per image; no detector weights are available
offline, so the regions here are the h·w cells of a CNN feature map (`map_regions`: K = h·w regions × C).
Output normalisation: the release's SIAM code is not in the stored seed versions; f is L2-normalised here, which
changes neither the NCE (it normalises its inputs) nor the cosine re-ranking.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def map_regions(feature_map: torch.Tensor) -> torch.Tensor:
    """B × C × h × w -> B × (h·w) × C: each cell of the map is one region (row-major)."""
    return feature_map.flatten(2).transpose(1, 2)


class SIAM(nn.Module):
    """forward(regions B × K × region_dim, feature_map B × C × h × w, text_emb B × dim) -> B × dim (unit norm).

    Trainable: roi_linear, alpha_linear, beta_linear, gamma_linear, image_linear (the release's optimiser set);
    the region source, the guide map and the DE text tower are frozen inputs.
    """

    def __init__(self, region_dim: int, map_channels: int, map_size: tuple[int, int], dim: int):
        super().__init__()
        h, w = map_size
        self.roi_linear = nn.Linear(region_dim, dim)
        self.alpha_linear = nn.Linear(dim, h)
        self.beta_linear = nn.Linear(dim, w)
        self.gamma_linear = nn.Linear(dim, map_channels)
        self.image_linear = nn.Linear(map_channels, dim)
        self.map_size = (h, w)

    def aggregate(self, regions: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """a = Σ_k (r_k · û) r_k with r_k = L2norm(W_roi r_k): B × dim."""
        r = F.normalize(self.roi_linear(regions), dim=-1)  # B × K × D
        u = F.normalize(text_emb, dim=-1)
        weights = torch.einsum("bkd,bd->bk", r, u)  # w_k, no softmax
        return torch.einsum("bk,bkd->bd", weights, r)

    @staticmethod
    def modulate(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """X' = X + α_h ⊙ X + β_w ⊙ X + γ_c ⊙ X; x B × C × h × w, alpha B × h, beta B × w, gamma B × C."""
        return x + alpha[:, None, :, None] * x + beta[:, None, None, :] * x + gamma[:, :, None, None] * x

    def modulated_map(self, regions: torch.Tensor, feature_map: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        if tuple(feature_map.shape[-2:]) != self.map_size:
            raise ValueError(f"feature map is {tuple(feature_map.shape[-2:])}, SIAM was built for {self.map_size}")
        a = self.aggregate(regions, text_emb)
        return self.modulate(feature_map, self.alpha_linear(a), self.beta_linear(a), self.gamma_linear(a))

    def forward(self, regions: torch.Tensor, feature_map: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        pooled = F.normalize(self.modulated_map(regions, feature_map, text_emb).mean(dim=(2, 3)), dim=-1)
        return F.normalize(self.image_linear(pooled), dim=-1)

    def rerank_scores(self, regions: torch.Tensor, maps: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Stage 2 of the release's re-ranking: cosine between the query text and SIAM's feature of each of N candidates
        (regions N × K × R, maps N × C × h × w) -> N scores; sort descending to re-rank. text_emb is one
        query's text (dim), or one text per candidate (N × dim) to score several queries' candidates at once."""
        text = F.normalize(text_emb.reshape(-1, text_emb.shape[-1]), dim=-1).expand(maps.shape[0], -1)
        return (self(regions, maps, text) * text).sum(dim=-1)
