"""TIRG: Text-Image Residual Gating (Vo et al., CVPR 2019), as in google/tirg.

    f = a0 * sigmoid(g) ⊙ φ_x + a1 * r                              (TIRG eq. 1)
    g = W_g2 ReLU(BN([φ_x; φ_t]))                                    (gate, eq. 2)
    r = W_r3 ReLU(W_r2 ReLU(BN([φ_x; φ_t])))                         (residual, eq. 3)

Query f and target φ_x(target) both pass the normalisation x -> s x / |x| (s learnable, init 4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NormalizationLayer(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x.float(), dim=-1)


class TIRG(nn.Module):
    # GA's isotropic noise, as_released, weighs tensors in the release's named_parameters() order
    # (fuxianghuang1/GA img_text_composition_models.py TIRG): its own `a` first (PyTorch yields a module's own
    # parameters before its children's), then normalization_layer, img_model, text_model, the two composers
    RELEASED_PARAMETER_ORDER = ("a", "normalize", "image_encoder", "text_encoder", "gate", "residual")

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int, norm_scale: float):
        super().__init__()
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        d = embed_dim
        self.a = nn.Parameter(torch.tensor([1.0, 10.0, 1.0, 1.0]))  # only a0, a1 are used
        self.gate = nn.Sequential(nn.BatchNorm1d(2 * d), nn.ReLU(), nn.Linear(2 * d, d))
        self.residual = nn.Sequential(
            nn.BatchNorm1d(2 * d), nn.ReLU(), nn.Linear(2 * d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d)
        )
        self.normalize = NormalizationLayer(norm_scale)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """φ_x: the target/gallery side, un-normalised."""
        return self.image_encoder(images)

    encode_reference = encode_image  # the query side reads the same φ_x

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """φ_t."""
        return self.text_encoder(tokens, lengths)

    def compose(self, phi_x: torch.Tensor, phi_t: torch.Tensor) -> torch.Tensor:
        u = torch.cat([phi_x, phi_t], dim=1)
        return self.a[0] * torch.sigmoid(self.gate(u)) * phi_x + self.a[1] * self.residual(u)  # eq. 1

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The composed query f (un-normalised)."""
        return self.compose(self.encode_image(images), self.encode_text(tokens, lengths))


def build(parts) -> TIRG:
    """models/registry.py: TIRG on the image vector and the text vector (parts: stages.modeling.factory.Parts)."""
    d = parts.embed_dim
    return TIRG(parts.vector_encoder(), parts.text_encoder(d), d, parts.norm_scale)
