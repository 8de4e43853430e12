"""Dual encoder (DE) of guided image retrieval (sibasmarak/guided-image-retrieval @59f935a src/model.py).

    v = L2norm(W_v f_img(I)),   W_v: Linear(image_dim → D)   (release: timm ResNet-50 pooled 2048-d → D)
    u = L2norm(W_t f_txt(T)),   W_t: Linear(text_dim → D)    (release: BERT pooler_output 768-d → D)
    s(I, T) = v · u

The release returns the projections un-normalised and normalises inside its loss; normalising here gives the same
NCE (utils/loss.py) and lets gallery vectors be indexed as they come. `logit_scale` (init log(1/0.07)) is read only by
the symmetric CLIP-style option; the faithful NCE has τ = 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import ConvMap
from models.losses.matching import nce_loss, symmetric_info_nce


class DualEncoder(nn.Module):
    """image_tower: images -> B × image_dim; text_tower: (tokens, lengths) -> B × text_dim.

    map_tower (optional): images -> B × C × h × w, the spatial map SIAM modulates (the release's separate "guide"
    ResNet-101 layer4; it may share modules with image_tower). Weights are loaded by the caller (no file I/O here).
    """

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, image_dim: int, text_dim: int, dim: int,
                 map_tower: nn.Module | None = None):
        super().__init__()
        self.image_tower, self.text_tower, self.map_tower = image_tower, text_tower, map_tower
        self.image_projection = nn.Linear(image_dim, dim)
        self.text_projection = nn.Linear(text_dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.dim = dim

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """v = L2norm(W_v f_img(I)): the gallery side."""
        return F.normalize(self.image_projection(self.image_tower(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """u = L2norm(W_t f_txt(T)): the query side."""
        return F.normalize(self.text_projection(self.text_tower(tokens, lengths)), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(tokens, lengths)

    def tower_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(image side, text side): the release's VisionModel (backbone + dense) and LanguageModel (BERT + dense),
        each with its own optimiser; logit_scale (not in the release) goes with the image side."""
        text = list(self.text_tower.parameters()) + list(self.text_projection.parameters())
        text_ids = {id(p) for p in text}
        image = [p for p in self.parameters() if id(p) not in text_ids]
        return image, text

    def image_map(self, images: torch.Tensor) -> torch.Tensor:
        """X = map_tower(I) ∈ R^{B×C×h×w} (SIAM's guide feature map)."""
        if self.map_tower is None:
            raise ValueError("this DualEncoder was built without a map_tower: it has no spatial feature map")
        return self.map_tower(images)

    def loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor, image_ids: torch.Tensor, tau: float = 1.0,
             symmetric: bool = False) -> torch.Tensor:
        """the release's one-way NCE (τ = tau) or the symmetric InfoNCE with learned τ."""
        if symmetric:
            return symmetric_info_nce(image_emb, text_emb, image_ids, self.logit_scale)
        return nce_loss(image_emb, text_emb, image_ids, tau)


def build(parts) -> DualEncoder:
    """models/registry.py: image tower and text tower projected to embed_dim; SIAM's guide map shares the tower."""
    d = parts.embed_dim
    image_tower = parts.vector_encoder()
    return DualEncoder(image_tower, parts.text_encoder(d), d, d, d, ConvMap(image_tower))
