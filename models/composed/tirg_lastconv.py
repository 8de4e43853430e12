"""TIRG-LastConv: TIRG's gated residual applied on the last conv map (Vo et al., CVPR 2019, §3.3 variant).

This is what GA (fuxianghuang1/GA) instantiates for `--model tirg` (class TIRGLastConv):

    X ∈ R^{B×c×h×w}  (ResNet layer4 map),   T = tile(φ_t) over h×w,   Z = [X; T]
    residual  R   = Conv3×3(m→c)(ReLU(Conv3×3(m→m)(BN2d(Z))))          (TIRG eq. 3, spatial form)
    gate      T_g = same stack, own weights                             (TIRG eq. 2, spatial form)
    X'            = a0 · σ(T_g) ⊙ X + a1 · R                             (TIRG eq. 1)
    f             = FC(avgpool(X'))                                     (composed query)

with m = c + text_dim (= 2c for GA's 512/512) and a = (1, 10, 1, 1) learnable, only a0, a1 used.
Targets use the plain image path FC(avgpool(X)).
"""
from __future__ import annotations

import torch
from torch import nn

from models.composed.tirg import NormalizationLayer


def _conv_stack(merged: int, channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(merged),
        nn.Conv2d(merged, merged, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(merged, channels, 3, padding=1),
    )


class TIRGLastConv(nn.Module):
    # The release's named_parameters() order (GA img_text_composition_models.py TIRGLastConv): its own `a` first
    # (PyTorch yields a module's own parameters before its children's), then normalization_layer, img_model (conv1 ..
    # layer4, then fc), text_model, mod2d, mod2d_gate. GA's as_released isotropic noise reads it.
    RELEASED_PARAMETER_ORDER = ("a", "normalize", "feature_extractor", "image_fc", "text_encoder", "residual", "gate")

    def __init__(self, feature_extractor: nn.Module, image_fc: nn.Module, text_encoder: nn.Module,
                 channels: int, text_dim: int, norm_scale: float):
        super().__init__()
        self.feature_extractor, self.image_fc, self.text_encoder = feature_extractor, image_fc, text_encoder
        merged = channels + text_dim
        self.a = nn.Parameter(torch.tensor([1.0, 10.0, 1.0, 1.0]))  # only a0, a1 are used
        self.residual = _conv_stack(merged, channels)  # GA `mod2d`
        self.gate = _conv_stack(merged, channels)  # GA `mod2d_gate`
        self.normalize = NormalizationLayer(norm_scale)

    def pool_fc(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Global average pool → the image model's FC."""
        return self.image_fc(feature_map.mean(dim=(2, 3)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """φ_x = FC(avgpool(X)): the target/gallery side, un-normalised."""
        return self.pool_fc(self.feature_extractor(images))

    def encode_reference(self, images: torch.Tensor) -> torch.Tensor:
        """X: the reference's last conv map, composed before pooling."""
        return self.feature_extractor(images)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """φ_t."""
        return self.text_encoder(tokens, lengths)

    def compose_maps(self, x: torch.Tensor, phi_t: torch.Tensor) -> torch.Tensor:
        """X' = a0·σ(T_g)⊙X + a1·R on the B×c×h×w map X (eq. 1)."""
        t = phi_t[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])  # tile φ_t over h×w
        z = torch.cat([x, t], dim=1)
        return self.a[0] * torch.sigmoid(self.gate(z)) * x + self.a[1] * self.residual(z)

    def compose(self, x: torch.Tensor, phi_t: torch.Tensor) -> torch.Tensor:
        """The composed query f = FC(avgpool(X')) (un-normalised)."""
        return self.pool_fc(self.compose_maps(x, phi_t))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.compose(self.encode_reference(images), self.encode_text(tokens, lengths))


def build(parts) -> TIRGLastConv:
    """models/registry.py: TIRG on the last conv map, then pool + FC."""
    d = parts.embed_dim
    trunk, channels = parts.last_map_trunk()
    return TIRGLastConv(trunk, nn.Linear(channels, d), parts.text_encoder(d), channels, d, parts.norm_scale)
